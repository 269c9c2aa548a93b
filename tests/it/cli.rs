//! `check` names the file (and line) at fault for every rule of SPEC §2 (in-process, and once
//! through the built binary for its exit status and count); the built binary finishes an
//! in-flight request on SIGTERM before exiting 0, reloads on SIGHUP, and under
//! `--log-format json` writes only JSON lines.

use std::io::BufRead;
use std::process::Command;
use std::time::Duration;

use crate::support::*;
use http::StatusCode;

use crate::support::process::{BIN, GatewayProcess};

/// `check`, in-process: whether the configuration is valid, its summary, and its errors one
/// per line (what the command prints on stdout and stderr).
fn check(f: &Fixture) -> (bool, String, String) {
    let config = f.gateway_toml();
    match logon_gate::ops::check(&config) {
        Ok(table) => (
            true,
            logon_gate::ops::summary(&config, &table),
            String::new(),
        ),
        Err(errors) => (
            false,
            String::new(),
            errors.iter().map(|e| format!("{e}\n")).collect(),
        ),
    }
}

/// The built binary's `check`: its exit status, stdout and stderr.
fn check_binary(f: &Fixture) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("check")
        .arg("-c")
        .arg(f.gateway_toml())
        .output()
        .expect("run check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fixture() -> Fixture {
    Fixture::new("http://127.0.0.1:9", "")
}

/// Expects `check` to fail with an error naming `file` (and `line`), containing `words`.
fn assert_refused(f: &Fixture, file: &str, line: Option<usize>, words: &str) {
    let (ok, _, err) = check(f);
    assert!(!ok, "check accepted an invalid configuration");
    let wanted = match line {
        Some(l) => format!("{file}:{l}: "),
        None => format!("{file}: "),
    };
    let hit = err.lines().find(|l| l.contains(&wanted));
    let hit = hit.unwrap_or_else(|| panic!("no error naming {wanted}:\n{err}"));
    assert!(hit.contains(words), "expected `{words}` in: {hit}");
}

#[test]
fn valid_configuration_passes_with_a_summary() {
    let f = fixture();
    let (ok, out, err) = check_binary(&f);
    assert!(ok, "{err}");
    assert!(out.contains("configuration is valid"), "{out}");
    assert!(
        out.contains("tenants: 3, logon addresses: 4 (2 enabled), platform hosts: 1"),
        "{out}"
    );
    assert!(out.contains("certificates: 3"), "{out}");
    assert!(
        out.contains("expires in 89 days") || out.contains("expires in 90 days"),
        "{out}"
    );
}

#[test]
fn host_must_lie_below_the_tenant_domain() {
    let f = fixture();
    f.write_tenant(
        "example.net",
        &EXAMPLE_NET.replace("\"mail.example.net\"", "\"mail.example.org\""),
    );
    assert_refused(&f, "example.net.toml", Some(13), "does not lie below");
    f.write_tenant(
        "example.net",
        &EXAMPLE_NET.replace("\"mail.example.net\"", "\"example.net\""),
    );
    assert_refused(&f, "example.net.toml", Some(13), "does not lie below");
}

#[test]
fn host_must_be_well_formed_and_canonical() {
    let f = fixture();
    f.write_tenant(
        "example.net",
        &EXAMPLE_NET.replace("\"mail.example.net\"", "\"Mail.Example.net\""),
    );
    assert_refused(&f, "example.net.toml", Some(13), "write `mail.example.net`");
    f.write_tenant(
        "example.net",
        &EXAMPLE_NET.replace("\"mail.example.net\"", "\"mail_x.example.net\""),
    );
    assert_refused(&f, "example.net.toml", Some(13), "not allowed");
    f.write_tenant(
        "example.net",
        &EXAMPLE_NET.replace("\"mail.example.net\"", "\"mail.bücher.example.net\""),
    );
    assert_refused(&f, "example.net.toml", Some(13), "xn--bcher-kva");
}

#[test]
fn host_belongs_to_one_tenant_only() {
    let f = fixture();
    // webmail.win.example.net lies below both example.net and win.example.net.
    f.write_tenant(
        "win.example.net",
        "domain = \"win.example.net\"\nedition = \"standard\"\n[[logon]]\nhost = \"webmail.win.example.net\"\n",
    );
    f.write_tenant(
        "example.net",
        &format!("{EXAMPLE_NET}\n[[logon]]\nhost = \"webmail.win.example.net\"\n"),
    );
    let (ok, _, err) = check(&f);
    assert!(!ok);
    assert!(
        err.contains("webmail.win.example.net already belongs to tenant"),
        "{err}"
    );
}

#[test]
fn at_most_one_enabled_address_per_tenant() {
    let f = fixture();
    f.write_tenant(
        "example.net",
        &EXAMPLE_NET.replace("enabled = false", "enabled = true"),
    );
    assert_refused(
        &f,
        "example.net.toml",
        None,
        "more than one logon address is enabled",
    );
}

#[test]
fn enabled_needs_verified_cname_and_filed_icp() {
    let f = fixture();
    f.write_tenant(
        "example.org",
        &EXAMPLE_ORG.replace("cname   = \"verified\"", "cname   = \"pending\""),
    );
    assert_refused(&f, "example.org.toml", Some(8), "CNAME is not verified");
    f.write_tenant(
        "example.org",
        &EXAMPLE_ORG.replace("icp     = \"filed\"", "icp = \"pending\""),
    );
    assert_refused(
        &f,
        "example.org.toml",
        Some(8),
        "ICP filing is not recorded",
    );
    // With require_icp = false the same tenant is valid.
    let text = std::fs::read_to_string(f.gateway_toml())
        .expect("read")
        .replace("require_icp = true", "require_icp = false");
    std::fs::write(f.gateway_toml(), text).expect("write");
    assert!(check(&f).0);
}

#[test]
fn free_tenant_cannot_enable() {
    let f = fixture();
    f.write_tenant(
        "example.com",
        &format!("{EXAMPLE_COM}cname = \"verified\"\nicp = \"filed\"\nenabled = true\n"),
    );
    assert_refused(&f, "example.com.toml", Some(8), "free edition");
}

#[test]
fn unknown_keys_and_bad_values_are_errors_with_lines() {
    let f = fixture();
    f.write_tenant(
        "example.org",
        &EXAMPLE_ORG.replace("enabled = true", "enabled = true\nenabeld = true"),
    );
    assert_refused(&f, "example.org.toml", Some(9), "enabeld");
    f.write_tenant(
        "example.org",
        &EXAMPLE_ORG.replace("\"standard\"", "\"gold\""),
    );
    assert_refused(&f, "example.org.toml", Some(2), "gold");
    f.write_tenant("example.org", EXAMPLE_ORG);
    let text = std::fs::read_to_string(f.gateway_toml())
        .expect("read")
        .replace(
            "connect_timeout = \"1s\"",
            "connect_timeout = \"one second\"",
        );
    std::fs::write(f.gateway_toml(), text).expect("write");
    assert_refused(&f, "gateway.toml", Some(11), "connect_timeout");
}

#[test]
fn tenant_file_name_must_match_its_domain() {
    let f = fixture();
    std::fs::rename(
        f.path().join("tenants/example.org.toml"),
        f.path().join("tenants/org.toml"),
    )
    .expect("rename");
    assert_refused(&f, "org.toml", Some(1), "must be named example.org.toml");
}

#[test]
fn certificate_problems_name_the_file() {
    let mut f = fixture();
    // Key of another certificate.
    let a = f.pki.issue(&["webmail.example.org"]).expect("issue");
    let b = f.pki.issue(&["webmail.example.org"]).expect("issue");
    std::fs::write(
        f.path().join("certs/mismatch.pem"),
        format!("{}{}", a.cert_pem, b.key_pem),
    )
    .expect("write");
    assert_refused(&f, "mismatch.pem", None, "does not match");
    std::fs::remove_file(f.path().join("certs/mismatch.pem")).expect("rm");

    // Expired.
    let old = f
        .pki
        .issue_expired(&["webmail.example.org"])
        .expect("issue");
    std::fs::write(
        f.path().join("certs/old.pem"),
        format!("{}{}", old.cert_pem, old.key_pem),
    )
    .expect("write");
    assert_refused(&f, "old.pem", None, "expired");
    std::fs::remove_file(f.path().join("certs/old.pem")).expect("rm");

    // Unparseable.
    std::fs::write(
        f.path().join("certs/broken.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    assert_refused(&f, "broken.pem", None, "cannot be parsed");
    std::fs::remove_file(f.path().join("certs/broken.pem")).expect("rm");

    // Certificate and key in separate files pair up by public key, whatever their names.
    let c = f.add_cert("unused.pem", &["webmail.example.org"]);
    std::fs::remove_file(f.path().join("certs/unused.pem")).expect("rm");
    std::fs::write(f.path().join("certs/chain.crt"), &c.cert_pem).expect("write");
    std::fs::write(f.path().join("certs/secret.key"), &c.key_pem).expect("write");
    let (ok, out, err) = check(&f);
    assert!(ok, "{err}");
    assert!(out.contains("certificates: 4"), "{out}");
    // A certificate without any key.
    std::fs::remove_file(f.path().join("certs/secret.key")).expect("rm");
    assert_refused(&f, "chain.crt", None, "no private key");
}

#[test]
fn errors_are_all_reported_at_once() {
    let f = fixture();
    f.write_tenant(
        "example.net",
        &EXAMPLE_NET.replace("\"mail.example.net\"", "\"mail.example.org\""),
    );
    f.write_tenant("example.com", &EXAMPLE_COM.replace("\"free\"", "\"gold\""));
    let (ok, _, err) = check_binary(&f);
    assert!(!ok);
    assert!(err.contains("example.net.toml:13:"), "{err}");
    assert!(err.contains("example.com.toml:2:"), "{err}");
    assert!(err.contains("(2 errors)"), "{err}");
}

#[test]
fn a_bad_cpu_affinity_switch_stops_serve_naming_the_variable() {
    let f = fixture();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("-c")
        .arg(f.gateway_toml())
        .env("LOGON_GATE_CPU_AFFINITY", "maybe")
        .output()
        .expect("run serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started with a bad switch");
    assert!(
        err.contains("LOGON_GATE_CPU_AFFINITY must be 1, true, on, 0, false or off, not \"maybe\""),
        "{err}"
    );
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let gw = GatewayProcess::start(&["serve"], &f.gateway_toml()).await;
    let https = gw.https.expect("https");

    let mut c = https_client(https, &f.pki.ca_der(), "webmail.example.net", false).await;
    let in_flight =
        tokio::spawn(async move { c.get("webmail.example.net", "/slow?ms=1500").await });
    assert!(
        eventually(Duration::from_secs(5), || async { backend.hits() == 1 }).await,
        "request did not reach the backend"
    );
    gw.signal("TERM");

    // New connections are no longer accepted...
    let refused = eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(https).await.is_err()
    })
    .await;
    assert!(refused, "still accepting after SIGTERM");
    // ...but the request in flight completes.
    let r = in_flight.await.expect("join");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "slow done");
    let (status, _) = gw.wait().await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn sighup_reloads_without_a_file_change() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let mut gw = GatewayProcess::start(&[], &f.gateway_toml()).await;
    assert!(
        gw.ready_line.starts_with("listening https="),
        "{:?}",
        gw.ready_line
    );
    let stderr = gw.take_stderr();
    gw.signal("HUP");
    // Read stderr until the reload is reported (bounded by the timeout; the gateway is
    // killed when `gw` drops).
    let reloaded = tokio::task::spawn_blocking(move || {
        stderr
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("configuration reloaded") && l.contains("generation=2"))
    });
    let reloaded = tokio::time::timeout(Duration::from_secs(10), reloaded)
        .await
        .expect("a reload reported within 10 s")
        .expect("join");
    assert!(reloaded, "no reload reported after SIGHUP");
    gw.signal("TERM");
    let (status, _) = gw.wait().await;
    assert!(status.success(), "{status}");
}

/// Under `--log-format json` every line the process writes, on stdout and stderr alike, is
/// one JSON object: the readiness line, the log, the access lines and the last words.
#[tokio::test]
async fn json_log_format_writes_only_json_lines() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let mut gw = GatewayProcess::start(&["--log-format", "json"], &f.gateway_toml()).await;
    let ready: serde_json::Value =
        serde_json::from_str(&gw.ready_line).expect("JSON readiness line");
    assert_eq!(ready["message"], "listening", "{}", gw.ready_line);
    let stderr = gw.take_stderr();
    let errors =
        std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect::<Vec<_>>());
    let https = gw.https.expect("https address");
    let mut c = https_client(https, &f.pki.ca_der(), "webmail.example.net", false).await;
    assert_eq!(
        c.get("webmail.example.net", "/").await.status,
        StatusCode::OK
    );
    gw.signal("TERM");
    let (status, rest) = gw.wait().await;
    assert!(status.success(), "{status}");
    let errors = errors.join().expect("stderr reader");
    assert!(
        errors.iter().any(|l| l.contains("\"target\":\"access\"")),
        "no access line: {errors:?}"
    );
    for line in rest.lines().chain(errors.iter().map(String::as_str)) {
        let v: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(
            v.is_ok_and(|v| v.is_object()),
            "not a JSON object: {line:?}"
        );
    }
}
