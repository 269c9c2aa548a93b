//! SPEC §6: the store of tenants and certificates. The files of `[paths]` are the default
//! store. With `[store] kind = "etcd"` (the `etcd` feature), etcd is, and the `[paths]`
//! folders become the gateway's local copy of it. The gateway alone writes them, each file
//! atomically. The watcher and `Loader::apply` then serve each change the way they serve a
//! file edit: the request path never waits on etcd, and a gateway that loses etcd, or starts
//! without it, serves its last copy.
//!
//! Keys under the prefix: `tenants/<domain>` holds a tenant file's TOML, `certs/<name>` a PEM
//! chain and key; `acme/...` is not copied.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::Settings;

#[cfg(feature = "etcd")]
pub mod etcd;

/// One value of the store: what it is, by the name it has there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entry {
    /// `tenants/<domain>`: the tenant file of `<domain>`.
    Tenant(String),
    /// `certs/<name>`: a certificate chain and its key.
    Cert(String),
}

/// Whether `name` is usable as a file name in one folder: not empty, no `/`, not hidden.
fn safe(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\0', '\\'])
}

impl Entry {
    /// The entry a key under `prefix` names, if it is one the gateway serves.
    pub fn of_key(prefix: &str, key: &str) -> Option<Entry> {
        let rest = key.strip_prefix(prefix)?;
        if let Some(domain) = rest.strip_prefix("tenants/") {
            return safe(domain).then(|| Entry::Tenant(domain.to_owned()));
        }
        let name = rest.strip_prefix("certs/")?;
        safe(name).then(|| Entry::Cert(name.to_owned()))
    }

    /// The entry a file of `[paths]` is, if it is one.
    pub fn of_file(settings: &Settings, path: &Path) -> Option<Entry> {
        let name = path.file_name()?.to_str()?;
        if !safe(name) {
            return None;
        }
        let parent = path.parent()?;
        if parent == settings.tenants_dir {
            return Some(Entry::Tenant(name.strip_suffix(".toml")?.to_owned()));
        }
        (parent == settings.certs_dir).then(|| Entry::Cert(name.to_owned()))
    }

    /// Its key under `prefix`.
    pub fn key(&self, prefix: &str) -> String {
        match self {
            Entry::Tenant(d) => format!("{prefix}tenants/{d}"),
            Entry::Cert(n) => format!("{prefix}certs/{n}"),
        }
    }

    /// Its file in a tenants folder and a certificates folder.
    pub fn file(&self, tenants: &Path, certs: &Path) -> PathBuf {
        match self {
            Entry::Tenant(d) => tenants.join(format!("{d}.toml")),
            Entry::Cert(n) => certs.join(n),
        }
    }
}

/// The local copy of a store: a tenants folder and a certificates folder.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub tenants: PathBuf,
    pub certs: PathBuf,
}

impl Mirror {
    /// The copy in `settings`' `[paths]`.
    pub fn of(settings: &Settings) -> Mirror {
        Mirror {
            tenants: settings.tenants_dir.clone(),
            certs: settings.certs_dir.clone(),
        }
    }

    /// Writes `value` as `entry`'s file (atomically, 0600), unless it holds that already.
    pub fn put(&self, entry: &Entry, value: &[u8]) -> Result<(), crate::acme::AcmeError> {
        let path = entry.file(&self.tenants, &self.certs);
        if std::fs::read(&path).is_ok_and(|old| old == value) {
            return Ok(());
        }
        crate::acme::store::write_private(&path, value)
    }

    /// Removes `entry`'s file, if there is one.
    pub fn remove(&self, entry: &Entry) {
        let _ = std::fs::remove_file(entry.file(&self.tenants, &self.certs));
    }

    /// Makes the copy hold exactly `entries`: each written, every other entry's file removed.
    pub fn replace_all(
        &self,
        entries: &HashMap<Entry, Vec<u8>>,
    ) -> Result<(), crate::acme::AcmeError> {
        for (e, v) in entries {
            self.put(e, v)?;
        }
        for (dir, tenants) in [(&self.tenants, true), (&self.certs, false)] {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            for f in rd.filter_map(Result::ok) {
                let name = f.file_name().to_string_lossy().into_owned();
                let entry = match tenants {
                    true => name
                        .strip_suffix(".toml")
                        .map(|d| Entry::Tenant(d.to_owned())),
                    false => Some(Entry::Cert(name.clone())),
                };
                if let Some(e) = entry.filter(|_| safe(&name))
                    && !entries.contains_key(&e)
                {
                    self.remove(&e);
                }
            }
        }
        Ok(())
    }

    /// Every entry of the copy with its content: what `store import` puts into a store.
    pub fn entries(&self) -> Result<HashMap<Entry, Vec<u8>>, std::io::Error> {
        let mut out = HashMap::new();
        for (dir, tenants) in [(&self.tenants, true), (&self.certs, false)] {
            for f in std::fs::read_dir(dir)?.filter_map(Result::ok) {
                let name = f.file_name().to_string_lossy().into_owned();
                if !safe(&name) || !f.path().is_file() {
                    continue;
                }
                let entry = match tenants {
                    true => match name.strip_suffix(".toml") {
                        Some(d) => Entry::Tenant(d.to_owned()),
                        None => continue,
                    },
                    false => Entry::Cert(name),
                };
                out.insert(entry, std::fs::read(f.path())?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_files_and_nothing_leaves_its_folder() {
        let p = "/logon-gate/";
        assert_eq!(
            Entry::of_key(p, "/logon-gate/tenants/example.net"),
            Some(Entry::Tenant("example.net".into()))
        );
        assert_eq!(
            Entry::of_key(p, "/logon-gate/certs/example.net.pem"),
            Some(Entry::Cert("example.net.pem".into()))
        );
        for bad in [
            "/logon-gate/tenants/../x",
            "/logon-gate/tenants/a/b",
            "/logon-gate/certs/.hidden",
            "/logon-gate/certs/",
            "/logon-gate/acme/account",
            "/other/tenants/example.net",
        ] {
            assert_eq!(Entry::of_key(p, bad), None, "{bad}");
        }
        let e = Entry::Tenant("example.net".into());
        assert_eq!(e.key(p), "/logon-gate/tenants/example.net");
        assert_eq!(
            e.file(Path::new("/t"), Path::new("/c")),
            PathBuf::from("/t/example.net.toml")
        );
    }
}
