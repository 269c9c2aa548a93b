//! Issue 27's files benchmark, measured from outside: N tenants (default 100,000) with N
//! certificates on files, served by the release binary (`GATE_BIN`, default
//! target/release/logon-gate) on loopback. Reports the cold start to serving, peak RSS, the
//! CPU of an idle gateway over 5 s, and the time from writing one tenant's file to the change
//! being served (a new logon address answering 403 where it answered 421), p50/p99 over 100
//! changes. Not a test: `cargo bench --bench scale` (SCALE_TENANTS=N to change N). Every
//! process it starts is stopped by PID; everything listens on 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

/// Writes `text` to `path` as the CLI does: a temporary file in the same folder, renamed.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The status code the gateway answers a plain-HTTP GET for `host` with.
fn status(port: u16, host: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn peak_rss_mb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

struct Gate(Child);
impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let n: usize = std::env::var("SCALE_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let bin = std::env::var("GATE_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/logon-gate").to_owned()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let http = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let t = Instant::now();
    common::generate(
        dir.path(),
        n,
        &format!("[listen]\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:{http}\"\nadmin = \"\"\n"),
    );
    eprintln!(
        "generated {n} tenants and certificates in {:?}",
        t.elapsed()
    );

    let started = Instant::now();
    let mut child = Command::new(&bin)
        .args(["serve", "-c"])
        .arg(dir.path().join("gateway.toml"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("gateway.log")).expect("log"))
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let gate = Gate(child);
    let pid = gate.0.id();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("listening line");
    while status(http, "webmail.tenant0.example") != Some(308) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let cold = started.elapsed();

    let ticks = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(5));
    let idle_cpu = (cpu_ticks(pid) - ticks) as f64 / 100.0;

    let mut lat = Vec::new();
    for k in 0..100 {
        let i = (k * 997) % n;
        let host = format!("new{k}.tenant{i}.example");
        let file = dir
            .path()
            .join("tenants")
            .join(format!("tenant{i}.example.toml"));
        let t = Instant::now();
        write_atomic(&file, &common::tenant(i, true, Some(&host)));
        loop {
            if status(http, &host) == Some(403) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "change {k} not served in 30 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "tenants {n}: cold start to serving {:.2} s, peak RSS {} MB, idle CPU {:.2} s over 5 s, one change served p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        cold.as_secs_f64(),
        peak_rss_mb(pid),
        idle_cpu,
        ms(lat[49]),
        ms(lat[98]),
        ms(lat[99])
    );
    drop(gate);
    // The gateway's own account of each reload: took_ms, incremental or not.
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
    let mut took: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("configuration reloaded") && l.contains("incremental=true"))
        .filter_map(|l| {
            l.split("took_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    took.sort_unstable();
    let full = log
        .lines()
        .filter(|l| l.contains("configuration reloaded") && l.contains("incremental=false"))
        .count();
    if let (Some(p50), Some(max)) = (took.get(took.len() / 2), took.last()) {
        println!(
            "reloads applied alone: {} (took p50 {p50} ms, max {max} ms); full loads: {full}",
            took.len()
        );
    }
}
