//! Serving threads: one single-threaded tokio runtime per core, each serving the connections
//! handed to it from accept to close, as nginx's and HAProxy's workers do.
//!
//! The accept loops hand each new connection to the thread serving the fewest. A connection's
//! task, the tasks hyper spawns for its HTTP/2 streams and the backend connections its
//! requests use (the pool keeps one idle list per thread) all run on one thread, so a request
//! never waits for a wake-up from another thread, and no task migrates between cores. The accept loops, reloads and the admin endpoint stay on the main runtime.
//!
//! When the scheduler puts two busy serving threads on one core, the one it preempts waits a
//! whole scheduler tick (4 ms on a 250 Hz kernel) with all its connections, which was the
//! HTTP/1.1 p99 under load. So each serving thread publishes the CPU it runs on, and every
//! [`CHECK_EVERY`] requests yields that CPU if another serving thread, awake, was last seen
//! on it: two threads stacked on one core then take turns every few requests instead of every
//! tick, as one thread serving both halves would.
//!
//! With `LOGON_GATE_CPU_AFFINITY=1` each serving thread is also pinned to one CPU (as nginx's
//! `worker_cpu_affinity auto` or HAProxy's `cpu-map` do). Off by default: on a dedicated host
//! it cuts the HTTP/1.1 tail latency (the scheduler no longer stacks two serving threads on
//! one core), but on a host whose cores are busy with other processes a pinned thread cannot
//! move away from them (benches/load/README.md has both measurements).

use std::cell::{Cell, OnceCell};
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::watch;

thread_local! {
    /// 1 + this thread's index among the serving threads; 0 on any other thread.
    static SHARD: Cell<usize> = const { Cell::new(0) };
    /// On a serving thread: where its fellow serving threads were last seen.
    static PEERS: OnceCell<Seen> = const { OnceCell::new() };
    /// Requests this thread has started, for [`checkpoint`].
    static REQUESTS: Cell<u32> = const { Cell::new(0) };
}

/// Per serving thread, the CPU it was last seen running on, or [`ASLEEP`].
type Seen = Arc<[AtomicUsize]>;

/// Published by a serving thread that waits for events: it wants no CPU.
const ASLEEP: usize = usize::MAX;

/// How many requests a serving thread starts between two looks at where its peers are. At
/// about 30,000 requests per second and thread, 16 is a look every half millisecond: well
/// below the 4 ms a preempted thread otherwise waits, for one `sched_getcpu` (vDSO) per 16
/// requests and a `sched_yield` only when stacked. (4, 8, 16 and 32 all gave an HTTP/1.1 p99
/// of 1.4 to 2.2 ms; benches/load/README.md.)
pub const CHECK_EVERY: u32 = 16;

/// Called as each request starts. Every [`CHECK_EVERY`] requests on a serving thread, yields
/// the CPU if another serving thread is waiting for it (see the module doc). Returns whether
/// it yielded.
pub fn checkpoint() -> bool {
    let me = shard();
    if me == 0 {
        return false;
    }
    let n = REQUESTS.with(|r| {
        let n = r.get().wrapping_add(1);
        r.set(n);
        n
    });
    if !n.is_multiple_of(CHECK_EVERY) {
        return false;
    }
    PEERS.with(|p| p.get().is_some_and(|seen| yield_if_stacked(seen, me - 1)))
}

/// Publishes where thread `me` runs and yields if another awake thread was last seen there.
fn yield_if_stacked(seen: &[AtomicUsize], me: usize) -> bool {
    let Ok(cpu) = nix::sched::sched_getcpu() else {
        return false;
    };
    seen[me].store(cpu, Ordering::Relaxed);
    if !other_on(seen, me, cpu) {
        return false;
    }
    // A peer that is awake (it has not parked) and last ran here, where this thread runs now,
    // is waiting for this CPU. A stale entry (it has moved since) costs one yield to whatever
    // else waits here, or nothing if nothing does.
    let _ = nix::sched::sched_yield();
    true
}

/// Whether a thread other than `me` was last seen awake on `cpu`.
fn other_on(seen: &[AtomicUsize], me: usize, cpu: usize) -> bool {
    cpu != ASLEEP
        && seen
            .iter()
            .enumerate()
            .any(|(k, s)| k != me && s.load(Ordering::Relaxed) == cpu)
}

/// Publishes that serving thread `i` is awake on the CPU it runs on now.
fn publish_awake(seen: &[AtomicUsize], i: usize) {
    if let Ok(cpu) = nix::sched::sched_getcpu() {
        seen[i].store(cpu, Ordering::Relaxed);
    }
}

/// Which serving thread this is (1-based), or 0 on any other thread: for per-thread state.
pub fn shard() -> usize {
    SHARD.with(Cell::get)
}

/// The serving threads. They end once [`Workers::finish`] is called (after the graceful
/// shutdown), or when this is dropped.
pub struct Workers {
    handles: Vec<Handle>,
    /// Connections being served by each thread.
    load: Arc<[AtomicUsize]>,
    /// Where the search for the least busy thread starts, so that ties go round.
    next: AtomicUsize,
    done: watch::Sender<bool>,
}

/// Counts a connection against its thread while it lives.
struct Load(Arc<[AtomicUsize]>, usize);

impl Drop for Load {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Starts `n` serving threads (at least one); with `pin`, thread `i` runs only on the
    /// `i`-th CPU this process may use (round robin when there are more threads than CPUs).
    pub fn start(n: usize, pin: bool) -> io::Result<Workers> {
        let (done, done_rx) = watch::channel(false);
        let mut handles = Vec::new();
        let cpus = if pin { allowed_cpus()? } else { Vec::new() };
        let n = n.max(1);
        let seen: Seen = (0..n).map(|_| AtomicUsize::new(ASLEEP)).collect();
        for i in 0..n {
            let (parks, unparks) = (seen.clone(), seen.clone());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(move || parks[i].store(ASLEEP, Ordering::Relaxed))
                .on_thread_unpark(move || publish_awake(&unparks, i))
                .build()?;
            handles.push(rt.handle().clone());
            let mut done_rx = done_rx.clone();
            let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            let peers = seen.clone();
            std::thread::Builder::new()
                .name(format!("logon-gate-{i}"))
                .spawn(move || {
                    SHARD.with(|s| s.set(i + 1));
                    PEERS.with(|p| {
                        let _ = p.set(peers);
                    });
                    if let Some(cpu) = cpu
                        && let Err(e) = pin_current_thread(cpu)
                    {
                        tracing::warn!(thread = i, cpu, error = %e, "cannot pin a serving thread to its CPU; it runs unpinned");
                    }
                    rt.block_on(async move {
                        let _ = done_rx.wait_for(|d| *d).await;
                    });
                })?;
        }
        let load = (0..handles.len()).map(|_| AtomicUsize::new(0)).collect();
        Ok(Workers {
            handles,
            load,
            next: AtomicUsize::new(0),
            done,
        })
    }

    /// The number of serving threads: `TOKIO_WORKER_THREADS` if set, else one per core.
    pub fn default_count() -> usize {
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Whether to pin serving threads to CPUs: `LOGON_GATE_CPU_AFFINITY` (`1`, `true`, `on`;
    /// `0`, `false`, `off` or unset for no). Anything else is an error naming the variable.
    pub fn pin_from_env() -> Result<bool, String> {
        let Some(v) = std::env::var_os(AFFINITY_VAR) else {
            return Ok(false);
        };
        v.to_str().and_then(parse_switch).ok_or_else(|| {
            format!("{AFFINITY_VAR} must be 1, true, on, 0, false or off, not {v:?}")
        })
    }

    /// Serves a connection's task on the thread with the fewest connections.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let n = self.handles.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let pick = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| self.load[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        self.load[pick].fetch_add(1, Ordering::Relaxed);
        let load = Load(self.load.clone(), pick);
        self.handles[pick].spawn(async move {
            let _load = load;
            task.await;
        });
    }

    /// Ends the serving threads; tasks still running on them are dropped.
    pub fn finish(&self) {
        let _ = self.done.send(true);
    }
}

/// The environment variable that turns CPU pinning on.
pub const AFFINITY_VAR: &str = "LOGON_GATE_CPU_AFFINITY";

fn parse_switch(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" => Some(true),
        "0" | "false" | "off" | "" => Some(false),
        _ => None,
    }
}

/// The CPUs this process may run on (its affinity mask, which a cpuset or `taskset` narrows).
fn allowed_cpus() -> io::Result<Vec<usize>> {
    use nix::sched::{CpuSet, sched_getaffinity};
    use nix::unistd::Pid;
    let set = sched_getaffinity(Pid::from_raw(0)).map_err(io::Error::from)?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Restricts the calling thread to `cpu`.
fn pin_current_thread(cpu: usize) -> io::Result<()> {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    set.set(cpu).map_err(io::Error::from)?;
    // Pid 0 is the calling thread.
    sched_setaffinity(Pid::from_raw(0), &set).map_err(io::Error::from)
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tasks that stay open go to the thread serving the fewest, and run there.
    #[test]
    fn connections_go_to_the_least_busy_thread() {
        let workers = Workers::start(2, false).expect("threads");
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let (hold_tx, hold_rx) = watch::channel(false);
        for _ in 0..6 {
            let seen = seen_tx.clone();
            let mut hold = hold_rx.clone();
            workers.spawn(async move {
                let _ = seen.send(shard());
                let _ = hold.wait_for(|h| *h).await;
            });
        }
        let mut on = [0usize; 3];
        for _ in 0..6 {
            let s = seen_rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .expect("task ran");
            on[s] += 1;
        }
        assert_eq!(
            on,
            [0, 3, 3],
            "tasks per thread (none may run off the serving threads)"
        );
        let _ = hold_tx.send(true);
        // Each ended task gives its place back.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while workers.load.iter().any(|l| l.load(Ordering::Relaxed) != 0) {
            assert!(std::time::Instant::now() < deadline, "loads not released");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// With pinning, serving thread i runs only on the i-th allowed CPU (round robin).
    #[test]
    fn pinned_threads_run_on_one_cpu_each() {
        let allowed = allowed_cpus().expect("affinity readable");
        assert!(!allowed.is_empty());
        let n = 3;
        let workers = Workers::start(n, true).expect("threads");
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let (hold_tx, hold_rx) = watch::channel(false);
        // Held open so that the three tasks land on the three threads.
        for _ in 0..n {
            let seen = seen_tx.clone();
            let mut hold = hold_rx.clone();
            workers.spawn(async move {
                let _ = seen.send((shard(), allowed_cpus().expect("affinity readable")));
                let _ = hold.wait_for(|h| *h).await;
            });
        }
        let mut got: Vec<(usize, Vec<usize>)> = (0..n)
            .map(|_| {
                seen_rx
                    .recv_timeout(std::time::Duration::from_secs(5))
                    .expect("task ran")
            })
            .collect();
        got.sort();
        let want: Vec<(usize, Vec<usize>)> = (0..n)
            .map(|i| (i + 1, vec![allowed[i % allowed.len()]]))
            .collect();
        assert_eq!(got, want, "(thread, CPUs it may run on)");
        let _ = hold_tx.send(true);
    }

    /// Only another thread, awake and last seen on this CPU, counts as waiting for it.
    #[test]
    fn a_peer_counts_as_waiting_only_on_this_cpu_and_awake() {
        let seen: Seen = [3, ASLEEP, 5].map(AtomicUsize::new).into();
        assert!(!other_on(&seen, 0, 3), "this thread itself");
        assert!(other_on(&seen, 1, 3), "thread 0 was seen on CPU 3");
        assert!(other_on(&seen, 0, 5), "thread 2 was seen on CPU 5");
        assert!(!other_on(&seen, 0, 4), "nobody on CPU 4");
        assert!(!other_on(&seen, 0, ASLEEP), "an asleep thread wants no CPU");
    }

    /// Two busy threads on one CPU yield to each other; on two CPUs they never do.
    #[test]
    fn stacked_threads_yield_and_apart_they_do_not() {
        let allowed = allowed_cpus().expect("affinity readable");
        let run = |cpus: [usize; 2]| -> [u32; 2] {
            let seen: Seen = (0..2).map(|_| AtomicUsize::new(ASLEEP)).collect();
            let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
            let threads: Vec<_> = (0..2)
                .map(|i| {
                    let seen = seen.clone();
                    std::thread::spawn(move || {
                        pin_current_thread(cpus[i]).expect("pin");
                        let mut yields = 0;
                        while std::time::Instant::now() < until {
                            yields += u32::from(yield_if_stacked(&seen, i));
                        }
                        yields
                    })
                })
                .collect();
            let mut out = [0; 2];
            for (o, t) in out.iter_mut().zip(threads) {
                *o = t.join().expect("thread");
            }
            out
        };
        let [a, b] = run([allowed[0], allowed[0]]);
        assert!(
            a > 0 && b > 0,
            "both threads on one CPU: {a} and {b} yields"
        );
        if let Some(&other) = allowed.get(1) {
            assert_eq!(run([allowed[0], other]), [0, 0], "threads on two CPUs");
        }
    }

    #[test]
    fn the_switch_reads_the_usual_spellings() {
        assert_eq!(parse_switch("1"), Some(true));
        assert_eq!(parse_switch(" On "), Some(true));
        assert_eq!(parse_switch("false"), Some(false));
        assert_eq!(parse_switch(""), Some(false));
        assert_eq!(parse_switch("2"), None);
    }
}
