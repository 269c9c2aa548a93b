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

/// Retries of an edit whose transaction lost a race with another edit.
#[cfg(feature = "etcd")]
const EDIT_ATTEMPTS: usize = 8;

/// One edit of a tenant against the etcd store (SPEC §6), as `edit::edit_tenant_file` does it
/// against files: `change` gets the table the store holds now (loaded from a private copy,
/// never the gateway's) and returns the tenant file to write, its text and the message. The
/// whole result is validated like a file edit, then written in one transaction guarded by the
/// revision read: it applies only if no tenant changed meanwhile, else it is made again from
/// the new state. Edits from any number of machines are so never lost, and the rules that span
/// tenants (a host in one tenant only) hold under races.
#[cfg(feature = "etcd")]
pub fn edit_tenant<F>(
    config: &Path,
    store: &crate::config::EtcdStore,
    mut change: F,
) -> Result<String, OpError>
where
    F: FnMut(&crate::config::table::Table) -> Result<(std::path::PathBuf, String, String), OpError>,
{
    let refused = |e: crate::store::etcd::StoreError| OpError::Refused(crate::error::sentence(&e));
    let text = std::fs::read_to_string(config).map_err(OpError::io("read", config))?;
    for _ in 0..EDIT_ATTEMPTS {
        let (entries, revision) = on_etcd(|| async {
            let mut client = crate::store::etcd::connect(store).await?;
            crate::store::etcd::snapshot(&mut client, store).await
        })
        .map_err(refused)?;
        let copy =
            tempfile::tempdir().map_err(OpError::io("make a folder in", Path::new("/tmp")))?;
        let gateway = private_copy(copy.path(), &text, &entries, config)?;
        let mut loader = crate::config::table::Loader::new(crate::config::crypto_provider());
        let table = super::edit::load(&mut loader, &gateway)?;
        let (path, new_text, message) = change(&table)?;
        let overrides = std::collections::HashMap::from([(path.clone(), new_text.clone())]);
        if let Err(errors) = loader.load_with(&gateway, &overrides) {
            return Err(OpError::Refused(format!(
                "refused: the change would make the configuration invalid: {}",
                errors[0]
            )));
        }
        let entry = crate::store::Entry::of_file(&table.settings, &path)
            .ok_or_else(|| OpError::Refused(format!("{} is not a tenant file", path.display())))?;
        // Applies only if no tenant key changed since the snapshot (a range compare over
        // the whole tenants/ prefix).
        let txn = etcd_client::Txn::new()
            .when([etcd_client::Compare::mod_revision(
                format!("{}tenants/", store.prefix),
                etcd_client::CompareOp::Less,
                revision + 1,
            )
            .with_prefix()])
            .and_then([etcd_client::TxnOp::put(
                entry.key(&store.prefix),
                new_text,
                None,
            )]);
        let applied = on_etcd(|| async {
            let mut client = crate::store::etcd::connect(store).await?;
            client
                .txn(txn)
                .await
                .map(|r| r.succeeded())
                .map_err(|source| crate::store::etcd::StoreError::Etcd {
                    endpoints: store.endpoints.join(", "),
                    source,
                })
        })
        .map_err(refused)?;
        if applied {
            return Ok(message);
        }
    }
    Err(OpError::Refused(format!(
        "another edit won the race {EDIT_ATTEMPTS} times in a row; try again"
    )))
}

/// Runs `f`'s future to its end on a thread of its own with its own runtime: the caller may
/// be inside a runtime already (`domain verify`), and the edit around it is synchronous.
#[cfg(feature = "etcd")]
fn on_etcd<T, Fut>(f: impl FnOnce() -> Fut + Send) -> Result<T, crate::store::etcd::StoreError>
where
    T: Send,
    Fut: std::future::Future<Output = Result<T, crate::store::etcd::StoreError>>,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| crate::store::etcd::StoreError::Read {
                        path: "a runtime".into(),
                        source,
                    })?;
                rt.block_on(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Writes `entries` and a gateway.toml (`text` with `[store]` removed and `[paths]` pointing
/// there) under `dir`; returns that gateway.toml.
#[cfg(feature = "etcd")]
fn private_copy(
    dir: &Path,
    text: &str,
    entries: &std::collections::HashMap<crate::store::Entry, Vec<u8>>,
    config: &Path,
) -> Result<std::path::PathBuf, OpError> {
    let copy = crate::store::Mirror {
        tenants: dir.join("tenants"),
        certs: dir.join("certs"),
    };
    for d in [&copy.tenants, &copy.certs] {
        std::fs::create_dir_all(d).map_err(OpError::io("make the folder", d))?;
    }
    copy.replace_all(entries)
        .map_err(|e| OpError::Refused(crate::error::sentence(&e)))?;
    let mut doc = text
        .parse::<toml_edit::DocumentMut>()
        .map_err(|e| OpError::Refused(format!("{}: {}", config.display(), e.message())))?;
    doc.remove("store");
    doc["paths"]["tenants"] = toml_edit::value(copy.tenants.display().to_string());
    doc["paths"]["certs"] = toml_edit::value(copy.certs.display().to_string());
    let gateway = dir.join("gateway.toml");
    std::fs::write(&gateway, doc.to_string()).map_err(OpError::io("write", &gateway))?;
    Ok(gateway)
}
