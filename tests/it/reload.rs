//! Hot reload, end to end: every way a change arrives is picked up within 2 s, an invalid edit
//! keeps the old table serving, and nothing in flight is dropped across 50 reloads.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use logon_gate::serve::Running;
use tokio_tungstenite::tungstenite::Message;

const WITHIN: Duration = Duration::from_secs(2);

fn generation(gw: &Running) -> u64 {
    gw.gateway.snapshot().generation
}

fn last_ok(gw: &Running) -> bool {
    gw.gateway.status.lock().map(|s| s.ok).unwrap_or(false)
}

async fn status_of(addr: std::net::SocketAddr, host: &str) -> StatusCode {
    let mut c = http_client(addr).await;
    c.get(host, "/").await.status
}

/// Waits until a plain-HTTP request for `host` gets `want`.
async fn becomes(gw: &Running, host: &str, want: StatusCode) -> bool {
    let http = gw.http.expect("http");
    eventually(
        WITHIN,
        || async move { status_of(http, host).await == want },
    )
    .await
}

fn editor_write(path: &Path, text: &str) {
    // What vim/emacs/sed -i do: write a temp file beside it, then rename over.
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test]
async fn in_place_and_editor_writes_are_picked_up() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    assert_eq!(
        status_of(gw.http.expect("http"), "webmail.example.org").await,
        StatusCode::OK
    );

    // In place: disable example.org's address.
    f.write_tenant(
        "example.org",
        &EXAMPLE_ORG.replace("enabled = true", "enabled = false"),
    );
    assert!(
        becomes(&gw, "webmail.example.org", StatusCode::FORBIDDEN).await,
        "in-place write"
    );

    // Editor style: enable it again.
    editor_write(&f.path().join("tenants/example.org.toml"), EXAMPLE_ORG);
    assert!(
        becomes(&gw, "webmail.example.org", StatusCode::OK).await,
        "temp + rename"
    );
    assert!(last_ok(&gw));
    gw.stop().await.expect("gateway task");
}

/// Files a reload does not read (a log written beside gateway.toml, an editor's swap file, a
/// tenant folder's notes, a hidden file among the certificates) start no reload: only the
/// real change does, so the generation goes from 1 to exactly 2.
#[tokio::test]
async fn files_a_reload_does_not_read_start_no_reload() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    assert_eq!(generation(&gw), 1);
    let noise = [
        f.path().join("gateway.log"),
        f.path().join(".gateway.toml.swp"),
        f.path().join("tenants/README.txt"),
        f.path().join("certs/.staging"),
    ];
    for round in 0..10 {
        for p in &noise {
            std::fs::write(p, format!("line {round}\n")).expect("write noise");
        }
    }
    // Quiet for four times the debounce, so that a reload the noise had started would be
    // over (and counted) before the real change starts its own.
    tokio::time::sleep(Duration::from_millis(400)).await;
    f.write_tenant(
        "example.org",
        &EXAMPLE_ORG.replace("enabled = true", "enabled = false"),
    );
    assert!(
        becomes(&gw, "webmail.example.org", StatusCode::FORBIDDEN).await,
        "the tenant change"
    );
    assert_eq!(generation(&gw), 2, "files no reload reads caused reloads");
    gw.stop().await.expect("gateway task");
}

/// A connection that stays open sees each reload: its requests are not decided once for the
/// connection's life (the gateway reuses the last forward decision only within one
/// configuration generation).
#[tokio::test]
async fn an_open_connection_follows_reloads() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let mut c = http_client(gw.http.expect("http")).await;
    for _ in 0..2 {
        assert_eq!(
            c.get("webmail.example.org", "/").await.status,
            StatusCode::OK
        );
    }

    let g0 = generation(&gw);
    f.write_tenant(
        "example.org",
        &EXAMPLE_ORG.replace("enabled = true", "enabled = false"),
    );
    let gw_ref = &gw;
    assert!(eventually(WITHIN, || async move { generation(gw_ref) > g0 }).await);
    assert_eq!(
        c.get("webmail.example.org", "/").await.status,
        StatusCode::FORBIDDEN,
        "the same connection, after the address was disabled"
    );

    let g1 = generation(&gw);
    editor_write(&f.path().join("tenants/example.org.toml"), EXAMPLE_ORG);
    assert!(eventually(WITHIN, || async move { generation(gw_ref) > g1 }).await);
    for _ in 0..2 {
        assert_eq!(
            c.get("webmail.example.org", "/").await.status,
            StatusCode::OK
        );
    }
    // Another Host on the same connection is decided on its own.
    assert_eq!(
        c.get("nowhere.example", "/").await.status,
        StatusCode::MISDIRECTED_REQUEST
    );
    assert_eq!(
        c.get("webmail.example.org", "/").await.status,
        StatusCode::OK
    );
    assert!(last_ok(&gw));
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn new_and_deleted_files_are_picked_up() {
    let backend = Backend::start().await;
    let mut f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let https = gw.https.expect("https");
    let ca = f.pki.ca_der();
    assert_eq!(
        status_of(gw.http.expect("http"), "webmail.example.info").await,
        StatusCode::MISDIRECTED_REQUEST
    );

    // A new tenant file.
    f.write_tenant(
        "example.info",
        "domain = \"example.info\"\nedition = \"standard\"\n[[logon]]\nhost = \"webmail.example.info\"\ncname = \"verified\"\nicp = \"filed\"\nenabled = true\n",
    );
    assert!(
        becomes(&gw, "webmail.example.info", StatusCode::OK).await,
        "new tenant"
    );
    // A new certificate: its name now completes a handshake, and plain HTTP redirects.
    let cfg = client_config(&ca, &[b"http/1.1"], true);
    assert!(
        tls_connect(https, cfg.clone(), "webmail.example.info")
            .await
            .is_err()
    );
    f.add_cert("info.pem", &["webmail.example.info"]);
    let ok = eventually(WITHIN, || {
        let cfg = cfg.clone();
        async move {
            tls_connect(https, cfg, "webmail.example.info")
                .await
                .is_ok()
        }
    })
    .await;
    assert!(ok, "new certificate");
    assert!(becomes(&gw, "webmail.example.info", StatusCode::PERMANENT_REDIRECT).await);

    // Deleted again.
    std::fs::remove_file(f.path().join("certs/info.pem")).expect("rm");
    let refused = eventually(WITHIN, || {
        let cfg = cfg.clone();
        async move {
            tls_connect(https, cfg, "webmail.example.info")
                .await
                .is_err()
        }
    })
    .await;
    assert!(refused, "deleted certificate");
    std::fs::remove_file(f.path().join("tenants/example.info.toml")).expect("rm");
    assert!(
        becomes(&gw, "webmail.example.info", StatusCode::MISDIRECTED_REQUEST).await,
        "deleted tenant"
    );
    // Issue 27: a tenant file removed is applied to the live table alone, without a full
    // load of the others.
    let message = reload_message(&gw);
    assert_eq!(message, "applied the changed files");
    gw.stop().await.expect("gateway task");
}

#[cfg(unix)]
#[tokio::test]
async fn kubernetes_configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    // Lay tenants/ out as a ConfigMap volume: visible files are symlinks through ..data.
    let tenants = f.path().join("tenants");
    for e in std::fs::read_dir(&tenants).expect("ls") {
        std::fs::remove_file(e.expect("entry").path()).expect("rm");
    }
    let v1 = tenants.join("..2026_11_26_00_00_00.000000001");
    std::fs::create_dir(&v1).expect("mkdir");
    for (name, text) in [("example.net", EXAMPLE_NET), ("example.org", EXAMPLE_ORG)] {
        std::fs::write(v1.join(format!("{name}.toml")), text).expect("write");
        symlink(
            format!("..data/{name}.toml"),
            tenants.join(format!("{name}.toml")),
        )
        .expect("symlink");
    }
    symlink(v1.file_name().expect("name"), tenants.join("..data")).expect("symlink");
    let gw = f.start().await;
    assert_eq!(
        status_of(gw.http.expect("http"), "webmail.example.org").await,
        StatusCode::OK
    );

    // The kubelet's update: a new timestamped folder, a ..data_tmp link to it, renamed over ..data.
    let v2 = tenants.join("..2026_11_26_00_01_00.000000002");
    std::fs::create_dir(&v2).expect("mkdir");
    std::fs::write(v2.join("example.net.toml"), EXAMPLE_NET).expect("write");
    std::fs::write(
        v2.join("example.org.toml"),
        EXAMPLE_ORG.replace("enabled = true", "enabled = false"),
    )
    .expect("write");
    symlink(v2.file_name().expect("name"), tenants.join("..data_tmp")).expect("symlink");
    std::fs::rename(tenants.join("..data_tmp"), tenants.join("..data")).expect("swap");
    std::fs::remove_dir_all(&v1).expect("rm old");
    assert!(
        becomes(&gw, "webmail.example.org", StatusCode::FORBIDDEN).await,
        "..data swap"
    );
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn invalid_edit_keeps_the_old_table_until_fixed() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let http = gw.http.expect("http");
    let g0 = generation(&gw);

    // Half-written file: invalid TOML. The old table keeps serving.
    let full = EXAMPLE_ORG.replace("enabled = true", "enabled = false");
    f.write_tenant("example.org", &full[..full.len() / 2]);
    let gw_ref = &gw;
    let failed = eventually(WITHIN, || async move { !last_ok(gw_ref) }).await;
    assert!(failed, "a reload should have been attempted and refused");
    assert_eq!(generation(&gw), g0);
    let msg = reload_message(&gw);
    assert!(msg.contains("example.org.toml:"), "{msg}");
    assert_eq!(status_of(http, "webmail.example.org").await, StatusCode::OK);

    // A rule violation is refused the same way.
    f.write_tenant(
        "example.org",
        &EXAMPLE_ORG.replace("cname   = \"verified\"", "cname = \"pending\""),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(generation(&gw), g0);
    assert_eq!(status_of(http, "webmail.example.org").await, StatusCode::OK);

    // The complete write fixes it.
    f.write_tenant("example.org", &full);
    assert!(becomes(&gw, "webmail.example.org", StatusCode::FORBIDDEN).await);
    assert!(generation(&gw) > g0);
    assert!(last_ok(&gw));
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn backend_change_in_gateway_toml_applies_live() {
    let one = Backend::start().await;
    let two = Backend::start().await;
    let f = Fixture::new(&one.url(), "");
    let gw = f.start().await;
    let http = gw.http.expect("http");
    assert_eq!(status_of(http, "webmail.example.org").await, StatusCode::OK);
    assert_eq!((one.hits(), two.hits()), (1, 0));
    f.write_gateway(&two.url(), "");
    let two_ref = &two;
    let moved = eventually(WITHIN, || async move {
        status_of(http, "webmail.example.org").await;
        two_ref.hits() > 0
    })
    .await;
    assert!(moved, "backend change not applied");
    gw.stop().await.expect("gateway task");
}

#[tokio::test]
async fn certificate_rotation_under_an_open_connection() {
    let backend = Backend::start().await;
    let mut f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let https = gw.https.expect("https");
    let ca = f.pki.ca_der();
    let cfg = client_config(&ca, &[b"h2"], true);
    let old = f.cert_der("webmail.example.net.pem");
    let tls = tls_connect(https, cfg.clone(), "webmail.example.net")
        .await
        .expect("tls");
    assert_eq!(presented(&tls), old);
    let mut open = Client::h2(tls).await;
    assert_eq!(
        open.get("webmail.example.net", "/").await.status,
        StatusCode::OK
    );

    let new = f
        .add_cert("webmail.example.net.pem", &["webmail.example.net"])
        .cert_der;
    assert_ne!(old, new);
    let rotated = eventually(WITHIN, || {
        let cfg = cfg.clone();
        let new = new.clone();
        async move {
            match tls_connect(https, cfg, "webmail.example.net").await {
                Ok(t) => presented(&t) == new,
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(rotated, "new handshakes should get the new certificate");
    // The connection made with the old certificate keeps working.
    for _ in 0..5 {
        assert_eq!(
            open.get("webmail.example.net", "/").await.status,
            StatusCode::OK
        );
    }
    gw.stop().await.expect("gateway task");
}

/// Sends requests back to back on one connection until `stop`; counts successes and failures.
async fn keep_asking(
    mut c: Client,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    bad: Arc<AtomicUsize>,
) {
    while !stop.load(Ordering::SeqCst) {
        match c
            .send("GET", Some("webmail.example.net"), "/", &[], Bytes::new())
            .await
        {
            Ok(r) if r.status == StatusCode::OK => ok.fetch_add(1, Ordering::SeqCst),
            _ => bad.fetch_add(1, Ordering::SeqCst),
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_drop_nothing() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = f.start().await;
    let https = gw.https.expect("https");
    let ca = f.pki.ca_der();

    // A WebSocket opened before the reloads.
    let tls = tls_connect(
        https,
        client_config(&ca, &[b"http/1.1"], true),
        "webmail.example.net",
    )
    .await
    .expect("tls");
    let (mut ws, _) = tokio_tungstenite::client_async("wss://webmail.example.net/ws", tls)
        .await
        .expect("websocket");
    ws.send(Message::text("before")).await.expect("send");
    assert_eq!(
        ws.next()
            .await
            .expect("msg")
            .expect("frame")
            .into_text()
            .expect("text")
            .as_str(),
        "before"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for h2 in [false, true] {
        let c = https_client(https, &ca, "webmail.example.net", h2).await;
        clients.push(tokio::spawn(keep_asking(
            c,
            stop.clone(),
            ok.clone(),
            bad.clone(),
        )));
    }

    let start = generation(&gw);
    for i in 1..=50u64 {
        // Alternate a real change so every reload publishes a new table.
        let text = if i % 2 == 0 {
            EXAMPLE_ORG.to_string()
        } else {
            EXAMPLE_ORG.replace("enabled = true", "enabled = false")
        };
        f.write_tenant("example.org", &text);
        let gw_ref = &gw;
        let reloaded = eventually(WITHIN, || async move { generation(gw_ref) >= start + i }).await;
        assert!(reloaded, "reload {i} not seen");
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client task");
    }
    assert_eq!(
        bad.load(Ordering::SeqCst),
        0,
        "requests failed during reloads"
    );
    assert!(
        ok.load(Ordering::SeqCst) > 50,
        "too few requests made: {}",
        ok.load(Ordering::SeqCst)
    );

    ws.send(Message::text("after"))
        .await
        .expect("send after reloads");
    assert_eq!(
        ws.next()
            .await
            .expect("msg")
            .expect("frame")
            .into_text()
            .expect("text")
            .as_str(),
        "after"
    );
    gw.stop().await.expect("gateway task");
}
