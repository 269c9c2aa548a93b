//! Raw config files (serde types mirroring gateway.toml and tenants/*.toml) and the errors that
//! point back into them by file and line. Validation across files lives in `table`.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// One problem in the configuration, naming the file (and line where there is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file at fault.
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// One sentence saying what is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error about a whole file.
    pub fn file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The folder of gateway.toml: where the operator CLI takes its lock and what the reloader
/// watches (`.` for a bare file name).
pub fn config_dir(gateway_toml: &Path) -> PathBuf {
    match gateway_toml.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A config file's text, kept so errors can be turned from byte spans into line numbers.
#[derive(Debug, Clone)]
pub struct Source {
    /// Path as given (relative paths stay relative, so messages read like the operator typed).
    pub path: PathBuf,
    /// The file's contents.
    pub text: String,
}

impl Source {
    /// Reads a file; an unreadable file is an error naming it.
    pub fn read(path: &Path) -> Result<Source, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::file(path, format!("cannot read the file: {e}")))?;
        Ok(Source {
            path: path.to_path_buf(),
            text,
        })
    }

    /// An error at a byte span of this file.
    pub fn error_at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let upto = span.start.min(self.text.len());
        let line = self.text.as_bytes()[..upto]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        ConfigError {
            file: self.path.clone(),
            line: Some(line),
            message: message.into(),
        }
    }

    /// Deserialises the file, turning a TOML or schema error into a located `ConfigError`.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(&self.text).map_err(|e| {
            let message = e.message().trim().to_string();
            match e.span() {
                Some(span) => self.error_at(span, message),
                None => ConfigError::file(&self.path, message),
            }
        })
    }
}

/// `config/gateway.toml` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    /// What customers' CNAME records must reach.
    pub cname_target: Spanned<String>,
    /// Whether enabling an address needs a filed ICP number (default true).
    #[serde(default = "default_true")]
    pub require_icp: bool,
    #[serde(default)]
    pub listen: RawListen,
    pub backend: RawBackend,
    #[serde(default)]
    pub platform: RawPlatform,
    #[serde(default)]
    pub paths: RawPaths,
    #[serde(default)]
    pub limits: RawLimits,
    /// SPEC §5: certificates ordered from an ACME CA; absent, nothing is ordered.
    pub acme: Option<Spanned<RawAcme>>,
    /// SPEC §6: where tenants and certificates live; absent, the files of `[paths]`.
    pub store: Option<Spanned<RawStore>>,
}

/// `[store]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    #[serde(default)]
    pub kind: Option<Spanned<String>>,
    #[serde(default)]
    pub endpoints: Vec<Spanned<String>>,
    #[serde(default)]
    pub prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub ca_file: Option<Spanned<String>>,
    #[serde(default)]
    pub cert_file: Option<Spanned<String>>,
    #[serde(default)]
    pub key_file: Option<Spanned<String>>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

/// Validated `[store] kind = "etcd"` (SPEC §6). With it, `[paths]` tenants and certs are the
/// gateway's local copy of the store, written by the gateway only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdStore {
    /// `http://host:port` endpoints of the etcd cluster.
    pub endpoints: Vec<String>,
    /// Every key lives under it; ends with `/`.
    pub prefix: String,
    /// User and password, when etcd has authentication on.
    pub user: Option<(String, String)>,
}

/// `[acme]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub directory: Spanned<String>,
    #[serde(default)]
    pub contact: Vec<Spanned<String>>,
    #[serde(default)]
    pub challenges: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub storage: Option<String>,
    #[serde(default)]
    pub directory_ca: Option<Spanned<String>>,
    #[serde(default)]
    pub eab_kid: Option<String>,
    #[serde(default)]
    pub eab_hmac_key: Option<String>,
    /// Beyond SPEC: the DNS server (`IP:PORT`) for the CNAME check made before each order;
    /// the system's resolver when absent.
    #[serde(default)]
    pub nameserver: Option<Spanned<String>>,
    /// Beyond SPEC: orders under way at once (default 8).
    #[serde(default)]
    pub orders_in_flight: Option<Spanned<u64>>,
}

/// Validated `[acme]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acme {
    /// The CA's directory URL.
    pub directory: String,
    /// `mailto:` URLs for the account.
    pub contact: Vec<String>,
    /// Challenges answered; `http-01` on the HTTP listener.
    pub http01: bool,
    pub tls_alpn01: bool,
    /// Account key and issued certificates (`certs/`), resolved against the config folder.
    pub storage: PathBuf,
    /// A PEM file trusted for the directory's HTTPS instead of the system's roots.
    pub directory_ca: Option<PathBuf>,
    /// External Account Binding: key id and base64url HMAC key.
    pub eab: Option<(String, String)>,
    /// The DNS server for the CNAME check before each order; `None`: the system's.
    pub nameserver: Option<std::net::SocketAddr>,
    /// Orders under way at once.
    pub orders_in_flight: usize,
}

/// Orders under way at once unless `orders_in_flight` says otherwise.
pub const ORDERS_IN_FLIGHT: usize = 8;

impl Acme {
    /// Where issued certificates are kept (chain and key in one file per host, 0600).
    pub fn certs_dir(&self) -> PathBuf {
        self.storage.join("certs")
    }
}

fn default_true() -> bool {
    true
}

/// `[listen]`: each key defaults to SPEC's address; `""` turns that listener off.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub https: Option<Spanned<String>>,
    pub http: Option<Spanned<String>>,
    pub admin: Option<Spanned<String>>,
}

/// `[backend]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub url: Spanned<String>,
    pub connect_timeout: Option<Spanned<String>>,
    pub response_timeout: Option<Spanned<String>>,
    pub queue_after_busy: Option<Spanned<u64>>,
    pub queue_wait: Option<Spanned<String>>,
}

/// `[platform]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlatform {
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
}

/// `[paths]`, relative to gateway.toml's folder.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPaths {
    pub tenants: Option<String>,
    pub certs: Option<String>,
}

/// `[limits]`; every key optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub tls_handshake_timeout: Option<Spanned<String>>,
    pub header_read_timeout: Option<Spanned<String>>,
    pub keepalive_timeout: Option<Spanned<String>>,
    pub shutdown_timeout: Option<Spanned<String>>,
    pub max_request_header_bytes: Option<Spanned<u64>>,
    pub max_connections: Option<Spanned<u64>>,
    pub h2_max_concurrent_streams: Option<Spanned<u64>>,
    pub backend_max_in_flight: Option<Spanned<u64>>,
}

/// Tenant edition; `free` cannot use custom logon addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Edition {
    Free,
    Standard,
    Enterprise,
}

impl Edition {
    /// The word used in files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Edition::Free => "free",
            Edition::Standard => "standard",
            Edition::Enterprise => "enterprise",
        }
    }
}

impl std::str::FromStr for Edition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "free" => Ok(Edition::Free),
            "standard" => Ok(Edition::Standard),
            "enterprise" => Ok(Edition::Enterprise),
            other => Err(format!(
                "unknown edition `{other}`: expected free, standard or enterprise"
            )),
        }
    }
}

/// CNAME state of a logon address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CnameState {
    #[default]
    Pending,
    Verified,
}

/// ICP filing state of a logon address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IcpState {
    #[default]
    Pending,
    Filed,
}

/// `config/tenants/<domain>.toml` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub domain: Spanned<String>,
    pub edition: Spanned<Edition>,
    #[serde(default)]
    pub logon: Vec<RawLogon>,
}

/// One `[[logon]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogon {
    pub host: Spanned<String>,
    #[serde(default)]
    pub cname: CnameState,
    #[serde(default)]
    pub icp: IcpState,
    pub icp_number: Option<String>,
    pub enabled: Option<Spanned<bool>>,
}

/// Validated gateway-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Folder of gateway.toml; relative paths resolve against it.
    pub config_dir: PathBuf,
    pub cname_target: crate::config::host::HostName,
    pub require_icp: bool,
    pub listen: Listen,
    pub backend: Backend,
    pub tenants_dir: PathBuf,
    pub certs_dir: PathBuf,
    pub limits: Limits,
    pub acme: Option<Acme>,
    /// `[store] kind = "etcd"`; `None`: the files of `[paths]` are the store.
    pub etcd: Option<EtcdStore>,
}

/// Listener addresses; `None` is a listener turned off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// The webmail backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `host:port` of the backend (http only).
    pub authority: http::uri::Authority,
    /// Path prefix of the backend URL, without trailing slash ("" for none).
    pub base_path: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Busy backend connections a serving thread keeps before a request waits for one of
    /// them to come free instead of opening another.
    pub queue_after_busy: usize,
    /// How long such a request waits before it opens a connection of its own anyway.
    pub queue_wait: Duration,
}

/// Listener and upstream limits; see SPEC §2 `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub tls_handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub max_request_header_bytes: usize,
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    pub backend_max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            max_request_header_bytes: 65536,
            max_connections: 10000,
            h2_max_concurrent_streams: 100,
            backend_max_in_flight: 1024,
        }
    }
}

/// Parses gateway.toml into [`Settings`] and the platform host list, collecting every error.
pub fn load_gateway(src: &Source) -> Result<(Settings, Vec<Spanned<String>>), Vec<ConfigError>> {
    let raw: RawGateway = src.parse().map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    let config_dir = src.path.parent().map(Path::to_path_buf).unwrap_or_default();

    let cname_target =
        match crate::config::host::HostName::parse_canonical(raw.cname_target.get_ref()) {
            Ok(h) => Some(h),
            Err(e) => {
                errors.push(src.error_at(raw.cname_target.span(), format!("cname_target: {e}")));
                None
            }
        };

    let mut addr = |v: &Option<Spanned<String>>, key: &str, default: &str| -> Option<SocketAddr> {
        let (text, span) = match v {
            Some(s) => (s.get_ref().as_str(), s.span()),
            None => (default, 0..0),
        };
        if text.is_empty() {
            return None;
        }
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                errors.push(src.error_at(
                    span,
                    format!("listen.{key}: `{text}` is not an IP:port address"),
                ));
                None
            }
        }
    };
    let listen = Listen {
        https: addr(&raw.listen.https, "https", "0.0.0.0:443"),
        http: addr(&raw.listen.http, "http", "0.0.0.0:80"),
        admin: addr(&raw.listen.admin, "admin", "127.0.0.1:9901"),
    };
    if listen.https.is_none() && listen.http.is_none() {
        errors.push(ConfigError::file(
            &src.path,
            "listen: both https and http are turned off, so nothing would be served",
        ));
    }

    let backend = parse_backend(src, &raw.backend, &mut errors);

    let defaults = Limits::default();
    let mut dur = |v: &Option<Spanned<String>>, key: &str, default: Duration| {
        v.as_ref()
            .map_or(Some(default), |s| duration(src, s, key, &mut errors))
            .unwrap_or(default)
    };
    let mut limits = Limits {
        tls_handshake_timeout: dur(
            &raw.limits.tls_handshake_timeout,
            "limits.tls_handshake_timeout",
            defaults.tls_handshake_timeout,
        ),
        header_read_timeout: dur(
            &raw.limits.header_read_timeout,
            "limits.header_read_timeout",
            defaults.header_read_timeout,
        ),
        keepalive_timeout: dur(
            &raw.limits.keepalive_timeout,
            "limits.keepalive_timeout",
            defaults.keepalive_timeout,
        ),
        shutdown_timeout: dur(
            &raw.limits.shutdown_timeout,
            "limits.shutdown_timeout",
            defaults.shutdown_timeout,
        ),
        ..defaults
    };
    if let Some(n) = count(
        src,
        raw.limits.max_request_header_bytes.as_ref(),
        "limits.max_request_header_bytes",
        8192,
        16 << 20,
        &mut errors,
    ) {
        limits.max_request_header_bytes = n as usize;
    }
    if let Some(n) = count(
        src,
        raw.limits.max_connections.as_ref(),
        "limits.max_connections",
        1,
        1 << 24,
        &mut errors,
    ) {
        limits.max_connections = n as usize;
    }
    if let Some(n) = count(
        src,
        raw.limits.h2_max_concurrent_streams.as_ref(),
        "limits.h2_max_concurrent_streams",
        1,
        u32::MAX as u64,
        &mut errors,
    ) {
        limits.h2_max_concurrent_streams = n as u32;
    }
    if let Some(n) = count(
        src,
        raw.limits.backend_max_in_flight.as_ref(),
        "limits.backend_max_in_flight",
        1,
        1 << 24,
        &mut errors,
    ) {
        limits.backend_max_in_flight = n as usize;
    }

    let tenants_dir = config_dir.join(raw.paths.tenants.as_deref().unwrap_or("tenants"));
    let certs_dir = config_dir.join(raw.paths.certs.as_deref().unwrap_or("../certs"));
    let acme = raw
        .acme
        .as_ref()
        .and_then(|a| parse_acme(src, &config_dir, a.get_ref(), &mut errors));

    let etcd = raw
        .store
        .as_ref()
        .and_then(|st| parse_store(src, st, &mut errors));
    if let (Some(a), Some(_)) = (&raw.acme, &etcd) {
        errors.push(src.error_at(
            a.span(),
            "[acme] with store.kind = \"etcd\" is not supported yet: every gateway of the fleet would order the same certificates",
        ));
    }

    match (cname_target, backend) {
        (Some(cname_target), Some(backend)) if errors.is_empty() => Ok((
            Settings {
                config_dir,
                cname_target,
                require_icp: raw.require_icp,
                listen,
                backend,
                tenants_dir,
                certs_dir,
                limits,
                acme,
                etcd,
            },
            raw.platform.hosts,
        )),
        _ => Err(errors),
    }
}

/// `[acme]`, checked: an http(s) directory URL, `mailto:` contacts, known challenges, a
/// readable `directory_ca`, an EAB pair given whole.
fn parse_acme(
    src: &Source,
    config_dir: &Path,
    raw: &RawAcme,
    errors: &mut Vec<ConfigError>,
) -> Option<Acme> {
    let before = errors.len();
    let directory = raw.directory.get_ref().trim().to_owned();
    match directory.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("https" | "http")) && u.host().is_some() => {}
        _ => errors.push(src.error_at(
            raw.directory.span(),
            format!("acme.directory: `{directory}` is not an http(s) URL"),
        )),
    }
    let mut contact = Vec::new();
    for c in &raw.contact {
        match c.get_ref().strip_prefix("mailto:") {
            Some(addr) if addr.contains('@') => contact.push(c.get_ref().clone()),
            _ => errors.push(src.error_at(
                c.span(),
                format!("acme.contact: `{}` is not a mailto: address", c.get_ref()),
            )),
        }
    }
    let (mut http01, mut tls_alpn01) = (raw.challenges.is_none(), raw.challenges.is_none());
    for ch in raw.challenges.iter().flatten() {
        match ch.get_ref().as_str() {
            "http-01" => http01 = true,
            "tls-alpn-01" => tls_alpn01 = true,
            other => errors.push(src.error_at(
                ch.span(),
                format!("acme.challenges: `{other}` is not http-01 or tls-alpn-01"),
            )),
        }
    }
    let directory_ca = raw
        .directory_ca
        .as_ref()
        .filter(|p| !p.get_ref().is_empty())
        .and_then(|p| {
            let path = config_dir.join(p.get_ref());
            match std::fs::read(&path) {
                Ok(_) => Some(path),
                Err(e) => {
                    errors.push(src.error_at(
                        p.span(),
                        format!("acme.directory_ca: cannot read {}: {e}", path.display()),
                    ));
                    None
                }
            }
        });
    let eab = match (raw.eab_kid.as_deref(), raw.eab_hmac_key.as_deref()) {
        (None | Some(""), None | Some("")) => None,
        (Some(k), Some(h)) if !k.is_empty() && !h.is_empty() => {
            use base64::Engine as _;
            let decoded =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h.trim_end_matches('='));
            if decoded.is_err() {
                errors.push(src.error_at(
                    raw.directory.span(),
                    "acme.eab_hmac_key is not base64url (RFC 8555 §7.3.4)",
                ));
            }
            Some((k.to_owned(), h.to_owned()))
        }
        _ => {
            errors.push(src.error_at(
                raw.directory.span(),
                "acme: eab_kid and eab_hmac_key go together",
            ));
            None
        }
    };
    let nameserver = raw.nameserver.as_ref().and_then(|n| {
        let parsed = n.get_ref().parse::<std::net::SocketAddr>();
        if parsed.is_err() {
            errors.push(src.error_at(
                n.span(),
                format!("acme.nameserver: `{}` is not IP:PORT", n.get_ref()),
            ));
        }
        parsed.ok()
    });
    let orders_in_flight = count(
        src,
        raw.orders_in_flight.as_ref(),
        "acme.orders_in_flight",
        1,
        1000,
        errors,
    )
    .map_or(ORDERS_IN_FLIGHT, |n| n as usize);
    (errors.len() == before).then(|| Acme {
        directory,
        contact,
        http01,
        tls_alpn01,
        storage: config_dir.join(raw.storage.as_deref().unwrap_or("../acme")),
        directory_ca,
        eab,
        nameserver,
        orders_in_flight,
    })
}

/// `[store]`, checked: `kind` files or etcd; for etcd, http endpoints and a prefix ending in
/// `/`. TLS to etcd (`ca_file`, `cert_file`, `key_file`) is refused for now, in so many words.
fn parse_store(
    src: &Source,
    raw: &Spanned<RawStore>,
    errors: &mut Vec<ConfigError>,
) -> Option<EtcdStore> {
    let st = raw.get_ref();
    let kind = st.kind.as_ref().map_or("files", |k| k.get_ref().as_str());
    match kind {
        "files" => return None,
        "etcd" => {}
        other => {
            let span = st.kind.as_ref().map_or(raw.span(), |k| k.span());
            errors.push(src.error_at(
                span,
                format!("store.kind: `{other}` is not \"files\" or \"etcd\""),
            ));
            return None;
        }
    }
    let before = errors.len();
    if !cfg!(feature = "etcd") {
        errors.push(src.error_at(
            raw.span(),
            "store.kind = \"etcd\" needs a logon-gate built with `--features etcd`",
        ));
    }
    if st.endpoints.is_empty() {
        errors.push(src.error_at(
            raw.span(),
            "store.endpoints: name at least one etcd endpoint",
        ));
    }
    let mut endpoints = Vec::new();
    for e in &st.endpoints {
        match e.get_ref().parse::<http::Uri>() {
            Ok(u) if u.scheme_str() == Some("http") && u.host().is_some() => {
                endpoints.push(e.get_ref().clone())
            }
            _ => errors.push(src.error_at(
                e.span(),
                format!(
                    "store.endpoints: `{}` is not an http://host:port URL (TLS to etcd is not supported yet)",
                    e.get_ref()
                ),
            )),
        }
    }
    for (key, v) in [
        ("ca_file", &st.ca_file),
        ("cert_file", &st.cert_file),
        ("key_file", &st.key_file),
    ] {
        if let Some(v) = v.as_ref().filter(|v| !v.get_ref().is_empty()) {
            errors.push(src.error_at(
                v.span(),
                format!("store.{key}: TLS to etcd is not supported yet"),
            ));
        }
    }
    let prefix = st
        .prefix
        .as_ref()
        .map_or("/logon-gate/", |p| p.get_ref().as_str())
        .to_owned();
    if !prefix.ends_with('/') {
        let span = st.prefix.as_ref().map_or(raw.span(), |p| p.span());
        errors.push(src.error_at(span, format!("store.prefix: `{prefix}` must end with `/`")));
    }
    let user = match (&st.user, &st.password) {
        (Some(u), Some(p)) => Some((u.clone(), p.clone())),
        (None, None) => None,
        _ => {
            errors.push(src.error_at(raw.span(), "store: user and password go together"));
            None
        }
    };
    (errors.len() == before).then_some(EtcdStore {
        endpoints,
        prefix,
        user,
    })
}

/// `v` when it lies in `min..=max`; else an error naming `key` (and `None`, as when absent).
fn count(
    src: &Source,
    v: Option<&Spanned<u64>>,
    key: &str,
    min: u64,
    max: u64,
    errors: &mut Vec<ConfigError>,
) -> Option<u64> {
    let v = v?;
    let n = *v.get_ref();
    if n < min || n > max {
        errors.push(src.error_at(
            v.span(),
            format!("{key}: {n} is out of range ({min} to {max})"),
        ));
        return None;
    }
    Some(n)
}

fn duration(
    src: &Source,
    v: &Spanned<String>,
    key: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Duration> {
    match humantime::parse_duration(v.get_ref()) {
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            errors.push(src.error_at(
                v.span(),
                format!("{key}: a duration of zero is not allowed"),
            ));
            None
        }
        Err(_) => {
            errors.push(src.error_at(
                v.span(),
                format!(
                    "{key}: `{}` is not a duration (write e.g. \"2s\" or \"500ms\")",
                    v.get_ref()
                ),
            ));
            None
        }
    }
}

fn parse_backend(src: &Source, raw: &RawBackend, errors: &mut Vec<ConfigError>) -> Option<Backend> {
    let connect_timeout = raw
        .connect_timeout
        .as_ref()
        .map_or(Some(Duration::from_secs(2)), |s| {
            duration(src, s, "backend.connect_timeout", errors)
        });
    let response_timeout = raw
        .response_timeout
        .as_ref()
        .map_or(Some(Duration::from_secs(30)), |s| {
            duration(src, s, "backend.response_timeout", errors)
        });
    let queue_wait = raw
        .queue_wait
        .as_ref()
        .map_or(Some(DEFAULT_QUEUE_WAIT), |s| {
            duration(src, s, "backend.queue_wait", errors)
        });
    let queue_after_busy = match raw.queue_after_busy.as_ref() {
        None => Some(DEFAULT_QUEUE_AFTER_BUSY),
        v => count(src, v, "backend.queue_after_busy", 1, 1 << 24, errors).map(|n| n as usize),
    };
    let url = raw.url.get_ref();
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(_) => {
            errors.push(src.error_at(raw.url.span(), format!("backend.url: `{url}` is not a URL")));
            return None;
        }
    };
    if uri.scheme_str() != Some("http") {
        errors.push(src.error_at(
            raw.url.span(),
            format!("backend.url: `{url}` must start with http:// (the backend is spoken to in plain HTTP/1.1)"),
        ));
        return None;
    }
    let Some(authority) = uri.authority().cloned() else {
        errors.push(src.error_at(raw.url.span(), format!("backend.url: `{url}` has no host")));
        return None;
    };
    if uri.query().is_some() {
        errors.push(src.error_at(
            raw.url.span(),
            format!("backend.url: `{url}` must not have a query string"),
        ));
        return None;
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    Some(Backend {
        authority,
        base_path,
        connect_timeout: connect_timeout?,
        response_timeout: response_timeout?,
        queue_after_busy: queue_after_busy?,
        queue_wait: queue_wait?,
    })
}

/// Per serving thread: above the 250 requests per thread in flight of the HTTP/2 load
/// benchmark, where a queue at 64 cost more (more writes and context switches) than the
/// connections it saved (docs/performance.md); 1,024 connections in all on two cores, as
/// the benchmark's HAProxy `maxconn`.
const DEFAULT_QUEUE_AFTER_BUSY: usize = 512;
/// Long enough to ride out the queue of a fast backend under load (a few milliseconds in the
/// benchmark), short enough that a request stuck behind long polls is hardly delayed.
const DEFAULT_QUEUE_WAIT: Duration = Duration::from_millis(20);

#[cfg(test)]
mod tests {
    use super::*;

    fn src(text: &str) -> Source {
        Source {
            path: "config/gateway.toml".into(),
            text: text.into(),
        }
    }

    #[test]
    fn minimal_gateway_gets_defaults() {
        let (s, hosts) = load_gateway(&src(
            "cname_target = \"logon.provider.test\"\n[backend]\nurl = \"http://127.0.0.1:8080\"\n",
        ))
        .expect("valid");
        assert!(s.require_icp);
        assert_eq!(s.listen.https, Some("0.0.0.0:443".parse().expect("addr")));
        assert_eq!(s.backend.connect_timeout, Duration::from_secs(2));
        assert_eq!(s.backend.queue_after_busy, DEFAULT_QUEUE_AFTER_BUSY);
        assert_eq!(s.backend.queue_wait, DEFAULT_QUEUE_WAIT);
        assert_eq!(s.limits, Limits::default());
        assert_eq!(s.tenants_dir, PathBuf::from("config/tenants"));
        assert!(hosts.is_empty());
    }

    #[test]
    fn errors_name_line() {
        let errs = load_gateway(&src(
            "cname_target = \"logon.provider.test\"\n[backend]\nurl = \"http://127.0.0.1:8080\"\nconnect_timeout = \"soon\"\n",
        ))
        .expect_err("invalid");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, Some(4));
        assert!(
            errs[0]
                .to_string()
                .starts_with("config/gateway.toml:4: backend.connect_timeout")
        );

        let errs = load_gateway(&src(
            "cname_target = \"logon.provider.test\"\nbogus = 1\n[backend]\nurl = \"http://x\"\n",
        ))
        .expect_err("unknown key");
        assert_eq!(errs[0].line, Some(2));
        assert!(errs[0].message.contains("bogus"), "{}", errs[0]);
    }

    #[test]
    fn backend_queue_keys() {
        let base =
            "cname_target = \"logon.provider.test\"\n[backend]\nurl = \"http://127.0.0.1:8080\"\n";
        let (s, _) = load_gateway(&src(&format!(
            "{base}queue_after_busy = 8\nqueue_wait = \"5ms\"\n"
        )))
        .expect("valid");
        assert_eq!(s.backend.queue_after_busy, 8);
        assert_eq!(s.backend.queue_wait, Duration::from_millis(5));

        let errs = load_gateway(&src(&format!("{base}queue_after_busy = 0\n"))).expect_err("zero");
        assert_eq!(errs[0].line, Some(4));
        assert!(
            errs[0]
                .message
                .starts_with("backend.queue_after_busy: 0 is out of range"),
            "{}",
            errs[0]
        );
        let errs = load_gateway(&src(&format!("{base}queue_wait = \"later\"\n")))
            .expect_err("not a duration");
        assert!(
            errs[0].message.starts_with("backend.queue_wait"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn store_keys_are_checked() {
        let base =
            "cname_target = \"logon.provider.test\"\n[backend]\nurl = \"http://127.0.0.1:8080\"\n";
        let (files, _) =
            load_gateway(&src(&format!("{base}[store]\nkind = \"files\"\n"))).expect("files");
        assert_eq!(files.etcd, None);
        let etcd =
            format!("{base}[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n");
        match (load_gateway(&src(&etcd)), cfg!(feature = "etcd")) {
            (Ok((s, _)), true) => {
                let e = s.etcd.expect("etcd");
                assert_eq!(e.prefix, "/logon-gate/");
                assert_eq!(e.endpoints, ["http://127.0.0.1:2379"]);
            }
            (Err(errors), false) => assert!(
                errors
                    .iter()
                    .any(|e| e.to_string().contains("--features etcd")),
                "{errors:?}"
            ),
            (r, built_with_etcd) => panic!("built with etcd: {built_with_etcd}: {:?}", r.err()),
        }
        for (bad, words) in [
            ("kind = \"consul\"", "is not \"files\" or \"etcd\""),
            ("kind = \"etcd\"", "name at least one etcd endpoint"),
            (
                "kind = \"etcd\"\nendpoints = [\"https://e:2379\"]",
                "TLS to etcd is not supported yet",
            ),
            (
                "kind = \"etcd\"\nendpoints = [\"http://e:2379\"]\nprefix = \"/lg\"",
                "must end with `/`",
            ),
            (
                "kind = \"etcd\"\nendpoints = [\"http://e:2379\"]\nuser = \"u\"",
                "user and password go together",
            ),
        ] {
            let errors = load_gateway(&src(&format!("{base}[store]\n{bad}\n"))).expect_err(bad);
            assert!(
                errors.iter().any(|e| e.to_string().contains(words)),
                "{bad}: {errors:?}"
            );
        }
    }

    #[test]
    fn acme_keys_are_checked() {
        let base =
            "cname_target = \"logon.provider.test\"\n[backend]\nurl = \"http://127.0.0.1:8080\"\n";
        let ok = format!(
            "{base}[acme]\ndirectory = \"https://ca.test/dir\"\ncontact = [\"mailto:ops@provider.test\"]\n"
        );
        let (settings, _) = load_gateway(&src(&ok)).expect("valid");
        let acme = settings.acme.expect("acme");
        assert!(acme.http01 && acme.tls_alpn01, "both challenges by default");
        assert!(acme.storage.ends_with("../acme"));
        assert_eq!(acme.orders_in_flight, ORDERS_IN_FLIGHT);
        assert_eq!(acme.nameserver, None);
        for (bad, words) in [
            ("directory = \"ftp://ca.test/\"", "is not an http(s) URL"),
            (
                "directory = \"https://ca.test/dir\"\ncontact = [\"ops@provider.test\"]",
                "is not a mailto: address",
            ),
            (
                "directory = \"https://ca.test/dir\"\nchallenges = [\"dns-01\"]",
                "is not http-01 or tls-alpn-01",
            ),
            (
                "directory = \"https://ca.test/dir\"\ndirectory_ca = \"missing.pem\"",
                "cannot read",
            ),
            (
                "directory = \"https://ca.test/dir\"\neab_kid = \"k\"",
                "go together",
            ),
            (
                "directory = \"https://ca.test/dir\"\nstorag = \"x\"",
                "unknown field",
            ),
            (
                "directory = \"https://ca.test/dir\"\neab_kid = \"k\"\neab_hmac_key = \"not base64!\"",
                "is not base64url",
            ),
            (
                "directory = \"https://ca.test/dir\"\nnameserver = \"127.0.0.1\"",
                "acme.nameserver: `127.0.0.1` is not IP:PORT",
            ),
            (
                "directory = \"https://ca.test/dir\"\norders_in_flight = 0",
                "acme.orders_in_flight: 0 is out of range",
            ),
        ] {
            let errors = load_gateway(&src(&format!("{base}[acme]\n{bad}\n"))).expect_err(bad);
            assert!(
                errors.iter().any(|e| e.to_string().contains(words)),
                "{bad}: {errors:?}"
            );
        }
    }

    #[test]
    fn https_backend_is_refused() {
        let errs = load_gateway(&src(
            "cname_target = \"logon.provider.test\"\n[backend]\nurl = \"https://127.0.0.1:8080\"\n",
        ))
        .expect_err("invalid");
        assert!(errs[0].message.contains("http://"));
    }
}
