//! Peers nobody here wrote, as child processes: Python's http.server as a backend
//! (`tests/peers/backend.py`), PHP's built-in server, python-h2 and curl as clients. Each
//! child is stopped by its PID when its handle is dropped. The tests that use them are
//! `#[ignore]`d by default (they need Debian packages) and run by `.ci/run`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Where the peers' scripts are.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// Debian's Python (python3-h2 is installed for it, not for any other Python on PATH).
pub const PYTHON: &str = "/usr/bin/python3";

/// A child process, killed and reaped on drop.
pub struct Peer {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `tests/peers/backend.py` on a loopback port.
    pub fn python_backend() -> Peer {
        let mut child = Command::new(PYTHON)
            .arg(peers_dir().join("backend.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PYTHON} (.ci/run installs it): {e}"));
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let port: u16 = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("backend.py said {line:?}"));
        Peer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// PHP's built-in web server on a loopback port, running `router` for every request.
    pub fn php(router: &Path) -> Peer {
        let mut child = Command::new("php")
            .args(["-S", "127.0.0.1:0"])
            .arg(router)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start php (.ci/run installs php-cli): {e}"));
        let err = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(err).lines();
        // "[date] PHP 8.2.x Development Server (http://127.0.0.1:PORT) started"
        let port = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                let rest = l.split("(http://127.0.0.1:").nth(1)?;
                rest.split(')').next()?.parse::<u16>().ok()
            })
            .expect("php -S reports its port");
        // Keep reading its log so that the pipe never fills up.
        std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        Peer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

/// What `tests/peers/h2client.py` saw.
#[derive(Debug)]
pub struct H2Answer {
    pub status: Option<u16>,
    #[allow(dead_code, reason = "shown when an assertion fails")]
    pub headers: Vec<(String, String)>,
    pub trailers: Vec<(String, String)>,
    pub body: String,
    /// The RST_STREAM error code's name, if the stream was reset.
    pub reset: Option<String>,
    #[allow(dead_code, reason = "shown when an assertion fails")]
    pub goaway: Option<String>,
}

fn pairs(v: &serde_json::Value) -> Vec<(String, String)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// Sends one HTTP/2 request as given (headers in order, each text of `data` one DATA frame)
/// with python-h2, which unlike curl or a browser sends malformed requests when asked.
pub async fn h2_request(
    port: u16,
    sni: &str,
    ca: &Path,
    headers: &[(&str, &str)],
    data: &[&str],
    final_empty: bool,
) -> H2Answer {
    let spec = serde_json::json!({
        "port": port,
        "sni": sni,
        "ca": ca,
        "headers": headers.iter().map(|(k, v)| [k, v]).collect::<Vec<_>>(),
        "data": data,
        "final_empty": final_empty,
    });
    let out = tokio::process::Command::new(PYTHON)
        .arg(peers_dir().join("h2client.py"))
        .arg(spec.to_string())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run h2client.py (.ci/run installs python3-h2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "h2client.py printed {text:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    H2Answer {
        status: v["status"].as_u64().and_then(|s| u16::try_from(s).ok()),
        headers: pairs(&v["headers"]),
        trailers: pairs(&v["trailers"]),
        body: v["body"].as_str().unwrap_or_default().to_owned(),
        reset: v["reset"].as_str().map(str::to_owned),
        goaway: v["goaway"].as_str().map(str::to_owned),
    }
}

/// What curl received: every response head in order (1xx included), and the body.
#[derive(Debug)]
pub struct CurlAnswer {
    /// Each head: its status line, then its fields with lower-cased names.
    pub heads: Vec<(String, Vec<(String, String)>)>,
    pub body: String,
    #[allow(dead_code, reason = "shown when an assertion fails")]
    pub exit: i32,
    #[allow(dead_code, reason = "shown when an assertion fails")]
    pub stderr: String,
}

impl CurlAnswer {
    /// The final response's status code.
    pub fn status(&self) -> Option<u16> {
        let line = &self.heads.last()?.0;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// The final response's values of `name`, in order.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.heads.last().map_or_else(Vec::new, |(_, fields)| {
            fields
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .collect()
        })
    }
}

/// Runs curl against `https://HOST:PORT{path}` on 127.0.0.1 (`--resolve`), trusting only
/// `ca`, with `args` added; `http2` picks `--http2` or `--http1.1`.
pub async fn curl(
    port: u16,
    host: &str,
    path: &str,
    ca: &Path,
    http2: bool,
    args: &[&str],
) -> CurlAnswer {
    let url = format!("https://{host}:{port}{path}");
    let body_file = tempfile::NamedTempFile::new().expect("temp file");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "-D", "-", "-o"])
        .arg(body_file.path())
        .arg("--cacert")
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(if http2 { "--http2" } else { "--http1.1" })
        .args(args)
        .arg(&url)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run curl");
    // Every head on stdout (-D -), 1xx included.
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut heads: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with("HTTP/") {
            heads.push((line.to_owned(), Vec::new()));
        } else if let (Some((k, v)), Some(head)) = (line.split_once(':'), heads.last_mut()) {
            head.1
                .push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    CurlAnswer {
        heads,
        body: std::fs::read_to_string(body_file.path()).unwrap_or_default(),
        exit: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
