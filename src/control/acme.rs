//! The background issuer (SPEC §5): every enabled logon address that no valid certificate
//! covers, and every issued certificate due for renewal, is queued once, in the order it
//! became wanted; up to `orders_in_flight` orders run at once, each taken from the front of
//! the queue among the hosts not backing off, so 1,000 addresses enabled at once are served
//! in turn and one host's failures never hold up another. A failure keeps whatever serves,
//! and backs that host off: 1 s doubling to 1 h, or longer when the CA says so (Retry-After,
//! `rateLimited`); the backoff is recorded in storage, so a restart does not retry at once.
//! Before each order the host's CNAME is looked up again (it must still reach
//! `cname_target`) and the host must still be enabled; a per-host lock in storage keeps this
//! gateway and `cert issue` from ordering the same host twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::acme::{AcmeError, Client, HostState, Outcome, Storage};
use crate::config::certs::{CertEntry, unix_now};
use crate::config::table::Table;
use crate::config::{Acme, Edition};
use crate::state::Gateway;

/// How often the table is looked at for addresses that need a certificate.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// Issued certificates are taken into the table at most this often.
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// How long an issued certificate may wait for a reload before its host is ordered again.
const FRESH_FOR: Duration = Duration::from_secs(600);
/// A folder time younger than this may hide a later change with the same time.
const FRESH: Duration = Duration::from_millis(100);
/// A host whose lock someone else holds is looked at again after this long.
const BUSY_WAIT: Duration = Duration::from_secs(5);

/// The enabled logon addresses (edition allowing) that no valid certificate covers, and
/// those served with one the CA issued that is due: a third of its lifetime left, or past the
/// renewal time the CA suggested for it (`early`). An uploaded certificate is never renewed
/// here: it wins until it expires.
pub fn wanted(table: &Table, early: impl Fn(&str, &CertEntry) -> bool) -> Vec<String> {
    let now = unix_now();
    let due = |host: &str, c: &CertEntry| {
        let issued = crate::acme::is_issued(table, c);
        let renew_at = c.not_after - (c.not_after - c.not_before) / 3;
        c.not_after <= now || (issued && (now >= renew_at || early(host, c)))
    };
    table
        .tenants
        .iter()
        .filter(|t| t.edition != Edition::Free)
        .flat_map(|t| t.logons.iter().filter(|l| l.enabled))
        .map(|l| l.host.as_str())
        .filter(|h| table.cert_for(h).is_none_or(|c| due(h, c)))
        .map(str::to_owned)
        .collect()
}

/// What one order task came back with.
enum Done {
    Ordered(Outcome),
    /// Someone else (another process) is ordering for this host now.
    Busy,
    /// Not ordered: the host is no longer enabled, or its CNAME no longer reaches the target.
    Skipped(AcmeError),
}

/// A host's backoff: failures in a row, and no order before `until` (Unix seconds).
#[derive(Clone, Copy, Default)]
struct Backoff {
    failures: u32,
    until: i64,
}

/// What the CA's renewal information (RFC 9773) says of one host's issued certificate.
struct Ari {
    /// The serial (hex) of the certificate it was asked for.
    serial: String,
    /// Renew from then on (Unix seconds), when the CA said.
    renew_at: Option<i64>,
    /// Ask again then (Unix seconds).
    next_check: i64,
}

/// What the CA said: renew from (Unix seconds), and ask again after.
type RenewalWindow = (i64, Duration);

/// Renewal-information requests started per look at the table.
const ARI_PER_LOOK: usize = 4;
/// How often the CA's renewal window is asked for again: its Retry-After, within these.
const ARI_MIN_AGAIN: Duration = Duration::from_secs(3600);
const ARI_MAX_AGAIN: Duration = Duration::from_secs(86_400);

/// The issuer's state between looks at the table.
struct Issuer {
    gw: Arc<Gateway>,
    client: Option<(Acme, Arc<Client>)>,
    account_backoff: Backoff,
    queue: VecDeque<String>,
    queued: HashSet<String>,
    running: JoinSet<(String, Done)>,
    in_flight: HashSet<String>,
    backoff: HashMap<String, Backoff>,
    /// RFC 9773 per host served by an issued certificate, when the CA serves it.
    ari: HashMap<String, Ari>,
    /// Renewal-information requests under way: host, serial, and what the CA said.
    ari_checks: JoinSet<(String, String, Option<RenewalWindow>)>,
    /// Hosts issued a certificate the served table does not have yet (it comes with the
    /// next reload), with when: not ordered again meanwhile.
    fresh: HashMap<String, Instant>,
    /// The modification time of the issued certificates' folder at the last reload.
    certs_seen: Option<SystemTime>,
    /// When the issuer last reloaded.
    last_reload: Instant,
}

/// Runs until `stop`: orders what [`wanted`] names. A shutdown does not wait for orders
/// under way (each is asked again after the next start).
pub async fn run(gw: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let mut issuer = Issuer {
        gw,
        client: None,
        account_backoff: Backoff::default(),
        queue: VecDeque::new(),
        queued: HashSet::new(),
        running: JoinSet::new(),
        in_flight: HashSet::new(),
        backoff: HashMap::new(),
        ari: HashMap::new(),
        ari_checks: JoinSet::new(),
        fresh: HashMap::new(),
        // The folder as the start-up load found it.
        certs_seen: None,
        last_reload: Instant::now(),
    };
    if let Some(acme) = &issuer.gw.snapshot().table.settings.acme {
        issuer.certs_seen = certs_changed(acme);
    }
    loop {
        let snap = issuer.gw.snapshot();
        if let Some(acme) = snap.table.settings.acme.clone() {
            tokio::select! {
                _ = crate::state::stopped(&mut stop) => return,
                _ = issuer.open_account(&acme) => {}
            }
            issuer.enqueue(&snap.table, &acme);
            issuer.start(&acme);
            issuer.ask_renewal_info(&snap.table, &acme);
        }
        tokio::select! {
            _ = crate::state::stopped(&mut stop) => return,
            Some(joined) = issuer.running.join_next(), if !issuer.running.is_empty() => {
                issuer.finish(joined);
                while let Some(joined) = issuer.running.try_join_next() {
                    issuer.finish(joined);
                }
            }
            Some(Ok((host, serial, said))) = issuer.ari_checks.join_next(), if !issuer.ari_checks.is_empty() => {
                issuer.renewal_info(host, serial, said);
            }
            _ = tokio::time::sleep(LOOK_EVERY) => {}
        }
        issuer.reload_if_issued().await;
    }
}

impl Issuer {
    /// Reloads once the issued certificates' folder changed (a certificate written by this
    /// issuer or by `cert issue`), at most once per [`RELOAD_EVERY`]: a reload per issued
    /// certificate would rebuild the table hundreds of times when many hosts are enabled at
    /// once (docs/performance.md, "ACME at scale").
    async fn reload_if_issued(&mut self) {
        let Some(acme) = self.gw.snapshot().table.settings.acme.clone() else {
            return;
        };
        let changed = certs_changed(&acme);
        if changed.is_none() || changed == self.certs_seen {
            return;
        }
        if self.last_reload.elapsed() < RELOAD_EVERY {
            return;
        }
        // The files written since the last look are applied alone (a full load of 100,000
        // tenants per issued certificate would keep the gateway reloading); a removal, or a
        // first look, loads everything.
        let since = self.certs_seen;
        // A change within the file system's timestamp granularity of this one would leave
        // the same time: a time this fresh is looked at again next time.
        self.certs_seen = changed.filter(|t| t.elapsed().is_ok_and(|e| e > FRESH));
        self.last_reload = Instant::now();
        let g = self.gw.clone();
        let dir = acme.certs_dir();
        let _ = tokio::task::spawn_blocking(move || {
            let written = since.and_then(|t| written_since(&dir, t - FRESH));
            crate::control::reload::reload(&g, written.as_deref())
        })
        .await;
    }

    /// Opens (or makes) the account for `acme` unless it is open, backing off on failure.
    async fn open_account(&mut self, acme: &Acme) {
        if self.client.as_ref().is_some_and(|(a, _)| a == acme)
            || unix_now() < self.account_backoff.until
        {
            return;
        }
        match Client::open(acme, &Storage::of(acme)).await {
            Ok(c) => {
                self.client = Some((acme.clone(), Arc::new(c)));
                self.account_backoff = Backoff::default();
            }
            Err(e) => {
                let failures = self.account_backoff.failures + 1;
                let wait = crate::acme::backoff(failures, None, e.rate_limited());
                self.account_backoff = Backoff {
                    failures,
                    until: unix_now() + wait.as_secs() as i64,
                };
                tracing::warn!(error = %crate::error::sentence(&e), retry_in = ?wait, "cannot open the ACME account");
            }
        }
    }

    /// Queues every wanted host not queued or under way yet (its backoff read from storage
    /// the first time it is seen), and drops queued hosts no longer wanted.
    fn enqueue(&mut self, table: &Table, acme: &Acme) {
        let now = unix_now();
        let ari = &self.ari;
        let early = |host: &str, c: &CertEntry| {
            ari.get(host).is_some_and(|a| {
                a.renew_at.is_some_and(|at| now >= at)
                    && c.key
                        .end_entity_cert()
                        .is_ok_and(|leaf| crate::acme::order::serial_hex(leaf) == a.serial)
            })
        };
        let wanted = wanted(table, early);
        let set: HashSet<&str> = wanted.iter().map(String::as_str).collect();
        self.queue.retain(|h| set.contains(h.as_str()));
        self.queued.retain(|h| set.contains(h.as_str()));
        // A host no longer wanted (it got a certificate, perhaps from `cert issue`) forgets
        // its backoff; storage has the record for when it is wanted again.
        let in_flight = &self.in_flight;
        self.backoff
            .retain(|h, _| set.contains(h.as_str()) || in_flight.contains(h));
        // Served now (or lost: a file removed before any reload took it is ordered again).
        self.fresh
            .retain(|h, at| set.contains(h.as_str()) && at.elapsed() < FRESH_FOR);
        let storage = Storage::of(acme);
        for host in wanted {
            if self.queued.contains(&host)
                || self.in_flight.contains(&host)
                || self.fresh.contains_key(&host)
            {
                continue;
            }
            if !self.backoff.contains_key(&host)
                && let Some(s) = storage.state(&host).filter(|s| s.state == "failed")
            {
                let until = s.retry_at.unwrap_or(0);
                self.backoff.insert(
                    host.clone(),
                    Backoff {
                        failures: s.failures,
                        until,
                    },
                );
            }
            self.queued.insert(host.clone());
            self.queue.push_back(host);
        }
    }

    /// Starts orders, front of the queue first, skipping hosts backing off, until
    /// `orders_in_flight` run.
    fn start(&mut self, acme: &Acme) {
        let Some((_, client)) = self.client.clone() else {
            return;
        };
        let now = unix_now();
        let mut i = 0;
        while self.running.len() < acme.orders_in_flight && i < self.queue.len() {
            let ready = self
                .backoff
                .get(&self.queue[i])
                .is_none_or(|b| now >= b.until);
            if !ready {
                i += 1;
                continue;
            }
            let Some(host) = self.queue.remove(i) else {
                break;
            };
            self.queued.remove(&host);
            self.in_flight.insert(host.clone());
            let failures = self.backoff.get(&host).map_or(0, |b| b.failures);
            let task = order_task(
                self.gw.clone(),
                acme.clone(),
                client.clone(),
                host.clone(),
                failures,
            );
            self.running.spawn(async move { (host, task.await) });
        }
    }

    /// RFC 9773 §4.3: asks the CA's renewal window for issued certificates not asked about
    /// yet (what storage recorded first, after a restart) or due to be asked again, a few per
    /// look.
    fn ask_renewal_info(&mut self, table: &Table, acme: &Acme) {
        let Some((_, client)) = self.client.clone() else {
            return;
        };
        if !client.has_ari() {
            return;
        }
        let now = unix_now();
        let storage = Storage::of(acme);
        let issued = table
            .tenants
            .iter()
            .filter(|t| t.edition != Edition::Free)
            .flat_map(|t| t.logons.iter().filter(|l| l.enabled))
            .filter_map(|l| {
                let c = table.cert_for(l.host.as_str())?;
                crate::acme::is_issued(table, c).then_some((l.host.as_str(), c))
            });
        for (host, cert) in issued {
            if self.ari_checks.len() >= ARI_PER_LOOK {
                break;
            }
            let Ok(leaf) = cert.key.end_entity_cert() else {
                continue;
            };
            let known = self.ari.get(host);
            if known.is_some_and(|a| now < a.next_check) {
                continue;
            }
            let serial = crate::acme::order::serial_hex(leaf);
            if known.is_none()
                && let Some(s) = storage.state(host)
                && s.renew_serial.as_deref() == Some(serial.as_str())
            {
                // Recorded before a restart: trusted until it is due to be asked again.
                self.ari.insert(
                    host.to_owned(),
                    Ari {
                        serial,
                        renew_at: s.renew_at,
                        next_check: s.at + ARI_MIN_AGAIN.as_secs() as i64,
                    },
                );
                continue;
            }
            // Not asked twice at once: the answer sets the next time.
            self.ari.insert(
                host.to_owned(),
                Ari {
                    serial: serial.clone(),
                    renew_at: known.and_then(|a| a.renew_at),
                    next_check: i64::MAX,
                },
            );
            let (client, leaf, host) = (client.clone(), leaf.clone().into_owned(), host.to_owned());
            self.ari_checks.spawn(async move {
                let said = client.renewal_at(&leaf).await;
                (host, serial, said)
            });
        }
    }

    /// Keeps what the CA said of `host`'s renewal window, in memory and in storage.
    fn renewal_info(&mut self, host: String, serial: String, said: Option<RenewalWindow>) {
        let now = unix_now();
        let again = said.map_or(ARI_MAX_AGAIN / 4, |(_, d)| {
            d.clamp(ARI_MIN_AGAIN, ARI_MAX_AGAIN)
        });
        let renew_at = said.map(|(at, _)| at);
        self.ari.insert(
            host.clone(),
            Ari {
                serial: serial.clone(),
                renew_at,
                next_check: now + again.as_secs() as i64,
            },
        );
        let Some(acme) = self.gw.snapshot().table.settings.acme.clone() else {
            return;
        };
        let storage = Storage::of(&acme);
        let mut state = storage.state(&host).unwrap_or_else(|| HostState {
            state: "valid".into(),
            at: now,
            ..HostState::default()
        });
        state.renew_at = renew_at;
        state.renew_serial = Some(serial);
        if let Err(e) = storage.set_state(&host, &state) {
            tracing::warn!(error = %crate::error::sentence(&e), "cannot record the ACME state");
        }
        if let Some(at) = renew_at {
            tracing::debug!(%host, renew_at = at, "ACME renewal window");
        }
    }

    /// Records what an order task came back with.
    fn finish(&mut self, joined: Result<(String, Done), tokio::task::JoinError>) {
        let Ok((host, done)) = joined else {
            // A panicked order task: its host stays in `in_flight` and is not ordered again
            // until a restart, rather than in a loop.
            tracing::error!("an ACME order task failed");
            return;
        };
        self.in_flight.remove(&host);
        let Some(acme) = self.gw.snapshot().table.settings.acme.clone() else {
            return;
        };
        let storage = Storage::of(&acme);
        let (result, retry_after, label) = match done {
            Done::Busy => {
                let b = self.backoff.entry(host).or_default();
                b.until = b.until.max(unix_now() + BUSY_WAIT.as_secs() as i64);
                return;
            }
            Done::Skipped(e) => (Err(e), None, "skipped"),
            Done::Ordered(Outcome {
                result,
                retry_after,
            }) => {
                let label = if result.is_ok() { "ok" } else { "failed" };
                (result, retry_after, label)
            }
        };
        self.gw
            .metrics
            .acme_orders
            .get_or_create(&crate::telemetry::metrics::ResultLabel { result: label })
            .inc();
        let state = match result {
            Ok(issued) => {
                self.backoff.remove(&host);
                self.fresh.insert(host.clone(), Instant::now());
                self.ari.insert(
                    host.clone(),
                    Ari {
                        serial: issued.serial.clone(),
                        renew_at: issued.renew_at,
                        next_check: unix_now() + ARI_MIN_AGAIN.as_secs() as i64,
                    },
                );
                tracing::info!(%host, "certificate issued by the ACME CA");
                HostState {
                    state: "valid".into(),
                    at: unix_now(),
                    renew_at: issued.renew_at,
                    renew_serial: issued.renew_at.map(|_| issued.serial),
                    ..HostState::default()
                }
            }
            Err(e) => {
                let failures = self.backoff.get(&host).map_or(0, |b| b.failures) + 1;
                let wait = crate::acme::backoff(failures, retry_after, e.rate_limited());
                let until = unix_now() + wait.as_secs() as i64;
                self.backoff
                    .insert(host.clone(), Backoff { failures, until });
                let reason = crate::error::sentence(&e);
                tracing::warn!(%host, error = %reason, problem = e.problem_type().unwrap_or("-"), retry_in = ?wait, "ACME order failed");
                HostState {
                    state: "failed".into(),
                    reason: Some(reason),
                    at: unix_now(),
                    failures,
                    retry_at: Some(until),
                    ..HostState::default()
                }
            }
        };
        if let Err(e) = storage.set_state(&host, &state) {
            tracing::warn!(error = %crate::error::sentence(&e), "cannot record the ACME state");
        }
    }
}

/// When the issued certificates' folder last changed (a file written into it is renamed in).
fn certs_changed(acme: &Acme) -> Option<SystemTime> {
    std::fs::metadata(acme.certs_dir())
        .and_then(|m| m.modified())
        .ok()
}

/// The files in `dir` modified at `since` or later; `None` if there are none (a file was
/// removed) or the folder cannot be read.
fn written_since(dir: &std::path::Path, since: SystemTime) -> Option<Vec<std::path::PathBuf>> {
    let files: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since)
        })
        .map(|e| e.path())
        .collect();
    (!files.is_empty()).then_some(files)
}

/// One host's order: its lock, the checks right before ordering, then the order itself.
async fn order_task(
    gw: Arc<Gateway>,
    acme: Acme,
    client: Arc<Client>,
    host: String,
    failures: u32,
) -> Done {
    let storage = Storage::of(&acme);
    let _lock = match storage.lock(&host) {
        Ok(Some(lock)) => lock,
        Ok(None) => return Done::Busy,
        Err(e) => return Done::Skipped(e),
    };
    let snap = gw.snapshot();
    if let Err(e) = crate::acme::ready_to_order(&snap.table, &acme, &host).await {
        return Done::Skipped(e);
    }
    Done::Ordered(client.issue(&acme, &storage, &host, failures).await)
}
