//! Hot reload: a notify watcher on the folders gateway.toml names (its own, tenants, certs) and
//! SIGHUP both lead to one debounced rebuild, run off the async threads, published with a single
//! ArcSwap store; an invalid result is logged and the last good table keeps serving.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::config::ConfigError;
use crate::state::{Gateway, snapshot_for};

/// How long the folders must be quiet before a reload starts (editors write in bursts; the
/// CLI's temporary file and rename come within a millisecond). Short, since a change to a few
/// files is applied alone (`Loader::apply`) and costs little.
const DEBOUNCE: Duration = Duration::from_millis(25);
/// A steady stream of changes still reloads at least this often.
const MAX_DELAY: Duration = Duration::from_millis(1000);

/// Builds the table from disk and publishes it, or keeps the old one; `changed` names the
/// files changed since the live table was built (`None`: anything may have changed), which
/// are applied to it alone when the loader can (`Loader::apply`), else everything is loaded.
/// Blocking: call it from `spawn_blocking`. Returns the generation now served.
pub fn reload(gw: &Gateway, changed: Option<&[PathBuf]>) -> Result<u64, Vec<ConfigError>> {
    let started = Instant::now();
    // One reload at a time; the loader's caches make a full load re-read only changed files.
    let mut loader = gw.loader.lock().unwrap_or_else(|p| p.into_inner());
    let live = gw.live.load_full();
    let applied = changed.and_then(|c| loader.apply(&live.table, c));
    let incremental = applied.is_some();
    let result = applied.unwrap_or_else(|| loader.load(&gw.config_path));
    drop(live);
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
            // 100,000 expiry series are not rebuilt for a change that kept every certificate.
            let same_certs = table.certs.len() == old.table.certs.len()
                && table
                    .certs
                    .iter()
                    .zip(&old.table.certs)
                    .all(|(a, b)| Arc::ptr_eq(a, b));
            if !same_certs {
                gw.metrics.set_certs(&table);
            }
            let snap = snapshot_for(table, Some(&old));
            let generation = snap.generation;
            gw.live.store(Arc::new(snap));
            status.generation = generation;
            status.ok = true;
            status.message = if incremental {
                "applied the changed files".into()
            } else {
                "loaded".into()
            };
            status.succeeded += 1;
            gw.metrics.generation.set(generation);
            gw.metrics
                .reloads
                .get_or_create(&crate::telemetry::metrics::ResultLabel { result: "ok" })
                .inc();
            tracing::info!(
                generation,
                took_ms = took.as_millis() as u64,
                incremental,
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
    let w = Watched::of(gw);
    [w.config_dir, w.tenants_dir, w.certs_dir]
        .into_iter()
        .collect()
}

/// The files a reload reads, by folder: a change to anything else in the watched folders (a
/// log file, an editor's swap file, a backup) starts no reload. The folders are the ones
/// `folders` watches, in the same form, so event paths compare as they are.
#[derive(Debug, Clone, PartialEq)]
struct Watched {
    config_dir: PathBuf,
    config_name: std::ffi::OsString,
    tenants_dir: PathBuf,
    certs_dir: PathBuf,
}

impl Watched {
    fn of(gw: &Gateway) -> Watched {
        let snap = gw.live.load();
        let s = &snap.table.settings;
        Watched {
            config_dir: crate::config::config_dir(&gw.config_path),
            config_name: gw.config_path.file_name().unwrap_or_default().to_owned(),
            tenants_dir: s.tenants_dir.clone(),
            certs_dir: s.certs_dir.clone(),
        }
    }

    /// Whether a change at `path` may change the configuration: gateway.toml, a tenant file
    /// (`*.toml`, not hidden), any file in the certificates folder that is not hidden, a
    /// watched folder itself, or Kubernetes' `..data` and `..<timestamp>` entries, whose swap
    /// replaces every file of a mounted volume at once.
    fn relevant(&self, path: &Path) -> bool {
        let Some(name) = path.file_name() else {
            return true;
        };
        let text = name.to_string_lossy();
        if text.starts_with("..") {
            return true;
        }
        if [&self.config_dir, &self.tenants_dir, &self.certs_dir].contains(&&path.to_path_buf()) {
            return true;
        }
        let parent = path.parent();
        let hidden = text.starts_with('.');
        (parent == Some(self.config_dir.as_path()) && name == self.config_name)
            || (parent == Some(self.tenants_dir.as_path()) && !hidden && text.ends_with(".toml"))
            || (parent == Some(self.certs_dir.as_path()) && !hidden)
    }
}

/// The watcher and SIGHUP listener, set up before the gateway reports itself started, so no
/// change made after `start` returns can be missed.
pub struct Reloader {
    gw: Arc<Gateway>,
    rx: mpsc::UnboundedReceiver<Option<PathBuf>>,
    watcher: Option<notify::RecommendedWatcher>,
    watched: BTreeSet<PathBuf>,
    /// What the watcher's events are matched against; updated after each reload.
    relevant: Arc<RwLock<Watched>>,
}

impl Reloader {
    /// Starts watching the folders of `gw`'s configuration, and SIGHUP.
    pub fn new(gw: Arc<Gateway>) -> Reloader {
        // Each relevant path changed, or `None`: anything may have changed (SIGHUP, an event
        // without paths, a watcher error such as a queue overflow).
        let (tx, rx) = mpsc::unbounded_channel::<Option<PathBuf>>();
        let fs_tx = tx.clone();
        let relevant = Arc::new(RwLock::new(Watched::of(&gw)));
        let files = relevant.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let read = files.read().unwrap_or_else(|p| p.into_inner());
            match res {
                // None of the files a reload reads.
                Ok(ev) if !ev.paths.is_empty() && !ev.paths.iter().any(|p| read.relevant(p)) => {}
                // Reads change nothing; everything else (writes, creates, renames, deletes,
                // symlink swaps, attribute changes) may.
                Ok(ev)
                    if matches!(
                        ev.kind,
                        EventKind::Access(
                            notify::event::AccessKind::Open(_) | notify::event::AccessKind::Read
                        )
                    ) => {}
                Ok(ev) if !ev.paths.is_empty() && !ev.need_rescan() => {
                    for p in ev.paths.into_iter().filter(|p| read.relevant(p)) {
                        let _ = fs_tx.send(Some(p));
                    }
                }
                Ok(_) | Err(_) => {
                    let _ = fs_tx.send(None);
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
                        if tx.send(None).is_err() {
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
            relevant,
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
        relevant,
    } = r;
    loop {
        let first_change = tokio::select! {
            _ = crate::state::stopped(&mut stop) => return,
            got = rx.recv() => match got {
                Some(c) => c,
                None => return,
            },
        };
        // The paths changed in this burst; `None` once anything may have.
        let mut changed: Option<Vec<PathBuf>> = first_change.map(|p| vec![p]);
        // Debounce: wait for a quiet spell, but not forever.
        let first = Instant::now();
        loop {
            let left = MAX_DELAY.saturating_sub(first.elapsed());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(DEBOUNCE.min(left), rx.recv()).await {
                Ok(Some(Some(p))) => {
                    if let Some(c) = changed.as_mut() {
                        c.push(p);
                    }
                }
                Ok(Some(None)) => changed = None,
                Ok(None) | Err(_) => break,
            }
        }
        let g = gw.clone();
        let _ = tokio::task::spawn_blocking(move || reload(&g, changed.as_deref())).await;
        *relevant.write().unwrap_or_else(|p| p.into_inner()) = Watched::of(&gw);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_files_a_reload_reads_are_relevant() {
        let w = Watched {
            config_dir: PathBuf::from("/etc/lg"),
            config_name: "gateway.toml".into(),
            tenants_dir: PathBuf::from("/etc/lg/tenants"),
            certs_dir: PathBuf::from("/etc/lg/../certs"),
        };
        for yes in [
            "/etc/lg/gateway.toml",
            "/etc/lg/tenants/example.net.toml",
            "/etc/lg/../certs/example.net.pem",
            "/etc/lg/../certs/chain.crt",
            "/etc/lg/..data",
            "/etc/lg/tenants/..2026_12_08_01_02_03.123",
            "/etc/lg/tenants",
        ] {
            assert!(w.relevant(Path::new(yes)), "{yes}");
        }
        for no in [
            "/etc/lg/gateway.log",
            "/etc/lg/.gateway.toml.swp",
            "/etc/lg/gateway.toml~",
            "/etc/lg/other.toml",
            "/etc/lg/tenants/.example.net.toml.swp",
            "/etc/lg/tenants/notes.txt",
            "/etc/lg/../certs/.hidden.pem",
        ] {
            assert!(!w.relevant(Path::new(no)), "{no}");
        }
    }
}
