//! ACME against a real ACME server: Debian's Pebble (RFC 8555), started here on loopback with
//! its own listener certificate, validating http-01 on the gateway's HTTP listener through a
//! DNS server of the test's that resolves the test names to 127.0.0.1. Needs the `pebble`
//! package (`.ci/run` installs it), so a bare `cargo test` ignores it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::dns::{DnsServer, Rec};
use crate::support::{self, *};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Whether, within `limit`, a handshake for `host` succeeds with a certificate that verifies
/// to `root` alone.
async fn served_by(https: SocketAddr, root: &[u8], host: &str, limit: Duration) -> bool {
    eventually(limit, || async move {
        let config = client_config(root, &[b"http/1.1"], true);
        tls_connect(https, config, host).await.is_ok()
    })
    .await
}

/// `logon-gate cert status --json`, by host.
fn cert_status(config: &std::path::Path) -> serde_json::Value {
    let out = Command::new(crate::support::process::BIN)
        .args(["cert", "status", "--json", "-c"])
        .arg(config)
        .output()
        .expect("run cert status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let by_host = rows
        .into_iter()
        .filter_map(|r| Some((r["host"].as_str()?.to_owned(), r)))
        .collect::<serde_json::Map<_, _>>();
    serde_json::Value::Object(by_host)
}

/// Pebble, killed and reaped on drop.
struct Pebble {
    child: Child,
    management: u16,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pebble {
    /// Starts Pebble on free loopback ports, validating against `http_port`/`tls_port` on
    /// 127.0.0.1 (as `dns` resolves every test name), with a listener certificate for
    /// `localhost` from `f`'s test CA.
    fn start(f: &mut Fixture, http_port: u16, tls_port: u16, dns: SocketAddr) -> (Pebble, u16) {
        let listener = f.pki.issue(&["localhost"]).expect("pebble certificate");
        let dir = f.path().join("pebble");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("cert.pem"), &listener.cert_pem).expect("write");
        std::fs::write(dir.join("key.pem"), &listener.key_pem).expect("write");
        let (port, management) = (support::free_port(), support::free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string()).expect("write");
        let log = std::fs::File::create(dir.join("pebble.log")).expect("log");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .arg("-dnsserver")
            .arg(dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start pebble (.ci/run installs it)");
        let mut pebble = Pebble { child, management };
        // Listening before the gateway's first order (bounded: 10 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = pebble.child.try_wait() {
                panic!("pebble exited: {status}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pebble not listening after 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        (pebble, port)
    }

    /// The root Pebble signs with, from its management listener.
    async fn root(&self, f: &Fixture) -> Vec<u8> {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(f.path().join("ca.pem"))
            .arg(format!("https://localhost:{}/roots/0", self.management))
            .kill_on_drop(true)
            .output()
            .await
            .expect("curl");
        CertificateDer::from_pem_slice(&out.stdout)
            .unwrap_or_else(|e| {
                panic!(
                    "Pebble's root ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })
            .to_vec()
    }
}

/// Pebble, the tests' DNS server, a backend, and the gateway with `[acme]` pointed at Pebble,
/// on ports picked here; `prepare` changes the fixture before the gateway starts.
struct Setup {
    f: Fixture,
    pebble: Pebble,
    gw: logon_gate::serve::Running,
    https: SocketAddr,
    _backend: Backend,
    _dns: DnsServer,
}

impl Setup {
    async fn start(prepare: impl FnOnce(&mut Fixture)) -> Setup {
        let backend = Backend::start().await;
        let dns = DnsServer::start(&[
            ("webmail.example.org", Rec::A([127, 0, 0, 1].into())),
            ("mail.example.net", Rec::A([127, 0, 0, 1].into())),
            ("webmail.example.net", Rec::A([127, 0, 0, 1].into())),
        ])
        .await;
        let mut f = Fixture::new(&backend.url(), "");
        std::fs::write(f.path().join("ca.pem"), f.pki.ca_pem()).expect("write CA");
        let (http_port, https_port) = (support::free_port(), support::free_port());
        let (pebble, port) = Pebble::start(&mut f, http_port, https_port, dns.addr);
        let acme = format!(
            "\n[acme]\ndirectory = \"https://localhost:{port}/dir\"\ncontact = [\"mailto:ops@provider.test\"]\nchallenges = [\"http-01\"]\nstorage = \"acme\"\ndirectory_ca = \"ca.pem\"\n"
        );
        f.write_gateway(&backend.url(), &acme);
        let text = std::fs::read_to_string(f.gateway_toml())
            .expect("read")
            .replace(
                "https = \"127.0.0.1:0\"",
                &format!("https = \"127.0.0.1:{https_port}\""),
            )
            .replace(
                "http  = \"127.0.0.1:0\"",
                &format!("http  = \"127.0.0.1:{http_port}\""),
            )
            .replace("admin = \"\"", "admin = \"127.0.0.1:0\"");
        std::fs::write(f.gateway_toml(), text).expect("write");
        prepare(&mut f);
        let gw = f.start().await;
        let https = gw.https.expect("https");
        Setup {
            f,
            pebble,
            gw,
            https,
            _backend: backend,
            _dns: dns,
        }
    }
}

/// RFC 8555 §8.3 (http-01) end to end: the enabled address without a certificate
/// (webmail.example.org) gets one from the CA and is served with it, the chain verifying to
/// Pebble's root; the enabled address with an uploaded certificate and the disabled one are
/// never ordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs pebble and curl: run by .ci/run"]
async fn an_enabled_address_without_a_certificate_gets_one_over_http01() {
    let Setup {
        f,
        pebble,
        gw,
        https,
        ..
    } = Setup::start(|f| {
        // Enabled too, but its name is not in DNS: the CA's validation fails.
        f.write_tenant(
            "example.info",
            "domain = \"example.info\"\nedition = \"standard\"\n[[logon]]\nhost = \"webmail.example.info\"\ncname = \"verified\"\nicp = \"filed\"\nenabled = true\n",
        );
    })
    .await;
    let issued = f.path().join("acme/certs/webmail.example.org.pem");
    let got = eventually(Duration::from_secs(60), || {
        let issued = issued.clone();
        async move { issued.exists() }
    })
    .await;
    let log = std::fs::read_to_string(f.path().join("pebble/pebble.log")).unwrap_or_default();
    assert!(
        got,
        "no certificate issued within 60 s; Pebble said:\n{log}"
    );

    // Served without a restart, and the chain verifies to Pebble's root.
    let root = pebble.root(&f).await;
    let served = served_by(https, &root, "webmail.example.org", Duration::from_secs(10)).await;
    assert!(
        served,
        "the issued certificate is not served, or does not verify to Pebble's root"
    );
    let mut c = https_client(https, &root, "webmail.example.org", false).await;
    assert_eq!(
        c.get("webmail.example.org", "/").await.status,
        http::StatusCode::OK
    );

    // Only what was wanted was ordered: not the disabled address, nor the one with an
    // uploaded certificate.
    let names: Vec<String> = std::fs::read_dir(f.path().join("acme/certs"))
        .expect("acme/certs")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(names, ["webmail.example.org.pem"]);

    // `cert status --json`: source, expiry and ACME state per address, the failed one with
    // the CA's reason.
    let failed = eventually(Duration::from_secs(20), || {
        let config = f.gateway_toml();
        async move {
            cert_status(&config)["webmail.example.info"]["acme"]
                .as_str()
                .is_some_and(|s| s.starts_with("failed: "))
        }
    })
    .await;
    let status = cert_status(&f.gateway_toml());
    assert!(failed, "webmail.example.info not shown as failed: {status}");
    let reason = status["webmail.example.info"]["acme"]
        .as_str()
        .unwrap_or_default();
    // The CA's words and its problem type (RFC 8555 §6.7).
    assert!(
        reason.contains("could not resolve") && reason.contains("urn:ietf:params:acme:error:"),
        "{reason}"
    );
    assert_eq!(status["webmail.example.info"]["source"], "none");
    assert_eq!(status["webmail.example.org"]["source"], "acme");
    assert_eq!(status["webmail.example.org"]["acme"], "valid");
    assert!(
        status["webmail.example.org"]["expires"].is_string(),
        "{status}"
    );
    assert_eq!(status["webmail.example.net"]["source"], "uploaded");
    assert_eq!(status["webmail.example.net"]["acme"], "-");
    assert_eq!(status["mail.example.net"]["acme"], "-");
    // Serving went on for the others meanwhile.
    let mut c = https_client(https, &root, "webmail.example.org", false).await;
    assert_eq!(
        c.get("webmail.example.org", "/").await.status,
        http::StatusCode::OK
    );
    // The account is kept for the next start.
    assert!(f.path().join("acme/account.json").exists());
    // What /metrics says of it.
    let mut admin = http_client(gw.admin.expect("admin listener")).await;
    let m = admin.get("localhost", "/metrics").await.text();
    for line in [
        "logon_gate_acme_orders_total{result=\"ok\"} 1",
        "logon_gate_certificates{source=\"acme\"} 1",
        "logon_gate_certificates{source=\"uploaded\"} 3",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing:\n{m}");
    }
    gw.stop().await.expect("gateway task");

    // A restart reuses the account and the certificate: served at once, and no new order
    // for it once the issuer has been through the wanted hosts (the failing one's order
    // shows it has).
    let stored = std::fs::read(&issued).expect("the issued certificate");
    let account = std::fs::read(f.path().join("acme/account.json")).expect("the account");
    let gw = f.start().await;
    let https = gw.https.expect("https");
    let config = client_config(&root, &[b"http/1.1"], true);
    assert!(
        tls_connect(https, config, "webmail.example.org")
            .await
            .is_ok(),
        "the stored certificate is not served after a restart"
    );
    let admin = gw.admin.expect("admin listener");
    let metric = |line: &'static str| async move {
        let mut c = http_client(admin).await;
        let m = c.get("localhost", "/metrics").await.text();
        m.lines().any(|l| l == line)
    };
    assert!(
        eventually(Duration::from_secs(20), || metric(
            "logon_gate_acme_orders_total{result=\"failed\"} 1"
        ))
        .await,
        "the issuer did not run after the restart"
    );
    assert!(metric("logon_gate_acme_orders_total{result=\"ok\"} 0").await);
    assert_eq!(
        std::fs::read(&issued).expect("read"),
        stored,
        "a new certificate was ordered"
    );
    let again = std::fs::read(f.path().join("acme/account.json")).expect("the account");
    assert_eq!(again, account, "a new account was made");
    gw.stop().await.expect("gateway task");
}

/// SPEC §5: a certificate the CA issued is renewed once a third of its lifetime is left; an
/// uploaded one is never replaced by ACME, however close its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs pebble and curl: run by .ci/run"]
async fn an_issued_certificate_with_a_third_of_its_life_left_is_renewed() {
    let day = Duration::from_secs(86_400);
    let Setup {
        f,
        pebble,
        gw,
        https,
        ..
    } = Setup::start(|f| {
        // As if issued 80 days ago for 90: 10 days left, under a third.
        let old = f
            .pki
            .issue_lasting(&["webmail.example.org"], 80 * day, 10 * day)
            .expect("issue");
        let dir = f.path().join("acme/certs");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("webmail.example.org.pem"),
            format!("{}{}", old.cert_pem, old.key_pem),
        )
        .expect("write");
        // Uploaded, with the same 10 days left: left alone.
        let up = f
            .pki
            .issue_lasting(&["webmail.example.net"], 80 * day, 10 * day)
            .expect("issue");
        std::fs::write(
            f.path().join("certs/webmail.example.net.pem"),
            format!("{}{}", up.cert_pem, up.key_pem),
        )
        .expect("write");
    })
    .await;
    let root = pebble.root(&f).await;
    let renewed = served_by(https, &root, "webmail.example.org", Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(f.path().join("pebble/pebble.log")).unwrap_or_default();
    assert!(
        renewed,
        "not renewed by Pebble within 60 s; Pebble said:\n{log}"
    );
    // The uploaded one still serves (it chains to the test CA), and nothing was ordered for it.
    let config = client_config(&f.pki.ca_der(), &[b"http/1.1"], true);
    assert!(
        tls_connect(https, config, "webmail.example.net")
            .await
            .is_ok()
    );
    assert!(!f.path().join("acme/certs/webmail.example.net.pem").exists());
    gw.stop().await.expect("gateway task");
}
