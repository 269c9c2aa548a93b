//! The state every task shares, and nothing else: the live configuration snapshot (swapped
//! whole on reload), the gateway's counters and settings that outlive a reload, the outcome
//! of the last reload, and the stop signal. Serving, proxying and control import it; it
//! imports only what it holds (config, upstream, telemetry), never them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio::sync::watch;

use crate::config::Limits;
use crate::config::table::{Loader, Table};
use crate::telemetry::metrics::Metrics;
use crate::upstream::Upstream;

/// What requests are served from: the table and the upstream built for it, swapped together
/// so a request never sees a mix of two configurations.
pub struct Snapshot {
    pub table: Table,
    pub upstream: Arc<Upstream>,
    /// Increases by one with every successful (re)load; 1 at start-up.
    pub generation: u64,
}

/// State shared by every connection.
pub struct Gateway {
    pub live: ArcSwap<Snapshot>,
    /// The rustls config connections start from (built once; survives reloads).
    pub tls: Arc<ServerConfig>,
    /// The bound HTTPS port, for redirects.
    pub https_port: Option<u16>,
    /// Path of gateway.toml.
    pub config_path: PathBuf,
    /// Loader with its caches, for reloads.
    pub loader: std::sync::Mutex<Loader>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Outcome of the last reload.
    pub status: std::sync::Mutex<ReloadStatus>,
    /// Open client connections, against `limits.max_connections` (which may change on reload).
    open_connections: Arc<AtomicUsize>,
    max_connections: AtomicUsize,
}

/// Holds one connection's place under `max_connections`.
pub struct ConnSlot(Arc<AtomicUsize>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gateway {
    /// The shared state at start-up, serving `snapshot`.
    pub fn new(
        snapshot: Snapshot,
        tls: Arc<ServerConfig>,
        https_port: Option<u16>,
        config_path: PathBuf,
        loader: Loader,
        metrics: Metrics,
    ) -> Gateway {
        let max_connections = snapshot.table.settings.limits.max_connections;
        Gateway {
            live: ArcSwap::from_pointee(snapshot),
            tls,
            https_port,
            config_path,
            loader: std::sync::Mutex::new(loader),
            metrics,
            status: std::sync::Mutex::new(ReloadStatus::initial()),
            open_connections: Arc::new(AtomicUsize::new(0)),
            max_connections: AtomicUsize::new(max_connections),
        }
    }

    /// Applies limits that live outside the table (the connection cap) after a reload.
    pub fn apply_limits(&self, limits: &Limits) {
        self.max_connections
            .store(limits.max_connections, Ordering::Relaxed);
    }

    /// Number of client connections open now.
    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }

    /// A place for one more client connection, or `None` at `max_connections`.
    pub fn try_slot(&self) -> Option<ConnSlot> {
        let max = self.max_connections.load(Ordering::Relaxed);
        let before = self.open_connections.fetch_add(1, Ordering::AcqRel);
        let slot = ConnSlot(self.open_connections.clone());
        (before < max).then_some(slot)
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.live.load_full()
    }
}

/// The outcome of the last reload, for the admin listener and logs.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    /// Generation now served.
    pub generation: u64,
    /// Whether the last attempt succeeded.
    pub ok: bool,
    /// "loaded", "applied the changed files" (`config::table::Loader::apply`), or the errors,
    /// one per line.
    pub message: String,
    /// When the last attempt finished.
    pub at: SystemTime,
    /// How long the last attempt took.
    pub took: Duration,
    pub succeeded: u64,
    pub failed: u64,
}

impl ReloadStatus {
    /// The status right after start-up.
    pub fn initial() -> Self {
        ReloadStatus {
            generation: 1,
            ok: true,
            message: "loaded at start-up".into(),
            at: SystemTime::now(),
            took: Duration::ZERO,
            succeeded: 0,
            failed: 0,
        }
    }
}

/// Resolves once a stop was requested (or the sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Builds the snapshot a table is served from, keeping `previous`'s upstream (and its
/// connection pool) when the backend settings did not change.
pub fn snapshot_for(table: Table, previous: Option<&Snapshot>) -> Snapshot {
    let limits = table.settings.limits;
    let (upstream, generation) = match previous {
        Some(p) if p.upstream.fits(&table.settings.backend, &limits) => {
            (p.upstream.clone(), p.generation + 1)
        }
        Some(p) => (
            Arc::new(Upstream::new(&table.settings.backend, &limits)),
            p.generation + 1,
        ),
        None => (Arc::new(Upstream::new(&table.settings.backend, &limits)), 1),
    };
    Snapshot {
        table,
        upstream,
        generation,
    }
}
