//! HTTP/2 streams run inside their connection's task instead of a task each.
//!
//! hyper hands every HTTP/2 stream to an executor. With tokio's, each stream is a task of its
//! own: spawned, scheduled and woken separately from the connection task that reads and writes
//! its frames, so a request crosses two task switches on the client side alone. Here the
//! connection's future polls its streams itself ([`WithStreams`]): a stream that finishes its
//! response hands it to the connection without waking another task.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor hyper is given: it queues each stream for the [`WithStreams`] that owns it.
#[derive(Clone, Default)]
pub struct StreamExec {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    inbox: Mutex<Vec<Stream>>,
    /// The owning task, woken when a stream arrives from outside its poll.
    task: AtomicWaker,
    /// Set while the owning task is polled: it drains the inbox before it returns.
    polling: AtomicBool,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.shared
            .inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            // A stream that panics ends alone, as it did as a task of its own; the panic hook
            // has reported it by then. Unwinding costs nothing until something panics.
            .push(Box::pin(AssertUnwindSafe(fut).catch_unwind().map(drop)));
        // hyper spawns streams while the connection is being polled, and that poll drains the
        // inbox right after: waking the task then would only poll it once more for nothing.
        if !self.shared.polling.load(Ordering::Acquire) {
            self.shared.task.wake();
        }
    }
}

impl StreamExec {
    /// A future that polls `conn` and every stream spawned on this executor, and ends with
    /// `conn`'s output once `conn` has ended and its last stream has finished.
    pub fn run<F: Future>(self, conn: F) -> WithStreams<F> {
        WithStreams {
            conn: Box::pin(conn),
            done: None,
            exec: self,
            streams: FuturesUnordered::new(),
        }
    }
}

/// A connection with its streams; see [`StreamExec::run`].
pub struct WithStreams<F: Future> {
    conn: Pin<Box<F>>,
    done: Option<F::Output>,
    exec: StreamExec,
    streams: FuturesUnordered<Stream>,
}

impl<F: Future> Unpin for WithStreams<F> {}

impl<F: Future> Future for WithStreams<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let shared = &this.exec.shared;
        shared.task.register(cx.waker());
        shared.polling.store(true, Ordering::Release);
        if this.done.is_none()
            && let Poll::Ready(out) = this.conn.as_mut().poll(cx)
        {
            this.done = Some(out);
        }
        let mut inbox = shared.inbox.lock().unwrap_or_else(PoisonError::into_inner);
        this.streams.extend(inbox.drain(..));
        // Cleared under the lock: a stream queued after this drain finds it clear and wakes.
        shared.polling.store(false, Ordering::Release);
        drop(inbox);
        // FuturesUnordered yields (and wakes this task) after a bounded number of polls, so a
        // burst of ready streams cannot starve the thread's other connections.
        while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
        if this.streams.is_empty()
            && let Some(out) = this.done.take()
        {
            return Poll::Ready(out);
        }
        Poll::Pending
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
    ) -> (oneshot::Sender<()>, tokio::task::JoinHandle<T>) {
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
        assert_eq!(out, "conn done");
        assert!(
            finished.try_recv().is_ok(),
            "the stream did not run to its end"
        );
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
            "conn done"
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
}
