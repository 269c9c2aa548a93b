//! Test support: a throwaway PKI, a real backend on port 0, the real gateway on port 0, and
//! real TLS clients (HTTP/1.1 and HTTP/2) that trust only the test CA.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use logon_gate::pki::{Issued, Pki};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A loopback port free now, for a peer that cannot report the port it bound (Dovecot), or
/// that must be told another's before either starts (Pebble and the gateway). Bound and
/// released, so another process could take it in between; these tests start at once after.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `f` every 20 ms until it returns true or `limit` passes; true when it did.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- backend

/// A real HTTP/1.1 backend on a loopback port that counts its hits.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// TCP connections accepted.
    pub conns: Arc<AtomicUsize>,
}

impl Backend {
    pub async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| backend_handle(h.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Backend { addr, hits, conns }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Whether `n` requests have reached the backend within 5 s.
    pub async fn reached(&self, n: usize) -> bool {
        eventually(Duration::from_secs(5), || {
            let hits = self.hits();
            async move { hits >= n }
        })
        .await
    }
}

type BackendBody = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> BackendBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// The deterministic bytes `/download?n=N` returns.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

async fn backend_handle(
    hits: Arc<AtomicUsize>,
    mut req: Request<Incoming>,
) -> Result<Response<BackendBody>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let num = |key: &str| -> u64 {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    let resp = match path.as_str() {
        "/echo" => Response::new(req.into_body().boxed()),
        "/download" => Response::new(full(pattern(num("n") as usize))),
        "/close" => {
            let mut r = Response::new(full("closing"));
            r.headers_mut()
                .insert("connection", http::HeaderValue::from_static("close"));
            r
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(num("ms"))).await;
            Response::new(full("slow done"))
        }
        "/ws" => {
            let key = req.headers().get("sec-websocket-key").map(|k| {
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes())
            });
            let Some(accept) = key else {
                let mut r = Response::new(full("not a websocket request"));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return Ok(r);
            };
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = upgrade.await else { return };
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if ws.send(msg).await.is_err() {
                            return;
                        }
                    } else if msg.is_close() {
                        return;
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(full(""))
                .expect("response")
        }
        _ => {
            // Echo what arrived, as JSON: method, path, headers (all values, in order).
            let mut headers: Vec<(String, String)> = Vec::new();
            for (k, v) in req.headers() {
                headers.push((k.to_string(), v.to_str().unwrap_or("<binary>").to_string()));
            }
            let body = serde_json::json!({
                "method": req.method().as_str(),
                "path": path,
                "version": format!("{:?}", req.version()),
                "headers": headers,
            });
            let mut r = Response::new(full(body.to_string()));
            r.headers_mut().insert(
                "connection",
                http::HeaderValue::from_static("x-backend-hop"),
            );
            r.headers_mut()
                .insert("x-backend-hop", http::HeaderValue::from_static("1"));
            r
        }
    };
    Ok(resp)
}

/// Headers the backend saw, from its JSON echo.
pub fn seen_headers(json: &serde_json::Value, name: &str) -> Vec<String> {
    json["headers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p[0] == name)
                .filter_map(|p| p[1].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------- gateway files

pub const EXAMPLE_NET: &str = r#"# the example.net tenant
domain  = "example.net"
edition = "enterprise"

[[logon]]
host       = "webmail.example.net"
cname      = "verified"
icp        = "filed"
icp_number = "ICP-1"
enabled    = true

[[logon]]
host    = "mail.example.net"
cname   = "verified"
icp     = "filed"
enabled = false
"#;

pub const EXAMPLE_ORG: &str = r#"domain  = "example.org"
edition = "standard"

[[logon]]
host    = "webmail.example.org"
cname   = "verified"
icp     = "filed"
enabled = true
"#;

pub const EXAMPLE_COM: &str = r#"domain  = "example.com"
edition = "free"

[[logon]]
host = "webmail.example.com"
"#;

/// A config folder in a temp dir: gateway.toml, tenants/, certs/, and the PKI that signed them.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub certs: HashMap<String, Issued>,
}

impl Fixture {
    /// The standard set: example.net (enabled + disabled), example.org (enabled, no
    /// certificate), example.com (free); certificates for webmail.example.net (exact),
    /// *.example.net (wildcard) and the platform host mail.provider.test.
    pub fn new(backend_url: &str, extra: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Fixture {
            dir,
            pki: Pki::new("logon-gate test CA").expect("CA"),
            certs: HashMap::new(),
        };
        std::fs::create_dir(f.path().join("tenants")).expect("mkdir");
        std::fs::create_dir(f.path().join("certs")).expect("mkdir");
        f.write_gateway(backend_url, extra);
        f.write_tenant("example.net", EXAMPLE_NET);
        f.write_tenant("example.org", EXAMPLE_ORG);
        f.write_tenant("example.com", EXAMPLE_COM);
        let mut f = f;
        f.add_cert("webmail.example.net.pem", &["webmail.example.net"]);
        f.add_cert("wildcard.pem", &["*.example.net"]);
        f.add_cert("platform.pem", &["mail.provider.test"]);
        f
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn gateway_toml(&self) -> PathBuf {
        self.path().join("gateway.toml")
    }

    pub fn write_gateway(&self, backend_url: &str, extra: &str) {
        let text = format!(
            r#"cname_target = "logon.provider.test"
require_icp = true

[listen]
https = "127.0.0.1:0"
http  = "127.0.0.1:0"
admin = ""

[backend]
url = "{backend_url}"
connect_timeout = "1s"
response_timeout = "5s"

[platform]
hosts = ["mail.provider.test"]

[paths]
tenants = "tenants"
certs = "certs"
{extra}"#
        );
        std::fs::write(self.gateway_toml(), text).expect("write gateway.toml");
    }

    pub fn write_tenant(&self, domain: &str, text: &str) {
        std::fs::write(
            self.path().join("tenants").join(format!("{domain}.toml")),
            text,
        )
        .expect("write tenant");
    }

    /// Issues a certificate for `names` and writes chain + key into one file under certs/.
    pub fn add_cert(&mut self, file: &str, names: &[&str]) -> Issued {
        let issued = self.pki.issue(names).expect("issue");
        std::fs::write(
            self.path().join("certs").join(file),
            format!("{}{}", issued.cert_pem, issued.key_pem),
        )
        .expect("write cert");
        self.certs.insert(file.to_string(), issued.clone());
        issued
    }

    pub fn cert_der(&self, file: &str) -> Vec<u8> {
        self.certs[file].cert_der.clone()
    }

    pub async fn start(&self) -> logon_gate::serve::Running {
        logon_gate::serve::start(&self.gateway_toml())
            .await
            .expect("gateway starts")
    }
}

/// What the gateway's last reload said (`/status`'s `last_reload.message`).
pub fn reload_message(gw: &logon_gate::serve::Running) -> String {
    gw.gateway
        .status
        .lock()
        .map(|s| s.message.clone())
        .unwrap_or_default()
}

// ---------------------------------------------------------------- clients

/// A rustls client config that trusts only `ca_der`.
pub fn client_config(ca_der: &[u8], alpn: &[&[u8]], sni: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .expect("add CA");
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.enable_sni = sni;
    Arc::new(cfg)
}

/// Connects over TLS with `sni`, verifying the server's certificate against the test CA.
pub async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// The leaf certificate the server presented.
pub fn presented(tls: &TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_default()
}

/// The TLS alert a failed handshake received, if that is why it failed.
pub fn alert_of(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// A response with its body collected.
pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("backend JSON")
    }
}

/// One HTTP client connection, HTTP/1.1 or HTTP/2, over any transport.
pub enum Client {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Client {
    pub async fn h1<IO>(io: IO) -> Client
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .expect("h1 handshake");
        tokio::spawn(conn.with_upgrades());
        Client::H1(send)
    }

    pub async fn h2<IO>(io: IO) -> Client
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        Client::H2(send)
    }

    /// Sends a request; for HTTP/1.1 `host` goes in the Host header (None: no Host at all),
    /// for HTTP/2 in `:authority`.
    pub async fn send(
        &mut self,
        method: &str,
        host: Option<&str>,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Got, hyper::Error> {
        let resp = match self {
            Client::H1(s) => {
                let mut b = Request::builder().method(method).uri(path);
                if let Some(h) = host {
                    b = b.header("host", h);
                }
                for (k, v) in headers {
                    b = b.header(*k, *v);
                }
                s.ready().await?;
                s.send_request(b.body(Full::new(body)).expect("request"))
                    .await?
            }
            Client::H2(s) => {
                let uri = format!("https://{}{path}", host.unwrap_or("missing.invalid"));
                let mut b = Request::builder()
                    .method(method)
                    .uri(uri)
                    .version(http::Version::HTTP_2);
                for (k, v) in headers {
                    b = b.header(*k, *v);
                }
                s.ready().await?;
                s.send_request(b.body(Full::new(body)).expect("request"))
                    .await?
            }
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Got {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Got {
        self.send("GET", Some(host), path, &[], Bytes::new())
            .await
            .expect("request")
    }
}

/// Opens an HTTPS connection with `sni` and ALPN `h2` or `http/1.1`.
pub async fn https_client(addr: SocketAddr, ca: &[u8], sni: &str, h2: bool) -> Client {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let tls = tls_connect(addr, client_config(ca, alpn, true), sni)
        .await
        .expect("TLS handshake");
    let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    assert_eq!(negotiated.as_deref(), Some(alpn[0]), "ALPN");
    if h2 {
        Client::h2(tls).await
    } else {
        Client::h1(tls).await
    }
}

/// Opens a plain HTTP/1.1 connection.
pub async fn http_client(addr: SocketAddr) -> Client {
    Client::h1(TcpStream::connect(addr).await.expect("connect")).await
}
pub mod dns;
pub mod peers;
pub mod process;
