//! `store import` and `store export DIR` (SPEC §6): the files of `[paths]` into the etcd
//! store, and the store back out as the files of §2 with a gateway.toml that `check` takes.

use std::path::Path;

use super::OpError;

/// The `[store]` of `config`, which must be etcd.
#[cfg(feature = "etcd")]
fn etcd_of(config: &Path) -> Result<(crate::config::Settings, crate::config::EtcdStore), OpError> {
    let src = crate::config::Source::read(config).map_err(|e| OpError::Refused(e.to_string()))?;
    let (settings, _) = crate::config::load_gateway(&src).map_err(|e| {
        OpError::Refused(
            e.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let store = settings.etcd.clone().ok_or_else(|| {
        OpError::Refused(format!(
            "{} has no [store] kind = \"etcd\": its files are the store already",
            config.display()
        ))
    })?;
    Ok((settings, store))
}

/// Copies the tenant and certificate files of `[paths]` into the store; returns what to print.
pub async fn import(config: &Path) -> Result<String, OpError> {
    #[cfg(feature = "etcd")]
    {
        let (settings, store) = etcd_of(config)?;
        let mirror = crate::store::Mirror::of(&settings);
        let n = crate::store::etcd::import(&store, &mirror)
            .await
            .map_err(|e| OpError::Refused(crate::error::sentence(&e)))?;
        Ok(format!(
            "imported {n} files from {} and {} under {}",
            mirror.tenants.display(),
            mirror.certs.display(),
            store.prefix
        ))
    }
    #[cfg(not(feature = "etcd"))]
    Err(no_etcd(config))
}

/// Writes the store out under `dir` as `tenants/`, `certs/` and a `gateway.toml` (this one's,
/// with `[store]` removed and `[paths]` pointing there); returns what to print.
pub async fn export(config: &Path, dir: &Path) -> Result<String, OpError> {
    #[cfg(feature = "etcd")]
    {
        let (_, store) = etcd_of(config)?;
        let mut client = crate::store::etcd::connect(&store)
            .await
            .map_err(|e| OpError::Refused(crate::error::sentence(&e)))?;
        let (entries, revision) = crate::store::etcd::snapshot(&mut client, &store)
            .await
            .map_err(|e| OpError::Refused(crate::error::sentence(&e)))?;
        let mirror = crate::store::Mirror {
            tenants: dir.join("tenants"),
            certs: dir.join("certs"),
        };
        for d in [&mirror.tenants, &mirror.certs] {
            std::fs::create_dir_all(d).map_err(OpError::io("make the folder", d))?;
        }
        mirror
            .replace_all(&entries)
            .map_err(|e| OpError::Refused(crate::error::sentence(&e)))?;
        let text = std::fs::read_to_string(config).map_err(OpError::io("read", config))?;
        let mut doc = text
            .parse::<toml_edit::DocumentMut>()
            .map_err(|e| OpError::Refused(format!("{}: {}", config.display(), e.message())))?;
        doc.remove("store");
        doc["paths"]["tenants"] = toml_edit::value("tenants");
        doc["paths"]["certs"] = toml_edit::value("certs");
        let out = dir.join("gateway.toml");
        super::edit::write_atomic(&out, doc.to_string().as_bytes(), 0o644)?;
        Ok(format!(
            "exported {} entries at revision {revision} to {}",
            entries.len(),
            dir.display()
        ))
    }
    #[cfg(not(feature = "etcd"))]
    {
        let _ = dir;
        Err(no_etcd(config))
    }
}

#[cfg(not(feature = "etcd"))]
fn no_etcd(config: &Path) -> OpError {
    OpError::Refused(format!(
        "this logon-gate was built without etcd (build with `--features etcd`), so {} cannot name an etcd store",
        config.display()
    ))
}
