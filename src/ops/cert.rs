//! `cert install HOST --cert F --key F [--force]`: validate a certificate and key (parse, key
//! matches, covers HOST, not expired; warn under 30 days) and install them into certs/ as one
//! file written atomically with mode 0600, so the gateway never sees half a pair.

use std::path::Path;

use super::OpError;
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
