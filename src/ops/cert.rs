//! `cert install HOST --cert F --key F [--force]`: validate a certificate and key (parse, key
//! matches, covers HOST, not expired; warn under 30 days) and install them into certs/ as one
//! file written atomically with mode 0600, so the gateway never sees half a pair.

use std::path::Path;

use super::OpError;

/// One logon address's certificate facts, as `cert status` shows them (SPEC §5).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertStatus {
    pub host: String,
    #[serde(flatten)]
    pub facts: crate::acme::CertFacts,
}

/// Every logon address (or only `host`) with the source and expiry of the certificate that
/// would serve it, and its ACME state as last recorded in storage.
pub fn status(config: &Path, host: Option<&str>) -> Result<Vec<CertStatus>, OpError> {
    let only = host
        .map(|h| {
            HostName::from_user(h)
                .map_err(|e| OpError::Refused(format!("`{h}` is not a valid host name: {e}")))
        })
        .transpose()?;
    let mut loader = crate::config::table::Loader::new(crate::config::crypto_provider());
    let table = super::edit::load(&mut loader, config)?;
    let mut rows = Vec::new();
    for t in &table.tenants {
        for l in &t.logons {
            if only.as_ref().is_some_and(|h| *h != l.host) {
                continue;
            }
            rows.push(CertStatus {
                host: l.host.to_string(),
                facts: crate::acme::facts(&table, t, l),
            });
        }
    }
    if let Some(h) = &only
        && rows.is_empty()
    {
        return Err(OpError::Refused(format!(
            "{h} is not a logon address of any tenant"
        )));
    }
    rows.sort_by(|a, b| a.host.cmp(&b.host));
    Ok(rows)
}

/// `cert status` rows as an aligned text table.
pub fn render_status(rows: &[CertStatus]) -> String {
    let width = rows.iter().map(|r| r.host.len()).max().unwrap_or(4).max(4);
    let mut out = format!(
        "{:width$}  {:8}  {:10}  ACME\n",
        "HOST", "SOURCE", "EXPIRES"
    );
    for r in rows {
        out.push_str(&format!(
            "{:width$}  {:8}  {:10}  {}\n",
            r.host,
            r.facts.source,
            r.facts.expires.as_deref().unwrap_or("-"),
            match &r.facts.retry_at {
                Some(at) => format!("{} (next try {at} UTC)", r.facts.acme),
                None => r.facts.acme.clone(),
            }
        ));
    }
    out
}
use super::edit;
use crate::config::certs;
use crate::config::host::HostName;

/// Days of validity under which `cert install` warns.
pub const WARN_DAYS: i64 = 30;

/// Installs the pair; returns the lines to print (the last one says where it went).
pub fn install(
    config: &Path,
    host: &str,
    cert: &Path,
    key: &Path,
    force: bool,
) -> Result<Vec<String>, OpError> {
    let host = HostName::from_user(host)
        .map_err(|e| OpError::Refused(format!("`{host}` is not a valid host name: {e}")))?;
    let read = |p: &Path, what: &'static str| std::fs::read(p).map_err(OpError::io(what, p));
    let cert_pem = read(cert, "read the certificate file")?;
    let key_pem = read(key, "read the key file")?;
    let provider = crate::config::crypto_provider();
    let entry = certs::load_pair(&cert_pem, &key_pem, &provider)
        .map_err(|e| OpError::Refused(format!("{} / {}: {e}", cert.display(), key.display())))?;
    if !entry.covers(host.as_str()) {
        return Err(OpError::Refused(format!(
            "{} does not cover {host} (its names: {})",
            cert.display(),
            entry.names.join(", ")
        )));
    }
    let mut out = Vec::new();
    let days = entry.days_left();
    if days < WARN_DAYS {
        out.push(format!("warning: the certificate expires in {days} days"));
    }

    let _lock = edit::lock(config)?;
    let mut loader = crate::config::table::Loader::new(provider);
    let table = edit::load(&mut loader, config)?;
    edit::not_etcd(&table, config)?;
    let dest = table.settings.certs_dir.join(format!("{host}.pem"));
    let new_leaf = entry
        .key
        .end_entity_cert()
        .ok()
        .map(|c| c.as_ref().to_vec());
    if let Some(existing) = table.certs.iter().find(|c| c.path == dest) {
        let old_leaf = existing
            .key
            .end_entity_cert()
            .ok()
            .map(|c| c.as_ref().to_vec());
        if old_leaf != new_leaf && !force {
            return Err(OpError::Refused(format!(
                "{} already holds a different valid certificate for {host} (expires in {} days); use --force to replace it",
                dest.display(),
                existing.days_left()
            )));
        }
    }
    if let Some(other) = table.cert_for(host.as_str())
        && other.path != dest
        && other.not_after > entry.not_after
    {
        out.push(format!(
            "note: {} also covers {host} and expires later, so it stays the one served",
            other.path.display()
        ));
    }
    let mut pem = String::from_utf8_lossy(&cert_pem).trim_end().to_string();
    pem.push('\n');
    pem.push_str(String::from_utf8_lossy(&key_pem).trim_end());
    pem.push('\n');
    edit::write_atomic(&dest, pem.as_bytes(), 0o600)?;
    out.push(format!(
        "installed the certificate for {host} (expires in {days} days) as {}",
        dest.display()
    ));
    Ok(out)
}

/// How often `cert issue` looks whether another orderer has let go of the host.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// `cert issue HOST`: orders a certificate for HOST from the ACME CA now and waits (SPEC §5).
/// HOST must be enabled, its CNAME must still reach `cname_target`, and no uploaded
/// certificate may cover it (that one wins). The running gateway answers the CA's challenge
/// from storage and serves the result once it is written. If the gateway is ordering for HOST
/// already, this waits for that order and reports it. Returns the lines to print.
pub async fn issue(config: &Path, host: &str) -> Result<Vec<String>, OpError> {
    let name = HostName::from_user(host)
        .map_err(|e| OpError::Refused(format!("`{host}` is not a valid host name: {e}")))?;
    let host = name.as_str();
    let mut loader = crate::config::table::Loader::new(crate::config::crypto_provider());
    let table = super::edit::load(&mut loader, config)?;
    let Some(acme) = table.settings.acme.clone() else {
        return Err(OpError::Refused(format!(
            "{} has no [acme] table, so there is no CA to order from",
            config.display()
        )));
    };
    if !table
        .tenants
        .iter()
        .any(|t| t.logons.iter().any(|l| l.host == name))
    {
        return Err(OpError::Refused(format!(
            "{host} is not a logon address of any tenant"
        )));
    }
    crate::acme::ready_to_order(&table, &acme, host)
        .await
        .map_err(|e| OpError::Refused(format!("{host}: {}", crate::error::sentence(&e))))?;
    if let Some(c) = table
        .cert_for(host)
        .filter(|c| c.not_after > certs::unix_now())
        && !crate::acme::is_issued(&table, c)
    {
        return Err(OpError::Refused(format!(
            "{} is an uploaded certificate for {host} and wins over ACME until it expires ({})",
            c.path.display(),
            certs::date(c.not_after)
        )));
    }
    let storage = crate::acme::Storage::of(&acme);
    let acme_err = |e: crate::acme::AcmeError| {
        OpError::Refused(format!("{host}: {}", crate::error::sentence(&e)))
    };
    let started = certs::unix_now();
    let deadline = std::time::Instant::now() + crate::acme::order::ORDER_DEADLINE;
    let mut waited = false;
    let _lock = loop {
        if let Some(lock) = storage.lock(host).map_err(acme_err)? {
            break lock;
        }
        if std::time::Instant::now() > deadline {
            return Err(OpError::Refused(format!(
                "{host}: another order has held {} for longer than an order may take",
                storage.dir().join("locks").join(host).display()
            )));
        }
        waited = true;
        tokio::time::sleep(LOCK_POLL).await;
    };
    // The gateway ordered it while this waited: that order is the answer.
    if waited && let Some(s) = storage.state(host).filter(|s| s.at >= started) {
        return match s.reason {
            None => Ok(vec![format!(
                "the gateway issued a certificate for {host} meanwhile, as {}",
                storage.cert_file(host).display()
            )]),
            Some(why) => Err(OpError::Refused(format!("{host}: the order failed: {why}"))),
        };
    }
    let client = crate::acme::Client::open(&acme, &storage)
        .await
        .map_err(acme_err)?;
    let outcome = client.issue(&acme, &storage, host, 0).await;
    let now = certs::unix_now();
    let (state, result) = match outcome.result {
        Ok(issued) => (
            crate::acme::HostState {
                state: "valid".into(),
                at: now,
                renew_at: issued.renew_at,
                renew_serial: issued.renew_at.map(|_| issued.serial),
                ..Default::default()
            },
            Ok(()),
        ),
        Err(e) => {
            let reason = crate::error::sentence(&e);
            let previous = storage.state(host).map_or(0, |s| s.failures);
            let wait = crate::acme::backoff(previous + 1, outcome.retry_after, e.rate_limited());
            (
                crate::acme::HostState {
                    state: "failed".into(),
                    reason: Some(reason.clone()),
                    at: now,
                    failures: previous + 1,
                    retry_at: Some(now + wait.as_secs() as i64),
                    ..Default::default()
                },
                Err(OpError::Refused(format!(
                    "{host}: the order failed: {reason}"
                ))),
            )
        }
    };
    storage.set_state(host, &state).map_err(acme_err)?;
    result?;
    let file = storage.cert_file(host);
    let expires = std::fs::read(&file)
        .ok()
        .and_then(|pem| certs::load_pair(&pem, &pem, &crate::config::crypto_provider()).ok())
        .map_or_else(|| "?".to_owned(), |e| certs::date(e.not_after));
    Ok(vec![format!(
        "issued a certificate for {host} (expires {expires}) as {}",
        file.display()
    )])
}
