//! ACME (SPEC §5, RFC 8555): every enabled logon address that no valid certificate covers
//! gets one from the CA, answered with http-01 on the HTTP listener. Orders run one at a time
//! in the background; a failure is logged with the CA's reason, keeps whatever serves, and
//! backs off per host (1 s doubling to 1 h). An issued certificate (chain and key, 0600) is
//! written atomically under `storage/certs/` and served after a reload; uploaded ones win for
//! the names they cover (`config::table`). The account is kept in `storage/account.json` and
//! reused after a restart.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tokio::sync::watch;

use crate::config::table::Table;
use crate::config::{Acme, Edition};
use crate::state::Gateway;

/// How often the table is looked at for addresses that need a certificate.
const LOOK_EVERY: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Why an order failed, in the CA's words where it gave them.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("the ACME CA said")]
    Ca(#[from] instant_acme::Error),
    #[error("{0}")]
    Order(String),
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the key or CSR")]
    Csr(#[from] rcgen::Error),
}

/// The enabled logon addresses (edition allowing) that no valid certificate covers, and
/// those served with one the CA issued that has a third of its lifetime left or less (an
/// uploaded certificate is never renewed here: it wins until it expires).
pub fn wanted(table: &Table) -> Vec<String> {
    let now = crate::config::certs::unix_now();
    let acme_dir = table.settings.acme.as_ref().map(|a| a.certs_dir());
    let due = |c: &crate::config::certs::CertEntry| {
        let issued = acme_dir.as_ref().is_some_and(|d| c.path.starts_with(d));
        let renew_at = c.not_after - (c.not_after - c.not_before) / 3;
        c.not_after <= now || (issued && now >= renew_at)
    };
    table
        .tenants
        .iter()
        .filter(|t| t.edition != Edition::Free)
        .flat_map(|t| t.logons.iter().filter(|l| l.enabled))
        .map(|l| l.host.as_str())
        .filter(|h| table.cert_for(h).is_none_or(|c| due(c)))
        .map(str::to_owned)
        .collect()
}

/// Runs until `stop`: orders what [`wanted`] names, one host at a time.
pub async fn run(gw: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let mut account: Option<Account> = None;
    let mut backoff: HashMap<String, (Instant, Duration)> = HashMap::new();
    loop {
        let snap = gw.snapshot();
        if let Some(acme) = snap.table.settings.acme.clone() {
            for host in wanted(&snap.table) {
                if backoff
                    .get(&host)
                    .is_some_and(|(at, _)| Instant::now() < *at)
                {
                    continue;
                }
                let attempt = async {
                    if account.is_none() {
                        account = Some(load_or_create(&acme).await?);
                    }
                    match account.as_ref() {
                        Some(a) => order(&gw, &acme, a, &host).await,
                        None => Err(AcmeError::Order("no ACME account".into())),
                    }
                };
                // A shutdown does not wait for an order under way (it is asked again after
                // the next start).
                let result = tokio::select! {
                    _ = crate::state::stopped(&mut stop) => return,
                    r = attempt => r,
                };
                let label = if result.is_ok() { "ok" } else { "failed" };
                let said = result.as_ref().err().map(|e| crate::error::sentence(e));
                if let Err(e) = record(&acme, &host, said.as_deref()) {
                    tracing::warn!(error = %crate::error::sentence(&e), "cannot record the ACME state");
                }
                gw.metrics
                    .acme_orders
                    .get_or_create(&crate::telemetry::metrics::ResultLabel { result: label })
                    .inc();
                match result {
                    Ok(()) => {
                        backoff.remove(&host);
                        tracing::info!(%host, "certificate issued by the ACME CA");
                        let g = gw.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            crate::control::reload::reload_now(&g)
                        })
                        .await;
                    }
                    Err(e) => {
                        let wait = backoff
                            .get(&host)
                            .map_or(FIRST_BACKOFF, |(_, w)| (*w * 2).min(MAX_BACKOFF));
                        backoff.insert(host.clone(), (Instant::now() + wait, wait));
                        tracing::warn!(%host, error = %crate::error::sentence(&e), retry_in = ?wait, "ACME order failed");
                    }
                }
            }
        }
        tokio::select! {
            _ = crate::state::stopped(&mut stop) => return,
            _ = tokio::time::sleep(LOOK_EVERY) => {}
        }
    }
}

/// Records the last order's outcome for `host` in `storage/state.json` (for `cert status`):
/// `None` for success, else the reason.
fn record(acme: &Acme, host: &str, failed: Option<&str>) -> Result<(), AcmeError> {
    let file = acme.storage.join(crate::config::ACME_STATE_FILE);
    let mut state: serde_json::Map<String, serde_json::Value> = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let entry = match failed {
        None => serde_json::json!({"state": "valid", "at": crate::config::certs::unix_now()}),
        Some(why) => serde_json::json!({
            "state": "failed", "reason": why, "at": crate::config::certs::unix_now()
        }),
    };
    state.insert(host.to_owned(), entry);
    let bytes = serde_json::to_vec_pretty(&state).map_err(|e| AcmeError::Order(e.to_string()))?;
    write_private(&file, &bytes)
}

/// The account in `storage/account.json`, or a new one (saved there, 0600).
async fn load_or_create(acme: &Acme) -> Result<Account, AcmeError> {
    let builder = match &acme.directory_ca {
        Some(ca) => Account::builder_with_root(ca)?,
        None => Account::builder()?,
    };
    let file = acme.storage.join("account.json");
    if let Ok(text) = std::fs::read_to_string(&file)
        && let Ok(creds) = serde_json::from_str::<AccountCredentials>(&text)
    {
        return Ok(builder.from_credentials(creds).await?);
    }
    if acme.eab.is_some() {
        return Err(AcmeError::Order(
            "External Account Binding is not supported yet".into(),
        ));
    }
    let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
    let (account, creds) = builder
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            acme.directory.clone(),
            None,
        )
        .await?;
    let json = serde_json::to_vec(&creds).map_err(|e| AcmeError::Order(e.to_string()))?;
    write_private(&file, &json)?;
    Ok(account)
}

/// One order for `host`, through http-01; writes the certificate on success.
async fn order(gw: &Gateway, acme: &Acme, account: &Account, host: &str) -> Result<(), AcmeError> {
    if !acme.http01 {
        return Err(AcmeError::Order(
            "only http-01 is answered yet; add it to acme.challenges".into(),
        ));
    }
    let ids = [Identifier::Dns(host.to_owned())];
    let mut order = account.new_order(&NewOrder::new(&ids)).await?;
    let mut tokens = Vec::new();
    let result = async {
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(AcmeError::Order(format!("authorization is {other:?}"))),
            }
            let mut challenge = authz
                .challenge(ChallengeType::Http01)
                .ok_or_else(|| AcmeError::Order("the CA offers no http-01 challenge".into()))?;
            let answer = challenge.key_authorization().as_str().to_owned();
            tokens.push(challenge.token.clone());
            gw.acme_tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(challenge.token.clone(), answer);
            challenge.set_ready().await?;
        }
        let status = order.poll_ready(&RetryPolicy::default()).await?;
        if status != OrderStatus::Ready {
            let why = order
                .state()
                .error
                .as_ref()
                .and_then(|p| p.detail.clone())
                .unwrap_or_else(|| format!("the order is {status:?}"));
            return Err(AcmeError::Order(why));
        }
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::new(vec![host.to_owned()])?.serialize_request(&key)?;
        order.finalize_csr(csr.der()).await?;
        let chain = order.poll_certificate(&RetryPolicy::default()).await?;
        let pem = format!("{chain}{}", key.serialize_pem());
        write_private(
            &acme.certs_dir().join(format!("{host}.pem")),
            pem.as_bytes(),
        )
    }
    .await;
    let mut answers = gw.acme_tokens.lock().unwrap_or_else(|p| p.into_inner());
    for t in &tokens {
        answers.remove(t);
    }
    result
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, fsync, rename), mode
/// 0600, making the folder if needed.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    use std::io::Write as _;
    let io = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| AcmeError::Io { what, path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("make the folder of"))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".logon-gate-")
        .tempfile_in(dir)
        .map_err(io("write"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io("set the mode of"))?;
    }
    tmp.write_all(bytes).map_err(io("write"))?;
    tmp.as_file().sync_all().map_err(io("sync"))?;
    tmp.persist(path).map_err(|e| io("replace")(e.error))?;
    Ok(())
}
