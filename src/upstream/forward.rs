//! Forwarding to the webmail backend: a pooled HTTP/1.1 client, proxy headers, streaming bodies
//! both ways, Upgrade (WebSocket) pass-through and the connect/response timeouts.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::config::{Backend, Limits};
use crate::upstream::body::RequestBody;
use crate::upstream::pool::{InFlight, Pool, PoolBody, PoolError};

/// Why a request could not be forwarded. [`ForwardError::chain`] says it with its causes.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("backend unreachable")]
    Unreachable(#[source] PoolError),
    #[error("backend did not answer within {0:?}")]
    Timeout(Duration),
    #[error("backend failed")]
    Failed(#[source] PoolError),
    /// The backend's base path and the request's path make no valid URI.
    #[error("backend failed")]
    Uri(#[from] http::uri::InvalidUri),
    /// The backend's response has a transfer-coding other than `chunked`.
    #[error("backend failed: a transfer-coding other than chunked")]
    TransferCoding,
    /// The client's body broke its framing before the request could be sent whole
    /// (RFC 9113 §8.1.1); h2 has reset the stream.
    #[error("the request's body does not match its content-length")]
    ClientBody(#[source] crate::upstream::body::BodyError),
    #[error("too many requests in flight to the backend")]
    Busy,
}

impl ForwardError {
    /// 502 for a backend that cannot be reached or fails, 504 for one too slow, 503 when our
    /// own in-flight limit is reached.
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::Unreachable(_)
            | ForwardError::Failed(_)
            | ForwardError::Uri(_)
            | ForwardError::TransferCoding => StatusCode::BAD_GATEWAY,
            ForwardError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ForwardError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ForwardError::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Whether the backend (or the gateway's side of it) failed, for `upstream_errors`; not
    /// so for a client whose body broke its framing.
    pub fn is_upstream(&self) -> bool {
        !matches!(self, ForwardError::ClientBody(_))
    }

    /// The error and its causes, each after a colon.
    pub fn chain(&self) -> String {
        crate::error::sentence(self)
    }

    /// A bounded label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ForwardError::Unreachable(_) => "connect",
            ForwardError::Timeout(_) => "timeout",
            ForwardError::Failed(_) | ForwardError::Uri(_) | ForwardError::TransferCoding => {
                "failed"
            }
            ForwardError::ClientBody(_) => "client_body",
            ForwardError::Busy => "busy",
        }
    }
}

/// The pooled connection to the backend, rebuilt only when its settings change.
pub struct Upstream {
    /// Also counts the requests in flight (`backend_max_in_flight`).
    pool: Arc<Pool>,
    backend: Backend,
    max_in_flight: usize,
}

/// Facts about the client side that the backend is told in proxy headers.
pub struct ClientSide<'a> {
    /// The client's IP as a header value (built once per connection).
    pub peer_ip: &'a HeaderValue,
    /// The connection's `Forwarded` header.
    pub forwarded: &'a Forwarded,
    pub https: bool,
    /// The Host the client asked for, as sent (port included).
    pub authority: &'a HeaderValue,
    /// `X-Logon-Tenant` value; `None` for platform hosts.
    pub tenant: Option<HeaderValue>,
}

impl Upstream {
    /// A client for `backend`, with keep-alive pooling and `TCP_NODELAY`.
    pub fn new(backend: &Backend, limits: &Limits) -> Upstream {
        let pool = Pool::new(backend, limits.backend_max_in_flight);
        Upstream {
            pool,
            backend: backend.clone(),
            max_in_flight: limits.backend_max_in_flight,
        }
    }

    /// Requests waiting for a busy backend connection (`backend.queue_after_busy`).
    pub fn queued(&self) -> usize {
        self.pool.queued()
    }

    /// Requests in flight to the backend now (`backend_max_in_flight`).
    pub fn in_flight(&self) -> usize {
        self.pool.in_flight()
    }

    /// True when a table with these settings can keep using this upstream (and its pool).
    pub fn fits(&self, backend: &Backend, limits: &Limits) -> bool {
        self.backend == *backend && self.max_in_flight == limits.backend_max_in_flight
    }

    /// Prepares `req` for the backend (origin-form URI, hop-by-hop headers out, proxy headers
    /// in), then returns the future that sends it and gives the response head, with the body
    /// streaming.
    ///
    /// The preparation runs here, before the future exists, and the future owns all it needs
    /// (`'static`), so that a caller can make it before its own future and keep it there once.
    /// The request itself is kept only in the pool's future: every copy of it in a future
    /// makes hyper's stream future larger, and that is copied whole, into memory last written
    /// hundreds of requests before, when the stream starts (docs/performance.md).
    pub fn forward(
        &self,
        mut req: Request<RequestBody>,
        client: ClientSide<'_>,
    ) -> impl Future<Output = Result<Response<PoolBody>, ForwardError>> + Send + use<> {
        let (entered, client_upgrade) = match self.prepare(&mut req, client) {
            Ok(prepared) => prepared,
            Err(e) => return Either::Left(std::future::ready(Err(e))),
        };
        let timeout = self.backend.response_timeout;
        if req.body().must_end_first() {
            // Rare (an HTTP/2 request declared empty whose stream is still open), so boxed.
            return Either::Right(Either::Right(Box::pin(async move {
                req.body_mut()
                    .wait_for_end()
                    .await
                    .map_err(ForwardError::ClientBody)?;
                Sending {
                    sent: tokio::time::timeout(timeout, Pool::send(entered, req)),
                    timeout,
                    client_upgrade,
                }
                .await
            })
                as Pin<Box<dyn Future<Output = _> + Send>>));
        }
        Either::Right(Either::Left(Sending {
            sent: tokio::time::timeout(timeout, Pool::send(entered, req)),
            timeout,
            client_upgrade,
        }))
    }

    /// `forward`'s first half: makes `req` the request the backend gets, and returns a place
    /// among `backend_max_in_flight` and the client's side of an upgrade it asks for. In
    /// place, not taken apart and rebuilt: the request is copied on every move, and it
    /// already moves several times on its way to the backend.
    fn prepare(
        &self,
        req: &mut Request<RequestBody>,
        client: ClientSide<'_>,
    ) -> Result<(InFlight, Option<OnUpgrade>), ForwardError> {
        let entered = self.pool.enter().ok_or(ForwardError::Busy)?;
        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut *req));

        *req.uri_mut() = self.backend_uri(req.uri())?;
        *req.version_mut() = Version::HTTP_11;
        let headers = std::mem::take(req.headers_mut());
        *req.headers_mut() = backend_headers(headers, client, upgrade);
        Ok((entered, client_upgrade))
    }

    /// The origin-form URI sent to the backend: its base path, then the request's path and
    /// query (the Host header says which site; the connection says which server).
    fn backend_uri(&self, original: &Uri) -> Result<Uri, ForwardError> {
        if self.backend.base_path.is_empty() {
            return Ok(original
                .path_and_query()
                .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone())));
        }
        let pq = original.path_and_query().map_or("/", |pq| pq.as_str());
        Uri::try_from(format!("{}{}", self.backend.base_path, pq)).map_err(ForwardError::Uri)
    }
}

pin_project_lite::pin_project! {
    /// `forward`'s second half: waits for the response head under the response timeout, then
    /// passes an Upgrade through or strips the response's hop-by-hop headers. Written out
    /// rather than as an async block, which would keep the pool's future twice (as captured,
    /// and as awaited).
    struct Sending<F> {
        #[pin]
        sent: tokio::time::Timeout<F>,
        timeout: Duration,
        client_upgrade: Option<OnUpgrade>,
    }
}

impl<F> Future for Sending<F>
where
    F: Future<Output = Result<Response<PoolBody>, PoolError>>,
{
    type Output = Result<Response<PoolBody>, ForwardError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let sent = match this.sent.poll(cx) {
            Poll::Ready(Ok(out)) => out,
            Poll::Ready(Err(_)) => return Poll::Ready(Err(ForwardError::Timeout(*this.timeout))),
            Poll::Pending => return Poll::Pending,
        };
        let mut resp = match sent {
            Err(e) if e.is_connect() => return Poll::Ready(Err(ForwardError::Unreachable(e))),
            Err(e) => return Poll::Ready(Err(ForwardError::Failed(e))),
            Ok(r) => r,
        };
        // The request's place in flight (in the pool's lease until now) ends here, or is held
        // for the life of an upgraded tunnel.
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = this.client_upgrade.take()
        {
            let entered = resp.body_mut().detach();
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let _entered = entered;
                if let (Ok(c), Ok(b)) = tokio::join!(client_upgrade, backend_upgrade) {
                    let mut c = TokioIo::new(c);
                    let mut b = TokioIo::new(b);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
                }
            });
        } else {
            if let Err(e) = transfer_coding(resp.headers_mut()) {
                drop(resp.body_mut().detach());
                return Poll::Ready(Err(e));
            }
            strip_hop_by_hop(resp.headers_mut());
            resp.body_mut().responded();
        }
        Poll::Ready(Ok(resp))
    }
}

/// The `Upgrade` protocol when the request asks for one (`Connection: upgrade` + `Upgrade`)
/// that the backend may see: WebSocket only. Any other (h2c above all, RFC 9113 §3.1, which
/// would turn the connection into a tunnel past the host policy and the proxy headers) is
/// dropped, and the request forwarded as a plain one.
fn wants_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let upgrade = headers.get(header::UPGRADE).filter(|_| asks)?;
    upgrade
        .as_bytes()
        .trim_ascii()
        .eq_ignore_ascii_case(b"websocket")
        .then(|| upgrade.clone())
}

/// A backend response's Transfer-Encoding, which hyper has decoded when it is `chunked`: then
/// a Content-Length beside it goes (RFC 9112 §6.3: "MUST first remove the received
/// Content-Length field"); any other coding (`gzip, chunked`) would reach the client
/// undecoded and unlabelled once Transfer-Encoding, a hop-by-hop field, is stripped, so the
/// response is refused (502).
fn transfer_coding(headers: &mut HeaderMap) -> Result<(), ForwardError> {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty());
    let Some(first) = codings.next() else {
        return Ok(());
    };
    if !first.eq_ignore_ascii_case(b"chunked") || codings.next().is_some() {
        return Err(ForwardError::TransferCoding);
    }
    headers.remove(header::CONTENT_LENGTH);
    Ok(())
}

/// The hop-by-hop headers, and `Upgrade` (re-added by the caller for a real upgrade), in the
/// order `hop_by_hop_index` numbers them. `Trailer` is not among them (RFC 9110 §6.6.2 makes
/// it end-to-end, and hyper sends an HTTP/1.1 client only the trailer fields it declares).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including any the Connection header names,
/// and `Upgrade` (re-added by the caller for a real upgrade).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are there: a removal by name is a hash lookup, and
    // nearly every message carries at most `Connection` of the nine.
    let mut present = [false; HOP_BY_HOP.len()];
    for k in headers.keys() {
        if let Some(i) = hop_by_hop_index(k) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    let mut named: Vec<HeaderName> = Vec::new();
    named_by_connection(headers.get_all(header::CONNECTION), |n| named.push(n));
    for n in named {
        headers.remove(n);
    }
    for (h, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(h);
    }
}

/// Calls `f` with each header that `Connection` values name, which are hop-by-hop too.
/// `close`, `keep-alive` and `upgrade`, nearly all that is ever sent, are skipped: they name no
/// header left to remove, and only other tokens need a HeaderName built (an allocation). Plain
/// loops: an iterator chain here cost more per request (docs/performance.md).
fn named_by_connection<'v>(
    values: impl IntoIterator<Item = &'v HeaderValue>,
    mut f: impl FnMut(HeaderName),
) {
    for v in values {
        for t in v.as_bytes().split(|&b| b == b',') {
            let t = t.trim_ascii();
            let usual = t.is_empty()
                || t.eq_ignore_ascii_case(b"close")
                || t.eq_ignore_ascii_case(b"keep-alive")
                || t.eq_ignore_ascii_case(b"upgrade");
            if !usual && let Ok(n) = HeaderName::from_bytes(t) {
                f(n);
            }
        }
    }
}

/// A copy of `v` in an allocation of its own, for keeping beyond the request. A value hyper
/// parsed shares the connection's whole read buffer (8 KB or more), which a clone would hold
/// for as long as it is kept: for a per-connection cache, the connection's life, idle or not.
pub fn detached(v: &HeaderValue) -> Option<HeaderValue> {
    HeaderValue::from_bytes(v.as_bytes()).ok()
}

/// Where `name` is in `HOP_BY_HOP`. A match on the name's text (lengths first, then bytes):
/// comparing `HeaderName`s one by one took 9 comparisons for each header of every request
/// and response.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "proxy-authenticate" => Some(3),
        "proxy-authorization" => Some(4),
        "te" => Some(5),
        "transfer-encoding" => Some(6),
        "upgrade" => Some(7),
        _ => None,
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// Names the tenant to the backend; never taken from the client.
pub static X_LOGON_TENANT: HeaderName = HeaderName::from_static("x-logon-tenant");

/// The per-connection parts of the proxy headers: the peer IP as a header value and the
/// connection's `Forwarded` header.
pub fn peer_parts(peer: SocketAddr) -> (HeaderValue, Forwarded) {
    let ip = peer.ip();
    let text = ip.to_string();
    let value =
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    // Quoted and bracketed for IPv6 (RFC 7239).
    let for_part = if ip.is_ipv6() {
        format!("for=\"[{text}]\"")
    } else {
        format!("for={text}")
    };
    let forwarded = Forwarded {
        for_part: for_part.into(),
        last: Mutex::new(None),
    };
    (value, forwarded)
}

/// One connection's `Forwarded` header (RFC 7239). Its `for=` and `proto=` are the
/// connection's, and its `host=` rarely changes from one request to the next, so the value
/// last built is kept and used again while they stay the same: building it (a string, then
/// a header value checked byte by byte) is not cheap (docs/performance.md).
pub struct Forwarded {
    for_part: Box<str>,
    /// `https`, the authority, and the value built for them.
    last: Mutex<Option<(bool, HeaderValue, HeaderValue)>>,
}

impl Forwarded {
    fn value(&self, https: bool, authority: &HeaderValue) -> Option<HeaderValue> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((h, a, v)) = &*last
            && *h == https
            && a == authority
        {
            return Some(v.clone());
        }
        let proto = if https { "https" } else { "http" };
        let host = authority.to_str().unwrap_or_default();
        let parts = [&*self.for_part, ";host=\"", host, "\";proto=", proto];
        // Built in one allocation of the right size: `format!` grew its string three times.
        let mut text = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        parts.iter().for_each(|p| text.push_str(p));
        // Only peer IPs and an already-valid Host go in, so this cannot fail.
        let value = HeaderValue::try_from(text).ok()?;
        if let Some(kept) = detached(authority) {
            *last = Some((https, kept, value.clone()));
        }
        Some(value)
    }
}

/// What [`backend_headers`] does with a header of the client's.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    Keep,
    /// Hop-by-hop (RFC 9110 §7.6.1), or one the proxy headers replace.
    Drop,
    /// Dropped after its tokens are read: the headers it names are hop-by-hop too.
    Connection,
    /// Its values come first in the new `X-Forwarded-For`.
    ForwardedFor,
    /// Joined into one `Cookie` line (RFC 9113 §8.2.3).
    Cookie,
    /// Kept once: the handler has refused disagreeing values, and h2 lets equal ones repeat.
    ContentLength,
}

/// The role of a client header, by one match on the name's text (lengths first, then bytes).
fn role(name: &HeaderName) -> Role {
    match name.as_str() {
        "connection" => Role::Connection,
        "x-forwarded-for" => Role::ForwardedFor,
        "cookie" => Role::Cookie,
        "content-length" => Role::ContentLength,
        "keep-alive"
        | "proxy-connection"
        | "proxy-authenticate"
        | "proxy-authorization"
        | "te"
        | "transfer-encoding"
        | "upgrade"
        | "http2-settings"
        | "host"
        | "x-forwarded-proto"
        | "x-forwarded-host"
        | "forwarded"
        | "x-logon-tenant" => Role::Drop,
        _ => Role::Keep,
    }
}

/// The headers the backend gets: the client's, less hop-by-hop ones (and any its Connection
/// header names) and less those the proxy headers replace, its cookies in one `Cookie` line,
/// then the proxy headers, and `Connection: upgrade` with `Upgrade` when the client asks for
/// an `upgrade` the backend should see.
///
/// An HTTP/2 client sends each cookie as a field of its own, and RFC 9113 §8.2.3 says they
/// are joined with `"; "` before an HTTP/1.1 hop: a backend that joins repeated lines with
/// `", "` (PHP does) would read `a=1, b=2` as one cookie. Several `Cookie` lines from an
/// HTTP/1.1 client (RFC 6265 §5.4 allows only one) are joined the same way.
///
/// A new map sized for all of them, filled in one pass over the client's: the client's own
/// map, sized for its headers, grew on nearly every request when the proxy headers went in
/// (a reallocation and a rehash: docs/performance.md), and was scanned once more for the
/// hop-by-hop names.
fn backend_headers(
    from_client: HeaderMap,
    client: ClientSide<'_>,
    upgrade: Option<HeaderValue>,
) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(from_client.len() + 8);
    // Both rare, so not allocated unless used.
    let mut connection: Vec<HeaderValue> = Vec::new();
    let mut forwarded_for: Vec<HeaderValue> = Vec::new();
    let mut cookies = Cookies::None;
    let mut current: Option<(HeaderName, Role)> = None;
    // Each name comes once, followed by its further values with `None`.
    for (name, value) in from_client {
        if let Some(name) = name {
            let role = role(&name);
            current = Some((name, role));
        }
        match &current {
            Some((name, Role::Keep)) => {
                headers.append(name.clone(), value);
            }
            Some((_, Role::Connection)) => connection.push(value),
            Some((_, Role::ForwardedFor)) => forwarded_for.push(value),
            Some((_, Role::Cookie)) => cookies.add(value),
            Some((name, Role::ContentLength)) => {
                if !headers.contains_key(name) {
                    headers.insert(name.clone(), value);
                }
            }
            Some((_, Role::Drop)) | None => {}
        }
    }
    if let Some(cookie) = cookies.value() {
        headers.insert(header::COOKIE, cookie);
    }
    named_by_connection(&connection, |n| {
        if n == X_FORWARDED_FOR {
            forwarded_for.clear();
        }
        headers.remove(n);
    });

    headers.insert(header::HOST, client.authority.clone());
    match forwarded_for.first() {
        Some(prev) if !prev.as_bytes().trim_ascii().is_empty() => {
            let mut all: Vec<&str> = forwarded_for
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            all.push(client.peer_ip.to_str().unwrap_or_default());
            set(&mut headers, &X_FORWARDED_FOR, all.join(", "));
        }
        _ => {
            headers.insert(&X_FORWARDED_FOR, client.peer_ip.clone());
        }
    }
    let proto = if client.https { "https" } else { "http" };
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    headers.insert(&X_FORWARDED_HOST, client.authority.clone());
    if let Some(v) = client.forwarded.value(client.https, client.authority) {
        headers.insert(&FORWARDED, v);
    }
    // Never the client's: its own values were dropped above.
    if let Some(t) = client.tenant {
        headers.insert(&X_LOGON_TENANT, t);
    }
    if let Some(proto) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto);
    }
    headers
}

/// A request's cookie fields on their way to one `Cookie` line. One field, as HTTP/1.1
/// clients send, passes as it is; only several are copied into a new value.
enum Cookies {
    None,
    One(HeaderValue),
    Joined(Vec<u8>),
}

impl Cookies {
    fn add(&mut self, crumb: HeaderValue) {
        // Without the spaces and `;` around it: an empty crumb adds nothing, and `a=1;`
        // then `b=2` make `a=1; b=2`, not `a=1;; b=2`.
        let bytes = crumb.as_bytes();
        let mut part = bytes.trim_ascii();
        while let Some(rest) = part.strip_suffix(b";").or_else(|| part.strip_prefix(b";")) {
            part = rest.trim_ascii();
        }
        if part.is_empty() {
            return;
        }
        match self {
            Cookies::None if part.len() == bytes.len() => *self = Cookies::One(crumb),
            Cookies::None => *self = Cookies::Joined(part.to_vec()),
            Cookies::One(first) => {
                let mut joined = Vec::with_capacity(first.len() + 2 + part.len());
                joined.extend_from_slice(first.as_bytes());
                joined.extend_from_slice(b"; ");
                joined.extend_from_slice(part);
                *self = Cookies::Joined(joined);
            }
            Cookies::Joined(joined) => {
                joined.extend_from_slice(b"; ");
                joined.extend_from_slice(part);
            }
        }
    }

    fn value(self) -> Option<HeaderValue> {
        match self {
            Cookies::None => None,
            Cookies::One(v) => Some(v),
            // Every part was a valid header value and "; " is too.
            Cookies::Joined(bytes) => HeaderValue::from_bytes(&bytes).ok(),
        }
    }
}

fn set(headers: &mut HeaderMap, name: &HeaderName, value: String) {
    // Only peer IPs and an already-valid Host go in, so this cannot fail; skip rather than panic.
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    /// `/metrics` shows every kind at 0 from the start, so each must be in the list.
    #[test]
    fn every_error_label_is_a_known_series() {
        for e in [
            ForwardError::Unreachable(PoolError::ConnectTimeout {
                addr: String::new(),
                after: Duration::ZERO,
            }),
            ForwardError::Timeout(Duration::ZERO),
            ForwardError::Uri(http::Uri::try_from("a b").expect_err("invalid")),
            ForwardError::TransferCoding,
            ForwardError::Busy,
        ] {
            assert!(
                crate::telemetry::metrics::UPSTREAM_ERROR_KINDS.contains(&e.label()),
                "{e}"
            );
        }
    }

    #[test]
    fn hop_by_hop_index_numbers_the_table() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        for other in [header::ACCEPT, HeaderName::from_static("x-connection")] {
            assert_eq!(hop_by_hop_index(&other), None, "{other}");
        }
    }

    #[test]
    fn each_hop_by_hop_header_is_removed_on_its_own() {
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.append(name, HeaderValue::from_static("x"));
            h.append(name, HeaderValue::from_static("y"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name}: {h:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    fn side<'a>(
        peer: &'a (HeaderValue, Forwarded),
        host: &'a HeaderValue,
        https: bool,
        tenant: Option<&'a HeaderValue>,
    ) -> ClientSide<'a> {
        ClientSide {
            peer_ip: &peer.0,
            forwarded: &peer.1,
            https,
            authority: host,
            tenant: tenant.cloned(),
        }
    }

    #[test]
    fn proxy_headers() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        h.insert(&X_LOGON_TENANT, HeaderValue::from_static("evil.example"));
        let host = HeaderValue::from_static("webmail.example.net:8443");
        let peer = peer_parts("[::1]:5555".parse().expect("addr"));
        let h = backend_headers(h, side(&peer, &host, true, None), None);
        assert_eq!(h[&X_FORWARDED_FOR], "203.0.113.9, ::1");
        assert_eq!(
            h[&FORWARDED],
            "for=\"[::1]\";host=\"webmail.example.net:8443\";proto=https"
        );
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "webmail.example.net:8443");
        assert_eq!(h[header::HOST], "webmail.example.net:8443");
        assert!(!h.contains_key(&X_LOGON_TENANT));
        assert_eq!(h.len(), 5, "{h:?}");

        // The client's own values, however many, give way to the tenant's.
        let mut h = h;
        h.append(&X_LOGON_TENANT, HeaderValue::from_static("evil.example"));
        h.append(&X_LOGON_TENANT, HeaderValue::from_static("evil2.example"));
        let tenant = HeaderValue::from_static("example.net");
        let h = backend_headers(h, side(&peer, &host, false, Some(&tenant)), None);
        let got: Vec<_> = h.get_all(&X_LOGON_TENANT).iter().collect();
        assert_eq!(got, [&tenant]);
        assert_eq!(
            h[&FORWARDED],
            "for=\"[::1]\";host=\"webmail.example.net:8443\";proto=http"
        );
        // Forwarded a second time: the first hop's address stays first.
        assert_eq!(h[&X_FORWARDED_FOR], "203.0.113.9, ::1, ::1");

        // The connection's Forwarded value is kept only while the Host stays the same.
        let other = HeaderValue::from_static("mail.provider.test");
        for (host, want) in [
            (
                &other,
                "for=\"[::1]\";host=\"mail.provider.test\";proto=http",
            ),
            (
                &host,
                "for=\"[::1]\";host=\"webmail.example.net:8443\";proto=http",
            ),
            (
                &host,
                "for=\"[::1]\";host=\"webmail.example.net:8443\";proto=http",
            ),
        ] {
            let h = backend_headers(HeaderMap::new(), side(&peer, host, false, None), None);
            assert_eq!(h[&FORWARDED], want);
        }
    }

    #[test]
    fn backend_headers_keep_the_clients_other_headers_and_drop_hop_by_hop_ones() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret, x-forwarded-for"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.7"));
        // HTTP/2 clients send each cookie as a header of its own (RFC 9113 §8.2.3).
        for c in ["a=1", "b=2", "c=3"] {
            h.append(header::COOKIE, HeaderValue::from_static(c));
        }
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        for name in &HOP_BY_HOP[1..] {
            h.append(name, HeaderValue::from_static("x"));
            h.append(name, HeaderValue::from_static("y"));
        }
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("gopher"));
        h.insert(&X_FORWARDED_HOST, HeaderValue::from_static("evil.example"));
        h.insert(&FORWARDED, HeaderValue::from_static("for=evil"));
        let host = HeaderValue::from_static("webmail.example.net");
        let peer = peer_parts("192.0.2.1:5555".parse().expect("addr"));
        let h = backend_headers(h, side(&peer, &host, true, None), None);

        // Joined, in order, into the one line an HTTP/1.1 backend reads (RFC 9113 §8.2.3).
        let cookies: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        assert_eq!(h[header::ACCEPT], "*/*");
        assert_eq!(h[header::HOST], "webmail.example.net");
        // Named by Connection: hop-by-hop, so the client's addresses are not passed on.
        assert_eq!(h[&X_FORWARDED_FOR], "192.0.2.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "webmail.example.net");
        assert_eq!(
            h[&FORWARDED],
            "for=192.0.2.1;host=\"webmail.example.net\";proto=https"
        );
        for name in HOP_BY_HOP
            .iter()
            .chain([&HeaderName::from_static("x-secret")])
        {
            assert!(!h.contains_key(name), "{name}: {h:?}");
        }
        // cookie, accept, host and the four proxy headers.
        assert_eq!(h.len(), 7, "{h:?}");

        // An upgrade the backend is to see is asked for again, by the gateway.
        let mut c = HeaderMap::new();
        c.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        c.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let proto = wants_upgrade(&c);
        let h = backend_headers(c, side(&peer, &host, true, None), proto);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    /// RFC 9113 §8.2.3: "If there are multiple Cookie header fields after decompression,
    /// these MUST be concatenated into a single octet string using the two-octet delimiter of
    /// 0x3b, 0x20 (the ASCII string "; ") before being passed into a non-HTTP/2 context".
    #[test]
    fn cookie_crumbs_become_one_line() {
        let host = HeaderValue::from_static("webmail.example.net");
        let peer = peer_parts("192.0.2.1:5555".parse().expect("addr"));
        let cookies = |crumbs: &[&'static str]| {
            let mut h = HeaderMap::new();
            for c in crumbs {
                h.append(header::COOKIE, HeaderValue::from_static(c));
            }
            let h = backend_headers(h, side(&peer, &host, true, None), None);
            h.get_all(header::COOKIE)
                .iter()
                .map(|v| v.to_str().expect("ascii").to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cookies(&["roundcube_sessid=abc", "roundcube_sessauth=xyz"]),
            ["roundcube_sessid=abc; roundcube_sessauth=xyz"]
        );
        // One line (HTTP/1.1, or a client that joined them itself) passes unchanged.
        assert_eq!(cookies(&["a=1; b=2"]), ["a=1; b=2"]);
        assert_eq!(cookies(&["a=1; b=2", "c=3"]), ["a=1; b=2; c=3"]);
        // Empty crumbs, and the spaces and `;` around one, add no stray separator.
        assert_eq!(cookies(&["", "a=1", " ", "b=2"]), ["a=1; b=2"]);
        assert_eq!(cookies(&["a=1;", " b=2 ", ";c=3; "]), ["a=1; b=2; c=3"]);
        assert_eq!(cookies(&[" a=1; "]), ["a=1"]);
        assert!(cookies(&[]).is_empty());
        assert!(cookies(&[""]).is_empty());
    }
}
