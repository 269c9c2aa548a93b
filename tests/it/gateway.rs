//! End-to-end: the real gateway on port 0, a real backend, real TLS clients over HTTP/1.1 and
//! HTTP/2 that trust only the test CA.

use crate::support::*;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn certificate_is_chosen_per_sni() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let https = gw.https.expect("https");
    let ca = f.pki.ca_der();
    let cfg = client_config(&ca, &[b"http/1.1"], true);

    // Exact name: its own certificate, even though the wildcard also covers it.
    let tls = tls_connect(https, cfg.clone(), "webmail.example.net")
        .await
        .expect("exact");
    assert_eq!(presented(&tls), f.cert_der("webmail.example.net.pem"));
    // Wildcard: another name under example.net.
    let tls = tls_connect(https, cfg.clone(), "mail.example.net")
        .await
        .expect("wildcard");
    assert_eq!(presented(&tls), f.cert_der("wildcard.pem"));
    // Case and trailing dot in SNI do not matter.
    let tls = tls_connect(https, cfg.clone(), "Mail.Provider.Test")
        .await
        .expect("platform");
    assert_eq!(presented(&tls), f.cert_der("platform.pem"));
    // No certificate: refused in the handshake with unrecognized_name.
    for sni in ["webmail.example.org", "a.b.example.net", "unknown.test"] {
        let err = tls_connect(https, cfg.clone(), sni).await.expect_err(sni);
        assert_eq!(
            alert_of(&err),
            Some(rustls::AlertDescription::UnrecognisedName),
            "{sni}: {err}"
        );
    }
    // No SNI at all: refused the same way.
    let no_sni = client_config(&ca, &[b"http/1.1"], false);
    let err = tls_connect(https, no_sni, "webmail.example.net")
        .await
        .expect_err("no SNI");
    assert_eq!(
        alert_of(&err),
        Some(rustls::AlertDescription::UnrecognisedName),
        "{err}"
    );
    assert_eq!(backend.hits(), 0);
    gw.stop().await.expect("gateway task");
}

async fn policy_rows(h2: bool) {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let https = gw.https.expect("https");
    let http = gw.http.expect("http");
    let ca = f.pki.ca_der();

    // Enabled address: forwarded.
    let mut c = https_client(https, &ca, "webmail.example.net", h2).await;
    let r = c.get("webmail.example.net", "/inbox").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["path"], "/inbox");
    assert_eq!(backend.hits(), 1);

    // Host differs from SNI and this connection's certificate does not cover it: 421.
    let r = c.get("mail.example.net", "/").await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST, "{}", r.text());
    assert!(
        r.text().contains("not covered by the certificate"),
        "{}",
        r.text()
    );

    // On a wildcard connection, another covered name is judged on its own (HTTP/2 reuse).
    let mut w = https_client(https, &ca, "mail.example.net", h2).await;
    let r = w.get("webmail.example.net", "/").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(backend.hits(), 2);
    // Configured but not enabled: 403, saying why.
    let r = w.get("mail.example.net", "/").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.text().contains("not enabled"), "{}", r.text());
    // Neither a platform host nor a logon address: 421.
    let r = w.get("nobody.example.net", "/").await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST);
    assert!(r.text().contains("not a logon address"), "{}", r.text());
    // Platform host over its own certificate: forwarded.
    let mut p = https_client(https, &ca, "mail.provider.test", h2).await;
    assert_eq!(
        p.get("mail.provider.test", "/").await.status,
        StatusCode::OK
    );
    assert_eq!(backend.hits(), 3);

    // Plain HTTP.
    let mut c = http_client(http).await;
    // Free tenant: 403.
    let r = c.get("webmail.example.com", "/").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.text().contains("edition"), "{}", r.text());
    // Enabled with a certificate: 308 to the same URL over HTTPS.
    let r = c.get("WebMail.Example.Net.", "/a/b?c=d").await;
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        r.headers["location"],
        format!("https://webmail.example.net:{}/a/b?c=d", https.port()).as_str()
    );
    // Enabled without a certificate: forwarded over plain HTTP.
    let r = c.get("webmail.example.org:80", "/").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Unknown: 421.
    assert_eq!(
        c.get("example.org", "/").await.status,
        StatusCode::MISDIRECTED_REQUEST
    );
    // Missing Host: 400.
    let r = c
        .send("GET", None, "/", &[], Bytes::new())
        .await
        .expect("request");
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(backend.hits(), 4, "refusals must not reach the backend");
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn policy_rows_http1() {
    policy_rows(false).await;
}

#[tokio::test]
async fn policy_rows_http2() {
    policy_rows(true).await;
}

#[tokio::test]
async fn malformed_hosts_are_400_and_never_forwarded() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let http = gw.http.expect("http");
    for bad in [
        "a b.example.net",
        "webmail.example.net:x",
        "[::1",
        "webmail..example.net",
    ] {
        let mut c = http_client(http).await;
        let r = c
            .send("GET", Some(bad), "/", &[], Bytes::new())
            .await
            .expect("request");
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    // Two Host headers.
    let mut c = http_client(http).await;
    let r = c
        .send(
            "GET",
            Some("webmail.example.org"),
            "/",
            &[("host", "evil.example.org")],
            Bytes::new(),
        )
        .await
        .expect("request");
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(backend.hits(), 0);
    gw.stop().await.expect("gateway task");
}

async fn forwarded_headers_once(c: &mut Client, host: &str, headers: &[(&str, &str)]) {
    let host = host.to_string();
    let r = c
        .send("GET", Some(&host), "/h?x=1", headers, Bytes::new())
        .await
        .expect("request");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let j = r.json();
    assert_eq!(j["path"], "/h");
    assert_eq!(seen_headers(&j, "host"), vec![host.clone()]);
    assert_eq!(
        seen_headers(&j, "x-forwarded-for"),
        vec!["203.0.113.7, 127.0.0.1"]
    );
    assert_eq!(seen_headers(&j, "x-forwarded-proto"), vec!["https"]);
    assert_eq!(seen_headers(&j, "x-forwarded-host"), vec![host.clone()]);
    assert_eq!(
        seen_headers(&j, "forwarded"),
        vec![format!("for=127.0.0.1;host=\"{host}\";proto=https")]
    );
    assert_eq!(seen_headers(&j, "x-logon-tenant"), vec!["example.net"]);
    for hop in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(seen_headers(&j, hop).is_empty(), "{hop} was forwarded");
    }
    // Hop-by-hop headers from the backend do not come back either.
    assert!(!r.headers.contains_key("x-backend-hop"), "{:?}", r.headers);
    assert!(!r.headers.contains_key("connection"), "{:?}", r.headers);
}

async fn forwarded_headers(h2: bool) {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let https = gw.https.expect("https");
    let mut c = https_client(https, &f.pki.ca_der(), "webmail.example.net", h2).await;
    let mut headers = vec![
        ("x-forwarded-for", "203.0.113.7"),
        ("x-logon-tenant", "someone-else.example"),
        ("forwarded", "for=203.0.113.7"),
        ("x-forwarded-proto", "http"),
    ];
    if !h2 {
        headers.extend([
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ]);
    }
    let host = format!("webmail.example.net:{}", https.port());
    // Twice on one connection: the second request reuses the first one's decision, and must
    // be forwarded with the same headers.
    for _ in 0..2 {
        forwarded_headers_once(&mut c, &host, &headers).await;
    }

    // A platform host: no X-Logon-Tenant, and the client's copy is still removed.
    let mut p = https_client(https, &f.pki.ca_der(), "mail.provider.test", h2).await;
    let r = p
        .send(
            "GET",
            Some("mail.provider.test"),
            "/",
            &[("x-logon-tenant", "forged")],
            Bytes::new(),
        )
        .await
        .expect("request");
    assert!(seen_headers(&r.json(), "x-logon-tenant").is_empty());
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn forwarded_headers_http1() {
    forwarded_headers(false).await;
}

#[tokio::test]
async fn forwarded_headers_http2() {
    forwarded_headers(true).await;
}

/// Also: a WebSocket quiet for longer than the keep-alive and header timeouts stays open (those
/// are HTTP timeouts; a tunnel has none).
#[tokio::test]
async fn websocket_passes_through() {
    let backend = Backend::start().await;
    let f = Fixture::new(
        &backend.url(),
        "[limits]\nkeepalive_timeout = \"1s\"\nheader_read_timeout = \"1s\"\n",
    );
    let gw = f.start().await;
    let mut ws = websocket(&f, &gw).await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    for i in 0..20 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.expect("send");
        let got = ws.next().await.expect("message").expect("frame");
        assert_eq!(got.into_text().expect("text").as_str(), text);
    }
    ws.close(None).await.expect("close");
    gw.stop().await.expect("gateway task");
}

type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A WebSocket to the backend's echo, through the gateway over HTTP/1.1 and TLS.
async fn websocket(f: &Fixture, gw: &logon_gate::serve::Running) -> WebSocket {
    let tls = tls_connect(
        gw.https.expect("https"),
        client_config(&f.pki.ca_der(), &[b"http/1.1"], true),
        "webmail.example.net",
    )
    .await
    .expect("tls");
    let (ws, resp) = tokio_tungstenite::client_async("wss://webmail.example.net/ws", tls)
        .await
        .expect("websocket handshake through the gateway");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

async fn big_bodies(h2: bool) {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let mut c = https_client(
        gw.https.expect("https"),
        &f.pki.ca_der(),
        "webmail.example.net",
        h2,
    )
    .await;
    let size = 5 * 1024 * 1024;
    let upload = Bytes::from(pattern(size + 17).into_iter().rev().collect::<Vec<u8>>());
    let r = c
        .send(
            "POST",
            Some("webmail.example.net"),
            "/echo",
            &[],
            upload.clone(),
        )
        .await
        .expect("upload");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), upload.len());
    assert!(r.body == upload, "uploaded body came back altered");
    let r = c
        .get("webmail.example.net", &format!("/download?n={size}"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), size);
    assert!(r.body == pattern(size), "downloaded body altered");
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn five_megabytes_each_way_http1() {
    big_bodies(false).await;
}

#[tokio::test]
async fn five_megabytes_each_way_http2() {
    big_bodies(true).await;
}

#[tokio::test]
async fn backend_unreachable_is_502_and_slow_is_504() {
    // A port that was just free: nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let f = Fixture::new(&format!("http://{dead}"), "");
    let gw = f.start().await;
    let mut c = https_client(
        gw.https.expect("https"),
        &f.pki.ca_der(),
        "webmail.example.net",
        false,
    )
    .await;
    let r = c.get("webmail.example.net", "/").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert!(r.text().contains("unreachable"), "{}", r.text());
    gw.stop().await.expect("gateway task");

    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let text = std::fs::read_to_string(f.gateway_toml())
        .expect("read")
        .replace("response_timeout = \"5s\"", "response_timeout = \"300ms\"");
    std::fs::write(f.gateway_toml(), text).expect("write");
    let gw = f.start().await;
    let mut c = https_client(
        gw.https.expect("https"),
        &f.pki.ca_der(),
        "webmail.example.net",
        true,
    )
    .await;
    // Fast requests first, then slow ones on the same connection: each request's response
    // timeout is its own, and the slow ones' must fire.
    for _ in 0..3 {
        let r = c.get("webmail.example.net", "/slow?ms=10").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    for _ in 0..2 {
        let r = c.get("webmail.example.net", "/slow?ms=3000").await;
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
        // A fast request on the same connection is still served.
        let r = c.get("webmail.example.net", "/slow?ms=10").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn backend_connections_are_pooled_and_closed_ones_replaced() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let mut c = https_client(
        gw.https.expect("https"),
        &f.pki.ca_der(),
        "webmail.example.net",
        true,
    )
    .await;
    for _ in 0..20 {
        assert_eq!(
            c.get("webmail.example.net", "/").await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        backend.conns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "sequential requests should reuse one connection"
    );
    // The backend closes after each of these: every one still succeeds on a fresh connection.
    for _ in 0..5 {
        let r = c.get("webmail.example.net", "/close").await;
        assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "closing"));
    }
    assert!(backend.conns.load(std::sync::atomic::Ordering::SeqCst) >= 5);
    // A large body read to its end hands its connection back in a usable state.
    let mut d = https_client(
        gw.https.expect("https"),
        &f.pki.ca_der(),
        "webmail.example.net",
        false,
    )
    .await;
    let r = d.get("webmail.example.net", "/download?n=100000").await;
    assert_eq!(r.body.len(), 100000);
    for _ in 0..5 {
        assert_eq!(
            c.get("webmail.example.net", "/").await.status,
            StatusCode::OK
        );
    }
    gw.stop().await.expect("gateway task");
}

type H2Send = hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>;

/// A backend, the gateway in front of it and one HTTP/2 connection to it.
async fn h2_gateway() -> (Backend, Fixture, logon_gate::serve::Running, H2Send) {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let send = h2_connect(&f, &gw).await;
    (backend, f, gw, send)
}

/// One HTTP/2 connection to the gateway's HTTPS listener.
async fn h2_connect(f: &Fixture, gw: &logon_gate::serve::Running) -> H2Send {
    let https = gw.https.expect("https");
    let Client::H2(send) = https_client(https, &f.pki.ca_der(), "webmail.example.net", true).await
    else {
        panic!("ALPN h2 gave an HTTP/1.1 client");
    };
    send
}

/// One GET on an HTTP/2 connection shared with other requests.
fn h2_get(
    send: &H2Send,
    path: &str,
) -> impl std::future::Future<Output = Result<(StatusCode, Bytes), hyper::Error>> + use<> {
    use http_body_util::BodyExt;
    let mut send = send.clone();
    let req = http::Request::builder()
        .uri(format!("https://webmail.example.net{path}"))
        .version(http::Version::HTTP_2)
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("request");
    async move {
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// A backend and a gateway whose serving threads queue requests once `after` backend
/// connections are busy, for up to `wait`.
async fn queueing_gateway(
    after: usize,
    wait: &str,
) -> (Backend, Fixture, logon_gate::serve::Running) {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let text = std::fs::read_to_string(f.gateway_toml())
        .expect("read")
        .replace(
            "response_timeout = \"5s\"",
            &format!(
                "response_timeout = \"5s\"\nqueue_after_busy = {after}\nqueue_wait = \"{wait}\""
            ),
        );
    std::fs::write(f.gateway_toml(), text).expect("write");
    let gw = f.start().await;
    (backend, f, gw)
}

/// Whether, within 5 s, exactly `want` requests wait in the gateway's backend queue.
async fn queued_now(gw: &logon_gate::serve::Running, want: usize) -> bool {
    let upstream = gw.gateway.snapshot().upstream.clone();
    eventually(std::time::Duration::from_secs(5), || {
        let n = upstream.queued();
        async move { n == want }
    })
    .await
}

fn backend_conns(backend: &Backend) -> usize {
    backend.conns.load(std::sync::atomic::Ordering::SeqCst)
}

// The streams of one HTTP/2 connection are served by one thread, so they share its pool.
#[tokio::test]
async fn past_queue_after_busy_requests_wait_for_a_busy_backend_connection() {
    let (backend, f, gw) = queueing_gateway(1, "10s").await;
    let send = h2_connect(&f, &gw).await;
    let all = (0..3).map(|_| h2_get(&send, "/slow?ms=200"));
    for r in futures_util::future::join_all(all).await {
        let (status, body) = r.expect("request");
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"slow done"[..]));
    }
    assert_eq!(
        backend_conns(&backend),
        1,
        "the requests should have taken turns on one backend connection"
    );
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn a_request_queued_past_queue_wait_opens_its_own_backend_connection() {
    let (backend, f, gw) = queueing_gateway(1, "100ms").await;
    let send = h2_connect(&f, &gw).await;
    let long_poll = tokio::spawn(h2_get(&send, "/slow?ms=3000"));
    assert!(
        backend.reached(1).await,
        "the long poll never reached the backend"
    );
    let (status, _) = h2_get(&send, "/")
        .await
        .expect("request behind the long poll");
    assert_eq!(status, StatusCode::OK);
    assert!(
        !long_poll.is_finished(),
        "the request waited for the long poll's connection instead of opening one"
    );
    assert_eq!(backend_conns(&backend), 2);
    let (status, _) = long_poll.await.expect("task").expect("long poll");
    assert_eq!(status, StatusCode::OK);
    gw.stop().await.expect("gateway task");
}

// Connections opened past the limit stay idle afterwards; they must not lift it.
#[tokio::test]
async fn connections_left_over_from_a_burst_do_not_lift_the_limit() {
    let (backend, f, gw) = queueing_gateway(1, "1s").await;
    let send = h2_connect(&f, &gw).await;
    let long_poll = tokio::spawn(h2_get(&send, "/slow?ms=4000"));
    assert!(
        backend.reached(1).await,
        "the long poll never reached the backend"
    );
    // Waits out queue_wait, opens a second connection, and leaves it idle.
    let (status, _) = h2_get(&send, "/").await.expect("request past the limit");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backend_conns(&backend), 2);
    // The long poll still holds the one place: this request queues despite the idle one.
    let next = tokio::spawn(h2_get(&send, "/"));
    assert!(
        queued_now(&gw, 1).await,
        "the request took the left-over connection past the limit instead of queueing"
    );
    let (status, _) = next.await.expect("task").expect("queued request");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        backend_conns(&backend),
        2,
        "past queue_wait the request opened a connection while an idle one was there"
    );
    assert!(!long_poll.is_finished());
    let (status, _) = long_poll.await.expect("task").expect("long poll");
    assert_eq!(status, StatusCode::OK);
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn an_abandoned_queued_request_does_not_keep_the_connection_it_waited_for() {
    let (backend, f, gw) = queueing_gateway(1, "10s").await;
    let send = h2_connect(&f, &gw).await;
    let first = tokio::spawn(h2_get(&send, "/slow?ms=1000"));
    assert!(
        backend.reached(1).await,
        "the first request never reached the backend"
    );
    // Queued behind the first, then given up by its client (the stream is reset).
    let abandoned = tokio::spawn(h2_get(&send, "/slow?ms=0"));
    assert!(queued_now(&gw, 1).await, "the second request never queued");
    abandoned.abort();
    assert!(
        queued_now(&gw, 0).await,
        "the abandoned request stayed in the queue"
    );
    // The place is still the first request's, so the next one queues too.
    let next = tokio::spawn(h2_get(&send, "/"));
    assert!(
        queued_now(&gw, 1).await,
        "the abandoned request gave away a place it never had"
    );
    let (status, _) = first.await.expect("task").expect("first request");
    assert_eq!(status, StatusCode::OK);
    // Had the abandoned request kept the connection, or its place, this one would wait 10 s.
    let (status, _) = tokio::time::timeout(std::time::Duration::from_secs(3), next)
        .await
        .expect("the next request waited for a connection nobody holds")
        .expect("task")
        .expect("next request");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backend_conns(&backend), 1);
    assert_eq!(
        backend.hits(),
        2,
        "the abandoned request reached the backend"
    );
    gw.stop().await.expect("gateway task");
}

/// A WebSocket's backend connection leaves the pool, and its place with it. One WebSocket per
/// serving thread, so the request after them meets one whichever thread serves it.
#[tokio::test]
async fn websockets_do_not_hold_places_in_the_backend_queue() {
    let (_backend, f, gw) = queueing_gateway(1, "10s").await;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut sockets = Vec::new();
    for _ in 0..threads {
        sockets.push(websocket(&f, &gw).await);
    }
    let https = gw.https.expect("https");
    let mut c = https_client(https, &f.pki.ca_der(), "webmail.example.net", true).await;
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        c.get("webmail.example.net", "/"),
    )
    .await
    .expect("the request queued behind a WebSocket");
    assert_eq!(r.status, StatusCode::OK);
    for mut ws in sockets {
        ws.send(Message::text("still open")).await.expect("send");
        let got = ws.next().await.expect("message").expect("frame");
        assert_eq!(got.into_text().expect("text").as_str(), "still open");
    }
    gw.stop().await.expect("gateway task");
}

/// At most `backend_max_in_flight` requests wait for the backend; one more is answered 503 at
/// once. A place is given back with the response head (the body may still be coming) and
/// when the backend cannot be reached; a WebSocket tunnel holds its place while it is open.
#[tokio::test]
async fn past_backend_max_in_flight_a_request_is_answered_503_until_a_place_is_free() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "[limits]\nbackend_max_in_flight = 2\n");
    let gw = f.start().await;
    let upstream = gw.gateway.snapshot().upstream.clone();
    let in_flight_now = |want: usize| {
        let upstream = upstream.clone();
        eventually(std::time::Duration::from_secs(5), move || {
            let n = upstream.in_flight();
            async move { n == want }
        })
    };
    let send = h2_connect(&f, &gw).await;

    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(h2_get(&send, "/slow?ms=1500")))
        .collect();
    assert!(backend.reached(2).await, "the slow requests never arrived");
    assert_eq!(upstream.in_flight(), 2);
    let (status, body) = h2_get(&send, "/").await.expect("request past the limit");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(backend.hits(), 2, "the refused request reached the backend");
    for t in slow {
        let (status, _) = t.await.expect("task").expect("slow request");
        assert_eq!(status, StatusCode::OK);
    }
    assert!(
        in_flight_now(0).await,
        "places were kept after the responses"
    );

    // Two large bodies left unread: their heads are in, so their places are free.
    let mut heads = Vec::new();
    for _ in 0..2 {
        let req = http::Request::builder()
            .uri("https://webmail.example.net/download?n=4000000")
            .version(http::Version::HTTP_2)
            .body(http_body_util::Full::new(Bytes::new()))
            .expect("request");
        let resp = send.clone().send_request(req).await.expect("download head");
        assert_eq!(resp.status(), StatusCode::OK);
        heads.push(resp);
    }
    assert!(
        in_flight_now(0).await,
        "a response whose body is still coming kept its place"
    );
    let (status, _) = h2_get(&send, "/")
        .await
        .expect("request beside the downloads");
    assert_eq!(status, StatusCode::OK);
    drop(heads);

    // A WebSocket holds a place while it is open, and gives it back when it closes.
    let mut ws = websocket(&f, &gw).await;
    assert_eq!(upstream.in_flight(), 1);
    let mut ws2 = websocket(&f, &gw).await;
    let (status, _) = h2_get(&send, "/")
        .await
        .expect("request beside the tunnels");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // A tunnel lasts until both sides have closed their connections.
    ws.close(None).await.expect("close");
    ws2.close(None).await.expect("close");
    drop((ws, ws2));
    assert!(in_flight_now(0).await, "closed tunnels kept their places");
    let (status, _) = h2_get(&send, "/").await.expect("request after the tunnels");
    assert_eq!(status, StatusCode::OK);
    gw.stop().await.expect("gateway task");

    // A backend that cannot be reached gives each place back: three 502s, not a 503.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = closed.local_addr().expect("addr");
    drop(closed);
    let f = Fixture::new(
        &format!("http://{dead}"),
        "[limits]\nbackend_max_in_flight = 2\n",
    );
    let gw = f.start().await;
    let send = h2_connect(&f, &gw).await;
    for _ in 0..3 {
        let (status, _) = h2_get(&send, "/").await.expect("request to a dead backend");
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(gw.gateway.snapshot().upstream.in_flight(), 0);
    gw.stop().await.expect("gateway task");
}

// The streams of an HTTP/2 connection are polled by the connection's own task
// (src/serve/h2/streams.rs); none of them may wait for another.
#[tokio::test]
async fn http2_streams_on_one_connection_do_not_wait_for_each_other() {
    let (_backend, _f, gw, send) = h2_gateway().await;
    let slow = tokio::spawn(h2_get(&send, "/slow?ms=2500"));
    let quick = (0..40).map(|i| h2_get(&send, &format!("/slow?ms={}", i % 4)));
    for r in futures_util::future::join_all(quick).await {
        let (status, body) = r.expect("quick request");
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"slow done"[..]));
    }
    assert!(
        !slow.is_finished(),
        "the quick requests finished only after the slow one"
    );
    let (status, body) = slow.await.expect("task").expect("slow request");
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"slow done"[..]));
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn a_graceful_stop_lets_in_flight_http2_streams_finish() {
    let (backend, _f, gw, send) = h2_gateway().await;
    let in_flight: Vec<_> = (0..3)
        .map(|_| tokio::spawn(h2_get(&send, "/slow?ms=700")))
        .collect();
    assert!(
        backend.reached(3).await,
        "the requests never reached the backend"
    );
    let stop = tokio::spawn(gw.stop());
    for t in in_flight {
        let (status, body) = t.await.expect("task").expect("in-flight request");
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"slow done"[..]));
    }
    stop.await.expect("join").expect("gateway task");
}
