//! Listeners and connections: bind first, then spawn; TLS handshakes under a timeout; HTTP/1.1
//! and HTTP/2 served by hyper; a connection limit; graceful shutdown that lets in-flight
//! requests finish within `shutdown_timeout`.

pub mod h1;
mod h2;
pub(crate) mod tls;
mod tls_stream;
pub(crate) mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::table::{Loader, Table};
use crate::config::{ConfigError, Limits};
use crate::proxy::handler::{self, Conn};
use crate::serve::h2::streams::StreamExec;
use crate::serve::workers::Workers;
use crate::state::{Gateway, Snapshot, stopped};
use crate::upstream::Upstream;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Config(Vec<ConfigError>),
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("TLS setup failed")]
    Tls(#[from] rustls::Error),
    #[error("cannot start the serving threads")]
    Threads(#[source] std::io::Error),
    #[error("{0}")]
    Environment(String),
}

/// A started gateway: its bound addresses, a handle to stop it, and its task.
pub struct Running {
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (bounded by `shutdown_timeout`).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops the gateway and waits for it, as [`Running::shutdown`] then [`Running::wait`].
    pub async fn stop(self) -> Result<(), tokio::task::JoinError> {
        self.shutdown();
        self.wait().await
    }

    /// Waits until the gateway has stopped; a panic in its task is returned as an error.
    pub async fn wait(self) -> Result<(), tokio::task::JoinError> {
        self.task.await
    }
}

/// Loads the configuration, binds the listeners and starts serving. Returns once the sockets
/// are bound, so the addresses in `Running` accept connections.
pub async fn start(config_path: &Path) -> Result<Running, StartError> {
    #[cfg(feature = "etcd")]
    let follow = copy_the_store(config_path).await;
    let (table, loader) = load(config_path).await?;
    let listeners = Listeners::bind(&table).await?;
    let gateway = shared_state(table, loader, &listeners, config_path)?;
    let (stop, stop_rx) = watch::channel(false);
    let (https, http, admin) = (
        listeners.https_addr,
        listeners.http_addr,
        listeners.admin_addr,
    );
    let task = spawn(listeners, gateway.clone(), stop_rx)?;
    #[cfg(feature = "etcd")]
    if let Some((store, mirror, revision)) = follow {
        tokio::spawn(crate::store::etcd::follow(
            store,
            mirror,
            revision,
            stop.subscribe(),
        ));
    }
    Ok(Running {
        https,
        http,
        admin,
        gateway,
        stop,
        task,
    })
}

/// Step 0, with `[store] kind = "etcd"`: the local copy made equal to the store before the
/// first load, so the first table is the store's. An etcd out of reach leaves the copy as it
/// was (the table the gateway last served), and following it goes on retrying.
#[cfg(feature = "etcd")]
async fn copy_the_store(
    config_path: &Path,
) -> Option<(crate::config::EtcdStore, crate::store::Mirror, i64)> {
    let src = crate::config::Source::read(config_path).ok()?;
    let (settings, _) = crate::config::load_gateway(&src).ok()?;
    let store = settings.etcd.clone()?;
    let mirror = crate::store::Mirror::of(&settings);
    let bounded = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        crate::store::etcd::sync(&store, &mirror),
    );
    let revision = match bounded.await {
        Ok(Ok(rev)) => rev,
        Ok(Err(e)) => {
            tracing::warn!(error = %crate::error::sentence(&e), "cannot read the etcd store; serving the local copy");
            0
        }
        Err(_) => {
            tracing::warn!("the etcd store did not answer in 5 s; serving the local copy");
            0
        }
    };
    Some((store, mirror, revision))
}

/// Step 1: the configuration, read and validated off the async threads.
async fn load(config_path: &Path) -> Result<(Table, Loader), StartError> {
    let mut loader = Loader::new(crate::config::crypto_provider());
    let path = config_path.to_path_buf();
    let (table, loader) = tokio::task::spawn_blocking(move || {
        let t = loader.load(&path);
        (t, loader)
    })
    .await
    .map_err(|e| StartError::Config(vec![ConfigError::file(config_path, e.to_string())]))?;
    let table = table.map_err(StartError::Config)?;
    for w in &table.warnings {
        tracing::warn!("{w}");
    }
    Ok((table, loader))
}

/// Step 2: the bound listeners (before anything is spawned, so a port in use fails start-up).
struct Listeners {
    https: Option<TcpListener>,
    http: Option<TcpListener>,
    admin: Option<TcpListener>,
    https_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
}

impl Listeners {
    async fn bind(table: &Table) -> Result<Listeners, StartError> {
        let listen = table.settings.listen;
        let bind = |addr: Option<SocketAddr>, what: &'static str| async move {
            match addr {
                None => Ok(None),
                Some(addr) => TcpListener::bind(addr)
                    .await
                    .map(Some)
                    .map_err(|source| StartError::Bind { addr, what, source }),
            }
        };
        let https = bind(listen.https, "https").await?;
        let http = bind(listen.http, "http").await?;
        let admin = bind(listen.admin, "admin").await?;
        let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        Ok(Listeners {
            https_addr: addr(&https),
            http_addr: addr(&http),
            admin_addr: addr(&admin),
            https,
            http,
            admin,
        })
    }
}

/// Step 3: the state every task shares, serving generation 1.
fn shared_state(
    table: Table,
    loader: Loader,
    listeners: &Listeners,
    config_path: &Path,
) -> Result<Arc<Gateway>, StartError> {
    let limits = table.settings.limits;
    let upstream = Arc::new(Upstream::new(&table.settings.backend, &limits));
    let metrics = crate::telemetry::metrics::Metrics::new();
    metrics.generation.set(1);
    metrics.set_certs(&table);
    let snapshot = Snapshot {
        table,
        upstream,
        generation: 1,
    };
    let tls = tls::base_config(loader.provider())?;
    Ok(Arc::new(Gateway::new(
        snapshot,
        tls,
        listeners.https_addr.map(|a| a.port()),
        config_path.to_path_buf(),
        loader,
        metrics,
    )))
}

/// Step 4: the serving threads, the accept loops, the admin listener and the reloader; then
/// step 5, in the returned task: once stopped, the drain.
fn spawn(
    listeners: Listeners,
    gateway: Arc<Gateway>,
    stop_rx: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, StartError> {
    let graceful = Arc::new(GracefulShutdown::new());
    let pin = Workers::pin_from_env().map_err(StartError::Environment)?;
    let workers =
        Arc::new(Workers::start(Workers::default_count(), pin).map_err(StartError::Threads)?);
    // The accept loops run here, on the main runtime; each connection is then served on the
    // least busy serving thread (see `workers`).
    let mut loops = Vec::new();
    for (listener, https) in [(listeners.https, true), (listeners.http, false)] {
        let Some(listener) = listener else { continue };
        loops.push(tokio::spawn(accept_loop(
            listener,
            https,
            gateway.clone(),
            stop_rx.clone(),
            graceful.clone(),
            workers.clone(),
        )));
    }
    tracing::info!(
        https = ?listeners.https_addr,
        http = ?listeners.http_addr,
        hosts = gateway.snapshot().table.host_count(),
        "logon-gate listening"
    );
    let admin = listeners.admin.map(|l| {
        tokio::spawn(crate::control::admin::run(
            l,
            gateway.clone(),
            stop_rx.clone(),
        ))
    });
    let reloader =
        tokio::spawn(crate::control::reload::Reloader::new(gateway.clone()).run(stop_rx.clone()));
    // Idle (a look at the table each second) unless `[acme]` is set.
    let acme = tokio::spawn(crate::control::acme::run(gateway.clone(), stop_rx.clone()));
    let mut others = vec![reloader, acme];
    others.extend(admin);
    Ok(tokio::spawn(drain(
        gateway, stop_rx, loops, others, graceful, workers,
    )))
}

/// Step 5: after the stop signal, the accept loops and other tasks end, then the requests in
/// flight get `shutdown_timeout` to finish, then the serving threads end.
async fn drain(
    gw: Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
    loops: Vec<JoinHandle<()>>,
    others: Vec<JoinHandle<()>>,
    graceful: Arc<GracefulShutdown>,
    workers: Arc<Workers>,
) {
    stopped(&mut stop).await;
    for t in loops.into_iter().chain(others) {
        let _ = t.await;
    }
    // The accept loops held the other references; they have returned.
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        tracing::error!("connections still being accepted at shutdown");
        return;
    };
    let grace = gw.snapshot().table.settings.limits.shutdown_timeout;
    tracing::info!(
        open = graceful.count(),
        "shutting down; waiting for in-flight requests"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "shutdown timeout reached; closing remaining connections"
        );
    }
    workers.finish();
}

async fn accept_loop(
    listener: TcpListener,
    https: bool,
    gw: Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
    graceful: Arc<GracefulShutdown>,
    workers: Arc<Workers>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Some(slot) = gw.try_slot() else {
            // Over max_connections: close at once rather than queue.
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // Taken off this runtime's poller, for the serving thread's to watch.
        let Ok(tcp) = tcp.into_std() else {
            continue;
        };
        let gw = gw.clone();
        let watcher = graceful.watcher();
        let mut stop = stop.clone();
        let task = async move {
            let _slot = slot;
            let Ok(tcp) = TcpStream::from_std(tcp) else {
                return;
            };
            let label = crate::telemetry::metrics::ListenerLabel {
                listener: if https { "https" } else { "http" },
            };
            let open = gw.metrics.connections.get_or_create(&label).clone();
            open.inc();
            if https {
                serve_tls(tcp, peer, gw.clone(), watcher, &mut stop).await;
            } else {
                let conn = Arc::new(Conn::new(gw.clone(), peer, None));
                let io = watched(tcp, &conn);
                Box::pin(serve_http(TokioIo::new(io), conn, None, watcher, stop)).await;
            }
            open.dec();
        };
        workers.spawn(task);
    }
}

async fn serve_tls(
    tcp: TcpStream,
    peer: SocketAddr,
    gw: Arc<Gateway>,
    watcher: Watcher,
    stop: &mut watch::Receiver<bool>,
) {
    // Each stage is boxed so the task holds only the stage under way: an idle connection then
    // carries neither the handshake's state nor a second copy of the TLS stream. The
    // block ends the stream's storage before the serving await (a moved-from local would
    // otherwise still take room in this future).
    let served: Pin<Box<dyn Future<Output = ()> + Send>> = {
        let Some((mut stream, sni, cert)) = Box::pin(handshake(tcp, peer, &gw, stop)).await else {
            return;
        };
        let h2 = stream.alpn_protocol() == Some(b"h2");
        stream.coalesce(h2);
        if h2 {
            // HTTP/2 has no pings (see `serve_http`): a peer that vanished while a stream was
            // open is found by TCP's.
            let keepalive = gw.snapshot().table.settings.limits.keepalive_timeout;
            if let Err(e) = probe_when_silent(stream.get_ref(), keepalive) {
                tracing::debug!(%peer, error = %e, "TCP keep-alive not set");
            }
        }
        let conn = Arc::new(Conn::new(gw, peer, Some((sni, cert))));
        if h2 {
            // Closed with a lingering read, so frames the client still sends after the
            // GOAWAY do not reset the connection (`linger`).
            let served = serve_http(
                TokioIo::new(crate::serve::h2::linger::Lingering::new(stream)),
                conn,
                Some(true),
                watcher,
                stop.clone(),
            );
            Box::pin(served)
        } else {
            let io = Box::new(watched(stream, &conn));
            Box::pin(crate::serve::h1::park::serve(
                io,
                conn,
                watcher,
                stop.clone(),
            ))
        }
    };
    served.await;
}

/// The TLS handshake under `tls_handshake_timeout`, counted by outcome.
async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    gw: &Gateway,
    stop: &mut watch::Receiver<bool>,
) -> Option<crate::serve::tls::Accepted> {
    let limits = gw.snapshot().table.settings.limits;
    let lookup = |sni: &str| gw.snapshot().table.cert_for(sni).cloned();
    let challenge = |sni: &str| {
        let snap = gw.snapshot();
        let acme = snap.table.settings.acme.as_ref()?;
        let digest =
            crate::acme::Storage::of(acme).challenge(crate::acme::Challenge::TlsAlpn01, sni)?;
        crate::acme::order::tls_alpn01_key(sni, &digest)
            .map_err(|e| tracing::warn!(host = %sni, error = %crate::error::sentence(&e), "cannot answer tls-alpn-01"))
            .ok()
    };
    let handshake = crate::serve::tls::accept(tcp, &gw.tls, lookup, challenge);
    let result = tokio::select! {
        r = tokio::time::timeout(limits.tls_handshake_timeout, handshake) => r,
        // A shutdown abandons handshakes still under way: they carry no request yet and must
        // not hold the drain up until their timeout.
        _ = stopped(stop) => return None,
    };
    let outcome = match &result {
        Err(_) => "timeout",
        Ok(Err(e)) => e.label(),
        Ok(Ok(_)) => "ok",
    };
    gw.metrics
        .handshakes
        .get_or_create(&crate::telemetry::metrics::ResultLabel { result: outcome })
        .inc();
    match result {
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
        Ok(Err(crate::serve::tls::HandshakeError::AcmeChallenge)) => {
            tracing::info!(%peer, "answered an ACME tls-alpn-01 validation");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake refused");
            None
        }
        Ok(Ok(x)) => Some(x),
    }
}

/// An HTTP/1.1 stream with its request framing followed and its read timeouts kept (see
/// `framing`), heads capped where hyper caps them.
fn watched<S>(io: S, conn: &Conn) -> crate::serve::h1::framing::Watched<S> {
    let limits = conn.gateway.snapshot().table.settings.limits;
    let timeouts = crate::serve::h1::framing::Timeouts {
        header: limits.header_read_timeout,
        keepalive: limits.keepalive_timeout,
    };
    crate::serve::h1::framing::Watched::new(
        io,
        h1::max_buf(&limits),
        conn.framing.clone(),
        timeouts,
    )
}

/// hyper's HTTP/1.1 read buffer cap, which is also the largest head it accepts.
/// TCP keep-alive probes once the connection has been silent for `after`, then every
/// [`PROBE_EVERY`]; [`PROBES`] unanswered ones close it.
fn probe_when_silent(tcp: &TcpStream, after: Duration) -> std::io::Result<()> {
    let probes = socket2::TcpKeepalive::new()
        .with_time(after)
        .with_interval(PROBE_EVERY)
        .with_retries(PROBES);
    socket2::SockRef::from(tcp).set_tcp_keepalive(&probes)
}

/// Between TCP keep-alive probes ([`probe_when_silent`]).
const PROBE_EVERY: Duration = Duration::from_secs(10);
/// Unanswered TCP keep-alive probes that close a connection ([`probe_when_silent`]).
const PROBES: u32 = 3;

/// Serves HTTP on one connection. `h2`: `Some` when ALPN decided the protocol, `None` on plain
/// HTTP (HTTP/1.1, or HTTP/2 with prior knowledge). `watcher` is held until the end so a
/// graceful shutdown waits for it; `stop` starts that shutdown here.
async fn serve_http<IO>(
    io: IO,
    conn: Arc<Conn>,
    h2: Option<bool>,
    watcher: Watcher,
    mut stop: watch::Receiver<bool>,
) where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let _watcher = watcher;
    let limits = conn.gateway.snapshot().table.settings.limits;
    let exec = StreamExec::default();
    let mut builder = auto::Builder::new(exec.clone());
    builder = match h2 {
        Some(true) => builder.http2_only(),
        Some(false) => builder.http1_only(),
        None => builder,
    };
    // With ALPN h2, the connection is closed after `keepalive_timeout` without a stream, as
    // nginx does. Plain HTTP is HTTP/1.1 (whose idle time `framing` keeps) or, rarely, HTTP/2
    // with prior knowledge, which keeps hyper's keep-alive pings instead.
    let idle_close = h2 == Some(true);
    configure(&mut builder, &limits, !idle_close);
    let svc_conn = conn.clone();
    let svc = service_fn(move |req| request(&svc_conn, req));
    let served = builder.serve_connection_with_upgrades(io, svc).into_owned();
    let stopping = async move { stopped(&mut stop).await };
    let run = exec.run(served).closing(
        |c| c.graceful_shutdown(),
        stopping,
        idle_close.then_some(limits.keepalive_timeout),
    );
    tokio::select! {
        r = run => match r {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
            }
            None => tracing::debug!(peer = %conn.peer, "idle connection did not close after its GOAWAY; dropped"),
        },
        // Dropping the connection closes it: the client's streams end with it.
        _ = conn.abuse.notified() => {
            tracing::warn!(peer = %conn.peer, "closed a connection that abandoned most of its requests (HTTP/2 rapid reset)");
        }
    }
}

/// What hyper calls for each request of `conn`: the proxy's handler. A serving thread busy
/// for a whole slice offers its core first, between HTTP/1.1 requests; not between HTTP/2
/// streams, which come in batches (`workers`' module doc).
pub(crate) fn request(
    conn: &Arc<Conn>,
    req: http::Request<hyper::body::Incoming>,
) -> impl Future<Output = Result<http::Response<handler::Body>, std::convert::Infallible>> + Send + use<>
{
    if req.version() <= http::Version::HTTP_11 {
        workers::checkpoint();
    }
    handler::handle(conn.clone(), req)
}

/// hyper's settings; `pings`: HTTP/2 keep-alive pings at `keepalive_timeout`. HTTP/1.1's are
/// `h1::settings`, shared with the parking path.
fn configure(builder: &mut auto::Builder<StreamExec>, limits: &Limits, pings: bool) {
    h1::settings!(builder.http1(), h1::max_buf(limits));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_request_header_bytes.min(u32::MAX as usize) as u32)
        .keep_alive_interval(pings.then_some(limits.keepalive_timeout))
        .keep_alive_timeout(Duration::from_secs(20));
}
