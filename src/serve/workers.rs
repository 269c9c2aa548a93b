//! Serving threads: one single-threaded tokio runtime per core, each serving the connections
//! handed to it from accept to close, as nginx's and HAProxy's workers do.
//!
//! The accept loops hand each new connection to the thread serving the fewest. A connection's
//! task (which also polls its HTTP/2 streams, `serve::h2::streams`) and the backend
//! connections its requests use (the pool keeps one idle list per thread) all run on one
//! thread, so a request never waits for a wake-up from another thread, and no task migrates
//! between cores. The accept loops, reloads and the admin endpoint stay on the main runtime.
//!
//! A serving thread that has run for [`SLICE`] without sleeping offers its core to whatever
//! else waits for it (`sched_yield`). Otherwise the scheduler lets it run until its tick (4 ms
//! on a 250 Hz kernel) while what waits holds up requests: the other serving thread, when the
//! scheduler stacks both on one core (each such wait stalls every connection the waiting
//! thread serves, which showed in the HTTP/1.1 p99), or the backend, whose answers the thread
//! then waits for in turn (HTTP/2 throughput). Whether the thread slept is read from its
//! count of voluntary context switches: tokio's park hooks also run when the thread only
//! looked for events and found some, without sleeping.
//!
//! The thread looks at two points. Each time its run queue empties ([`at_park`]): everything
//! it has read has then been passed on, so a turn given away holds up nothing already taken
//! in. And every [`CHECK_EVERY`] HTTP/1.1 requests ([`checkpoint`]), since under HTTP/1.1
//! load the queue of a thread stacked on a busy core seldom empties. Not at HTTP/2 request
//! starts: those come in batches, taken from one read of a connection, and a turn given away
//! in the middle of one held the streams already taken in, and every answer queued behind
//! them, for the whole turn (docs/performance.md).
//!
//! With `LOGON_GATE_CPU_AFFINITY=1` each serving thread is also pinned to one CPU (as nginx's
//! `worker_cpu_affinity auto` or HAProxy's `cpu-map` do), so that the scheduler never stacks
//! two of them on one core. Off by default: since the slice above, stacking costs little, and
//! on a host whose cores are busy with other processes a pinned thread cannot move away from
//! them (docs/performance.md).

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::watch;

thread_local! {
    /// HTTP/1.1 requests this thread has started, for [`checkpoint`].
    static REQUESTS: Cell<u32> = const { Cell::new(0) };
    /// At the last look: the thread's voluntary context switches (how often it slept), and
    /// since when it has run without sleeping (as far as the looks can tell).
    static RUNNING: Cell<(std::ffi::c_long, Option<Instant>)> = const { Cell::new((-1, None)) };
}

/// How long a serving thread runs without sleeping before it offers its core: well below the
/// scheduler's 4 ms tick. Shorter and longer slices measured about alike
/// (docs/performance.md).
pub const SLICE: Duration = Duration::from_micros(500);

/// How many HTTP/1.1 requests a serving thread starts between two looks: often enough to
/// notice a slice's end under load, for a `getrusage` call and a vDSO clock read per 16
/// requests.
pub const CHECK_EVERY: u32 = 16;

/// Called as each HTTP/1.1 request starts. Every [`CHECK_EVERY`] requests on a serving thread,
/// yields the core if the thread has run for [`SLICE`] without sleeping (see the module doc).
/// Returns whether it yielded.
pub fn checkpoint() -> bool {
    if crate::shard::shard() == 0 {
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
    look(Instant::now())
}

/// Called (as tokio's park hook) each time a serving thread's run queue empties: yields the
/// core if the thread has run for [`SLICE`] without sleeping. Costs a clock read while the
/// last look is less than a slice old, so at most one `getrusage` per slice. Returns whether
/// it yielded.
pub fn at_park() -> bool {
    if crate::shard::shard() == 0 {
        return false;
    }
    let now = Instant::now();
    let (_, since) = RUNNING.with(Cell::get);
    if since.is_some_and(|t| now.saturating_duration_since(t) < SLICE) {
        return false;
    }
    look(now)
}

/// Yields if the thread has not slept since the last look and that look is a slice old;
/// otherwise notes when it was last seen to have slept. Returns whether it yielded.
fn look(now: Instant) -> bool {
    let Some(slept) = sleeps() else {
        return false;
    };
    let (last_slept, since) = RUNNING.with(Cell::get);
    let slept_since = slept != last_slept;
    if !slice_over(slept_since, since, now) {
        if slept_since {
            RUNNING.with(|r| r.set((slept, Some(now))));
        }
        return false;
    }
    // Cheap when nothing else waits for this core: the thread goes on at once.
    let _ = nix::sched::sched_yield();
    RUNNING.with(|r| r.set((slept, Some(Instant::now()))));
    true
}

/// How many times this thread has slept (its voluntary context switches).
fn sleeps() -> Option<std::ffi::c_long> {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
        .ok()
        .map(|u| u.voluntary_context_switches())
}

/// Whether a thread that has run without sleeping since `since` (and has not slept since the
/// last look, else `slept`) has had its slice by `now`.
fn slice_over(slept: bool, since: Option<Instant>, now: Instant) -> bool {
    !slept && since.is_some_and(|t| now.saturating_duration_since(t) >= SLICE)
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
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .on_thread_park(|| {
                    at_park();
                })
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let mut done_rx = done_rx.clone();
            let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            std::thread::Builder::new()
                .name(format!("logon-gate-{i}"))
                .spawn(move || {
                    crate::shard::set(i + 1);
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
                let _ = seen.send(crate::shard::shard());
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
                let _ = seen.send((
                    crate::shard::shard(),
                    allowed_cpus().expect("affinity readable"),
                ));
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

    /// The slice is over only once the thread has run SLICE without sleeping.
    #[test]
    fn the_slice_ends_after_slice_time_without_sleep() {
        let t = Instant::now();
        assert!(!slice_over(false, Some(t), t), "just started running");
        assert!(!slice_over(
            false,
            Some(t),
            t + SLICE - Duration::from_micros(1)
        ));
        assert!(slice_over(false, Some(t), t + SLICE));
        assert!(!slice_over(true, Some(t), t + SLICE), "slept since");
        assert!(
            !slice_over(false, Some(t + SLICE), t),
            "a clock read before"
        );
        assert!(!slice_over(false, None, t + SLICE), "first look");
    }

    /// Marks this thread as running, not asleep, since an hour from now: the slice cannot end
    /// during what follows, however slowly a loaded machine runs it.
    fn running_since_an_hour_from_now() {
        let far = Instant::now() + Duration::from_secs(3600);
        RUNNING.with(|r| r.set((sleeps().expect("getrusage"), Some(far))));
    }

    /// Runs, not asleep, for a whole slice.
    fn busy_for_a_slice() {
        RUNNING.with(|r| r.set((sleeps().expect("getrusage"), Some(Instant::now()))));
        let until = Instant::now() + SLICE;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }

    /// On a serving thread that runs without sleeping, a request start yields once every
    /// CHECK_EVERY requests once the slice is over, and not before; elsewhere never.
    #[test]
    fn checkpoints_yield_on_busy_serving_threads_once_the_slice_is_over() {
        assert!(!checkpoint(), "not a serving thread");
        let workers = Workers::start(1, false).expect("threads");
        let (tx, rx) = std::sync::mpsc::channel();
        workers.spawn(async move {
            running_since_an_hour_from_now();
            let fresh = (0..CHECK_EVERY * 4).filter(|_| checkpoint()).count();
            busy_for_a_slice();
            let due: Vec<bool> = (0..CHECK_EVERY).map(|_| checkpoint()).collect();
            let _ = tx.send((fresh, due));
        });
        let (fresh, due) = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("task ran");
        assert_eq!(fresh, 0, "yields within the slice");
        assert_eq!(
            due.iter().filter(|&&y| y).count(),
            1,
            "one yield per CHECK_EVERY requests once the slice is over: {due:?}"
        );
    }

    /// When its run queue empties, a busy serving thread yields once the slice is over, and
    /// not before (nor again before another slice); a thread that slept meanwhile does not.
    #[test]
    fn parks_yield_on_busy_serving_threads_once_the_slice_is_over() {
        assert!(!at_park(), "not a serving thread");
        let workers = Workers::start(1, false).expect("threads");
        let (tx, rx) = std::sync::mpsc::channel();
        workers.spawn(async move {
            running_since_an_hour_from_now();
            let fresh = at_park();
            busy_for_a_slice();
            let due = at_park();
            let again = at_park();
            // A slice old, but the thread slept since (one fewer sleep than it has now).
            let then = Instant::now() - SLICE;
            RUNNING.with(|r| r.set((sleeps().expect("getrusage") - 1, Some(then))));
            let slept = at_park();
            let noted = RUNNING.with(Cell::get).1.is_some_and(|t| t > then);
            let _ = tx.send((fresh, due, again, slept, noted));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("task ran");
        assert_eq!(
            got,
            (false, true, false, false, true),
            "(within the slice, after it, right after yielding, after a sleep, sleep noted)"
        );
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
