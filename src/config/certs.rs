//! Certificates: every file under certs/ (PEM via rustls-pki-types) -> paired, validated
//! `CertEntry`s with their SAN names and expiry. Files are cached by path and content hash so a
//! reload only parses what changed.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::sign::{CertifiedKey, SigningKey};
use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::ConfigError;
use crate::config::host;

/// A certificate chain with its matching key, ready to serve.
#[derive(Debug)]
pub struct CertEntry {
    /// The file holding the chain.
    pub path: PathBuf,
    /// The file holding the key (may equal `path`).
    pub key_path: PathBuf,
    /// What rustls serves.
    pub key: Arc<CertifiedKey>,
    /// SAN DNS names, lower-cased; wildcards as `*.example.net`.
    pub names: Vec<Box<str>>,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
}

impl CertEntry {
    /// True when one of the certificate's names covers `host` (exactly, or by a wildcard one
    /// label deep).
    pub fn covers(&self, host: &str) -> bool {
        self.names.iter().any(|n| name_covers(n, host))
    }

    /// Whole days until expiry (negative once expired).
    pub fn days_left(&self) -> i64 {
        (self.not_after - unix_now()).div_euclid(86_400)
    }
}

/// True when the certificate name `pattern` covers `host`.
pub fn name_covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(base) => host::parent(host) == Some(base) && !host.starts_with('*'),
        None => pattern == host,
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `unix` as `YYYY-MM-DD` (UTC).
pub fn date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|d| format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day()))
        .unwrap_or_else(|_| "?".into())
}

/// `unix` as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn date_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|d| {
            format!(
                "{} {:02}:{:02}:{:02}",
                date(unix),
                d.hour(),
                d.minute(),
                d.second()
            )
        })
        .unwrap_or_else(|_| "?".into())
}

/// What one file under certs/ contained.
#[derive(Debug)]
struct ParsedFile {
    chain: Option<Chain>,
    keys: Vec<ParsedKey>,
}

#[derive(Debug)]
struct Chain {
    certs: Vec<CertificateDer<'static>>,
    names: Vec<Box<str>>,
    spki: Vec<u8>,
    not_before: i64,
    not_after: i64,
    not_after_text: String,
    is_ca: bool,
}

#[derive(Debug)]
struct ParsedKey {
    key: Arc<dyn SigningKey>,
    spki: Vec<u8>,
}

/// Parsed files kept between loads, keyed by path and checked by content hash.
#[derive(Default)]
pub struct CertCache {
    files: HashMap<PathBuf, CachedFile>,
    /// Paired entries by chain file, with the content hashes of chain and key file they came
    /// from: an unchanged pair is reused as is.
    entries: HashMap<PathBuf, (u64, u64, Arc<CertEntry>)>,
}

type Parsed = (PathBuf, u64, Arc<Result<ParsedFile, String>>);

/// Content hash, stamp (when settled) and parse result of one file.
type CachedFile = (u64, Option<Stamp>, Arc<Result<ParsedFile, String>>);

/// What loading certs/ produced: the usable entries, errors (each naming a file) and warnings.
#[derive(Debug, Default)]
pub struct CertLoad {
    pub entries: Vec<Arc<CertEntry>>,
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<String>,
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Lists the files directly in `dir` that are candidates: symlinks are followed, names that
/// start with `.` are skipped (editor swap files, Kubernetes' `..data` folders).
pub fn list_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| ConfigError::file(dir, format!("cannot read the folder: {e}")))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry =
            entry.map_err(|e| ConfigError::file(dir, format!("cannot read the folder: {e}")))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        match entry.file_type() {
            // The folder listing already says so: no extra system call per file.
            Ok(t) if t.is_file() => out.push(path),
            // metadata() follows symlinks: a dangling one is skipped, like a deleted file.
            Ok(t) if t.is_symlink() => {
                if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                    out.push(path);
                }
            }
            _ => continue,
        }
    }
    out.sort();
    Ok(out)
}

impl CertCache {
    /// Loads every certificate and key under `dir`, reusing parsed files whose content did not
    /// change, and pairs certificates with keys by public key.
    pub fn load(&mut self, dir: &Path, provider: &CryptoProvider) -> CertLoad {
        let mut load = CertLoad::default();
        let files = match list_files(dir) {
            Ok(f) => f,
            Err(e) => {
                load.errors.push(e);
                return load;
            }
        };
        // Reading and parsing are independent per file: a cold start of 100,000 files runs
        // them on every core (docs/performance.md, "100,000 tenants on files").
        let cached = &self.files;
        let one = |path: PathBuf| -> FileOutcome {
            // A settled file whose stamp did not change is not read again.
            let stamp = Stamp::of(&path);
            if let (Some((hash, Some(old), entry)), Some((now, mode))) = (cached.get(&path), stamp)
                && *old == now
            {
                return Ok((path, *hash, Some(now), mode, entry.clone()));
            }
            let (bytes, mode) = match read_with_mode(&path) {
                Ok(b) => b,
                Err(e) => {
                    return Err(ConfigError::file(
                        &path,
                        format!("cannot read the file: {e}"),
                    ));
                }
            };
            let hash = content_hash(&bytes);
            let entry = match cached.get(&path) {
                Some((h, _, p)) if *h == hash => p.clone(),
                _ => Arc::new(parse_file(&bytes, provider)),
            };
            let settled = stamp.and_then(|(st, _)| st.settled().then_some(st));
            Ok((path, hash, settled, mode, entry))
        };
        let outcomes = in_parallel(files, &one);
        let mut fresh = HashMap::with_capacity(outcomes.len());
        let mut parsed = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            match outcome {
                Ok((path, hash, settled, mode, entry)) => {
                    warn_key_mode(&path, mode, &entry, &mut load.warnings);
                    fresh.insert(path.clone(), (hash, settled, entry.clone()));
                    parsed.push((path, hash, entry));
                }
                Err(e) => load.errors.push(e),
            }
        }
        self.files = fresh;
        self.entries = pair(&parsed, &self.entries, &mut load);
        load
    }
}

/// One file of `CertCache::load`: path, content hash, stamp when settled, mode, parse.
type FileOutcome = Result<
    (
        PathBuf,
        u64,
        Option<Stamp>,
        u32,
        Arc<Result<ParsedFile, String>>,
    ),
    ConfigError,
>;

/// `f` over `items` on up to as many threads as there are cores, results in `items`' order.
/// Small inputs stay on the calling thread.
pub(crate) fn in_parallel<T: Send, R: Send>(items: Vec<T>, f: &(impl Fn(T) -> R + Sync)) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 || items.len() < 512 {
        return items.into_iter().map(f).collect();
    }
    let size = items.len().div_ceil(threads);
    let mut chunks: Vec<Vec<T>> = Vec::with_capacity(threads);
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        chunks.push(items.by_ref().take(size).collect());
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| scope.spawn(move || chunk.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// What `stat` says of a file: enough to tell, for a file not modified in the last few
/// seconds, that its content is unchanged without reading it (git's "racy" rule: a file
/// changed within the clock's granularity of a read is always read again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    ino: u64,
    dev: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// Files changed more recently than this are always re-read.
const SETTLE_SECS: i64 = 3;

impl Stamp {
    /// The stamp (following symlinks) and permission bits of `path`.
    #[cfg(unix)]
    pub fn of(path: &Path) -> Option<(Stamp, u32)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some((
            Stamp {
                len: m.len(),
                ino: m.ino(),
                dev: m.dev(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
            },
            m.mode(),
        ))
    }

    /// Without inode and change times there is no safe stamp: always read.
    #[cfg(not(unix))]
    pub fn of(_: &Path) -> Option<(Stamp, u32)> {
        None
    }

    /// True when neither content nor metadata changed in the last `SETTLE_SECS` seconds.
    pub fn settled(&self) -> bool {
        let now = unix_now();
        now - self.mtime.0 > SETTLE_SECS && now - self.ctime.0 > SETTLE_SECS
    }
}

/// Reads a file and its permission bits with one open (fstat on the open file).
fn read_with_mode(path: &Path) -> std::io::Result<(Vec<u8>, u32)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.read_to_end(&mut bytes)?;
    #[cfg(unix)]
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
    #[cfg(not(unix))]
    let mode = 0o600;
    Ok((bytes, mode))
}

fn warn_key_mode(
    path: &Path,
    mode: u32,
    parsed: &Result<ParsedFile, String>,
    warnings: &mut Vec<String>,
) {
    if let Ok(p) = parsed
        && !p.keys.is_empty()
        && mode & 0o077 != 0
    {
        warnings.push(format!(
            "{}: private key file is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        ));
    }
}

fn parse_file(bytes: &[u8], provider: &CryptoProvider) -> Result<ParsedFile, String> {
    let mut certs = Vec::new();
    let mut keys = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
        let (kind, der) = section.map_err(|e| format!("is not valid PEM: {e}"))?;
        match kind {
            SectionKind::Certificate => certs.push(CertificateDer::from(der)),
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                let der = PrivateKeyDer::from_pem(kind, der)
                    .ok_or_else(|| "holds a private key of an unknown form".to_string())?;
                let key = provider
                    .key_provider
                    .load_private_key(der)
                    .map_err(|e| format!("holds a private key that cannot be used: {e}"))?;
                let spki = key
                    .public_key()
                    .map(|s| s.as_ref().to_vec())
                    .ok_or_else(|| {
                        "holds a private key whose public key cannot be derived".to_string()
                    })?;
                keys.push(ParsedKey { key, spki });
            }
            _ => {}
        }
    }
    if certs.is_empty() && keys.is_empty() {
        return Err("contains no PEM certificate or private key".into());
    }
    let chain = match certs.first() {
        None => None,
        Some(leaf) => {
            let (_, x509) = X509Certificate::from_der(leaf.as_ref())
                .map_err(|e| format!("holds a certificate that cannot be parsed: {e}"))?;
            let mut names = Vec::new();
            if let Ok(Some(san)) = x509.subject_alternative_name() {
                for n in &san.value.general_names {
                    if let GeneralName::DNSName(d) = n {
                        let d = d.trim_end_matches('.').to_ascii_lowercase();
                        names.push(d.into_boxed_str());
                    }
                }
            }
            let validity = x509.validity();
            Some(Chain {
                names,
                spki: x509.public_key().raw.to_vec(),
                not_before: validity.not_before.timestamp(),
                not_after: validity.not_after.timestamp(),
                not_after_text: validity.not_after.to_string(),
                is_ca: x509.is_ca(),
                certs: certs.clone(),
            })
        }
    };
    Ok(ParsedFile { chain, keys })
}

fn pair(
    parsed: &[Parsed],
    previous: &HashMap<PathBuf, (u64, u64, Arc<CertEntry>)>,
    load: &mut CertLoad,
) -> HashMap<PathBuf, (u64, u64, Arc<CertEntry>)> {
    let mut keys_by_spki: HashMap<&[u8], (&Path, u64, &ParsedKey)> = HashMap::new();
    for (path, hash, p) in parsed {
        if let Ok(p) = p.as_ref() {
            for k in &p.keys {
                keys_by_spki.entry(&k.spki).or_insert((path, *hash, k));
            }
        }
    }
    let mut entries = HashMap::with_capacity(parsed.len());
    let mut used: std::collections::HashSet<&[u8]> = Default::default();
    let now = unix_now();
    for (path, hash, p) in parsed {
        let p = match p.as_ref() {
            Ok(p) => p,
            Err(msg) => {
                load.errors.push(ConfigError::file(path, msg.clone()));
                continue;
            }
        };
        let Some(chain) = &p.chain else { continue };
        if chain.is_ca && p.keys.is_empty() && !keys_by_spki.contains_key(chain.spki.as_slice()) {
            load.warnings.push(format!(
                "{}: a CA certificate with no key; ignored (put intermediates after the leaf in the chain file)",
                path.display()
            ));
            continue;
        }
        if !p.keys.is_empty() && !p.keys.iter().any(|k| k.spki == chain.spki) {
            load.errors.push(ConfigError::file(
                path,
                "the private key in this file does not match its certificate",
            ));
            continue;
        }
        let Some((key_path, key_hash, key)) = keys_by_spki.get(chain.spki.as_slice()) else {
            load.errors.push(ConfigError::file(
                path,
                "no private key under the certificates folder matches this certificate",
            ));
            continue;
        };
        used.insert(&key.spki);
        if chain.not_after < now {
            load.errors.push(ConfigError::file(
                path,
                format!("the certificate expired on {}", chain.not_after_text),
            ));
            continue;
        }
        if chain.names.is_empty() {
            load.errors.push(ConfigError::file(
                path,
                "the certificate has no DNS names (subjectAltName), so it cannot be matched to a host",
            ));
            continue;
        }
        if chain.not_before > now {
            load.warnings.push(format!(
                "{}: the certificate is not valid yet; clients will refuse it until it is",
                path.display()
            ));
        }
        let entry = match previous.get(path) {
            Some((h, kh, e)) if h == hash && kh == key_hash && e.key_path == *key_path => e.clone(),
            _ => Arc::new(CertEntry {
                path: path.clone(),
                key_path: key_path.to_path_buf(),
                key: Arc::new(CertifiedKey::new(chain.certs.clone(), key.key.clone())),
                names: chain.names.clone(),
                not_before: chain.not_before,
                not_after: chain.not_after,
            }),
        };
        entries.insert(path.clone(), (*hash, *key_hash, entry.clone()));
        load.entries.push(entry);
    }
    for (spki, (path, _, _)) in &keys_by_spki {
        if !used.contains(spki) {
            load.warnings.push(format!(
                "{}: a private key that no certificate uses",
                path.display()
            ));
        }
    }
    entries
}

/// Reads and validates one certificate + key pair without a cache (for `cert install`).
pub fn load_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertEntry, String> {
    let chain = parse_file(cert_pem, provider)?
        .chain
        .ok_or_else(|| "the certificate file holds no certificate".to_string())?;
    let keys = parse_file(key_pem, provider)?.keys;
    let key = keys
        .into_iter()
        .find(|k| k.spki == chain.spki)
        .ok_or_else(|| "the private key does not match the certificate".to_string())?;
    if chain.not_after < unix_now() {
        return Err(format!(
            "the certificate expired on {}",
            chain.not_after_text
        ));
    }
    Ok(CertEntry {
        path: PathBuf::new(),
        key_path: PathBuf::new(),
        key: Arc::new(CertifiedKey::new(chain.certs, key.key)),
        names: chain.names,
        not_before: chain.not_before,
        not_after: chain.not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_covers_one_label() {
        assert!(name_covers("*.example.net", "webmail.example.net"));
        assert!(!name_covers("*.example.net", "example.net"));
        assert!(!name_covers("*.example.net", "a.b.example.net"));
        assert!(name_covers("webmail.example.net", "webmail.example.net"));
        assert!(!name_covers("webmail.example.net", "mail.example.net"));
    }
}
