//! The operator CLI through the built binary: every command's success and refusals, comments
//! kept, concurrent edits kept, `domain verify` against a real DNS server on loopback, and the
//! seed's whole walk-through ending with the running gateway serving the address over HTTPS.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::dns::{DnsServer, Rec};
use crate::support::*;
use http::StatusCode;

const BIN: &str = env!("CARGO_BIN_EXE_logon-gate");

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(config: &Path, args: &[&str]) -> Out {
    let out = Command::new(BIN)
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .expect("run logon-gate");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(config: &Path, args: &[&str]) -> String {
    let o = run(config, args);
    assert!(o.ok, "{args:?} failed: {}", o.stderr);
    o.stdout
}

/// Expects a refusal: non-zero exit and one sentence on stderr containing `words`.
fn refused(config: &Path, args: &[&str], words: &str) {
    let o = run(config, args);
    assert!(
        !o.ok,
        "{args:?} should have been refused; printed {}",
        o.stdout
    );
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one sentence, got {:?}",
        o.stderr
    );
    assert!(
        o.stderr.contains(words),
        "{args:?}: expected `{words}` in {:?}",
        o.stderr
    );
}

fn tenant_file(f: &Fixture, domain: &str) -> String {
    std::fs::read_to_string(f.path().join(format!("tenants/{domain}.toml"))).expect("read")
}

#[test]
fn tenant_commands() {
    let f = Fixture::new("http://127.0.0.1:9", "");
    let c = f.gateway_toml();
    assert!(
        ok(
            &c,
            &["tenant", "add", "Example.Info", "--edition", "standard"]
        )
        .contains("tenant example.info added")
    );
    assert!(tenant_file(&f, "example.info").contains("edition = \"standard\""));
    refused(
        &c,
        &["tenant", "add", "example.info", "--edition", "standard"],
        "already exists",
    );
    refused(
        &c,
        &["tenant", "add", "exa mple.info", "--edition", "standard"],
        "not a valid host name",
    );
    let o = run(&c, &["tenant", "add", "example.biz", "--edition", "gold"]);
    assert!(!o.ok && o.stderr.contains("gold"), "{}", o.stderr);

    ok(&c, &["tenant", "edition", "example.info", "enterprise"]);
    assert!(tenant_file(&f, "example.info").contains("edition = \"enterprise\""));
    refused(
        &c,
        &["tenant", "edition", "example.biz", "free"],
        "there is no tenant example.biz",
    );
    // A tenant with an enabled address cannot drop to the free edition.
    refused(
        &c,
        &["tenant", "edition", "example.net", "free"],
        "disable it first",
    );
    // The edit kept the comment in front of the edition value.
    assert!(tenant_file(&f, "example.info").contains("# free | standard | enterprise"));
}

#[test]
fn domain_add_remove_and_comments_survive() {
    let f = Fixture::new("http://127.0.0.1:9", "");
    let c = f.gateway_toml();
    let out = ok(
        &c,
        &["domain", "add", "example.net", "WebMail.Win.Example.NET"],
    );
    assert!(
        out.contains("webmail.win.example.net added to tenant example.net"),
        "{out}"
    );
    let text = tenant_file(&f, "example.net");
    assert!(text.starts_with("# the example.net tenant\n"), "{text}");
    assert!(text.contains("host = \"webmail.win.example.net\"\ncname = \"pending\"\nicp = \"pending\"\nenabled = false"), "{text}");

    refused(
        &c,
        &["domain", "add", "example.net", "webmail.example.org"],
        "does not lie below",
    );
    refused(
        &c,
        &["domain", "add", "example.net", "example.net"],
        "does not lie below",
    );
    refused(
        &c,
        &["domain", "add", "example.net", "webmail.win.example.net"],
        "already belongs to tenant example.net",
    );
    refused(
        &c,
        &["domain", "add", "example.biz", "webmail.example.biz"],
        "there is no tenant example.biz",
    );

    ok(&c, &["domain", "remove", "webmail.win.example.net"]);
    assert!(!tenant_file(&f, "example.net").contains("win.example.net"));
    assert!(tenant_file(&f, "example.net").starts_with("# the example.net tenant\n"));
    refused(
        &c,
        &["domain", "remove", "webmail.win.example.net"],
        "not a logon address of any tenant",
    );
    refused(
        &c,
        &["domain", "disable", "mail.provider.test"],
        "platform host",
    );
}

#[test]
fn enable_checks_every_rule_and_keeps_one_enabled() {
    let f = Fixture::new("http://127.0.0.1:9", "");
    let c = f.gateway_toml();
    ok(&c, &["domain", "add", "example.net", "new.example.net"]);
    refused(
        &c,
        &["domain", "enable", "new.example.net"],
        "CNAME is not verified",
    );
    // Mark the CNAME verified by hand (as an operator might), leaving ICP pending.
    let text = tenant_file(&f, "example.net").replace(
        "host = \"new.example.net\"\ncname = \"pending\"",
        "host = \"new.example.net\"\ncname = \"verified\"",
    );
    f.write_tenant("example.net", &text);
    refused(
        &c,
        &["domain", "enable", "new.example.net"],
        "ICP filing is not recorded",
    );
    refused(
        &c,
        &["domain", "icp", "new.example.net", "--number", " "],
        "must not be empty",
    );
    ok(
        &c,
        &[
            "domain",
            "icp",
            "new.example.net",
            "--number",
            "ICP-2026-42",
        ],
    );
    let out = ok(&c, &["domain", "enable", "new.example.net"]);
    assert!(out.contains("disabled webmail.example.net"), "{out}");
    let text = tenant_file(&f, "example.net");
    assert_eq!(text.matches("enabled = true").count(), 1, "{text}");
    assert!(text.contains("icp_number = \"ICP-2026-42\""), "{text}");
    assert!(ok(&c, &["check"]).contains("configuration is valid"));

    // The free edition can never enable.
    refused(
        &c,
        &["domain", "enable", "webmail.example.com"],
        "free edition",
    );
    ok(&c, &["domain", "disable", "new.example.net"]);
    assert_eq!(
        tenant_file(&f, "example.net")
            .matches("enabled = true")
            .count(),
        0
    );
}

#[test]
fn list_as_table_and_json() {
    let f = Fixture::new("http://127.0.0.1:9", "");
    let c = f.gateway_toml();
    let table = ok(&c, &["domain", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("TENANT"), "{table}");
    assert_eq!(lines.len(), 5, "{table}");
    let row = lines
        .iter()
        .find(|l| l.contains("webmail.example.net"))
        .expect("row");
    assert!(
        row.contains("enterprise") && row.contains("verified") && row.ends_with("yes"),
        "{row}"
    );
    // SPEC §4 "certificate (expiry)", with its source (SPEC §5).
    assert!(
        row.contains("uploaded, until ") && (row.contains("(89d)") || row.contains("(90d)")),
        "{row}"
    );
    // Columns line up: every row's HOST column starts where the header's does.
    let col = lines[0].find("HOST").expect("HOST");
    assert!(
        lines
            .iter()
            .skip(1)
            .all(|l| l[col..].starts_with(|ch: char| ch.is_ascii_alphanumeric()))
    );

    let json: serde_json::Value =
        serde_json::from_str(&ok(&c, &["domain", "list", "example.org", "--json"])).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(1));
    assert_eq!(json[0]["host"], "webmail.example.org");
    assert_eq!(json[0]["certificate_expires"], serde_json::Value::Null);
    assert_eq!(json[0]["enabled"], true);
}

#[tokio::test]
async fn verify_follows_real_dns() {
    let dns = DnsServer::start(&[
        ("webmail.example.net", Rec::Cname("hop.example.net")),
        ("hop.example.net", Rec::Cname("logon.provider.test")),
        (
            "logon.provider.test",
            Rec::A("192.0.2.10".parse().expect("ip")),
        ),
        ("mail.example.net", Rec::Cname("elsewhere.test")),
        ("elsewhere.test", Rec::A("192.0.2.20".parse().expect("ip"))),
        ("a.example.net", Rec::A("192.0.2.30".parse().expect("ip"))),
        ("empty.example.net", Rec::Empty),
        ("loop.example.net", Rec::Cname("loop2.example.net")),
        ("loop2.example.net", Rec::Cname("loop.example.net")),
        ("dangling.example.net", Rec::Cname("gone.example.net")),
        ("slow.example.net", Rec::Silent),
    ])
    .await;
    let f = Fixture::new("http://127.0.0.1:9", "");
    let c = f.gateway_toml();
    for h in ["a", "empty", "loop", "dangling", "slow", "nx"] {
        ok(
            &c,
            &["domain", "add", "example.net", &format!("{h}.example.net")],
        );
    }
    let ns = dns.addr.to_string();
    let verify = |host: &str| {
        let c = c.clone();
        let ns = ns.clone();
        let host = host.to_string();
        tokio::task::spawn_blocking(move || {
            run(&c, &["domain", "verify", &host, "--nameserver", &ns])
        })
    };
    let o = verify("mail.example.net").await.expect("join");
    assert!(!o.ok);
    assert!(
        o.stderr
            .contains("ends at elsewhere.test, not at logon.provider.test"),
        "{}",
        o.stderr
    );
    let cases = [
        ("a.example.net", "only address records (192.0.2.30)"),
        ("empty.example.net", "has no CNAME record"),
        ("nx.example.net", "NXDOMAIN"),
        (
            "dangling.example.net",
            "dangling.example.net -> gone.example.net ends in a name that does not exist",
        ),
        ("loop.example.net", "loops"),
        ("slow.example.net", "did not answer in time"),
    ];
    for (host, words) in cases {
        let o = verify(host).await.expect("join");
        assert!(!o.ok, "{host} verified");
        assert!(
            o.stderr.contains(words),
            "{host}: expected `{words}` in {:?}",
            o.stderr
        );
        assert_eq!(o.stderr.lines().count(), 1, "{:?}", o.stderr);
    }
    let text = tenant_file(&f, "example.net");
    assert!(
        !text.contains("cname = \"verified\"\nicp = \"pending\""),
        "a refusal changed the file:\n{text}"
    );

    // The two-hop chain reaches the target.
    let o = verify("webmail.example.net").await.expect("join");
    assert!(o.ok, "{}", o.stderr);
    assert!(
        o.stdout
            .contains("webmail.example.net -> hop.example.net -> logon.provider.test"),
        "{}",
        o.stdout
    );
}

#[test]
fn cert_install_validates_and_installs_privately() {
    let f = Fixture::new("http://127.0.0.1:9", "");
    let c = f.gateway_toml();
    let dir = tempfile::tempdir().expect("tmp");
    let put = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.to_string_lossy().into_owned()
    };
    let good = f.pki.issue(&["webmail.example.org"]).expect("issue");
    let other = f.pki.issue(&["webmail.example.org"]).expect("issue");
    let old = f
        .pki
        .issue_expired(&["webmail.example.org"])
        .expect("issue");
    let (gc, gk) = (
        put("good.crt", &good.cert_pem),
        put("good.key", &good.key_pem),
    );
    let (oc, ok_) = (
        put("other.crt", &other.cert_pem),
        put("other.key", &other.key_pem),
    );
    let (xc, xk) = (put("old.crt", &old.cert_pem), put("old.key", &old.key_pem));

    refused(
        &c,
        &[
            "cert",
            "install",
            "webmail.example.org",
            "--cert",
            &gc,
            "--key",
            &ok_,
        ],
        "does not match",
    );
    refused(
        &c,
        &[
            "cert",
            "install",
            "webmail.example.org",
            "--cert",
            &xc,
            "--key",
            &xk,
        ],
        "expired",
    );
    refused(
        &c,
        &[
            "cert",
            "install",
            "mail.example.org",
            "--cert",
            &gc,
            "--key",
            &gk,
        ],
        "does not cover mail.example.org",
    );
    refused(
        &c,
        &[
            "cert",
            "install",
            "webmail.example.org",
            "--cert",
            "/nonexistent.crt",
            "--key",
            &gk,
        ],
        "cannot read the certificate file",
    );

    let out = ok(
        &c,
        &[
            "cert",
            "install",
            "webmail.example.org",
            "--cert",
            &gc,
            "--key",
            &gk,
        ],
    );
    assert!(
        out.contains("installed the certificate for webmail.example.org"),
        "{out}"
    );
    let dest = f.path().join("certs/webmail.example.org.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dest).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert!(ok(&c, &["check"]).contains("certificates: 4"));
    // Reinstalling the same pair is fine; a different one needs --force.
    ok(
        &c,
        &[
            "cert",
            "install",
            "webmail.example.org",
            "--cert",
            &gc,
            "--key",
            &gk,
        ],
    );
    refused(
        &c,
        &[
            "cert",
            "install",
            "webmail.example.org",
            "--cert",
            &oc,
            "--key",
            &ok_,
        ],
        "use --force",
    );
    ok(
        &c,
        &[
            "cert",
            "install",
            "webmail.example.org",
            "--cert",
            &oc,
            "--key",
            &ok_,
            "--force",
        ],
    );
    assert!(
        std::fs::read_to_string(&dest)
            .expect("read")
            .contains(other.cert_pem.trim())
    );
}

#[test]
fn concurrent_adds_on_one_tenant_both_land() {
    let f = Fixture::new("http://127.0.0.1:9", "");
    let c = f.gateway_toml();
    // Start all processes before waiting for any, so their edits race.
    let hosts: Vec<String> = (0..8).map(|i| format!("c{i}.example.net")).collect();
    let mut kids: Vec<_> = hosts
        .iter()
        .map(|h| {
            Command::new(BIN)
                .args(["domain", "add", "example.net", h, "-c"])
                .arg(&c)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for k in &mut kids {
        assert!(k.wait().expect("wait").success());
    }
    let text = tenant_file(&f, "example.net");
    for h in hosts.iter() {
        assert!(
            text.contains(&format!("host = \"{h}\"")),
            "lost {h}:\n{text}"
        );
    }
    assert!(ok(&c, &["check"]).contains("configuration is valid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_walkthrough_ends_served_over_https() {
    let dns = DnsServer::start(&[
        ("webmail.example.info", Rec::Cname("logon.provider.test")),
        (
            "logon.provider.test",
            Rec::A("192.0.2.10".parse().expect("ip")),
        ),
    ])
    .await;
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let c = f.gateway_toml();
    let gw = f.start().await;
    let https: SocketAddr = gw.https.expect("https");

    let step = |args: Vec<String>| {
        let c = c.clone();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            ok(&c, &a)
        })
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    step(s(&[
        "tenant",
        "add",
        "example.info",
        "--edition",
        "enterprise",
    ]))
    .await
    .expect("join");
    step(s(&[
        "domain",
        "add",
        "example.info",
        "webmail.example.info",
    ]))
    .await
    .expect("join");
    step(s(&[
        "domain",
        "add",
        "example.info",
        "webmail.win.example.info",
    ]))
    .await
    .expect("join");
    step(s(&[
        "domain",
        "verify",
        "webmail.example.info",
        "--nameserver",
        &dns.addr.to_string(),
    ]))
    .await
    .expect("join");
    step(s(&[
        "domain",
        "icp",
        "webmail.example.info",
        "--number",
        "ICP-2026-7",
    ]))
    .await
    .expect("join");
    let dir = tempfile::tempdir().expect("tmp");
    let issued = f
        .pki
        .issue(&["webmail.example.info", "webmail.win.example.info"])
        .expect("issue");
    let crt = dir.path().join("c.pem");
    let key = dir.path().join("k.pem");
    std::fs::write(&crt, &issued.cert_pem).expect("write");
    std::fs::write(&key, &issued.key_pem).expect("write");
    step(s(&[
        "cert",
        "install",
        "webmail.example.info",
        "--cert",
        &crt.to_string_lossy(),
        "--key",
        &key.to_string_lossy(),
    ]))
    .await
    .expect("join");
    step(s(&["domain", "enable", "webmail.example.info"]))
        .await
        .expect("join");

    // The running gateway picked every change up by itself.
    let ca = f.pki.ca_der();
    let served = eventually(Duration::from_secs(3), || {
        let ca = ca.clone();
        async move {
            let cfg = client_config(&ca, &[b"h2"], true);
            let Ok(tls) = tls_connect(https, cfg, "webmail.example.info").await else {
                return false;
            };
            let mut c = Client::h2(tls).await;
            let r = c.get("webmail.example.info", "/").await;
            r.status == StatusCode::OK
                && seen_headers(&r.json(), "x-logon-tenant") == vec!["example.info"]
        }
    })
    .await;
    assert!(served, "the enabled address is not served over HTTPS");
    let mut c = https_client(https, &ca, "webmail.win.example.info", false).await;
    assert_eq!(
        c.get("webmail.win.example.info", "/").await.status,
        StatusCode::FORBIDDEN
    );
    gw.stop().await.expect("gateway task");
}
