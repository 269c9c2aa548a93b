//! `logon-gate demo`: the real gateway on loopback ports, a demo webmail backend in the same
//! process, throwaway certificates made on the fly, and commands to try printed.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::pki::Pki;

/// Example tenants, used when the `--config` folder has none (e.g. run outside the repository).
const EMBEDDED_TENANTS: [(&str, &str); 3] = [
    (
        "example.net.toml",
        include_str!("../../config/tenants/example.net.toml"),
    ),
    (
        "example.org.toml",
        include_str!("../../config/tenants/example.org.toml"),
    ),
    (
        "example.com.toml",
        include_str!("../../config/tenants/example.com.toml"),
    ),
];

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// HTTPS listener address.
    pub https: SocketAddr,
    /// Plain HTTP listener address.
    pub http: SocketAddr,
    /// The gateway.toml whose tenants folder to use, if it exists.
    pub config: PathBuf,
}

/// A prepared demo: its folder (deleted on drop) and the files in it.
pub struct DemoSetup {
    pub dir: tempfile::TempDir,
    pub gateway_toml: PathBuf,
    pub ca_pem: PathBuf,
}

/// Writes the demo's gateway.toml and certificates into a temporary folder.
/// Why the demo could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the demo certificates")]
    Pki(#[source] rcgen::Error),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DemoError {
    let path = path.to_path_buf();
    move |source| DemoError::Io { what, path, source }
}

/// Writes the demo's files: tenants, throwaway certificates, gateway.toml.
pub fn prepare(opts: &DemoOptions, backend: SocketAddr) -> Result<DemoSetup, DemoError> {
    let dir = tempfile::Builder::new()
        .prefix("logon-gate-demo-")
        .tempdir()
        .map_err(io("create a temporary folder in", &std::env::temp_dir()))?;
    let tenants = tenants_dir(&opts.config, dir.path())?;
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).map_err(io("create", &certs))?;

    let pki = Pki::new("logon-gate demo CA").map_err(DemoError::Pki)?;
    let ca_pem = dir.path().join("demo-ca.pem");
    write(&ca_pem, &pki.ca_pem())?;
    // One certificate per SNI so the demo can show selection: exact names, and a wildcard
    // that covers example.net's other addresses.
    for (file, names) in [
        ("webmail.example.net.pem", &["webmail.example.net"][..]),
        ("wildcard.example.net.pem", &["*.example.net"][..]),
        ("webmail.example.org.pem", &["webmail.example.org"][..]),
        ("webmail.example.com.pem", &["webmail.example.com"][..]),
        ("mail.provider.test.pem", &["mail.provider.test"][..]),
    ] {
        let issued = pki.issue(names).map_err(DemoError::Pki)?;
        write(
            &certs.join(file),
            &format!("{}{}", issued.cert_pem, issued.key_pem),
        )?;
        restrict(&certs.join(file))?;
    }

    let gateway_toml = dir.path().join("gateway.toml");
    let text = format!(
        r#"# Written by `logon-gate demo`.
cname_target = "logon.provider.test"
require_icp  = true

[listen]
https = "{https}"
http  = "{http}"
admin = ""

[backend]
url = "http://{backend}"
connect_timeout = "2s"
response_timeout = "30s"

[platform]
hosts = ["mail.provider.test"]

[paths]
tenants = {tenants:?}
certs   = "certs"
"#,
        https = opts.https,
        http = opts.http,
        tenants = tenants.display().to_string(),
    );
    write(&gateway_toml, &text)?;
    Ok(DemoSetup {
        dir,
        gateway_toml,
        ca_pem,
    })
}

fn tenants_dir(config: &Path, tmp: &Path) -> Result<PathBuf, DemoError> {
    let shipped = config.parent().map(|p| p.join("tenants"));
    if let Some(dir) = shipped
        && dir.is_dir()
    {
        return std::path::absolute(&dir).map_err(io("resolve", &dir));
    }
    let dir = tmp.join("tenants");
    std::fs::create_dir(&dir).map_err(io("create", &dir))?;
    for (name, text) in EMBEDDED_TENANTS {
        write(&dir.join(name), text)?;
    }
    Ok(dir)
}

fn write(path: &Path, text: &str) -> Result<(), DemoError> {
    std::fs::write(path, text).map_err(io("write", path))
}

#[cfg(unix)]
fn restrict(path: &Path) -> Result<(), DemoError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod", path))
}

#[cfg(not(unix))]
fn restrict(_: &Path) -> Result<(), DemoError> {
    Ok(())
}

/// Starts the demo webmail backend on a loopback port; its page says which logon address and
/// tenant the request came through.
pub async fn start_backend() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service_fn(webmail_page))
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn webmail_page(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let h = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    let tenant = req
        .headers()
        .get("x-logon-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(platform host: no tenant)")
        .to_string();
    let body = format!(
        "Demo webmail: please log on.\n  logon address: {}\n  tenant:        {}\n  scheme:        {}\n  client:        {}\n",
        h("host"),
        tenant,
        h("x-forwarded-proto"),
        h("x-forwarded-for"),
    );
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(resp)
}

/// The commands printed for a newcomer to try.
pub fn instructions(setup: &DemoSetup, https: SocketAddr, http: SocketAddr) -> String {
    let ca = setup.ca_pem.display();
    let hp = https.port();
    let pp = http.port();
    let ip = https.ip();
    let curl =
        |host: &str| format!("curl --cacert {ca} --resolve {host}:{hp}:{ip} https://{host}:{hp}/");
    let mut s = String::new();
    let _ = writeln!(s, "logon-gate demo is running (Ctrl-C to stop).");
    let _ = writeln!(s, "  config:  {}", setup.gateway_toml.display());
    let _ = writeln!(s, "  demo CA: {ca}");
    let _ = writeln!(s, "  https:   {https}    http: {http}\n");
    let _ = writeln!(s, "Try:");
    let _ = writeln!(
        s,
        "  # an enabled logon address: served by the webmail backend (200)"
    );
    let _ = writeln!(s, "  {}", curl("webmail.example.net"));
    let _ = writeln!(s, "  # set up but not enabled: refused (403)");
    let _ = writeln!(s, "  {}", curl("mail.example.net"));
    let _ = writeln!(s, "  # a free-edition tenant's address: refused (403)");
    let _ = writeln!(s, "  {}", curl("webmail.example.com"));
    let _ = writeln!(s, "  # not a logon address at all: refused (421)");
    let _ = writeln!(s, "  {}", curl("nobody.example.net"));
    let _ = writeln!(
        s,
        "  # a different certificate per SNI: compare the subjects"
    );
    let _ = writeln!(
        s,
        "  {} -v -o /dev/null 2>&1 | grep subject:",
        curl("webmail.example.org")
    );
    let _ = writeln!(
        s,
        "  {} -v -o /dev/null 2>&1 | grep subject:",
        curl("mail.example.net")
    );
    let _ = writeln!(
        s,
        "  # no certificate for this name: the handshake is refused (unrecognized_name)"
    );
    let _ = writeln!(s, "  {}", curl("unknown.test"));
    let _ = writeln!(
        s,
        "  # plain HTTP to an address with a certificate: 308 to HTTPS"
    );
    let _ = writeln!(
        s,
        "  curl -i --resolve webmail.example.net:{pp}:{ip} http://webmail.example.net:{pp}/"
    );
    let _ = writeln!(s, "  # the platform's own logon host works for everyone");
    let _ = writeln!(s, "  {}", curl("mail.provider.test"));
    s
}
