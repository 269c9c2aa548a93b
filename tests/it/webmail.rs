//! A real browser logs into a real webmail through the real gateway: Debian's Chromium,
//! driven by playwright-core (`tests/browser/webmail.mjs`), opens Roundcube (PHP's built-in
//! server) with Dovecot behind it, over HTTP/2 and over HTTP/1.1, logs in, lists the inbox,
//! opens a message and logs out; Roundcube's session cookies must be Secure (it trusts the
//! gateway's X-Forwarded-Proto), and the tenant's disabled address must show the gateway's
//! refusal without reaching Roundcube. It needs Debian packages and npm (`.ci/run` installs
//! them), so a bare `cargo test` ignores it. Pieces and how they fit: tests/browser/README.md.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const USER: &str = "alice";
const PASS: &str = "wonderland-7";
const SUBJECT: &str = "logon-gate e2e probe 7f3a";
const BODY_TEXT: &str = "quokka-lantern-4821";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// A child process killed and reaped when dropped (so also when the test fails).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(what: &str, cmd: &mut Command) -> Proc {
    let child = cmd
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what} (.ci/run installs it): {e}"));
    Proc(child)
}

/// Waits (at most 10 s) until `ready` holds, or panics naming `what` and the child's state.
fn wait_for(what: &str, proc: &mut Proc, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = proc.0.try_wait() {
            panic!("{what} exited early: {status}");
        }
        if ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} not ready after 10 s");
}

fn fill(template: &str, dir: &Path, imap_port: u16) -> String {
    let text = std::fs::read_to_string(browser_dir().join(template)).expect("read template");
    text.replace("@DIR@", &dir.display().to_string())
        .replace("@IMAP_PORT@", &imap_port.to_string())
        .replace("@USER@", USER)
        .replace("@PASS@", PASS)
}

/// base64(sha256(SubjectPublicKeyInfo)) of a PEM certificate, computed by openssl: what
/// Chromium's `--ignore-certificate-errors-spki-list` pins.
fn spki_pin(cert_pem: &str) -> String {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(
            "openssl x509 -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | base64",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(cert_pem.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("openssl");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One GET over plain HTTP/1.1 to 127.0.0.1, for readiness checks: the status line and body.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

/// Dovecot and Roundcube, started in `dir`. Roundcube's request log is counted in `hits`,
/// and the requests for the browser's disabled-host path in `probes`.
struct Webmail {
    php: SocketAddr,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    probes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _dovecot: Proc,
    _php: Proc,
}

impl Webmail {
    fn start(dir: &Path) -> Webmail {
        use std::os::unix::fs::PermissionsExt;
        // Dovecot's auth (user dovecot) and mail (user nobody) processes pass through it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        let imap_port = crate::support::free_port();
        let dove = dir.join("dovecot");
        std::fs::create_dir_all(&dove).expect("mkdir");
        std::fs::write(
            dove.join("dovecot.conf"),
            fill("dovecot.conf.in", dir, imap_port),
        )
        .expect("write dovecot.conf");
        std::fs::write(dove.join("users"), fill("users.in", dir, imap_port)).expect("users");
        let maildir = dir.join("mail").join(USER).join("Maildir");
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(maildir.join(sub)).expect("mkdir maildir");
        }
        std::fs::copy(
            browser_dir().join("message.eml"),
            maildir.join("new/1704099600.M1P1.logon-gate-test"),
        )
        .expect("place the message");
        let chown = Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(dir.join("mail"))
            .status()
            .expect("chown");
        assert!(chown.success(), "chown of the maildir failed (run as root)");
        let rc = dir.join("roundcube");
        for sub in ["logs", "temp"] {
            std::fs::create_dir_all(rc.join(sub)).expect("mkdir");
        }
        std::fs::write(
            rc.join("config.inc.php"),
            fill("config.inc.php.in", dir, imap_port),
        )
        .expect("write config.inc.php");
        for f in ["defaults.inc.php", "mimetypes.php"] {
            std::os::unix::fs::symlink(Path::new("/etc/roundcube").join(f), rc.join(f))
                .expect("symlink Roundcube defaults");
        }

        // Its log goes to a file, named when the test fails.
        let log = std::fs::File::create(dir.join("dovecot.log")).expect("dovecot.log");
        let mut dovecot = spawn(
            "dovecot",
            Command::new("dovecot")
                .arg("-F")
                .arg("-c")
                .arg(dove.join("dovecot.conf"))
                .stdout(Stdio::null())
                .stderr(log),
        );
        let imap = SocketAddr::from(([127, 0, 0, 1], imap_port));
        wait_for("dovecot", &mut dovecot, || {
            TcpStream::connect(imap)
                .ok()
                .and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                    let mut line = String::new();
                    BufReader::new(s).read_line(&mut line).ok()?;
                    Some(line.starts_with("* OK"))
                })
                .unwrap_or(false)
        });

        let php_port = crate::support::free_port();
        let php = SocketAddr::from(([127, 0, 0, 1], php_port));
        let mut php_proc = spawn(
            "php",
            Command::new("php")
                .arg("-S")
                .arg(php.to_string())
                .args(["-t", "/var/lib/roundcube/public_html"])
                .env("ROUNDCUBE_CONFIG_DIR", &rc)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        // php -S logs each request it answers ("[...] 127.0.0.1:PORT [200]: GET /path").
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let log = php_proc.0.stderr.take().expect("stderr");
        let probes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (h, p) = (hits.clone(), probes.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(log).lines().map_while(Result::ok) {
                if line.contains("]: ") {
                    h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                if line.contains("probe=disabled-host") {
                    p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        wait_for("Roundcube (php -S)", &mut php_proc, || {
            http_get(php, "/").is_some_and(|t| t.contains("rcmloginuser"))
        });
        Webmail {
            php,
            hits,
            probes,
            _dovecot: dovecot,
            _php: php_proc,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn probes(&self) -> usize {
        self.probes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Runs the browser once; panics with what it saw (page text, screenshot path) on failure.
async fn browse(
    port: u16,
    spki: &str,
    protocol: &str,
    out: &Path,
    logs: &Path,
) -> serde_json::Value {
    let node = tokio::process::Command::new("node")
        .arg(browser_dir().join("webmail.mjs"))
        .env("GATEWAY_PORT", port.to_string())
        .env("ENABLED_HOST", "webmail.example.net")
        .env("DISABLED_HOST", "mail.example.net")
        .env("SPKI", spki)
        .env("PROTOCOL", protocol)
        .env("IMAP_USER", USER)
        .env("IMAP_PASS", PASS)
        .env("SUBJECT", SUBJECT)
        .env("BODY_TEXT", BODY_TEXT)
        .env("OUT_DIR", out)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), node)
        .await
        .expect("the browser run is bounded by 90 s")
        .expect("run node (.ci/run installs it with playwright-core)");
    let text = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "webmail.mjs printed no JSON: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    if !(out.status.success() && result["ok"] == true) {
        let tail = |p: PathBuf| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "{}:\n{}",
                p.display(),
                lines[lines.len().saturating_sub(15)..].join("\n")
            )
        };
        panic!(
            "the browser ({protocol}) failed at {}: {}\nURL: {}\npage text: {}\nscreenshot: {}\n{}\n{}\nfull result: {result}",
            result["step"],
            result["error"],
            result["url"],
            result["text"],
            result["screenshot"],
            tail(logs.join("roundcube/logs/errors.log")),
            tail(logs.join("dovecot.log")),
        );
    }
    result
}

async fn logs_in_reads_and_logs_out(protocol: &str) {
    let f = Fixture::new("http://127.0.0.1:1", "");
    let mail = Webmail::start(f.path());
    f.write_gateway(&format!("http://{}", mail.php), "");
    let gw = f.start().await;
    let port = gw.https.expect("https").port();
    // The exact certificate for webmail.example.net, the wildcard for mail.example.net.
    let pins = [
        spki_pin(&f.certs["webmail.example.net.pem"].cert_pem),
        spki_pin(&f.certs["wildcard.pem"].cert_pem),
    ]
    .join(",");
    // Kept after the test (the fixture's folder is not), for a failure's screenshot.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("webmail-screenshots")
        .join(protocol.replace('/', ""));
    std::fs::create_dir_all(&out).expect("mkdir");

    let before = mail.hits();
    let result = browse(port, &pins, protocol, &out, f.path()).await;
    assert!(mail.hits() > before, "Roundcube logged no request");

    for p in result["protocols"].as_array().expect("protocols") {
        assert_eq!(p["protocol"], protocol, "{result}");
    }
    let cookies = result["cookies"].as_array().expect("cookies");
    for name in ["roundcube_sessid", "roundcube_sessauth"] {
        let c = cookies
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} cookie: {result}"));
        assert_eq!(c["secure"], true, "{name} is not Secure: {result}");
    }
    let disabled = &result["disabled"];
    assert_eq!(disabled["status"], 403, "{result}");
    assert_eq!(
        disabled["text"].as_str().map(str::trim),
        Some(
            "403 Forbidden: mail.example.net is a logon address of example.net but is not enabled."
        ),
        "{result}"
    );
    // The refusal came from the gateway: Roundcube's request log never shows its path.
    assert_eq!(mail.probes(), 0, "the disabled address reached Roundcube");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium, roundcube, dovecot and npm: run by .ci/run"]
async fn chromium_logs_into_roundcube_over_http2() {
    logs_in_reads_and_logs_out("h2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium, roundcube, dovecot and npm: run by .ci/run"]
async fn chromium_logs_into_roundcube_over_http11() {
    logs_in_reads_and_logs_out("http/1.1").await;
}
