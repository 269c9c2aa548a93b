//! The built binary as a child process: spawned with its arguments, its readiness line read
//! (text or JSON), stopped by its PID (SIGTERM, then SIGKILL) when dropped, so a failing test
//! never leaves a gateway behind.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::time::Duration;

/// The binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_logon-gate");

/// A running `logon-gate` child.
pub struct GatewayProcess {
    /// `None` once waited for.
    child: Option<Child>,
    /// The addresses from its readiness line.
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    /// The readiness line as written.
    pub ready_line: String,
    stdout: Option<BufReader<ChildStdout>>,
    stderr: Option<ChildStderr>,
}

/// An address from the readiness line: `key=ADDR` in text, `"key":"ADDR"` in JSON.
fn address(line: &str, key: &str) -> Option<SocketAddr> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        return v[key].as_str()?.parse().ok();
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|a| a.parse().ok())
}

impl GatewayProcess {
    /// Runs `logon-gate ARGS... -c CONFIG` and waits (at most 10 s) for its readiness line.
    pub async fn start(args: &[&str], config: &Path) -> GatewayProcess {
        let mut child = Command::new(BIN)
            .args(args)
            .arg("-c")
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn logon-gate");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            stdout.read_line(&mut line).map(|_| (line, stdout))
        });
        let stderr = child.stderr.take();
        let mut proc = GatewayProcess {
            child: Some(child),
            https: None,
            http: None,
            ready_line: String::new(),
            stdout: None,
            stderr,
        };
        let (line, stdout) = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the readiness line within 10 s")
            .expect("join")
            .expect("read stdout");
        proc.stdout = Some(stdout);
        proc.ready_line = line.trim().to_owned();
        proc.https = address(&proc.ready_line, "https");
        proc.http = address(&proc.ready_line, "http");
        assert!(
            proc.https.is_some() || proc.http.is_some(),
            "no listener in the readiness line {:?}",
            proc.ready_line
        );
        proc
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` (`TERM`, `HUP`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// Its stderr, to read the log from (taken once).
    pub fn take_stderr(&mut self) -> BufReader<ChildStderr> {
        BufReader::new(self.stderr.take().expect("stderr taken once"))
    }

    /// Waits (at most 10 s, then kills it) for it to exit; returns its status and what it
    /// wrote on stdout after the readiness line.
    pub async fn wait(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("not waited for yet");
        let mut stdout = self.stdout.take();
        let pid = child.id();
        let waited = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            let mut rest = String::new();
            if let Some(out) = stdout.as_mut() {
                let _ = out.read_to_string(&mut rest);
            }
            status.map(|s| (s, rest))
        });
        match tokio::time::timeout(Duration::from_secs(10), waited).await {
            Ok(r) => r.expect("join").expect("wait"),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("logon-gate (pid {pid}) did not exit within 10 s");
            }
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
