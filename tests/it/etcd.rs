//! SPEC §6 against a real etcd: Debian's `etcd-server` 3.4, started here on loopback ports
//! with its data in the test's folder. Needs the `etcd` feature and the package (`.ci/run`
//! builds and installs both), so a bare `cargo test` neither builds nor runs it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::StatusCode;

use crate::support::{self, *};

const PREFIX: &str = "/lg-test/";

/// One etcd member, killed and reaped on drop.
struct Etcd {
    child: Option<Child>,
    data: PathBuf,
    name: String,
    client: u16,
    peer: u16,
    /// `--initial-cluster`: every member's name and peer URL.
    cluster: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Etcd {
    fn start(data: PathBuf) -> Etcd {
        let mut members = Etcd::cluster(data, 1);
        members.remove(0)
    }

    /// A cluster of `n` members on loopback, each healthy before this returns.
    fn cluster(data: PathBuf, n: usize) -> Vec<Etcd> {
        std::fs::create_dir_all(&data).expect("mkdir");
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| (support::free_port(), support::free_port()))
            .collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("n{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Etcd> = ports
            .iter()
            .enumerate()
            .map(|(i, &(client, peer))| Etcd {
                child: None,
                data: data.join(format!("n{i}")),
                name: format!("n{i}"),
                client,
                peer,
                cluster: cluster.clone(),
            })
            .collect();
        // All started before any is waited for: a member is healthy only with a quorum.
        for m in &mut members {
            m.spawn();
        }
        for m in &members {
            m.wait_healthy();
        }
        members
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    /// Starts the member (again, on the same data and ports) and waits until it answers.
    fn run(&mut self) {
        self.spawn();
        self.wait_healthy();
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::File::create(self.data.with_extension("log")).expect("log");
        let child = Command::new("etcd")
            .arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.data.display()))
            .arg(format!("--listen-client-urls={}", self.endpoint()))
            .arg(format!("--advertise-client-urls={}", self.endpoint()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.cluster))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (.ci/run installs etcd-server)");
        self.child = Some(child);
    }

    fn wait_healthy(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.ctl(&["endpoint", "health"], None).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "etcd not healthy in 20 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `etcdctl` against this member, `stdin` as the value where given.
    fn ctl(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        use std::io::Write as _;
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg("--command-timeout=2s")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etcdctl");
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.unwrap_or("").as_bytes());
        }
        child.wait_with_output().expect("etcdctl output")
    }

    /// The value under `key`, as etcdctl prints it.
    fn get(&self, key: &str) -> String {
        let out = self.ctl(
            &["get", "--print-value-only", &format!("{PREFIX}{key}")],
            None,
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Puts `value` under `key`, retried for 10 s: a cluster that just lost its leader
    /// refuses writes until it has elected another.
    fn put(&self, key: &str, value: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.ctl(&["put", &format!("{PREFIX}{key}")], Some(value));
            if out.status.success() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Runs each `logon-gate ARGS -c CONFIG` at once, and asserts each succeeded.
fn all_at_once(runs: &[(PathBuf, Vec<String>)]) {
    let children: Vec<Child> = runs
        .iter()
        .map(|(config, args)| {
            Command::new(crate::support::process::BIN)
                .args(args)
                .arg("-c")
                .arg(config)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("logon-gate")
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn cli(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(crate::support::process::BIN)
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .expect("run logon-gate")
}

async fn status_of(http: SocketAddr, host: &str) -> StatusCode {
    let mut c = http_client(http).await;
    c.get(host, "/").await.status
}

/// Whether, within 5 s, every one of `gws` answers `host` with `want`.
async fn all_serve(gws: &[SocketAddr], host: &str, want: StatusCode) -> bool {
    eventually(Duration::from_secs(5), || async move {
        for &http in gws {
            if status_of(http, host).await != want {
                return false;
            }
        }
        true
    })
    .await
}

const INFO_ENABLED: &str = "domain = \"example.info\"\nedition = \"standard\"\n[[logon]]\nhost = \"webmail.example.info\"\ncname = \"verified\"\nicp = \"filed\"\nenabled = true\n";
const INFO_DISABLED: &str = "domain = \"example.info\"\nedition = \"standard\"\n[[logon]]\nhost = \"webmail.example.info\"\ncname = \"verified\"\nicp = \"filed\"\nenabled = false\n";

/// SPEC §6 end to end. `store import` fills etcd from one gateway's files. Three gateways
/// follow it, each from its own local copy, and converge after each edit made with etcdctl.
/// An invalid value is refused while the last table keeps serving. A stopped etcd costs no
/// request, and a restarted one is caught up with. `store export` writes files that `check`
/// takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd-server and the etcd feature: run by .ci/run"]
async fn gateways_follow_etcd_and_serve_on_without_it() {
    let backend = Backend::start().await;
    let store = |port: u16| {
        format!(
            "\n[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:{port}\"]\nprefix = \"{PREFIX}\"\n"
        )
    };
    let first = Fixture::new(&backend.url(), "");
    let mut etcd = Etcd::start(first.path().join("etcd"));
    let mut fixtures = vec![first];
    for _ in 0..2 {
        fixtures.push(Fixture::new(&backend.url(), ""));
    }
    for f in &fixtures {
        f.write_gateway(&backend.url(), &store(etcd.client));
    }
    let out = cli(&fixtures[0].gateway_toml(), &["store", "import"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("imported "));
    // The others' own copies lack example.org: the store fills it in before their first load.
    for f in &fixtures[1..] {
        std::fs::remove_file(f.path().join("tenants/example.org.toml")).expect("rm");
    }
    let mut gws = Vec::new();
    for f in &fixtures {
        gws.push(f.start().await);
    }
    let plain: Vec<SocketAddr> = gws.iter().map(|g| g.http.expect("http")).collect();
    assert!(all_serve(&plain, "webmail.example.org", StatusCode::OK).await);
    // Every gateway now presents the first one's certificate, from the store.
    let config = client_config(&fixtures[0].pki.ca_der(), &[b"http/1.1"], true);
    for g in &gws {
        let tls = g.https.expect("https");
        assert!(
            tls_connect(tls, config.clone(), "webmail.example.net")
                .await
                .is_ok()
        );
    }

    // An edit with etcdctl reaches every gateway.
    etcd.put("tenants/example.info", INFO_ENABLED);
    assert!(
        all_serve(&plain, "webmail.example.info", StatusCode::OK).await,
        "put"
    );

    // An invalid value is refused like an invalid file: the last table serves on.
    etcd.put("tenants/example.info", "domain = 7\n");
    let refused = eventually(Duration::from_secs(5), || {
        let gws = &gws;
        async move {
            gws.iter()
                .all(|g| g.gateway.status.lock().map(|s| !s.ok).unwrap_or(false))
        }
    })
    .await;
    assert!(refused, "the invalid value was not refused");
    assert!(all_serve(&plain, "webmail.example.info", StatusCode::OK).await);
    etcd.put("tenants/example.info", INFO_DISABLED);
    assert!(
        all_serve(&plain, "webmail.example.info", StatusCode::FORBIDDEN).await,
        "fixed"
    );

    // etcd stopped: not one request fails.
    etcd.stop();
    for _ in 0..20 {
        for &h in &plain {
            assert_eq!(status_of(h, "webmail.example.org").await, StatusCode::OK);
        }
    }
    // Started again: the gateways reconnect and catch up with a change made after.
    etcd.run();
    let del = etcd.ctl(&["del", &format!("{PREFIX}tenants/example.info")], None);
    assert!(del.status.success());
    assert!(
        all_serve(
            &plain,
            "webmail.example.info",
            StatusCode::MISDIRECTED_REQUEST
        )
        .await,
        "not caught up after etcd came back"
    );

    // `store export` writes the files of §2, which `check` takes.
    let out_dir = fixtures[0].path().join("exported");
    let out = cli(
        &fixtures[0].gateway_toml(),
        &["store", "export", out_dir.to_str().expect("utf-8")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = cli(&out_dir.join("gateway.toml"), &["check"]);
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(out_dir.join("tenants/example.org.toml").exists());
    assert!(!out_dir.join("tenants/example.info.toml").exists());

    // The CLI edits the store itself, and every gateway serves the edit.
    let config = fixtures[2].gateway_toml();
    let out = cli(&config, &["domain", "disable", "webmail.example.org"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all_serve(&plain, "webmail.example.org", StatusCode::FORBIDDEN).await,
        "CLI edit"
    );

    // Concurrent edits from several processes (each its own transaction, guarded by the
    // revision it read): none is lost.
    let adds: Vec<(PathBuf, Vec<String>)> = (0..6)
        .map(|i| {
            let host = format!("m{i}.example.org");
            let args = ["domain", "add", "example.org", &host].map(String::from);
            (fixtures[i % 3].gateway_toml(), args.to_vec())
        })
        .collect();
    all_at_once(&adds);
    let text = etcd.get("tenants/example.org");
    for i in 0..6 {
        assert!(
            text.contains(&format!("m{i}.example.org")),
            "lost m{i}:\n{text}"
        );
    }
    // "One enabled address per tenant" holds under a race: two enables at once, one wins.
    etcd.put("tenants/example.info", &format!("{INFO_DISABLED}[[logon]]\nhost = \"mail.example.info\"\ncname = \"verified\"\nicp = \"filed\"\nenabled = false\n"));
    let enables: Vec<(PathBuf, Vec<String>)> = ["webmail.example.info", "mail.example.info"]
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let args = ["domain", "enable", host].map(String::from);
            (fixtures[i].gateway_toml(), args.to_vec())
        })
        .collect();
    all_at_once(&enables);
    let text = etcd.get("tenants/example.info");
    assert_eq!(text.matches("enabled = true").count(), 1, "{text}");
    // `cert install` does not write to etcd yet, and says so.
    let pair = fixtures[2]
        .pki
        .issue(&["webmail.example.org"])
        .expect("issue");
    let (cert, key) = (
        fixtures[2].path().join("new.crt"),
        fixtures[2].path().join("new.key"),
    );
    std::fs::write(&cert, &pair.cert_pem).expect("write");
    std::fs::write(&key, &pair.key_pem).expect("write");
    let out = Command::new(crate::support::process::BIN)
        .args(["cert", "install", "webmail.example.org", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("-c")
        .arg(&config)
        .output()
        .expect("cert install");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("does not write there yet"), "{err}");
    for g in gws {
        g.stop().await.expect("gateway task");
    }
}

/// SPEC §6 with a three-member etcd cluster: the gateway lists every member, one member is
/// killed, and edits made through the others still reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd-server and the etcd feature: run by .ci/run"]
async fn a_killed_etcd_member_does_not_stop_a_gateway_following_the_cluster() {
    let backend = Backend::start().await;
    let f = Fixture::new(&backend.url(), "");
    let mut members = Etcd::cluster(f.path().join("etcd"), 3);
    let endpoints = members
        .iter()
        .map(|m| format!("\"{}\"", m.endpoint()))
        .collect::<Vec<_>>()
        .join(", ");
    f.write_gateway(
        &backend.url(),
        &format!("\n[store]\nkind = \"etcd\"\nendpoints = [{endpoints}]\nprefix = \"{PREFIX}\"\n"),
    );
    let out = cli(&f.gateway_toml(), &["store", "import"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gw = f.start().await;
    let http = [gw.http.expect("http")];
    members[0].put("tenants/example.info", INFO_ENABLED);
    assert!(
        all_serve(&http, "webmail.example.info", StatusCode::OK).await,
        "before"
    );
    // Each member in turn is the one killed; the change goes through another.
    for down in 0..3 {
        members[down].stop();
        let up = (down + 1) % 3;
        let (value, want) = match down % 2 {
            0 => (INFO_DISABLED, StatusCode::FORBIDDEN),
            _ => (INFO_ENABLED, StatusCode::OK),
        };
        members[up].put("tenants/example.info", value);
        assert!(
            all_serve(&http, "webmail.example.info", want).await,
            "member n{down} down: the change through n{up} was not served"
        );
        members[down].run();
    }
    gw.stop().await.expect("gateway task");
}
