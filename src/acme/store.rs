//! The files under `[acme] storage` that the orderer (the gateway's background issuer or
//! `cert issue`), the listeners answering challenges, and `cert status` share:
//!
//! ```text
//! account.json                  the ACME account (0600), made once and reused
//! certs/<host>.pem              issued chain and key (0600); served like certs/ (uploads win)
//! state/<host>.json             the last outcome per host (HostState)
//! challenges/http-01/<token>    key authorization, while the CA validates it
//! challenges/tls-alpn-01/<host> SHA-256 of the key authorization (hex), while validated
//! locks/<host>                  held by whoever orders for the host now
//! ```
//!
//! Every file is written atomically (temporary file, fsync, rename), so a reader sees the
//! old content or the new, never a part. Host names here are already validated DNS names
//! (lower case, punycode) and tokens are checked to be base64url, so neither can leave its
//! folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::acme::AcmeError;
use crate::config::Acme;
use crate::config::certs::unix_now;

/// A lock older than this is taken to belong to a holder that died: longer than any order
/// may last (`ORDER_DEADLINE` in `acme::order`), so a live holder never loses it.
pub const LOCK_STALE: Duration = Duration::from_secs(600);

/// The shared ACME folder of one configuration.
#[derive(Debug, Clone)]
pub struct Storage {
    dir: PathBuf,
}

/// A host's last ACME outcome, as `state/<host>.json` keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    /// `valid` after an issued certificate, `failed` after a failed order.
    pub state: String,
    /// The CA's reason (or ours) for a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When this outcome was recorded (Unix seconds).
    pub at: i64,
    /// Failed orders in a row; the backoff doubles with each.
    #[serde(default)]
    pub failures: u32,
    /// No order before this time (Unix seconds): the backoff, or the CA's Retry-After.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<i64>,
    /// The CA's suggested renewal time for the issued certificate (RFC 9773), when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<i64>,
    /// The serial (hex) of the certificate `renew_at` was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_serial: Option<String>,
}

/// Which challenge a stored key authorization answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// RFC 8555 §8.3, keyed by token.
    Http01,
    /// RFC 8737, keyed by host.
    TlsAlpn01,
}

impl Challenge {
    fn folder(self) -> &'static str {
        match self {
            Challenge::Http01 => "challenges/http-01",
            Challenge::TlsAlpn01 => "challenges/tls-alpn-01",
        }
    }
}

/// Whether `token` is a non-empty base64url string (RFC 8555 §8.1), so safe as a file name.
pub fn is_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Storage {
    /// The storage of `acme`.
    pub fn of(acme: &Acme) -> Storage {
        Storage {
            dir: acme.storage.clone(),
        }
    }

    /// The folder itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the account credentials are kept.
    pub fn account_file(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    /// Where `host`'s issued certificate is kept.
    pub fn cert_file(&self, host: &str) -> PathBuf {
        self.dir.join("certs").join(format!("{host}.pem"))
    }

    fn state_file(&self, host: &str) -> PathBuf {
        self.dir.join("state").join(format!("{host}.json"))
    }

    /// `host`'s last outcome, if one was recorded (an unreadable record counts as none).
    pub fn state(&self, host: &str) -> Option<HostState> {
        let bytes = std::fs::read(self.state_file(host)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records `host`'s outcome.
    pub fn set_state(&self, host: &str, state: &HostState) -> Result<(), AcmeError> {
        let bytes =
            serde_json::to_vec_pretty(state).map_err(|e| AcmeError::Order(e.to_string()))?;
        write_private(&self.state_file(host), &bytes)
    }

    fn challenge_file(&self, kind: Challenge, key: &str) -> Option<PathBuf> {
        let safe = match kind {
            Challenge::Http01 => is_token(key),
            Challenge::TlsAlpn01 => {
                crate::config::host::HostName::from_user(key).is_ok_and(|h| h.as_str() == key)
            }
        };
        safe.then(|| self.dir.join(kind.folder()).join(key))
    }

    /// Publishes the key authorization that answers `kind` for `key` (a token or a host).
    pub fn put_challenge(&self, kind: Challenge, key: &str, answer: &str) -> Result<(), AcmeError> {
        let path = self
            .challenge_file(kind, key)
            .ok_or_else(|| AcmeError::Order(format!("the CA sent an unusable token `{key}`")))?;
        write_private(&path, answer.as_bytes())
    }

    /// The key authorization published for `kind` and `key`, if any.
    pub fn challenge(&self, kind: Challenge, key: &str) -> Option<String> {
        std::fs::read_to_string(self.challenge_file(kind, key)?).ok()
    }

    /// Withdraws an answer once its order is over.
    pub fn remove_challenge(&self, kind: Challenge, key: &str) {
        if let Some(path) = self.challenge_file(kind, key) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Takes the lock on ordering for `host`: `None` while someone else holds it (a lock
    /// older than [`LOCK_STALE`] is taken over).
    pub fn lock(&self, host: &str) -> Result<Option<HostLock>, AcmeError> {
        use std::io::Write as _;
        let path = self.dir.join("locks").join(host);
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| AcmeError::Io { what, path, source }
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io("make the folder of", &path))?;
        }
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let _ = writeln!(f, "{} {}", std::process::id(), unix_now());
                    return Ok(Some(HostLock { path }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > LOCK_STALE);
                    if !stale {
                        return Ok(None);
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(io("create", &path)(e)),
            }
        }
        Ok(None)
    }
}

/// The lock on ordering for one host; released on drop.
#[derive(Debug)]
pub struct HostLock {
    path: PathBuf,
}

impl Drop for HostLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, fsync, rename),
/// mode 0600, making the folder if needed.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn storage() -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Storage {
            dir: dir.path().to_path_buf(),
        };
        (dir, s)
    }

    #[test]
    fn a_token_or_host_that_could_leave_its_folder_is_refused() {
        let (_d, s) = storage();
        for bad in ["../account.json", "a/b", "", "tok en", "..", "a.b"] {
            assert!(
                s.put_challenge(Challenge::Http01, bad, "x").is_err(),
                "{bad}"
            );
            assert_eq!(s.challenge(Challenge::Http01, bad), None, "{bad}");
        }
        for bad in ["../x", "Webmail.example.net", "a b"] {
            assert!(
                s.put_challenge(Challenge::TlsAlpn01, bad, "x").is_err(),
                "{bad}"
            );
        }
        s.put_challenge(Challenge::Http01, "abc-_09", "ka")
            .expect("put");
        assert_eq!(
            s.challenge(Challenge::Http01, "abc-_09").as_deref(),
            Some("ka")
        );
        s.remove_challenge(Challenge::Http01, "abc-_09");
        assert_eq!(s.challenge(Challenge::Http01, "abc-_09"), None);
    }

    #[test]
    fn one_holder_of_a_host_lock_at_a_time_and_a_released_lock_is_free() {
        let (_d, s) = storage();
        let held = s.lock("webmail.example.net").expect("lock").expect("free");
        assert!(s.lock("webmail.example.net").expect("lock").is_none());
        assert!(s.lock("webmail.example.org").expect("lock").is_some());
        drop(held);
        assert!(s.lock("webmail.example.net").expect("lock").is_some());
    }

    #[test]
    fn a_host_state_survives_a_round_trip() {
        let (_d, s) = storage();
        assert_eq!(s.state("webmail.example.net"), None);
        let st = HostState {
            state: "failed".into(),
            reason: Some("the CA said: dns".into()),
            at: 5,
            failures: 2,
            retry_at: Some(9),
            ..HostState::default()
        };
        s.set_state("webmail.example.net", &st).expect("set");
        assert_eq!(s.state("webmail.example.net"), Some(st));
    }
}
