//! The translation between HTTP/2 (and HTTP/1.1) clients and the HTTP/1.1 backend, checked
//! with peers nobody here wrote: python-h2 and curl as clients, Python's http.server and
//! PHP's built-in server as backends. Each test cites the RFC text it checks. They need
//! Debian packages (python3-h2, php-cli, curl), so they are ignored by a bare `cargo test`
//! and run by `.ci/run`.

use std::path::PathBuf;

use crate::support::peers::{self, Peer, curl, h2_request};
use crate::support::*;

/// The gateway in front of `backend`, and the test CA's PEM file for the clients.
async fn gateway(backend: &str) -> (Fixture, logon_gate::serve::Running, PathBuf, u16) {
    let f = Fixture::new(backend, "");
    let ca = f.path().join("ca.pem");
    std::fs::write(&ca, f.pki.ca_pem()).expect("write CA");
    let gw = f.start().await;
    let port = gw.https.expect("https").port();
    (f, gw, ca, port)
}

/// An HTTP/2 GET of `path` on webmail.example.net, with `extra` fields after the
/// pseudo-headers.
async fn h2_get(
    port: u16,
    ca: &std::path::Path,
    path: &str,
    extra: &[(&str, &str)],
) -> peers::H2Answer {
    let authority = format!("webmail.example.net:{port}");
    let mut h = vec![
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", authority.as_str()),
        (":path", path),
    ];
    h.extend_from_slice(extra);
    h2_request(port, "webmail.example.net", ca, &h, &[], false).await
}

/// `a` was forwarded, and the echo backend got exactly one Host line, `authority`.
fn assert_one_host(a: &peers::H2Answer, authority: &str) {
    assert_eq!(a.status, Some(200), "{a:?}");
    let echo: serde_json::Value = serde_json::from_str(&a.body).expect("echo JSON");
    assert_eq!(received(&echo, "host"), [authority], "{echo}");
}

/// The requests `tests/peers/backend.py` has received: (path, complete).
async fn seen(backend: &Peer) -> Vec<(String, bool)> {
    let mut c = http_client(backend.addr).await;
    let v = c.get("backend", "/__seen").await.json();
    v.as_array()
        .expect("list")
        .iter()
        .map(|e| {
            let path = e["path"].as_str().unwrap_or_default().to_owned();
            (path, e["complete"].as_bool().unwrap_or(false))
        })
        .collect()
}

fn reached(seen: &[(String, bool)], path: &str) -> Vec<bool> {
    seen.iter()
        .filter(|(p, _)| p == path)
        .map(|(_, c)| *c)
        .collect()
}

/// The header lines the echo backend received with `name` (any case), in order.
fn received(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter(|p| p[0].as_str().is_some_and(|k| k.eq_ignore_ascii_case(name)))
        .filter_map(|p| p[1].as_str().map(str::to_owned))
        .collect()
}

/// RFC 9113 §8.2.3: "If there are multiple Cookie header fields after decompression, these
/// MUST be concatenated into a single octet string using the two-octet delimiter of 0x3b,
/// 0x20 (the ASCII string "; ") before being passed into a non-HTTP/2 context, such as an
/// HTTP/1.1 connection". PHP, like the webmail it runs, joins repeated lines with ", ".
#[tokio::test]
#[ignore = "needs php-cli, python3-h2 and curl: run by .ci/run"]
async fn h2_cookie_crumbs_reach_php_as_separate_cookies() {
    let php = Peer::php(&crate::support::peers::peers_dir().join("cookies.php"));
    let (_f, _gw, ca, port) = gateway(&php.url()).await;
    let a = h2_get(
        port,
        &ca,
        "/",
        &[
            ("cookie", "roundcube_sessid=abc"),
            ("cookie", "roundcube_sessauth=xyz"),
            ("cookie", "lang=en"),
        ],
    )
    .await;
    assert_eq!(a.status, Some(200), "{a:?}");
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("PHP's JSON");
    assert_eq!(
        v["cookies"],
        serde_json::json!({"roundcube_sessid": "abc", "roundcube_sessauth": "xyz", "lang": "en"}),
        "{v}"
    );
    assert_eq!(
        v["raw"],
        "roundcube_sessid=abc; roundcube_sessauth=xyz; lang=en"
    );
    assert_eq!(v["https"], "https");

    // curl over HTTP/1.1 and HTTP/2, with the one Cookie line it sends.
    for h2 in [false, true] {
        let c = curl(
            port,
            "webmail.example.net",
            "/",
            &ca,
            h2,
            &["-b", "a=1; b=2"],
        )
        .await;
        assert_eq!(c.status(), Some(200), "{c:?}");
        let v: serde_json::Value = serde_json::from_str(&c.body).expect("PHP's JSON");
        assert_eq!(v["cookies"], serde_json::json!({"a": "1", "b": "2"}), "{v}");
    }
}

/// RFC 9113 §8.2.2: "An endpoint MUST NOT generate an HTTP/2 message containing
/// connection-specific header fields. This includes the Connection header field and those
/// listed as having connection-specific semantics in Section 7.6.1 of [HTTP] (that is,
/// Proxy-Connection, Keep-Alive, Transfer-Encoding, and Upgrade). Any message containing
/// connection-specific header fields MUST be treated as malformed"; the one exception is TE
/// with "trailers". §8.1.1: malformed requests are never forwarded.
#[tokio::test]
#[ignore = "needs python3-h2: run by .ci/run"]
async fn h2_connection_specific_fields_make_the_request_malformed() {
    let backend = Peer::python_backend();
    let (_f, _gw, ca, port) = gateway(&backend.url()).await;
    let fields = [
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("te", "gzip"),
    ];
    for (i, (name, value)) in fields.iter().enumerate() {
        let path = format!("/echo?malformed={i}");
        let a = h2_get(port, &ca, &path, &[(name, value)]).await;
        assert_eq!(a.status, None, "{name}: {a:?}");
        assert_eq!(a.reset.as_deref(), Some("PROTOCOL_ERROR"), "{name}: {a:?}");
    }
    // TE: trailers is allowed; TE is hop-by-hop on the HTTP/1.1 side, so it stops here.
    let a = h2_get(port, &ca, "/echo?te", &[("te", "trailers")]).await;
    assert_eq!(a.status, Some(200), "{a:?}");
    let echo: serde_json::Value = serde_json::from_str(&a.body).expect("echo JSON");
    assert!(received(&echo, "te").is_empty(), "{echo}");

    let seen = seen(&backend).await;
    for i in 0..fields.len() {
        let path = format!("/echo?malformed={i}");
        assert!(reached(&seen, &path).is_empty(), "{path} reached: {seen:?}");
    }
    assert_eq!(reached(&seen, "/echo?te"), [true]);
}

/// RFC 9113 §8.3.1: ":authority ... Clients that generate HTTP/2 requests directly MUST use
/// the :authority pseudo-header field to convey authority information, unless there is no
/// authority information to convey ... An intermediary that forwards a request over HTTP/1.1
/// MUST construct a Host header field if one is not present in a request by copying the
/// value of the :authority pseudo-header field"; a Host that "identifies an entity that
/// differs from the entity in the :authority pseudo-header field" is malformed.
#[tokio::test]
#[ignore = "needs python3-h2: run by .ci/run"]
async fn h2_authority_becomes_the_one_host() {
    let backend = Peer::python_backend();
    let (_f, _gw, ca, port) = gateway(&backend.url()).await;
    let authority = format!("webmail.example.net:{port}");
    let ask = |path: &'static str, extra: Vec<(&'static str, String)>| {
        let ca = ca.clone();
        let authority = authority.clone();
        async move {
            let mut h: Vec<(&str, &str)> = vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", &authority),
                (":path", path),
            ];
            h.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
            h2_request(port, "webmail.example.net", &ca, &h, &[], false).await
        }
    };
    let a = ask("/echo?authority", vec![]).await;
    assert_one_host(&a, &authority);

    // The same host in both: still one Host line.
    let a = ask("/echo?both", vec![("host", "WebMail.example.net".into())]).await;
    assert_one_host(&a, &authority);

    // Another host in Host than in :authority: refused, never forwarded.
    let a = ask("/echo?differs", vec![("host", "mail.provider.test".into())]).await;
    assert_eq!(a.status, Some(400), "{a:?}");
    assert!(reached(&seen(&backend).await, "/echo?differs").is_empty());
}

/// RFC 9113 §8.1.1: "A request or response is also malformed if the value of a
/// content-length header field does not equal the sum of the DATA frame payload lengths
/// that form the content ... Intermediaries that process HTTP requests or responses (i.e.,
/// any intermediary not acting as a tunnel) MUST NOT forward a malformed request".
#[tokio::test]
#[ignore = "needs python3-h2: run by .ci/run"]
async fn h2_content_length_must_equal_the_data() {
    let backend = Peer::python_backend();
    let (_f, _gw, ca, port) = gateway(&backend.url()).await;
    let authority = format!("webmail.example.net:{port}");
    let post = |path: &'static str, length: &'static str, data: Vec<&'static str>, empty| {
        let ca = ca.clone();
        let authority = authority.clone();
        async move {
            let h = [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", authority.as_str()),
                (":path", path),
                ("content-length", length),
            ];
            h2_request(port, "webmail.example.net", &ca, &h, &data, empty).await
        }
    };
    // Shorter than declared, ending with the last DATA frame.
    let a = post("/echo?short", "10", vec!["12345"], false).await;
    assert_eq!(
        (a.status, a.reset.as_deref()),
        (None, Some("PROTOCOL_ERROR"))
    );
    // Longer than declared, in a second frame after the declared length was reached: the
    // first five bytes are a whole HTTP/1.1 request, which must not reach the backend.
    let a = post("/echo?long", "5", vec!["12345", "6789"], false).await;
    assert_eq!(
        (a.status, a.reset.as_deref()),
        (None, Some("PROTOCOL_ERROR"))
    );
    // Declared, but END_STREAM on the headers.
    let a = post("/echo?none", "3", vec![], false).await;
    assert_eq!(
        (a.status, a.reset.as_deref()),
        (None, Some("PROTOCOL_ERROR"))
    );
    // Declared empty on a stream still open, then DATA: the backend would have had the
    // empty request whole at once.
    let a = post("/echo?zero", "0", vec!["abc"], false).await;
    assert_eq!(
        (a.status, a.reset.as_deref()),
        (None, Some("PROTOCOL_ERROR"))
    );
    // Declared empty, ended by an empty DATA frame: forwarded once the stream has ended.
    let a = post("/echo?zero-ok", "0", vec![], true).await;
    assert_eq!(a.status, Some(200), "{a:?}");
    // No number at all (h2 reads an empty value as 0): refused (RFC 9110 §8.6).
    let a = post("/echo?empty", "", vec![], false).await;
    assert_eq!(a.status, Some(400), "{a:?}");
    // Equal, with END_STREAM on an empty DATA frame after the declared length.
    let a = post("/echo?exact", "5", vec!["12345"], true).await;
    assert_eq!(a.status, Some(200), "{a:?}");
    let echo: serde_json::Value = serde_json::from_str(&a.body).expect("echo JSON");
    assert_eq!(echo["body_len"], 5);
    assert_eq!(received(&echo, "content-length"), ["5"]);

    let seen = seen(&backend).await;
    for path in [
        "/echo?short",
        "/echo?long",
        "/echo?none",
        "/echo?zero",
        "/echo?empty",
    ] {
        assert!(
            !reached(&seen, path).contains(&true),
            "{path} reached the backend whole: {seen:?}"
        );
    }
    assert_eq!(reached(&seen, "/echo?exact"), [true]);
    assert_eq!(reached(&seen, "/echo?zero-ok"), [true]);

    // The same length twice (h2 lets equal values repeat): one line for the backend.
    let h = [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", authority.as_str()),
        (":path", "/echo?twice"),
        ("content-length", "3"),
        ("content-length", "3"),
    ];
    let a = h2_request(port, "webmail.example.net", &ca, &h, &["abc"], false).await;
    assert_eq!(a.status, Some(200), "{a:?}");
    let echo: serde_json::Value = serde_json::from_str(&a.body).expect("echo JSON");
    assert_eq!(received(&echo, "content-length"), ["3"], "{echo}");
}

/// RFC 9110 §7.6.1: the fields a client's Connection names are hop-by-hop and removed, with
/// Connection itself. RFC 9113 §3.1: "The "h2c" string was previously used as a token for use
/// in the HTTP Upgrade mechanism's Upgrade header field ... This usage was never widely
/// deployed and is deprecated by this document"; an upgrade the backend accepted would make
/// the connection a tunnel past the host policy, so only WebSocket is passed on.
#[tokio::test]
#[ignore = "needs curl: run by .ci/run"]
async fn http11_hop_by_hop_fields_and_h2c_never_reach_the_backend() {
    let backend = Peer::python_backend();
    let (_f, _gw, ca, port) = gateway(&backend.url()).await;
    let c = curl(
        port,
        "webmail.example.net",
        "/echo?hop",
        &ca,
        false,
        &[
            "-H",
            "Connection: X-Private, Upgrade, HTTP2-Settings",
            "-H",
            "X-Private: secret",
            "-H",
            "Upgrade: h2c",
            "-H",
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            "-H",
            "X-Kept: 1",
        ],
    )
    .await;
    assert_eq!(c.status(), Some(200), "{c:?}");
    let echo: serde_json::Value = serde_json::from_str(&c.body).expect("echo JSON");
    for name in ["x-private", "upgrade", "http2-settings", "connection"] {
        assert!(received(&echo, name).is_empty(), "{name} reached: {echo}");
    }
    assert_eq!(received(&echo, "x-kept"), ["1"]);
}

/// RFC 9112 §6.3: a message with both Transfer-Encoding and Content-Length: "an intermediary
/// ... MUST first remove the received Content-Length field"; a transfer-coding the gateway
/// cannot decode (RFC 9112 §7) cannot be passed on once Transfer-Encoding, a hop-by-hop
/// field, is removed.
#[tokio::test]
#[ignore = "needs curl with HTTP/2: run by .ci/run"]
async fn backend_framing_is_repaired_or_refused() {
    let backend = Peer::python_backend();
    let (_f, _gw, ca, port) = gateway(&backend.url()).await;
    for h2 in [false, true] {
        let c = curl(port, "webmail.example.net", "/te-cl", &ca, h2, &[]).await;
        assert_eq!((c.status(), c.body.as_str()), (Some(200), "hello"), "{c:?}");
        assert!(c.all("content-length").iter().all(|v| v == "5"), "{c:?}");
        let c = curl(port, "webmail.example.net", "/te-gzip", &ca, h2, &[]).await;
        assert_eq!(c.status(), Some(502), "{c:?}");
    }
}

/// RFC 9110 §5.3: "a sender MUST NOT combine multiple field lines [of Set-Cookie] into one
/// field line"; RFC 6265 §3: "Origin servers SHOULD NOT fold multiple Set-Cookie header
/// fields into a single header field". An Expires date has a comma of its own.
#[tokio::test]
#[ignore = "needs curl with HTTP/2: run by .ci/run"]
async fn set_cookie_lines_stay_separate() {
    let backend = Peer::python_backend();
    let (_f, _gw, ca, port) = gateway(&backend.url()).await;
    for h2 in [false, true] {
        let c = curl(port, "webmail.example.net", "/cookies", &ca, h2, &[]).await;
        assert_eq!(c.status(), Some(200), "{c:?}");
        assert_eq!(
            c.all("set-cookie"),
            [
                "sess=abc; Path=/; Secure; HttpOnly",
                "tok=xyz; Expires=Wed, 09 Jun 2027 10:18:14 GMT; Path=/",
                "lang=en, fr; Path=/",
            ],
            "http2={h2}: {c:?}"
        );
    }
}

/// RFC 9110 §7.6.1: "Intermediaries MUST parse a received Connection header field before a
/// message is forwarded and, for each connection-option in this field, remove any header or
/// trailer field(s) from the message with the same name as the connection-option, and then
/// remove the Connection header field itself"; Proxy-Connection, Keep-Alive, TE,
/// Transfer-Encoding and Upgrade are connection-specific too. RFC 9113 §8.2.2: none of them
/// in an HTTP/2 response.
#[tokio::test]
#[ignore = "needs curl with HTTP/2: run by .ci/run"]
async fn backend_hop_by_hop_fields_never_reach_clients() {
    let backend = Peer::python_backend();
    let (_f, _gw, ca, port) = gateway(&backend.url()).await;
    for h2 in [false, true] {
        let c = curl(port, "webmail.example.net", "/hop", &ca, h2, &[]).await;
        assert_eq!((c.status(), c.body.as_str()), (Some(200), "hop"), "{c:?}");
        for name in [
            "connection",
            "x-private",
            "keep-alive",
            "proxy-connection",
            "upgrade",
        ] {
            assert!(c.all(name).is_empty(), "http2={h2}: {name} in {c:?}");
        }
        assert_eq!(c.all("x-kept"), ["1"]);
    }
}

/// RFC 9110 §10.1.1: a server that receives `Expect: 100-continue` "MUST send either an
/// immediate response with a final status code ... or an immediate 100 (Continue)
/// response"; a client "MAY proceed to send the content even if it has not yet received a
/// response". §15.2: "A client MUST be able to parse one or more 1xx responses received
/// prior to a final response"; RFC 8297: 103 Early Hints is informational, the final
/// response follows. Over HTTP/1.1 the gateway sends the 100 itself when it starts passing
/// the body on (the long expect timeout makes a missing 100 show). Over HTTP/2 hyper cannot
/// send a 1xx, so this falls short of §10.1.1's "immediate 100": curl proceeds after its
/// own 1 s wait, and the test checks only that the request then completes. Browsers send no
/// `Expect`.
#[tokio::test]
#[ignore = "needs curl with HTTP/2: run by .ci/run"]
async fn continue_and_early_hints_end_in_the_final_response() {
    let backend = Peer::python_backend();
    let (f, _gw, ca, port) = gateway(&backend.url()).await;
    let upload = f.path().join("upload.bin");
    std::fs::write(&upload, pattern(300_000)).expect("write upload");
    let data = format!("@{}", upload.display());
    let c = curl(
        port,
        "webmail.example.net",
        "/echo?continue",
        &ca,
        false,
        &[
            "-H",
            "Expect: 100-continue",
            "--expect100-timeout",
            "30",
            "--data-binary",
            &data,
        ],
    )
    .await;
    let statuses: Vec<&str> = c.heads.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        statuses,
        ["HTTP/1.1 100 Continue", "HTTP/1.1 200 OK"],
        "{c:?}"
    );
    let echo: serde_json::Value = serde_json::from_str(&c.body).expect("echo JSON");
    assert_eq!(echo["body_len"], 300_000);

    let c = curl(
        port,
        "webmail.example.net",
        "/echo?continue2",
        &ca,
        true,
        &[
            "-H",
            "Expect: 100-continue",
            "--expect100-timeout",
            "1",
            "--data-binary",
            &data,
        ],
    )
    .await;
    assert_eq!(c.status(), Some(200), "{c:?}");
    let echo: serde_json::Value = serde_json::from_str(&c.body).expect("echo JSON");
    assert_eq!(echo["body_len"], 300_000);

    for h2 in [false, true] {
        let c = curl(port, "webmail.example.net", "/early-hints", &ca, h2, &[]).await;
        assert_eq!((c.status(), c.body.as_str()), (Some(200), "final"), "{c:?}");
        // Dropped (one head only), and its fields are not the final response's.
        assert_eq!(c.heads.len(), 1, "{c:?}");
        assert!(c.all("link").is_empty(), "{c:?}");
    }
}

/// RFC 9110 §6.5 and RFC 9113 §8.1: trailer fields follow the content; an HTTP/2 response
/// carries them in a final HEADERS frame. RFC 9112 §7.1.2: over HTTP/1.1 they are sent in
/// the chunked encoding, and the Trailer field (RFC 9110 §6.6.2, end-to-end) names them.
#[tokio::test]
#[ignore = "needs python3-h2 and curl: run by .ci/run"]
async fn backend_trailers_reach_the_client() {
    let backend = Peer::python_backend();
    let (_f, _gw, ca, port) = gateway(&backend.url()).await;
    let a = h2_get(port, &ca, "/trailers", &[("te", "trailers")]).await;
    assert_eq!((a.status, a.body.as_str()), (Some(200), "hello"), "{a:?}");
    assert_eq!(
        a.trailers,
        [("x-checksum".to_string(), "abc123".to_string())],
        "{a:?}"
    );

    // A hop-by-hop field among them goes (RFC 9110 §7.6.1), and the HTTP/2 stream is not
    // reset over it (RFC 9113 §8.2.2).
    let a = h2_get(port, &ca, "/trailers-hop", &[("te", "trailers")]).await;
    assert_eq!((a.status, a.reset.as_deref()), (Some(200), None), "{a:?}");
    assert_eq!(
        a.trailers,
        [("x-checksum".to_string(), "abc123".to_string())],
        "{a:?}"
    );

    let c = curl(
        port,
        "webmail.example.net",
        "/trailers",
        &ca,
        false,
        &["-H", "TE: trailers"],
    )
    .await;
    assert_eq!((c.status(), c.body.as_str()), (Some(200), "hello"), "{c:?}");
    // curl writes the trailer after the head it belongs to.
    assert!(c.all("x-checksum").contains(&"abc123".to_string()), "{c:?}");
}
