//! The admin listener: /healthz, /metrics moving with traffic and reloads, /status JSON.

use std::time::Duration;

use crate::support::*;
use http::StatusCode;

async fn admin_get(addr: std::net::SocketAddr, path: &str) -> Got {
    let mut c = http_client(addr).await;
    c.get("localhost", path).await
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The gateway in front of a backend, with its admin listener on a port of its own.
async fn with_admin() -> (Backend, Fixture, logon_gate::serve::Running) {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let text = std::fs::read_to_string(f.gateway_toml())
        .expect("read")
        .replace("admin = \"\"", "admin = \"127.0.0.1:0\"");
    std::fs::write(f.gateway_toml(), text).expect("write");
    let gw = f.start().await;
    (backend, f, gw)
}

#[tokio::test]
async fn health_metrics_and_status() {
    let (_backend, f, gw) = with_admin().await;
    let admin = gw.admin.expect("admin listener");

    let r = admin_get(admin, "/healthz").await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "ok\n"));
    assert_eq!(
        admin_get(admin, "/nope").await.status,
        StatusCode::NOT_FOUND
    );

    let mut c = https_client(
        gw.https.expect("https"),
        &f.pki.ca_der(),
        "webmail.example.net",
        false,
    )
    .await;
    assert_eq!(
        c.get("webmail.example.net", "/").await.status,
        StatusCode::OK
    );
    assert_eq!(
        c.get("webmail.example.net", "/").await.status,
        StatusCode::OK
    );
    let mut p = http_client(gw.http.expect("http")).await;
    assert_eq!(
        p.get("attacker-chosen.example", "/").await.status,
        StatusCode::MISDIRECTED_REQUEST
    );

    let m = admin_get(admin, "/metrics").await.text();
    assert_eq!(
        metric(
            &m,
            "logon_gate_requests_total{decision=\"forward\",status=\"2xx\"}"
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "logon_gate_requests_total{decision=\"unknown_host\",status=\"4xx\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "logon_gate_backend_queued_requests "),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "logon_gate_backend_in_flight_requests "),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "logon_gate_tls_handshakes_total{result=\"ok\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "logon_gate_config_generation"), Some(1.0), "{m}");
    assert_eq!(
        metric(&m, "logon_gate_request_duration_seconds_count"),
        Some(3.0),
        "{m}"
    );
    // The buckets are cumulative, and the last holds every request.
    assert_eq!(
        metric(
            &m,
            "logon_gate_request_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(3.0),
        "{m}"
    );
    let under_16s = metric(
        &m,
        "logon_gate_request_duration_seconds_bucket{le=\"16.384\"}",
    );
    assert_eq!(under_16s, Some(3.0), "{m}");
    let sum = metric(&m, "logon_gate_request_duration_seconds_sum").expect("sum");
    assert!(sum > 0.0 && sum < 3.0 * 5.0, "{m}");
    let left = metric(
        &m,
        "logon_gate_certificate_expiry_seconds{file=\"platform.pem\"}",
    )
    .expect("expiry");
    assert!(left > 80.0 * 86400.0 && left < 91.0 * 86400.0, "{left}");
    // A client's Host never becomes a label.
    assert!(!m.contains("attacker-chosen"), "{m}");

    let s = admin_get(admin, "/status").await.json();
    assert_eq!(s["generation"], 1);
    assert_eq!(s["last_reload"]["ok"], true);
    let net = s["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .find(|t| t["domain"] == "example.net")
        .expect("example.net");
    assert_eq!(net["hosts"][0]["host"], "webmail.example.net");
    assert_eq!(net["hosts"][0]["enabled"], true);

    // A reload shows in both.
    f.write_tenant(
        "example.org",
        &EXAMPLE_ORG.replace("enabled = true", "enabled = false"),
    );
    let reloaded = eventually(Duration::from_secs(2), || async move {
        admin_get(admin, "/status").await.json()["generation"] == 2
    })
    .await;
    assert!(reloaded, "reload not shown in /status");
    let m = admin_get(admin, "/metrics").await.text();
    assert_eq!(metric(&m, "logon_gate_config_generation"), Some(2.0), "{m}");
    assert_eq!(
        metric(&m, "logon_gate_reloads_total{result=\"ok\"}"),
        Some(1.0),
        "{m}"
    );
    gw.stop().await.expect("gateway task");
}

/// Prometheus convention: a series whose labels are known in advance is there, at 0, from
/// the first scrape, so that `rate()` and alerts see its first increase.
#[tokio::test]
async fn known_series_are_zero_before_any_event() {
    let (_backend, _f, gw) = with_admin().await;
    let m = admin_get(gw.admin.expect("admin listener"), "/metrics")
        .await
        .text();
    for line in [
        "logon_gate_reloads_total{result=\"ok\"}",
        "logon_gate_reloads_total{result=\"error\"}",
        "logon_gate_tls_handshakes_total{result=\"ok\"}",
        "logon_gate_tls_handshakes_total{result=\"unknown_sni\"}",
        "logon_gate_tls_handshakes_total{result=\"timeout\"}",
        "logon_gate_tls_handshakes_total{result=\"protocol_error\"}",
        "logon_gate_upstream_errors_total{kind=\"connect\"}",
        "logon_gate_upstream_errors_total{kind=\"timeout\"}",
        "logon_gate_upstream_errors_total{kind=\"failed\"}",
        "logon_gate_upstream_errors_total{kind=\"busy\"}",
        "logon_gate_open_connections{listener=\"https\"}",
        "logon_gate_open_connections{listener=\"http\"}",
    ] {
        assert_eq!(metric(&m, &format!("{line} ")), Some(0.0), "{line}: {m}");
    }
}
