//! The admin listener (loopback by default): `GET /healthz`, `GET /metrics` (Prometheus text),
//! `GET /status` (JSON: config generation, last reload, tenants and hosts).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::state::Gateway;

/// Serves the admin endpoints until `stop`.
pub async fn run(listener: TcpListener, gw: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    loop {
        let tcp = tokio::select! {
            _ = crate::state::stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| respond(gw.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn respond(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/metrics" => {
            let snapshot = gw.snapshot();
            gw.metrics
                .backend_queued
                .set(snapshot.upstream.queued() as i64);
            gw.metrics
                .backend_in_flight
                .set(snapshot.upstream.in_flight() as i64);
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                gw.metrics.encode(),
            )
        }
        "/status" => reply(
            StatusCode::OK,
            "application/json",
            status_json(&gw).to_string(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /metrics or /status\n".into(),
        ),
    })
}

fn reply(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    r
}

/// The `/status` document.
pub fn status_json(gw: &Gateway) -> serde_json::Value {
    let snap = gw.snapshot();
    let status = gw
        .status
        .lock()
        .map(|s| s.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    let tenants: Vec<serde_json::Value> = snap
        .table
        .tenants
        .iter()
        .map(|t| {
            let hosts: Vec<serde_json::Value> = t
                .logons
                .iter()
                .map(|l| {
                    let cert = snap.table.cert_for(l.host.as_str());
                    serde_json::json!({
                        "host": l.host.as_str(),
                        "enabled": l.enabled,
                        "cname": l.cname,
                        "icp": l.icp,
                        "certificate_days_left": cert.map(|c| c.days_left()),
                        "certificate_file": cert.map(|c| c.path.display().to_string()),
                        "certificate": crate::acme::facts(&snap.table, t, l),
                    })
                })
                .collect();
            serde_json::json!({
                "domain": t.domain.as_str(),
                "edition": t.edition,
                "hosts": hosts,
            })
        })
        .collect();
    serde_json::json!({
        "generation": snap.generation,
        "last_reload": {
            "ok": status.ok,
            "message": status.message,
            "at_unix": status.at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "took_ms": status.took.as_millis() as u64,
            "succeeded": status.succeeded,
            "failed": status.failed,
        },
        "open_connections": gw.open_connections(),
        "platform_hosts": snap.table.platform_hosts.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
        "tenants": tenants,
    })
}
