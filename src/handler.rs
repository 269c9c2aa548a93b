//! One request: find its Host, ask the policy, then forward it, redirect it, or refuse it with a
//! short page that says why. Refusals never reach the backend.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::certs::CertEntry;
use crate::forward::ClientSide;
use crate::host::{self, HostBuf};
use crate::policy::{self, Decision, TlsFacts};
use crate::server::Gateway;

/// Response bodies: the backend's, streamed, or one of our short pages.
pub type Body = Either<Incoming, Full<Bytes>>;

/// What one connection knows about itself.
pub struct Conn {
    pub gateway: Arc<Gateway>,
    pub peer: SocketAddr,
    /// SNI and presented certificate, for HTTPS connections.
    pub tls: Option<(Box<str>, Arc<CertEntry>)>,
}

/// Serves one request; never fails (errors become pages).
pub async fn handle(conn: Arc<Conn>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let snapshot = conn.gateway.live.load_full();
    let authority = authority_of(&req);
    let mut buf: HostBuf = [0; host::MAX_HOST_LEN + 2];
    let tls = conn.tls.as_ref().map(|(sni, cert)| TlsFacts { sni, cert });
    let decision = match &authority {
        Ok(a) => policy::decide(
            &snapshot.table,
            tls.as_ref(),
            a.as_ref().map(HeaderValue::as_bytes),
            &mut buf,
        ),
        Err(()) => Decision::BadHost,
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();

    let (resp, upstream_error) = match (decision, &authority) {
        (Decision::Forward { tenant, .. }, Ok(Some(authority))) => {
            let client = ClientSide {
                peer: conn.peer,
                https: conn.tls.is_some(),
                authority,
                tenant: tenant.map(|t| &t.header),
            };
            match snapshot.upstream.forward(req, &client).await {
                Ok(r) => (r.map(Either::Left), None),
                Err(e) => {
                    let page = page(e.status(), &format!("{e}."));
                    (page, Some(e))
                }
            }
        }
        (Decision::RedirectHttps { host, .. }, _) => (redirect(&conn.gateway, host, &req), None),
        (Decision::Forward { .. }, _) => (
            page(StatusCode::BAD_REQUEST, &refusal_text(&Decision::BadHost)),
            None,
        ),
        (ref refused, _) => (page(refused.status(), &refusal_text(refused)), None),
    };

    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    let m = &conn.gateway.metrics;
    m.requests
        .get_or_create(&crate::metrics::RequestLabels {
            decision: decision.label(),
            status: crate::metrics::status_class(status),
        })
        .inc();
    m.duration.observe(elapsed.as_secs_f64());
    if let Some(e) = &upstream_error {
        m.upstream_errors
            .get_or_create(&crate::metrics::KindLabel { kind: e.label() })
            .inc();
    }
    tracing::info!(
        target: "access",
        client = %conn.peer,
        host = decision.host().unwrap_or("-"),
        tenant = decision.tenant().map_or("-", |t| t.domain.as_str()),
        method = %method,
        path = %path,
        status,
        decision = decision.label(),
        upstream_error = upstream_error.as_ref().map_or("-", |e| e.label()),
        duration_us = elapsed.as_micros() as u64,
    );
    Ok(resp)
}

/// The request's authority: `:authority`/absolute-form URI if present, else the one `Host`
/// header. Two Host headers, or a Host that names another host than the URI, is malformed.
fn authority_of(req: &Request<Incoming>) -> Result<Option<HeaderValue>, ()> {
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
pub fn page(status: StatusCode, why: &str) -> Response<Body> {
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

fn redirect(gw: &Gateway, host: &str, req: &Request<Incoming>) -> Response<Body> {
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
