//! `cert install HOST --cert F --key F [--force]`: validate a certificate and key (parse, key
//! matches, covers HOST, not expired; warn under 30 days) and install them into certs/ as one
//! file written atomically with mode 0600, so the gateway never sees half a pair.

use std::path::Path;

use super::OpError;

/// One logon address's certificate facts, as `cert status` shows them (SPEC §5).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertStatus {
    pub host: String,
    /// `uploaded`, `acme`, or `none`.
    pub source: &'static str,
    /// `YYYY-MM-DD` of the certificate served, if any.
    pub expires: Option<String>,
    /// `pending`, `valid`, `failed: <reason>`, or `-` (no `[acme]`, or not wanted).
    pub acme: String,
}

/// Every logon address (or only `host`) with the source and expiry of the certificate that
/// would serve it, and its ACME state as the gateway last recorded it.
pub fn status(config: &Path, host: Option<&str>) -> Result<Vec<CertStatus>, OpError> {
    let only = host
        .map(|h| {
            HostName::from_user(h)
                .map_err(|e| OpError::Refused(format!("`{h}` is not a valid host name: {e}")))
        })
        .transpose()?;
    let mut loader = crate::config::table::Loader::new(crate::config::crypto_provider());
    let table = super::edit::load(&mut loader, config)?;
    let acme = table.settings.acme.as_ref();
    let recorded: serde_json::Value = acme
        .and_then(|a| std::fs::read(a.storage.join(crate::config::ACME_STATE_FILE)).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let now = crate::config::certs::unix_now();
    let mut rows = Vec::new();
    for t in &table.tenants {
        for l in &t.logons {
            let name = l.host.as_str();
            if only.as_ref().is_some_and(|h| h.as_str() != name) {
                continue;
            }
            let cert = table.cert_for(name).filter(|c| c.not_after > now);
            let issued =
                |c: &certs::CertEntry| acme.is_some_and(|a| c.path.starts_with(a.certs_dir()));
            let source = match cert {
                Some(c) if issued(c) => "acme",
                Some(_) => "uploaded",
                None => "none",
            };
            let wanted = l.enabled && t.edition != crate::config::Edition::Free;
            let last = &recorded[name];
            let state = match (acme, cert) {
                (None, _) => "-".to_string(),
                (Some(_), Some(c)) if issued(c) => "valid".to_string(),
                (Some(_), Some(_)) => "-".to_string(),
                (Some(_), None) if !wanted => "-".to_string(),
                (Some(_), None) if last["state"] == "failed" => {
                    format!("failed: {}", last["reason"].as_str().unwrap_or("unknown"))
                }
                (Some(_), None) => "pending".to_string(),
            };
            rows.push(CertStatus {
                host: name.to_owned(),
                source,
                expires: cert.map(|c| super::lifecycle::date(c.not_after)),
                acme: state,
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
            r.source,
            r.expires.as_deref().unwrap_or("-"),
            r.acme
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
