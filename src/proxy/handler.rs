//! One request: find its Host, ask the policy, then forward it, redirect it, or refuse it with a
//! short page that says why. Refusals never reach the backend.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::config::certs::CertEntry;
use crate::config::host::{self, HostBuf};
use crate::proxy::access::{Logged, Record};
use crate::proxy::policy::{self, Decision, TlsFacts};
use crate::state::{Gateway, Snapshot};
use crate::upstream::body::RequestBody;
use crate::upstream::pool::PoolBody;
use crate::upstream::{ClientSide, ForwardError};

/// Response bodies: the backend's, streamed, or one of our short pages.
pub type Page = Either<PoolBody, Full<Bytes>>;

/// What the gateway sends: a page or the backend's body, logged at its end.
pub type Body = Logged<Page>;

/// What one connection knows about itself.
pub struct Conn {
    pub gateway: Arc<Gateway>,
    pub peer: SocketAddr,
    /// SNI and presented certificate, for HTTPS connections.
    pub tls: Option<(Box<str>, Arc<CertEntry>)>,
    /// Requests the client abandoned before their answer (an HTTP/2 reset), and answered.
    cancelled: AtomicU32,
    answered: AtomicU32,
    /// Signalled when this connection looks like an HTTP/2 "rapid reset" flood.
    pub abuse: tokio::sync::Notify,
    /// HTTP/1.1 only: which request carried both Content-Length and Transfer-Encoding, and
    /// whether one is being answered (for the idle timeout).
    pub framing: Arc<crate::proxy::progress::ConnProgress>,
    /// The last request forwarded here (see [`Conn::forwarded_before`]).
    last_forward: Mutex<Option<LastForward>>,
    /// Proxy-header parts that depend only on the peer, built once.
    peer_ip: HeaderValue,
    forwarded: crate::upstream::Forwarded,
}

/// More abandoned requests than this, and more than were answered, cuts the connection off:
/// browsers cancel a few streams, a rapid-reset flood cancels nearly all of them.
const MAX_CANCELLED: u32 = 100;

impl Conn {
    /// A connection's state.
    pub fn new(
        gateway: Arc<Gateway>,
        peer: SocketAddr,
        tls: Option<(Box<str>, Arc<CertEntry>)>,
    ) -> Self {
        let (peer_ip, forwarded) = crate::upstream::peer_parts(peer);
        Conn {
            gateway,
            peer,
            tls,
            last_forward: Mutex::new(None),
            peer_ip,
            forwarded,
            framing: Arc::default(),
            cancelled: AtomicU32::new(0),
            answered: AtomicU32::new(0),
            abuse: tokio::sync::Notify::new(),
        }
    }
}

/// Counts a request whose future was dropped before it produced a response.
fn cancelled(conn: &Conn) {
    let cancelled = conn.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
    if cancelled > MAX_CANCELLED && cancelled > conn.answered.load(Ordering::Relaxed) {
        conn.abuse.notify_one();
    }
}

/// A request with both Content-Length and Transfer-Encoding, disagreeing Content-Lengths, or
/// one that is not a number: the shapes of request smuggling (RFC 9112 §6.3, RFC 9110
/// §8.6), refused rather than repaired. Over HTTP/1.1 hyper has already removed such a
/// Content-Length, and refused one that is not a number; `framing` catches the first case.
/// Over HTTP/2, h2 takes an empty value for 0.
fn smuggling_shape<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    if !h.contains_key(header::CONTENT_LENGTH) {
        return false;
    }
    if h.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    let mut values = h
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii);
    let first = values.next();
    let number = |v: &[u8]| !v.is_empty() && v.iter().all(u8::is_ascii_digit);
    !first.is_some_and(number) || values.any(|v| Some(v) != first)
}

/// Serves one request; never fails (errors become pages).
///
/// The decision, and the making of the forwarding future, happen here, when hyper takes the
/// request; the future returned ([`Handling`]) only waits for the backend and finishes the
/// answer. The request is thus kept once, in the pool's future: hyper copies a stream's
/// whole future into the stream's box when it starts, into memory last written hundreds of
/// requests before, so every byte of it costs (docs/performance.md).
pub fn handle(
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send {
    let h1 = req.version() <= http::Version::HTTP_11;
    let started = Instant::now();
    // Borrowed, not cloned: the forwarding future owns what it needs, and an `Arc` clone
    // would write the count that every serving thread writes, moving its cache line between
    // cores twice per request.
    let snapshot = conn.gateway.live.load();
    // The access line's parts are gathered only when it will be written, straight into the
    // record it is written from. Cheap clones (shared bytes); a counter only for requests
    // with a body.
    let logging = tracing::enabled!(target: "access", tracing::Level::INFO);
    let bytes_in = (logging && !hyper::body::Body::is_end_stream(req.body()))
        .then(|| Arc::new(AtomicU64::new(0)));
    let mut record = logging.then(|| {
        Box::new(Record {
            started,
            client: conn.peer,
            host: None,
            tenant: None,
            method: req.method().clone(),
            uri: req.uri().clone(),
            status: 0,
            decision: "",
            upstream: None,
            upstream_error: None,
            bytes_in: bytes_in.clone(),
        })
    });

    // Counted for every HTTP/1.x request, so the framing watch's request numbers line up.
    let ambiguous = h1 && conn.framing.begin();
    let bad_framing = ambiguous || smuggling_shape(&req);
    // A browser sends all of a connection's requests to one host: the next request with the
    // same authority, under the same configuration, is forwarded as the last one was, without
    // normalising and looking up its host again.
    // An ACME CA asking for an http-01 answer, before the host policy and the 308 (the
    // host is not served over HTTPS until this answer gets it a certificate).
    let challenge = conn
        .tls
        .is_none()
        .then(|| acme_answer(&snapshot, req.uri().path()))
        .flatten();
    let (plan, label) = if let Some(answer) = challenge {
        (Plan::Answer(Box::new(answer)), "acme_challenge")
    } else {
        let again = (!bad_framing)
            .then(|| sent_authority(&req))
            .flatten()
            .and_then(|a| conn.forwarded_before(snapshot.generation, a));
        match again {
            Some((authority, tenant)) => {
                if let Some(r) = record.as_mut() {
                    r.host = Some(authority.clone());
                    r.tenant = tenant.clone();
                }
                (Plan::Forward { authority, tenant }, "forward")
            }
            None => plan(&conn, &snapshot, &req, bad_framing, record.as_deref_mut()),
        }
    };
    let (forwarded, answer) = match plan {
        Plan::Forward { authority, tenant } => {
            let client = ClientSide {
                peer_ip: &conn.peer_ip,
                forwarded: &conn.forwarded,
                https: conn.tls.is_some(),
                authority: &authority,
                tenant,
            };
            let h2_length = (!h1)
                .then(|| req.headers().get(header::CONTENT_LENGTH))
                .flatten()
                .and_then(|v| v.to_str().ok()?.trim().parse().ok());
            let req = req.map(|b| RequestBody::new(b, bytes_in, h2_length));
            (Some(snapshot.upstream.forward(req, client)), None)
        }
        Plan::Answer(resp) => (None, Some(resp)),
    };
    drop(snapshot);
    Handling {
        sent: logging.then(Instant::now),
        forwarded,
        answer,
        conn,
        started,
        record,
        label,
        h1,
    }
}

pin_project_lite::pin_project! {
    /// A request's future once the decision is made: it waits for the backend's answer (or
    /// has its page already) and then finishes the response. Written out rather than as an
    /// async block, which would keep the forwarding future twice (as captured, and as
    /// awaited).
    struct Handling<F> {
        #[pin]
        forwarded: Option<F>,
        answer: Option<Box<Response<Page>>>,
        conn: Arc<Conn>,
        started: Instant,
        sent: Option<Instant>,
        record: Option<Box<Record>>,
        label: &'static str,
        h1: bool,
    }

    impl<F> PinnedDrop for Handling<F> {
        fn drop(this: Pin<&mut Self>) {
            // Both are taken in the poll that answers.
            if this.forwarded.is_some() || this.answer.is_some() {
                cancelled(&this.conn);
            }
        }
    }
}

impl<F> Future for Handling<F>
where
    F: Future<Output = Result<Response<PoolBody>, ForwardError>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let (resp, upstream_error) = match this.forwarded.as_mut().as_pin_mut() {
            Some(forwarded) => {
                let result = std::task::ready!(forwarded.poll(cx));
                this.forwarded.set(None);
                if let (Some(r), Some(t)) = (this.record.as_mut(), *this.sent) {
                    r.upstream = Some(t.elapsed());
                }
                match result {
                    Ok(r) => (r.map(Either::Left), None),
                    Err(e) => {
                        let page = page(e.status(), &format!("{}.", e.chain()));
                        (page, Some(e))
                    }
                }
            }
            None => match this.answer.take() {
                Some(resp) => (*resp, None),
                // Polled again after it answered.
                None => return Poll::Pending,
            },
        };

        let conn = &**this.conn;
        let status = resp.status().as_u16();
        if *this.h1 && status == 101 {
            conn.framing.set_tunnel();
        }
        let elapsed = this.started.elapsed();
        let m = &conn.gateway.metrics;
        m.request(this.label, status, elapsed);
        if let Some(e) = upstream_error.as_ref().filter(|e| e.is_upstream()) {
            m.upstream_errors
                .get_or_create(&crate::telemetry::metrics::KindLabel { kind: e.label() })
                .inc();
        }
        let mut record = this.record.take();
        if let Some(r) = record.as_mut() {
            r.status = status;
            r.decision = this.label;
            r.upstream_error = upstream_error.as_ref().map(|e| e.label());
        }
        let done = this.h1.then(|| conn.framing.clone());
        let resp = resp.map(|b| Logged::new(b, record, done));
        conn.answered.fetch_add(1, Ordering::Relaxed);
        Poll::Ready(Ok(resp))
    }
}

/// What the decision leaves to do: forward (with what the proxy headers need), or answer with
/// a page (boxed: this is kept in the request's future while a forward waits).
enum Plan {
    Forward {
        authority: HeaderValue,
        tenant: Option<HeaderValue>,
    },
    Answer(Box<Response<Page>>),
}

/// A connection's last forwarded request: its authority as sent, the configuration generation
/// it was decided under, and the tenant it was forwarded for.
struct LastForward {
    generation: u64,
    authority: HeaderValue,
    tenant: Option<HeaderValue>,
}

impl Conn {
    /// The authority and tenant of the last request forwarded on this connection, when it
    /// was sent the same `authority` and decided under configuration `generation`: the same
    /// decision again (it depends only on those and the connection's TLS facts).
    fn forwarded_before(
        &self,
        generation: u64,
        authority: &[u8],
    ) -> Option<(HeaderValue, Option<HeaderValue>)> {
        let last = self
            .last_forward
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let last = last.as_ref()?;
        (last.generation == generation && last.authority.as_bytes() == authority)
            .then(|| (last.authority.clone(), last.tenant.clone()))
    }
}

/// Where an ACME CA asks for http-01 answers (RFC 8555 §8.3).
const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// The key authorization for an http-01 token being validated now, if `path` asks for one
/// (published in `[acme] storage` by whichever process orders, this one or `cert issue`).
fn acme_answer(snapshot: &Snapshot, path: &str) -> Option<Response<Page>> {
    let token = path.strip_prefix(ACME_CHALLENGE)?;
    let acme = snapshot.table.settings.acme.as_ref()?;
    let answer = crate::acme::Storage::of(acme).challenge(crate::acme::Challenge::Http01, token)?;
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(answer))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Some(resp)
}

/// Decides a request not decided before on its connection (see `Conn::forwarded_before`),
/// remembering a forward for the next one. Its own function, so that the host buffer the
/// decision borrows is never part of the request's future (hyper moves a stream's future a
/// few times before it runs, and 500 of them are in flight under load).
fn plan(
    conn: &Conn,
    snapshot: &Snapshot,
    req: &Request<Incoming>,
    bad_framing: bool,
    record: Option<&mut Record>,
) -> (Plan, &'static str) {
    let authority = authority_of(req);
    let mut buf: HostBuf = [0; host::MAX_HOST_LEN + 2];
    let tls = conn.tls.as_ref().map(|(sni, cert)| TlsFacts { sni, cert });
    let decision = match &authority {
        _ if bad_framing => Decision::BadFraming,
        Ok(a) => policy::decide(
            &snapshot.table,
            tls.as_ref(),
            a.as_ref().map(HeaderValue::as_bytes),
            &mut buf,
        ),
        Err(()) => Decision::BadHost,
    };
    if let Some(r) = record {
        r.host = match &authority {
            Ok(Some(a)) if decision.host().is_some() => Some(a.clone()),
            _ => None,
        };
        r.tenant = decision.tenant().map(|t| t.header.clone());
    }
    let label = decision.label();
    let plan = match (decision, authority) {
        (Decision::Forward { tenant, .. }, Ok(Some(authority))) => {
            let tenant = tenant.map(|t| t.header.clone());
            if let Some(kept) = crate::upstream::detached(&authority) {
                *conn
                    .last_forward
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(LastForward {
                    generation: snapshot.generation,
                    authority: kept,
                    tenant: tenant.clone(),
                });
            }
            Plan::Forward { authority, tenant }
        }
        (Decision::RedirectHttps { host, .. }, _) => {
            Plan::Answer(Box::new(redirect(&conn.gateway, host, req)))
        }
        (Decision::Forward { .. }, _) => Plan::Answer(Box::new(page(
            StatusCode::BAD_REQUEST,
            &refusal_text(&Decision::BadHost),
        ))),
        (ref refused, _) => Plan::Answer(Box::new(page(refused.status(), &refusal_text(refused)))),
    };
    (plan, label)
}

/// The request's authority as sent, when it is in one place only (the URI, or a single Host
/// header): what a connection's last forward is matched against.
fn sent_authority<B>(req: &Request<B>) -> Option<&[u8]> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (req.uri().authority(), hosts.next()) {
        (Some(a), None) => Some(a.as_str().as_bytes()),
        (None, Some(h)) if hosts.next().is_none() => Some(h.as_bytes()),
        _ => None,
    }
}

/// The request's authority: `:authority`/absolute-form URI if present, else the one `Host`
/// header. Two Host headers, or a Host that names another host than the URI, is malformed.
fn authority_of<B>(req: &Request<B>) -> Result<Option<HeaderValue>, ()> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(());
    }
    let Some(uri_authority) = req.uri().authority() else {
        return Ok(host.cloned());
    };
    let from_uri = HeaderValue::from_str(uri_authority.as_str()).map_err(|_| ())?;
    if let Some(host) = host {
        let (mut a, mut b): (HostBuf, HostBuf) =
            ([0; host::MAX_HOST_LEN + 2], [0; host::MAX_HOST_LEN + 2]);
        let x = host::normalize_authority(host.as_bytes(), &mut a);
        let y = host::normalize_authority(from_uri.as_bytes(), &mut b);
        if x.is_none() || x != y {
            return Err(());
        }
    }
    Ok(Some(from_uri))
}

fn refusal_text(d: &Decision<'_, '_>) -> String {
    match *d {
        Decision::BadHost => "the request has no valid Host header.".into(),
        Decision::BadFraming => {
            "the request has both Content-Length and Transfer-Encoding, or conflicting Content-Lengths.".into()
        }
        Decision::WrongCertificate { host } => format!(
            "{host} is not covered by the certificate of this connection; open a new connection for it."
        ),
        Decision::UnknownHost { host } => {
            format!("{host} is not a logon address served by this gateway.")
        }
        Decision::NotEnabled { host, tenant } => {
            if tenant.edition == crate::config::Edition::Free {
                format!(
                    "{host} is a logon address of {}, whose edition does not include custom logon addresses.",
                    tenant.domain
                )
            } else {
                format!(
                    "{host} is a logon address of {} but is not enabled.",
                    tenant.domain
                )
            }
        }
        Decision::RedirectHttps { .. } | Decision::Forward { .. } => String::new(),
    }
}

/// A short text page: status line words, then why.
pub fn page(status: StatusCode, why: &str) -> Response<Page> {
    let text = format!(
        "{} {}: {why}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(text))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn redirect(gw: &Gateway, host: &str, req: &Request<Incoming>) -> Response<Page> {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = match gw.https_port {
        Some(443) | None => format!("https://{host}{pq}"),
        Some(port) => format!("https://{host}:{port}{pq}"),
    };
    let mut resp = page(StatusCode::PERMANENT_REDIRECT, &format!("use {location}"));
    if let Ok(v) = HeaderValue::try_from(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    /// RFC 9112 §3.2 and RFC 9113 §8.3.1: the authority is the URI's (absolute form, or
    /// `:authority`) when there is one, else the one Host; two Hosts, or a Host naming
    /// another host than the URI, is malformed. The port and case do not count (SPEC §3).
    #[test]
    fn authority_comes_from_one_place() {
        let a = |r: &Request<()>| authority_of(r).map(|a| a.map(|v| v.as_bytes().to_vec()));
        assert_eq!(
            a(&req("/", &[("host", "webmail.example.net")])),
            Ok(Some(b"webmail.example.net".to_vec()))
        );
        assert_eq!(a(&req("/", &[])), Ok(None));
        assert_eq!(
            a(&req("https://webmail.example.net:8443/x", &[])),
            Ok(Some(b"webmail.example.net:8443".to_vec()))
        );
        assert_eq!(
            a(&req(
                "https://webmail.example.net:8443/x",
                &[("host", "WebMail.example.net")]
            )),
            Ok(Some(b"webmail.example.net:8443".to_vec()))
        );
        assert_eq!(
            a(&req(
                "https://webmail.example.net/",
                &[("host", "evil.example")]
            )),
            Err(())
        );
        assert_eq!(
            a(&req("/", &[("host", "a.example"), ("host", "a.example")])),
            Err(())
        );
        // What a connection's last forward is matched against: one place only.
        assert_eq!(
            sent_authority(&req("/", &[("host", "a.example")])),
            Some(&b"a.example"[..])
        );
        assert_eq!(
            sent_authority(&req("https://a.example/", &[("host", "a.example")])),
            None
        );
    }

    /// RFC 9112 §6.3 and RFC 9110 §8.6: Content-Length with Transfer-Encoding, several
    /// Content-Lengths that disagree, or one that is not a number.
    #[test]
    fn smuggling_shapes() {
        let shape = |h: &[(&str, &str)]| smuggling_shape(&req("/", h));
        assert!(!shape(&[]));
        assert!(!shape(&[("content-length", "5")]));
        assert!(!shape(&[("transfer-encoding", "chunked")]));
        assert!(!shape(&[("content-length", "5"), ("content-length", "5")]));
        assert!(!shape(&[("content-length", "5, 5")]));
        assert!(shape(&[
            ("content-length", "5"),
            ("transfer-encoding", "chunked")
        ]));
        assert!(shape(&[
            ("transfer-encoding", "chunked"),
            ("content-length", "5")
        ]));
        assert!(shape(&[("content-length", "5"), ("content-length", "6")]));
        assert!(shape(&[("content-length", "5, 6")]));
        assert!(shape(&[("content-length", "")]));
        assert!(shape(&[("content-length", "+5")]));
        assert!(shape(&[("content-length", "0x5")]));
    }
}
