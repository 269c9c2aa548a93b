//! Listener hardening and the access log: slowloris, the connection cap, 431, request
//! smuggling shapes, HTTP/2 rapid reset, old TLS versions and non-AEAD suites, JSON access log.

use std::io::BufRead;
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::process::GatewayProcess;

/// Reads until EOF (or `limit`); returns what arrived and whether EOF was seen.
async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S, limit: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one answer to a `/slow` request (its body ends "slow done").
async fn one_answer<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"slow done") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("connection ended early: {other:?}: {got:?}"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_while_others_are_served() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "[limits]\nheader_read_timeout = \"1s\"\n");
    let gw = f.start().await;
    let http = gw.http.expect("http");

    let slow = tokio::spawn(async move {
        let mut s = TcpStream::connect(http).await.expect("connect");
        let started = Instant::now();
        let head = b"GET / HTTP/1.1\r\nHost: webmail.example.org\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaa";
        for b in head.iter() {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            // One byte every 300 ms: always "active", never finishing its headers.
            let mut probe = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(300), s.read(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                _ => {}
            }
        }
        let (_, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
        closed.then(|| started.elapsed())
    });
    // A normal client on another connection is served throughout.
    let mut normal = http_client(http).await;
    for _ in 0..10 {
        assert_eq!(
            normal.get("webmail.example.org", "/").await.status,
            StatusCode::OK
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let cut = slow
        .await
        .expect("join")
        .expect("slow client was never disconnected");
    assert!(
        cut >= Duration::from_millis(900) && cut < Duration::from_secs(4),
        "cut after {cut:?}"
    );
    gw.stop().await.expect("gateway task");
}

/// HTTP/1.1 keep-alive: an idle connection outlives `header_read_timeout` and is closed at
/// `keepalive_timeout`; a response slower than both is not cut; a connection that never sends
/// a request is closed at `header_read_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_idle_timeout_is_separate_from_the_header_timeout() {
    let backend = Backend::start().await;
    let f = Fixture::new(
        &backend.url(),
        "[limits]\nheader_read_timeout = \"1s\"\nkeepalive_timeout = \"3s\"\n",
    );
    let gw = f.start().await;
    let http = gw.http.expect("http");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: webmail.example.org\r\n\r\n");

    // A response slower than both timeouts, then idle past the header timeout, then reused.
    let mut s = TcpStream::connect(http).await.expect("connect");
    s.write_all(get("/slow?ms=3500").as_bytes())
        .await
        .expect("write");
    assert!(one_answer(&mut s).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1800)).await;
    s.write_all(get("/slow?ms=0").as_bytes())
        .await
        .expect("write");
    assert!(
        one_answer(&mut s).await.starts_with("HTTP/1.1 200"),
        "an idle keep-alive connection was closed at the header timeout"
    );
    let idle = Instant::now();
    let (_, closed) = read_to_close(&mut s, Duration::from_secs(8)).await;
    let after = idle.elapsed();
    assert!(closed, "idle connection never closed");
    assert!(
        after >= Duration::from_millis(2700) && after < Duration::from_millis(5000),
        "idle connection closed after {after:?}, keepalive_timeout is 3s"
    );

    // Connected but silent: the first request's head is due within header_read_timeout.
    let mut silent = TcpStream::connect(http).await.expect("connect");
    let start = Instant::now();
    let (_, closed) = read_to_close(&mut silent, Duration::from_secs(5)).await;
    let after = start.elapsed();
    assert!(
        closed && after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
        "silent connection: closed={closed} after {after:?}"
    );
    gw.stop().await.expect("gateway task");
}

/// An idle HTTP/1.1 TLS connection is parked (hyper's connection and buffers dropped, see
/// `park`), is served again when its next request comes, and still closes at
/// `keepalive_timeout`; a gateway stop closes parked connections at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connection_is_parked_and_served_again() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "[limits]\nkeepalive_timeout = \"4s\"\n");
    let gw = f.start().await;
    let https = gw.https.expect("https");
    let cfg = client_config(&f.pki.ca_der(), &[b"http/1.1"], true);
    let parked = || gw.gateway.metrics.parked.get();
    let get = b"GET /slow?ms=0 HTTP/1.1\r\nHost: webmail.example.net\r\n\r\n";

    let mut s = tls_connect(https, cfg.clone(), "webmail.example.net")
        .await
        .expect("tls");
    for round in 0..3 {
        s.write_all(get).await.expect("write");
        let answer = one_answer(&mut s).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "round {round}: {answer}"
        );
        assert!(
            eventually(Duration::from_secs(3), || async { parked() == 1 }).await,
            "round {round}: the idle connection was not parked"
        );
    }
    // Two pipelined requests wake a parked connection; both are answered, in order.
    let two = b"GET /slow?ms=300 HTTP/1.1\r\nHost: webmail.example.net\r\n\r\nGET /slow?ms=0 HTTP/1.1\r\nHost: webmail.example.net\r\n\r\n";
    s.write_all(two).await.expect("write");
    let first = one_answer(&mut s).await;
    let second = if first.matches("slow done").count() == 2 {
        first.clone()
    } else {
        one_answer(&mut s).await
    };
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(second.contains("HTTP/1.1 200"), "{second}");
    // Half a head, then a pause longer than PARK_AFTER: not idle, so not parked; the rest of
    // the head completes the request.
    assert!(eventually(Duration::from_secs(3), || async { parked() == 1 }).await);
    s.write_all(b"GET /slow?ms=0 HTTP/1.1\r\nHost: webm")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(parked(), 0, "parked with half a head read");
    s.write_all(b"ail.example.net\r\n\r\n")
        .await
        .expect("write");
    let answer = one_answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answered = Instant::now();
    // Parked, it still closes when keep-alive runs out, counted from its last answer.
    let (_, closed) = read_to_close(&mut s, Duration::from_secs(8)).await;
    let after = answered.elapsed();
    assert!(
        closed && after >= Duration::from_millis(3800) && after < Duration::from_secs(6),
        "parked connection: closed={closed} after {after:?}, keepalive_timeout is 4s"
    );
    assert!(eventually(Duration::from_secs(2), || async { parked() == 0 }).await);

    // A stop does not wait for parked connections.
    let mut s = tls_connect(https, cfg, "webmail.example.net")
        .await
        .expect("tls");
    s.write_all(get).await.expect("write");
    one_answer(&mut s).await;
    assert!(eventually(Duration::from_secs(3), || async { parked() == 1 }).await);
    let stopping = Instant::now();
    gw.stop().await.expect("gateway task");
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "stop waited {:?} for a parked connection",
        stopping.elapsed()
    );
    let (_, closed) = read_to_close(&mut s, Duration::from_secs(2)).await;
    assert!(closed, "parked connection left open after stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_lets_an_http1_request_finish_then_closes_its_connection() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "[limits]\nkeepalive_timeout = \"30s\"\n");
    let gw = f.start().await;
    let https = gw.https.expect("https");
    let cfg = client_config(&f.pki.ca_der(), &[b"http/1.1"], true);
    let mut s = tls_connect(https, cfg, "webmail.example.net")
        .await
        .expect("tls");
    s.write_all(b"GET /slow?ms=600 HTTP/1.1\r\nHost: webmail.example.net\r\n\r\n")
        .await
        .expect("write");
    assert!(
        backend.reached(1).await,
        "the request never reached the backend"
    );
    let stop = tokio::spawn(gw.stop());
    let answer = one_answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Closed as soon as the answer is out, not by parking (which would take PARK_AFTER, 1 s,
    // of idling) nor by keep-alive (30 s).
    let (_, closed) = read_to_close(&mut s, Duration::from_millis(800)).await;
    assert!(closed, "connection left open after the stop");
    stop.await.expect("join").expect("gateway task");
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "[limits]\nmax_connections = 2\n");
    let gw = f.start().await;
    let http = gw.http.expect("http");
    let mut a = http_client(http).await;
    let mut b = http_client(http).await;
    assert_eq!(
        a.get("webmail.example.org", "/").await.status,
        StatusCode::OK
    );
    assert_eq!(
        b.get("webmail.example.org", "/").await.status,
        StatusCode::OK
    );
    // The third is accepted and closed straight away, without an answer.
    let mut c = TcpStream::connect(http).await.expect("connect");
    let _ = c
        .write_all(b"GET / HTTP/1.1\r\nHost: webmail.example.org\r\n\r\n")
        .await;
    let (got, closed) = read_to_close(&mut c, Duration::from_secs(2)).await;
    assert!(
        closed && got.is_empty(),
        "over-cap connection was served: {got:?}"
    );
    // When one closes, a new connection gets its place.
    drop(a);
    let served = eventually(Duration::from_secs(2), || async move {
        let mut d = http_client(http).await;
        matches!(
            d.send("GET", Some("webmail.example.org"), "/", &[], Bytes::new()).await,
            Ok(r) if r.status == StatusCode::OK
        )
    })
    .await;
    assert!(served);
    assert_eq!(
        b.get("webmail.example.org", "/").await.status,
        StatusCode::OK
    );
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let backend = Backend::start().await;
    let f = Fixture::new(
        &backend.url(),
        "[limits]\nmax_request_header_bytes = 8192\n",
    );
    let gw = f.start().await;
    let mut s = TcpStream::connect(gw.http.expect("http"))
        .await
        .expect("connect");
    let big = "a".repeat(20_000);
    let req = format!("GET / HTTP/1.1\r\nHost: webmail.example.org\r\nX-Big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let (got, _) = read_to_close(&mut s, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(backend.hits(), 0);
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn conflicting_lengths_are_refused_and_not_forwarded() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let http = gw.http.expect("http");
    let shapes = [
        "POST /echo HTTP/1.1\r\nHost: webmail.example.org\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello",
        "POST /echo HTTP/1.1\r\nHost: webmail.example.org\r\nContent-Length: 5, 40\r\n\r\nhello",
    ];
    for raw in shapes {
        let mut s = TcpStream::connect(http).await.expect("connect");
        let _ = s.write_all(raw.as_bytes()).await;
        let (got, _) = read_to_close(&mut s, Duration::from_secs(3)).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 400"), "{raw:?} got {text}");
    }
    assert_eq!(
        backend.hits(),
        0,
        "a conflicting length reached the backend"
    );
    gw.stop().await.expect("gateway task");
}

/// Content-Length with Transfer-Encoding, in either order, first on its connection or
/// pipelined behind requests with fixed-length and chunked bodies, over plain HTTP and TLS: the
/// ambiguous request gets 400 and never reaches the backend, and the ones before it are served.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_and_not_forwarded() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let http = gw.http.expect("http");
    let https = gw.https.expect("https");
    let cl_te = "POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n";
    let te_cl = "POST /echo HTTP/1.1\r\nHost: {HOST}\r\ntransfer-encoding: chunked\r\ncontent-length: 40\r\n\r\n0\r\n\r\n";
    // Bodies that themselves look like an ambiguous head must not be taken for one.
    let decoy = "GET /decoy HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let fixed = format!(
        "POST /echo HTTP/1.1\r\nHost: {{HOST}}\r\nContent-Length: {}\r\n\r\n{decoy}",
        decoy.len()
    );
    let chunked = format!(
        "POST /echo HTTP/1.1\r\nHost: {{HOST}}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{decoy}\r\n0\r\n\r\n",
        decoy.len()
    );
    // (bytes, answers expected before the 400)
    let cases = [
        (cl_te.to_string(), 0),
        (te_cl.to_string(), 0),
        (format!("{fixed}{chunked}{cl_te}"), 2),
    ];
    let ca = f.pki.ca_der();
    for (raw, served_before) in &cases {
        for tls in [false, true] {
            // Plain HTTP serves example.org (no certificate); example.net is redirected there.
            let host = if tls {
                "webmail.example.net"
            } else {
                "webmail.example.org"
            };
            let raw = raw.replace("{HOST}", host);
            let before = backend.hits();
            let got = if tls {
                let cfg = client_config(&ca, &[b"http/1.1"], true);
                let mut s = tls_connect(https, cfg, "webmail.example.net")
                    .await
                    .expect("tls");
                let _ = s.write_all(raw.as_bytes()).await;
                read_to_close(&mut s, Duration::from_secs(3)).await
            } else {
                let mut s = TcpStream::connect(http).await.expect("connect");
                let _ = s.write_all(raw.as_bytes()).await;
                read_to_close(&mut s, Duration::from_secs(3)).await
            };
            let (got, closed) = got;
            let text = String::from_utf8_lossy(&got);
            let statuses: Vec<&str> = text
                .match_indices("HTTP/1.1 ")
                .map(|(i, _)| &text[i + 9..i + 12])
                .collect();
            let mut want = vec!["200"; *served_before];
            want.push("400");
            assert_eq!(statuses, want, "tls={tls} {raw:?}: {text}");
            assert!(
                closed,
                "tls={tls}: connection kept open after an ambiguous request"
            );
            assert_eq!(
                backend.hits() - before,
                *served_before,
                "tls={tls}: the ambiguous request (or one behind it) reached the backend: {raw:?}"
            );
            assert!(
                text.contains("both Content-Length and Transfer-Encoding"),
                "{text}"
            );
        }
    }
    // A plain chunked request with trailers on a kept-alive connection is not refused.
    let mut s = TcpStream::connect(http).await.expect("connect");
    let ok = format!("{chunked}GET / HTTP/1.1\r\nHost: {{HOST}}\r\nConnection: close\r\n\r\n")
        .replace("{HOST}", "webmail.example.org");
    let _ = s.write_all(ok.as_bytes()).await;
    let (got, _) = read_to_close(&mut s, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    gw.stop().await.expect("gateway task");
}

/// A raw h2 client (the only kind that can send RST_STREAM at will) and its connection task.
async fn raw_h2(
    gw: &logon_gate::serve::Running,
    f: &Fixture,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tls = tls_connect(
        gw.https.expect("https"),
        client_config(&f.pki.ca_der(), &[b"h2"], true),
        "webmail.example.net",
    )
    .await
    .expect("tls");
    let (client, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    (client, tokio::spawn(conn))
}

/// HTTP/2 as nginx does it: a connection with no open stream for `keepalive_timeout` is sent
/// GOAWAY and closed cleanly; a response slower than that is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_at_the_keepalive_timeout() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "[limits]\nkeepalive_timeout = \"1s\"\n");
    let gw = f.start().await;
    let (client, mut conn) = raw_h2(&gw, &f).await;
    let mut client = client.ready().await.expect("ready");
    let req = http::Request::builder()
        .uri("https://webmail.example.net/slow?ms=2500")
        .body(())
        .expect("request");
    let (resp, _) = client.send_request(req, true).expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no answer in 10 s")
        .expect("the stream was cut while its response was under way");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert!(got.ends_with(b"slow done"), "{got:?}");
    assert!(!conn.is_finished(), "closed while a stream was open");

    let idle = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(6), &mut conn).await;
    let after = idle.elapsed();
    match ended {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => panic!("closed with an error, not a clean GOAWAY: {e}"),
        Ok(Err(e)) => panic!("client task: {e}"),
        Err(_) => panic!("an idle HTTP/2 connection was still open after 6 s"),
    }
    assert!(
        after >= Duration::from_millis(800) && after < Duration::from_millis(3000),
        "closed {after:?} after its last stream; keepalive_timeout is 1s"
    );
    gw.stop().await.expect("gateway task");
}

/// The gateway's end of the TCP connection from `client` to `server` in /proc/net/tcp: its
/// timer kind (2: keep-alive) and seconds until that timer fires.
fn server_side_timer(server: std::net::SocketAddr, client: std::net::SocketAddr) -> (u8, f64) {
    let hex = |a: std::net::SocketAddr| {
        let std::net::IpAddr::V4(ip) = a.ip() else {
            panic!("IPv4 expected: {a}")
        };
        // The address as the kernel's u32 in host (little-endian) order, then the port.
        format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), a.port())
    };
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) == Some(&local.as_str()) && f.get(2) == Some(&remote.as_str()) {
            let (kind, when) = f[5].split_once(':').expect("tr:tm->when");
            let kind = kind.parse().expect("timer kind");
            // Clock ticks, USER_HZ = 100 on Linux.
            let when = u64::from_str_radix(when, 16).expect("tm->when") as f64 / 100.0;
            return (kind, when);
        }
    }
    panic!("no socket {local} -> {remote} in /proc/net/tcp")
}

/// HTTP/2 has no pings (an idle connection is closed instead): a peer that vanishes while a
/// stream is open is found by TCP keep-alive probes, armed for `keepalive_timeout` of silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_probe_a_silent_peer_with_tcp_keepalive() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "[limits]\nkeepalive_timeout = \"30s\"\n");
    let gw = f.start().await;
    let https = gw.https.expect("https");
    for (alpn, probed) in [(&b"h2"[..], true), (&b"http/1.1"[..], false)] {
        let tls = tls_connect(
            https,
            client_config(&f.pki.ca_der(), &[alpn], true),
            "webmail.example.net",
        )
        .await
        .expect("tls");
        let client = tls.get_ref().0.local_addr().expect("client address");
        let mut c = if probed {
            Client::h2(tls).await
        } else {
            Client::h1(tls).await
        };
        assert_eq!(
            c.get("webmail.example.net", "/").await.status,
            StatusCode::OK
        );
        // Kind 1 (retransmission or loss probe) lasts until the client's ACKs are in.
        let mut timer = server_side_timer(https, client);
        let settled = Instant::now() + Duration::from_secs(3);
        while timer.0 == 1 && Instant::now() < settled {
            tokio::time::sleep(Duration::from_millis(20)).await;
            timer = server_side_timer(https, client);
        }
        let (kind, when) = timer;
        if probed {
            assert_eq!(kind, 2, "no keep-alive timer on an HTTP/2 connection");
            assert!(
                (20.0..=30.0).contains(&when),
                "first probe in {when} s; keepalive_timeout is 30s"
            );
        } else {
            assert_eq!(
                kind, 0,
                "HTTP/1.1 is closed at keepalive_timeout; no probes"
            );
        }
    }
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn http2_rapid_reset_is_cut_off() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let (mut client, conn) = raw_h2(&gw, &f).await;
    let mut sent = 0;
    let started = Instant::now();
    while sent < 20_000 && started.elapsed() < Duration::from_secs(10) {
        let Ok(ready) = client.clone().ready().await else {
            break;
        };
        client = ready;
        let req = http::Request::builder()
            .uri("https://webmail.example.net/slow?ms=1000")
            .body(())
            .expect("request");
        let Ok((_resp, mut stream)) = client.send_request(req, true) else {
            break;
        };
        // Let HEADERS reach the wire first, so the gateway really starts each request.
        tokio::task::yield_now().await;
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        sent < 20_000,
        "the gateway accepted {sent} opened-and-reset streams"
    );
    assert!(ended.is_ok(), "connection still open after {sent} resets");
    gw.stop().await.expect("gateway task");
}

/// The slower variant: each stream is reset only once the gateway is working on it (its
/// request reached the backend). h2's own limits do not see these; the gateway counts requests
/// abandoned before their answer and closes the connection past 100 of them.
#[tokio::test]
async fn http2_streams_abandoned_in_flight_are_cut_off() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let (mut client, conn) = raw_h2(&gw, &f).await;
    let mut abandoned = 0;
    while abandoned < 300 {
        let Ok(ready) = client.clone().ready().await else {
            break;
        };
        client = ready;
        let req = http::Request::builder()
            .uri("https://webmail.example.net/slow?ms=5000")
            .body(())
            .expect("request");
        let Ok((_resp, mut stream)) = client.send_request(req, true) else {
            break;
        };
        let before = abandoned;
        let backend_ref = &backend;
        if !eventually(Duration::from_secs(2), || async move {
            backend_ref.hits() > before
        })
        .await
        {
            break;
        }
        stream.send_reset(h2::Reason::CANCEL);
        abandoned += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        ended.is_ok(),
        "connection still open after {abandoned} abandoned requests"
    );
    assert!(
        (100..=110).contains(&abandoned),
        "cut off after {abandoned} abandoned requests"
    );
    gw.stop().await.expect("gateway task");
}

/// A hand-built ClientHello (no rustls client can speak TLS 1.1 or offer CBC-only suites).
fn client_hello(version: [u8; 2], suites: &[u16], sni: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version);
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]);
    let mut ext = Vec::new();
    let name = sni.as_bytes();
    let mut sn = Vec::new();
    sn.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sn.push(0);
    sn.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sn.extend_from_slice(name);
    ext.extend_from_slice(&[0, 0]);
    ext.extend_from_slice(&(sn.len() as u16).to_be_bytes());
    ext.extend_from_slice(&sn);
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17]); // secp256r1
    ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]); // uncompressed points
    ext.extend_from_slice(&[0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03]); // ecdsa_p256_sha256
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

async fn alert_for(addr: std::net::SocketAddr, hello: &[u8]) -> Option<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(hello).await.expect("write");
    let (got, _) = read_to_close(&mut s, Duration::from_secs(3)).await;
    // An alert record: type 21, version, length 2, level, description.
    (got.len() >= 7 && got[0] == 0x15).then(|| got[6])
}

#[tokio::test]
async fn old_tls_and_non_aead_suites_are_never_negotiated() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let https = gw.https.expect("https");
    let cbc = [0xc009, 0xc00a, 0xc013, 0x002f, 0x0035];
    // TLS 1.1 (and 1.0) only: protocol_version (70).
    for v in [[3, 2], [3, 1]] {
        let hello = client_hello(v, &[0xc02b, 0xc009], "webmail.example.net");
        assert_eq!(alert_for(https, &hello).await, Some(70), "version {v:?}");
    }
    // TLS 1.2 offering only CBC (non-AEAD) suites: handshake_failure (40).
    let hello = client_hello([3, 3], &cbc, "webmail.example.net");
    assert_eq!(alert_for(https, &hello).await, Some(40));
    // The same hello with an AEAD suite gets a ServerHello (record type 22), proving the
    // hand-built hello itself is sound.
    let mut s = TcpStream::connect(https).await.expect("connect");
    s.write_all(&client_hello([3, 3], &[0xc02b], "webmail.example.net"))
        .await
        .expect("write");
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.expect("read");
    assert_eq!(first[0], 0x16);
    // The handshake left half-done above must not hold the shutdown up.
    let t = Instant::now();
    gw.stop().await.expect("gateway task");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "shutdown waited {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn json_access_log_line_has_every_field() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let mut gw = GatewayProcess::start(&["serve", "--log-format", "json"], &f.gateway_toml()).await;
    let stderr = gw.take_stderr();
    // Under JSON the readiness line is a JSON object too.
    let https = gw.https.expect("https address in the JSON readiness line");
    let mut c = https_client(https, &f.pki.ca_der(), "webmail.example.net", false).await;
    let r = c
        .send(
            "POST",
            Some("webmail.example.net"),
            "/echo",
            &[],
            Bytes::from_static(b"hello"),
        )
        .await
        .expect("request");
    assert_eq!(r.status, StatusCode::OK);
    let access = tokio::task::spawn_blocking(move || {
        stderr
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("\"target\":\"access\""))
    });
    let access = tokio::time::timeout(Duration::from_secs(10), access)
        .await
        .expect("an access line within 10 s")
        .expect("join")
        .expect("an access line");
    gw.signal("TERM");
    let _ = gw.wait().await;
    let j: serde_json::Value = serde_json::from_str(&access).expect("access line is JSON");
    assert!(j["timestamp"].is_string(), "{j}");
    assert!(
        j["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{j}"
    );
    assert_eq!(j["host"], "webmail.example.net");
    assert_eq!(j["tenant"], "example.net");
    assert_eq!(j["method"], "POST");
    assert_eq!(j["path"], "/echo");
    assert_eq!(j["status"], 200);
    assert_eq!(j["decision"], "forward");
    assert_eq!(j["bytes_in"], 5);
    assert_eq!(j["bytes_out"], 5);
    assert_eq!(j["completed"], true);
    assert!(j["duration_us"].as_u64().is_some_and(|d| d > 0), "{j}");
    assert!(j["upstream_us"].as_u64().is_some_and(|d| d > 0), "{j}");
}
