//! HTTP/2 streams run inside their connection's task instead of a task each.
//!
//! hyper hands every HTTP/2 stream to an executor. With tokio's, each stream is a task of its
//! own: spawned, scheduled and woken separately from the connection task that reads and writes
//! its frames, so a request crosses two task switches on the client side alone. Here the
//! connection's future polls its streams itself ([`WithStreams`]): a stream that finishes its
//! response hands it to the connection without waking another task, and the connection,
//! polled right after its streams, writes it in the same poll.
//!
//! Knowing when the last stream has ended also gives HTTP/2 the idle timeout an nginx operator
//! expects ([`WithStreams::closing`]): a connection with no open stream for `keepalive_timeout`
//! is sent GOAWAY and closed. It takes one clock read each time the connection runs out of
//! streams and a timer reset at most once per timeout, where hyper's keep-alive pings, which it
//! replaces, took a lock, a clock read and a timer poll for every frame received.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;
use tokio::time::{Instant, Sleep};

/// A stream's future, boxed as it came from hyper. A panic in its poll ends it alone, as it
/// did as a task of its own (the panic hook has reported it by then); catching it here, not
/// in a wrapper around the future, keeps the future from being copied once more on its way
/// into the box (hyper's stream futures are large: docs/performance.md).
struct StreamTask(Pin<Box<dyn Future<Output = ()> + Send>>);

impl Future for StreamTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Unwinding costs nothing until something panics.
        std::panic::catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx)))
            .unwrap_or(Poll::Ready(()))
    }
}

/// The executor hyper is given: it queues each stream for the [`WithStreams`] that owns it.
#[derive(Clone, Default)]
pub struct StreamExec {
    shared: Arc<StreamInbox>,
}

#[derive(Default)]
struct StreamInbox {
    inbox: Mutex<Vec<StreamTask>>,
    /// The owning task, woken when a stream arrives from outside its poll.
    task: AtomicWaker,
    /// Set while the owning task is polled, until it has drained the inbox for the last time:
    /// a stream queued meanwhile, or a wake-up of the connection, needs no wake-up of the
    /// task (a wake-up of the connection only sets `conn_woken`).
    polling: AtomicBool,
    /// The connection asked to be polled again, through the waker it is polled with.
    conn_woken: AtomicBool,
}

/// The connection's waker. h2 wakes it whenever a stream queues a frame; in the owning task's
/// own poll that is every stream that answers, and waking the task would only poll it again
/// for what this poll does anyway (see [`WithStreams::poll`]).
impl std::task::Wake for StreamInbox {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.conn_woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let stream = StreamTask(Box::pin(fut));
        self.shared
            .inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(stream);
        // hyper spawns streams while the connection is being polled, and that poll drains the
        // inbox right after: waking the task then would only poll it once more for nothing.
        if !self.shared.polling.load(Ordering::SeqCst) {
            self.shared.task.wake();
        }
    }
}

impl StreamExec {
    /// A future that polls `conn` and every stream spawned on this executor, and ends with
    /// `conn`'s output once `conn` has ended and its last stream has finished.
    pub fn run<F: Future>(self, conn: F) -> WithStreams<F> {
        // Polled first thing: nothing has been registered to wake it yet.
        self.shared.conn_woken.store(true, Ordering::SeqCst);
        WithStreams {
            conn_waker: std::task::Waker::from(self.shared.clone()),
            conn: Box::pin(conn),
            done: None,
            exec: self,
            streams: FuturesUnordered::new(),
            closing: None,
        }
    }
}

/// How long a connection closed for idling may take over its GOAWAY (hyper's HTTP/2 graceful
/// close waits for the client's answer to a PING) before it is dropped: a client that vanished
/// without a FIN never answers.
pub const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(10);

/// When and how [`WithStreams`] asks its connection to close.
struct Closing<F> {
    /// Starts the connection's graceful close (GOAWAY, then close once its streams are done).
    close: fn(Pin<&mut F>),
    /// Resolves when the gateway stops; `None` once it has.
    stop: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The idle timeout, for connections that have one.
    idle: Option<IdleClose>,
    /// The close was asked for (by a stop or by idling).
    asked: bool,
}

/// A connection's idle timeout and, once it ran out, the grace time of its close.
struct IdleClose {
    /// Close after this long without an open stream.
    after: Duration,
    /// When the connection last ran out of streams (`None` while it has some).
    since: Option<Instant>,
    /// The idle deadline, then the grace deadline. Armed lazily: it may fire early, and is
    /// set again from `since` when it does.
    timer: Pin<Box<Sleep>>,
    /// The close was asked for by idling: `timer` now runs out [`IDLE_CLOSE_GRACE`].
    expired: bool,
}

/// What [`Closing::poll`] wants done.
enum CloseStep {
    Wait,
    /// Ask the connection to close, then poll it so it starts.
    Close,
    /// The connection idled, was asked to close, and has not within the grace time.
    GiveUp,
}

impl<F> Closing<F> {
    /// Called after the streams were polled: `idle_now` when there are none left, `became_idle`
    /// when that is new in this poll.
    fn poll(&mut self, cx: &mut Context<'_>, idle_now: bool, became_idle: bool) -> CloseStep {
        if let Some(stop) = &mut self.stop
            && stop.as_mut().poll(cx).is_ready()
        {
            self.stop = None;
            if !self.asked {
                self.asked = true;
                return CloseStep::Close;
            }
        }
        match &mut self.idle {
            Some(idle) if idle.expired => idle.poll_grace(cx),
            Some(idle) if !self.asked => {
                let step = idle.poll(cx, idle_now, became_idle);
                self.asked = matches!(step, CloseStep::Close);
                step
            }
            _ => CloseStep::Wait,
        }
    }
}

impl IdleClose {
    fn new(after: Duration) -> IdleClose {
        let now = Instant::now();
        IdleClose {
            after,
            since: Some(now),
            timer: Box::pin(tokio::time::sleep_until(now + after)),
            expired: false,
        }
    }

    /// [`CloseStep::Close`] once the connection has had no stream for `after`.
    fn poll(&mut self, cx: &mut Context<'_>, idle_now: bool, became_idle: bool) -> CloseStep {
        if !idle_now {
            // Busy: the timer is left as it is (it may wake the task once, for nothing).
            self.since = None;
            return CloseStep::Wait;
        }
        let since = match self.since {
            Some(t) if !became_idle => t,
            _ => *self.since.insert(Instant::now()),
        };
        if self.timer.as_mut().poll(cx).is_pending() {
            return CloseStep::Wait;
        }
        let now = Instant::now();
        if now < since + self.after {
            // Armed for an earlier idle period: wait out this one.
            self.timer.as_mut().reset(since + self.after);
            if self.timer.as_mut().poll(cx).is_pending() {
                return CloseStep::Wait;
            }
        }
        self.expired = true;
        self.timer.as_mut().reset(now + IDLE_CLOSE_GRACE);
        CloseStep::Close
    }

    /// [`CloseStep::GiveUp`] once the close asked for has taken [`IDLE_CLOSE_GRACE`].
    fn poll_grace(&mut self, cx: &mut Context<'_>) -> CloseStep {
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => CloseStep::GiveUp,
            Poll::Pending => CloseStep::Wait,
        }
    }
}

/// A connection with its streams; see [`StreamExec::run`].
pub struct WithStreams<F: Future> {
    conn: Pin<Box<F>>,
    /// Wakes this task through [`StreamInbox`], for the connection.
    conn_waker: std::task::Waker,
    done: Option<F::Output>,
    exec: StreamExec,
    streams: FuturesUnordered<StreamTask>,
    closing: Option<Closing<F>>,
}

impl<F: Future> Unpin for WithStreams<F> {}

impl<F: Future> WithStreams<F> {
    /// Asks the connection to close, through `close`, once `stop` resolves, and, with `idle`,
    /// once it has had no open stream for that long. A connection closed for idling that has
    /// not ended [`IDLE_CLOSE_GRACE`] later is dropped, and the future ends with `None`.
    pub fn closing(
        mut self,
        close: fn(Pin<&mut F>),
        stop: impl Future<Output = ()> + Send + 'static,
        idle: Option<Duration>,
    ) -> Self {
        self.closing = Some(Closing {
            close,
            stop: Some(Box::pin(stop)),
            idle: idle.map(IdleClose::new),
            asked: false,
        });
        self
    }
}

impl<F: Future> Future for WithStreams<F> {
    /// The connection's output; `None` if it was dropped (see [`WithStreams::closing`]).
    type Output = Option<F::Output>;

    /// Polls the woken streams first and the connection after them, so that the responses
    /// the streams queued go out in the connection's poll right away, in one write. (Polled
    /// the other way round, the connection wrote what the streams had queued in the task's
    /// previous poll, and h2 woke the task once more for every poll in which streams
    /// answered.) Streams the connection accepts are polled in the same poll too, and the
    /// connection again if they queued frames. The connection is polled only when its own
    /// waker was woken, as a future expects: not when the task was woken for a stream that
    /// queued nothing (one waiting for the backend).
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let shared = &this.exec.shared;
        shared.task.register(cx.waker());
        let mut poll_conn = false;
        let mut had_streams = false;
        loop {
            shared.polling.store(true, Ordering::SeqCst);
            this.streams.extend(
                shared
                    .inbox
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .drain(..),
            );
            had_streams |= !this.streams.is_empty();
            // FuturesUnordered yields (and wakes this task) after a bounded number of polls, so
            // a burst of ready streams cannot starve the thread's other connections.
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            // Woken: by its I/O or timers, by h2 for frames the streams above queued, or
            // asked to close.
            if shared.conn_woken.swap(false, Ordering::SeqCst) || poll_conn {
                poll_conn = false;
                if this.done.is_none()
                    && let Poll::Ready(out) = this
                        .conn
                        .as_mut()
                        .poll(&mut Context::from_waker(&this.conn_waker))
                {
                    this.done = Some(out);
                }
            }
            {
                // Streams the connection accepted get their first poll at once.
                let inbox = shared.inbox.lock().unwrap_or_else(PoisonError::into_inner);
                if !inbox.is_empty() {
                    continue;
                }
                // Cleared under the lock: a stream queued after this finds it clear and wakes.
                // SeqCst, as in the wakers: a wake-up from another thread is either seen
                // below or wakes the task itself.
                shared.polling.store(false, Ordering::SeqCst);
            }
            // Woken since its last poll here (it yielded, or a stream queued frames after it).
            if shared.conn_woken.load(Ordering::SeqCst) {
                cx.waker().wake_by_ref();
            }
            let idle = this.streams.is_empty();
            if idle && let Some(out) = this.done.take() {
                return Poll::Ready(Some(out));
            }
            let Some(closing) = this.closing.as_mut().filter(|_| this.done.is_none()) else {
                return Poll::Pending;
            };
            match closing.poll(cx, idle, had_streams && idle) {
                CloseStep::Wait => return Poll::Pending,
                CloseStep::GiveUp => return Poll::Ready(None),
                // Polled again at once: the connection starts its close in its next poll.
                CloseStep::Close => {
                    (closing.close)(this.conn.as_mut());
                    poll_conn = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use tokio::sync::oneshot;

    /// Runs a connection future on `exec` that ends, giving `out`, once the sender is used.
    fn conn_until_told<T: Send + 'static>(
        exec: &StreamExec,
        out: T,
    ) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Option<T>>) {
        let (end_conn, conn_ends) = oneshot::channel::<()>();
        let run = tokio::spawn(exec.clone().run(async move {
            let _ = conn_ends.await;
            out
        }));
        (end_conn, run)
    }

    #[tokio::test]
    async fn ends_only_after_the_connection_and_its_last_stream() {
        let exec = StreamExec::default();
        let (release, held) = oneshot::channel::<()>();
        let (finished_tx, mut finished) = oneshot::channel::<()>();
        let spawner = exec.clone();
        // A "connection" that spawns one stream while polled, then ends at once.
        let conn = async move {
            spawner.execute(async move {
                let _ = held.await;
                let _ = finished_tx.send(());
            });
            "conn done"
        };
        let mut run = tokio::spawn(exec.run(conn));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !run.is_finished(),
            "ended while its stream was still running"
        );
        release.send(()).expect("stream alive");
        let out = (&mut run).await.expect("join");
        assert_eq!(out, Some("conn done"));
        assert!(
            finished.try_recv().is_ok(),
            "the stream did not run to its end"
        );
    }

    /// A connection stand-in that counts its polls and "writes" a frame a stream queued.
    #[derive(Default)]
    struct Writer {
        polls: std::sync::atomic::AtomicUsize,
        queued: AtomicBool,
        written: std::sync::atomic::AtomicUsize,
        waker: Mutex<Option<std::task::Waker>>,
    }

    #[tokio::test]
    async fn what_a_stream_queues_goes_out_in_the_same_poll() {
        let exec = StreamExec::default();
        let w = Arc::new(Writer::default());
        let (answer_tx, answer_rx) = oneshot::channel::<()>();
        // Once told, the stream queues a frame and wakes the connection, as h2's
        // `send_response` does.
        let sw = w.clone();
        exec.execute(async move {
            let _ = answer_rx.await;
            sw.queued.store(true, Ordering::SeqCst);
            if let Some(waker) = sw.waker.lock().expect("lock").take() {
                waker.wake();
            }
        });
        let cw = w.clone();
        let conn = std::future::poll_fn(move |cx| {
            cw.polls.fetch_add(1, Ordering::SeqCst);
            if cw.queued.swap(false, Ordering::SeqCst) {
                cw.written.fetch_add(1, Ordering::SeqCst);
            }
            *cw.waker.lock().expect("lock") = Some(cx.waker().clone());
            Poll::<()>::Pending
        });
        let run = tokio::spawn(exec.run(conn));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = w.polls.load(Ordering::SeqCst);
        answer_tx.send(()).expect("stream alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            w.written.load(Ordering::SeqCst),
            1,
            "the frame was not written"
        );
        // Polled before its streams, the connection would write only in a second poll.
        assert_eq!(
            w.polls.load(Ordering::SeqCst) - before,
            1,
            "the connection was polled again for what its stream queued"
        );
        run.abort();
    }

    #[tokio::test]
    async fn a_stream_that_panics_ends_alone() {
        let exec = StreamExec::default();
        let (end_conn, run) = conn_until_told(&exec, "conn done");
        let (release, held) = oneshot::channel::<()>();
        let (tx, rx) = oneshot::channel();
        exec.execute(async move {
            let _ = held.await;
            let _ = tx.send("survivor done");
        });
        exec.execute(async { panic!("a stream's own bug") });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        release.send(()).expect("survivor alive");
        assert_eq!(rx.await.ok(), Some("survivor done"));
        end_conn.send(()).expect("conn alive");
        assert_eq!(
            run.await.expect("the connection's task panicked"),
            Some("conn done")
        );
    }

    #[tokio::test]
    async fn a_stream_spawned_from_outside_the_poll_runs() {
        let exec = StreamExec::default();
        let (end_conn, run) = conn_until_told(&exec, ());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let (tx, rx) = oneshot::channel();
        exec.execute(async move {
            let _ = tx.send(7);
        });
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await;
        assert_eq!(
            got.ok().and_then(Result::ok),
            Some(7),
            "the stream never ran"
        );
        end_conn.send(()).expect("conn alive");
        run.await.expect("join");
    }

    /// A connection that ends once asked to close, or, with `deaf`, never does; it counts the
    /// asks.
    struct Fake {
        asked: Arc<std::sync::atomic::AtomicU32>,
        deaf: bool,
    }

    impl Future for Fake {
        type Output = &'static str;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<&'static str> {
            if !self.deaf && self.asked.load(Ordering::SeqCst) > 0 {
                Poll::Ready("closed")
            } else {
                Poll::Pending
            }
        }
    }

    fn ask(c: Pin<&mut Fake>) {
        c.asked.fetch_add(1, Ordering::SeqCst);
    }

    fn fake(deaf: bool) -> (Fake, Arc<std::sync::atomic::AtomicU32>) {
        let asked = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let conn = Fake {
            asked: asked.clone(),
            deaf,
        };
        (conn, asked)
    }

    const IDLE: Duration = Duration::from_secs(60);

    /// `conn` run on `exec`, closed after `IDLE` without a stream, never stopped.
    fn closing_when_idle(exec: &StreamExec, conn: Fake) -> WithStreams<Fake> {
        exec.clone()
            .run(conn)
            .closing(ask, std::future::pending(), Some(IDLE))
    }

    /// `fut`'s output, or a failure once an hour of (paused, so instant) time has passed.
    async fn within_an_hour<T>(fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(3600), fut)
            .await
            .expect("still running after an hour")
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_asked_to_close_after_the_idle_time_and_not_before() {
        let exec = StreamExec::default();
        let (conn, asked) = fake(false);
        let start = Instant::now();
        let run = tokio::spawn(closing_when_idle(&exec, conn));
        assert_eq!(within_an_hour(run).await.expect("join"), Some("closed"));
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), IDLE, "closed after the wrong time");
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_time_counts_from_the_end_of_the_last_stream() {
        let exec = StreamExec::default();
        let (conn, asked) = fake(false);
        let start = Instant::now();
        let run = tokio::spawn(closing_when_idle(&exec, conn));
        // Streams back to back for two and a half idle times, with short gaps between.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let (done, wait) = oneshot::channel::<()>();
            exec.execute(async move {
                tokio::time::sleep(Duration::from_secs(25)).await;
                let _ = done.send(());
            });
            let _ = wait.await;
            assert_eq!(asked.load(Ordering::SeqCst), 0, "closed while in use");
        }
        let last_ended = start.elapsed();
        assert_eq!(last_ended, Duration::from_secs(150));
        assert_eq!(within_an_hour(run).await.expect("join"), Some("closed"));
        assert_eq!(start.elapsed() - last_ended, IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_ends_in_the_poll_it_began_in_still_counts_as_use() {
        let exec = StreamExec::default();
        let (conn, _) = fake(false);
        let start = Instant::now();
        let run = tokio::spawn(closing_when_idle(&exec, conn));
        tokio::time::sleep(Duration::from_secs(50)).await;
        exec.execute(async {});
        assert_eq!(within_an_hour(run).await.expect("join"), Some("closed"));
        assert_eq!(start.elapsed(), Duration::from_secs(50) + IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_does_not_close_after_idling_is_dropped_after_the_grace_time() {
        let exec = StreamExec::default();
        let (conn, asked) = fake(true);
        let start = Instant::now();
        let run = closing_when_idle(&exec, conn);
        assert_eq!(within_an_hour(run).await, None);
        assert_eq!(asked.load(Ordering::SeqCst), 1, "asked more than once");
        assert_eq!(start.elapsed(), IDLE + IDLE_CLOSE_GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_asks_at_once_and_without_an_idle_time_nothing_else_does() {
        let exec = StreamExec::default();
        let (conn, asked) = fake(false);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let stop = async move {
            let _ = stop_rx.await;
        };
        let mut run = tokio::spawn(exec.run(conn).closing(ask, stop, None));
        tokio::time::sleep(IDLE * 10).await;
        assert!(!run.is_finished(), "closed with no idle time set");
        assert_eq!(asked.load(Ordering::SeqCst), 0);
        let at = Instant::now();
        stop_tx.send(()).expect("run alive");
        assert_eq!((&mut run).await.expect("join"), Some("closed"));
        assert_eq!(at.elapsed(), Duration::ZERO);
        assert_eq!(asked.load(Ordering::SeqCst), 1);
    }
}
