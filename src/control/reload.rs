//! Hot reload: a notify watcher on the folders gateway.toml names (its own, tenants, certs) and
//! SIGHUP both lead to one debounced rebuild, run off the async threads, published with a single
//! ArcSwap store; an invalid result is logged and the last good table keeps serving.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::config::ConfigError;
use crate::state::{Gateway, snapshot_for};

/// How long the folders must be quiet before a reload starts (editors write in bursts).
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A steady stream of changes still reloads at least this often.
const MAX_DELAY: Duration = Duration::from_millis(1000);

/// Rebuilds the table from disk and publishes it, or keeps the old one. Blocking: call it
/// from `spawn_blocking`. Returns the generation now served.
pub fn reload_now(gw: &Gateway) -> Result<u64, Vec<ConfigError>> {
    let started = Instant::now();
    // One reload at a time; the loader's caches make it incremental.
    let mut loader = gw.loader.lock().unwrap_or_else(|p| p.into_inner());
    let result = loader.load(&gw.config_path);
    let took = started.elapsed();
    let mut status = gw.status.lock().unwrap_or_else(|p| p.into_inner());
    status.at = SystemTime::now();
    status.took = took;
    match result {
        Ok(table) => {
            let old = gw.live.load();
            if table.settings.listen != old.table.settings.listen {
                tracing::warn!(
                    old = ?old.table.settings.listen,
                    new = ?table.settings.listen,
                    "listener addresses changed in gateway.toml; they take effect at the next restart (the old ones keep serving)"
                );
            }
            for w in &table.warnings {
                tracing::warn!("{w}");
            }
            gw.apply_limits(&table.settings.limits);
            gw.metrics.set_certs(&table);
            let snap = snapshot_for(table, Some(&old));
            let generation = snap.generation;
            gw.live.store(Arc::new(snap));
            status.generation = generation;
            status.ok = true;
            status.message = "loaded".into();
            status.succeeded += 1;
            gw.metrics.generation.set(generation);
            gw.metrics
                .reloads
                .get_or_create(&crate::telemetry::metrics::ResultLabel { result: "ok" })
                .inc();
            tracing::info!(
                generation,
                took_ms = took.as_millis() as u64,
                "configuration reloaded"
            );
            Ok(generation)
        }
        Err(errors) => {
            for e in &errors {
                tracing::error!("reload refused: {e}");
            }
            tracing::error!(
                generation = status.generation,
                "configuration invalid; still serving the last valid one"
            );
            status.ok = false;
            status.message = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            status.failed += 1;
            gw.metrics
                .reloads
                .get_or_create(&crate::telemetry::metrics::ResultLabel { result: "error" })
                .inc();
            Err(errors)
        }
    }
}

/// The folders to watch for a configuration: gateway.toml's own, tenants and certs.
fn folders(gw: &Gateway) -> BTreeSet<PathBuf> {
    let snap = gw.live.load();
    let s = &snap.table.settings;
    let own = crate::config::config_dir(&gw.config_path);
    [own, s.tenants_dir.clone(), s.certs_dir.clone()]
        .into_iter()
        .collect()
}

/// The watcher and SIGHUP listener, set up before the gateway reports itself started, so no
/// change made after `start` returns can be missed.
pub struct Reloader {
    gw: Arc<Gateway>,
    rx: mpsc::UnboundedReceiver<()>,
    watcher: Option<notify::RecommendedWatcher>,
    watched: BTreeSet<PathBuf>,
}

impl Reloader {
    /// Starts watching the folders of `gw`'s configuration, and SIGHUP.
    pub fn new(gw: Arc<Gateway>) -> Reloader {
        let (tx, rx) = mpsc::unbounded_channel::<()>();
        let fs_tx = tx.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            match res {
                // Reads change nothing; everything else (writes, creates, renames, deletes,
                // symlink swaps, attribute changes) may.
                Ok(ev)
                    if matches!(
                        ev.kind,
                        EventKind::Access(
                            notify::event::AccessKind::Open(_) | notify::event::AccessKind::Read
                        )
                    ) => {}
                Ok(_) | Err(_) => {
                    let _ = fs_tx.send(());
                }
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the configuration folders; reload with SIGHUP");
                None
            }
        };
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP received: reloading");
                        if tx.send(()).is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch SIGHUP"),
        }
        let mut r = Reloader {
            rx,
            watcher,
            watched: BTreeSet::new(),
            gw,
        };
        let wanted = folders(&r.gw);
        rewatch(&mut r.watcher, &mut r.watched, wanted);
        r
    }

    /// Runs until `stop` turns true, reloading after each debounced burst of changes.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        run(self, stop).await
    }
}

async fn run(r: Reloader, mut stop: watch::Receiver<bool>) {
    let Reloader {
        gw,
        mut rx,
        mut watcher,
        mut watched,
    } = r;
    loop {
        tokio::select! {
            _ = crate::state::stopped(&mut stop) => return,
            got = rx.recv() => if got.is_none() { return },
        }
        // Debounce: wait for a quiet spell, but not forever.
        let first = Instant::now();
        loop {
            let left = MAX_DELAY.saturating_sub(first.elapsed());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(DEBOUNCE.min(left), rx.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        let g = gw.clone();
        let _ = tokio::task::spawn_blocking(move || reload_now(&g)).await;
        rewatch(&mut watcher, &mut watched, folders(&gw));
    }
}

fn rewatch(
    watcher: &mut Option<notify::RecommendedWatcher>,
    watched: &mut BTreeSet<PathBuf>,
    wanted: BTreeSet<PathBuf>,
) {
    let Some(w) = watcher else { return };
    if *watched == wanted {
        return;
    }
    for old in watched.difference(&wanted) {
        let _ = w.unwatch(old);
    }
    let mut now = BTreeSet::new();
    for dir in wanted {
        if watched.contains(&dir) {
            now.insert(dir);
            continue;
        }
        // Non-recursive: Kubernetes' `..data` swap is a rename inside the watched folder.
        match w.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                now.insert(dir);
            }
            Err(e) => {
                tracing::warn!(folder = %dir.display(), error = %e, "cannot watch folder; changes there need SIGHUP")
            }
        }
    }
    *watched = now;
}
