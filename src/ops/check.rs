//! `logon-gate check`: validate config and certificates like `nginx -t`, and summarise.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::ConfigError;
use crate::config::table::{Loader, Table};

/// Validates the configuration at `path` and returns the table, or every error found. With
/// `[acme]`, its storage folder must be writable too (the gateway makes it if missing).
pub fn check(path: &Path) -> Result<Table, Vec<ConfigError>> {
    let table = Loader::new(crate::config::crypto_provider()).load(path)?;
    if let Some(acme) = &table.settings.acme {
        let writable = std::fs::create_dir_all(&acme.storage)
            .and_then(|()| tempfile::tempfile_in(&acme.storage).map(drop));
        if let Err(e) = writable {
            return Err(vec![ConfigError::file(
                path,
                format!("acme.storage: cannot write {}: {e}", acme.storage.display()),
            )]);
        }
    }
    Ok(table)
}

/// The short summary `check` prints for a valid configuration.
pub fn summary(path: &Path, table: &Table) -> String {
    let mut out = String::new();
    let logons: usize = table.tenants.iter().map(|t| t.logons.len()).sum();
    let enabled: usize = table
        .tenants
        .iter()
        .map(|t| t.logons.iter().filter(|l| l.enabled).count())
        .sum();
    let _ = writeln!(out, "{}: configuration is valid", path.display());
    let _ = writeln!(
        out,
        "  tenants: {}, logon addresses: {logons} ({enabled} enabled), platform hosts: {}",
        table.tenants.len(),
        table.platform_hosts.len()
    );
    let _ = writeln!(out, "  certificates: {}", table.certs.len());
    let mut certs: Vec<_> = table.certs.iter().collect();
    certs.sort_by_key(|c| c.not_after);
    for c in certs {
        let _ = writeln!(
            out,
            "    {}  {}  expires in {} days",
            c.path.display(),
            c.names.join(","),
            c.days_left()
        );
    }
    for w in &table.warnings {
        let _ = writeln!(out, "  warning: {w}");
    }
    out
}
