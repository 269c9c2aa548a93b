//! Safe edits of config files: an exclusive lock held across read-modify-write (so concurrent
//! operators never lose an edit), a temporary file in the same folder, fsync, rename, fsync of
//! the folder (so a crash leaves the old or the new file, never half of one), and toml_edit
//! helpers that keep the operator's comments and layout.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Value};

use super::OpError;
use crate::config::table::{Loader, Table};

/// The lock file, beside gateway.toml; its leading dot keeps it out of the loader's sight.
const LOCK_FILE: &str = ".logon-gate.lock";

/// Holds the configuration's exclusive lock until dropped.
pub struct ConfigLock {
    _file: File,
}

/// Takes the exclusive lock of the configuration at `config` (waiting for other operators).
pub fn lock(config: &Path) -> Result<ConfigLock, OpError> {
    let path = crate::config::config_dir(config).join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(OpError::io("open the lock file", &path))?;
    file.lock().map_err(OpError::io("lock", &path))?;
    Ok(ConfigLock { _file: file })
}

/// Writes `bytes` to `path` atomically with permission `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), OpError> {
    let dir = path
        .parent()
        .ok_or_else(|| OpError::Refused(format!("{} has no folder", path.display())))?;
    let fail = |what: &'static str, e: std::io::Error| OpError::io(what, path)(e);
    let mut tmp = tempfile::Builder::new()
        .prefix(".logon-gate-")
        .tempfile_in(dir)
        .map_err(|e| fail("write", e))?;
    set_mode(tmp.as_file(), mode).map_err(|e| fail("set the mode of", e))?;
    tmp.write_all(bytes).map_err(|e| fail("write", e))?;
    tmp.as_file().sync_all().map_err(|e| fail("sync", e))?;
    tmp.persist(path).map_err(|e| fail("replace", e.error))?;
    // The rename itself must reach the disk too.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("sync the folder of", e))?;
    Ok(())
}

#[cfg(unix)]
fn set_mode(f: &File, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &File, _: u32) -> std::io::Result<()> {
    Ok(())
}

/// Loads the current configuration; an invalid one stops the command.
pub fn load(loader: &mut Loader, config: &Path) -> Result<Table, OpError> {
    loader.load(config).map_err(|errors| {
        OpError::Refused(format!(
            "the configuration is invalid ({} error{}; first: {}); run `logon-gate check` and fix it first",
            errors.len(),
            if errors.len() == 1 { "" } else { "s" },
            errors[0]
        ))
    })
}

/// Runs one read-modify-write of a tenant file under the lock: `change` gets the current table
/// and returns the file to write, its new text, and the message to print. The whole resulting
/// configuration is validated before anything is written.
pub fn edit_tenant_file<F>(config: &Path, mut change: F) -> Result<String, OpError>
where
    F: FnMut(&Table) -> Result<(PathBuf, String, String), OpError>,
{
    let _lock = lock(config)?;
    #[cfg(feature = "etcd")]
    if let Some(store) = etcd_store(config) {
        return super::store::edit_tenant(config, &store, change);
    }
    let mut loader = Loader::new(crate::config::crypto_provider());
    let table = load(&mut loader, config)?;
    let (path, text, message) = change(&table)?;
    let overrides = HashMap::from([(path.clone(), text.clone())]);
    if let Err(errors) = loader.load_with(config, &overrides) {
        return Err(OpError::Refused(format!(
            "refused: the change would make the configuration invalid: {}",
            errors[0]
        )));
    }
    write_atomic(&path, text.as_bytes(), 0o644)?;
    Ok(message)
}

/// The etcd store `config` names, if any (read from gateway.toml alone, before any table).
#[cfg(feature = "etcd")]
fn etcd_store(config: &Path) -> Option<crate::config::EtcdStore> {
    let src = crate::config::Source::read(config).ok()?;
    crate::config::load_gateway(&src).ok()?.0.etcd
}

/// Refuses `cert install` into files that are only the gateway's copy of an etcd store
/// (SPEC §6): the store would overwrite it, and it would be lost.
pub fn not_etcd(table: &Table, config: &Path) -> Result<(), OpError> {
    match &table.settings.etcd {
        Some(store) => Err(OpError::Refused(format!(
            "{} keeps certificates in etcd ({}), and `cert install` does not write there yet: put the chain and key under {}certs/ with etcdctl, or install into files and `store import` them",
            config.display(),
            store.endpoints.join(", "),
            store.prefix
        ))),
        None => Ok(()),
    }
}

/// Parses a tenant file for editing.
pub fn parse_doc(path: &Path) -> Result<DocumentMut, OpError> {
    let text = std::fs::read_to_string(path).map_err(OpError::io("read", path))?;
    text.parse::<DocumentMut>()
        .map_err(|e| OpError::Refused(format!("{}: {}", path.display(), e.message())))
}

/// Sets `key` in `table`, keeping the old value's surrounding spaces and trailing comment.
pub fn set(table: &mut toml_edit::Table, key: &str, value: impl Into<Value>) {
    let mut new: Value = value.into();
    if let Some(old) = table.get(key).and_then(Item::as_value) {
        *new.decor_mut() = old.decor().clone();
    }
    table[key] = Item::Value(new);
}
