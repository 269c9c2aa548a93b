//! Idle HTTP/1.1 connections without hyper's buffers.
//!
//! hyper keeps, for every HTTP/1.1 connection for its whole life, a read buffer, a write
//! buffer and the last header map, and has no way to let them go while the connection idles
//! (docs/performance.md). With thousands of keep-alive connections from webmail clients
//! that is most of the gateway's memory. So, as nginx frees its request buffers between
//! keep-alive requests, a TLS HTTP/1.1 connection that has idled for [`PARK_AFTER`] is taken
//! back from hyper: hyper closes its side (its shutdown of the stream is turned into a flush),
//! its connection and buffers are dropped, and only the TLS stream is kept, its own buffers
//! released too (`tls_stream`), waiting for readability. When bytes arrive a new hyper
//! connection is built on the same stream; bytes hyper had read but not used are put back
//! (`Watched::put_back`) and served to it first. `framing::Watched` stays on the stream
//! throughout, so request counting, the smuggling check and the keep-alive deadline carry on.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::proxy::handler::Conn;
use crate::serve::h1::framing::Watched;
use crate::serve::tls_stream::TlsStream;
use crate::state::stopped;

/// How long an HTTP/1.1 connection idles before it is parked. Long enough that a browser's
/// burst of requests keeps its hyper connection; short next to `keepalive_timeout`.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// Boxed so that moving it between the parked and the served state moves a pointer (the
/// stream held by value took room several times over in the future that moves it).
type ParkableIo = Box<Watched<TlsStream<TcpStream>>>;

/// Serves HTTP/1.1 on a TLS connection until it closes, parking it whenever it idles (see the
/// module doc). `watcher` is held until the end so a graceful shutdown waits for it; `stop`
/// starts that shutdown here.
pub async fn serve(
    mut io: ParkableIo,
    conn: Arc<Conn>,
    watcher: Watcher,
    mut stop: watch::Receiver<bool>,
) {
    let _watcher = watcher;
    loop {
        // Boxed: the served stage (hyper's connection and its waits) takes room only while it
        // runs, not in the future that waits out a parked connection.
        let Some(back) = Box::pin(serve_until_idle(io, &conn, stop.clone())).await else {
            return;
        };
        io = back;
        // Bytes already taken off the socket would not wake a wait on it.
        if io.has_replay() || io.get_ref().has_buffered() {
            continue;
        }
        io.get_mut().release_buffers();
        let metrics = &conn.gateway.metrics;
        metrics.parked.inc();
        let deadline = io.idle_deadline();
        let woke = tokio::select! {
            r = io.get_ref().get_ref().readable() => r.is_ok(),
            _ = tokio::time::sleep_until(deadline) => false,
            _ = stopped(&mut stop) => false,
        };
        metrics.parked.dec();
        if !woke {
            // Keep-alive ran out or the gateway is stopping: close as hyper would have.
            let _ = io.shutdown().await;
            return;
        }
    }
}

/// Runs one hyper connection on `io` until it ends, or until it has idled for [`PARK_AFTER`]:
/// then returns the stream, with any bytes hyper read but did not use put back.
async fn serve_until_idle(
    io: ParkableIo,
    conn: &Arc<Conn>,
    mut stop: watch::Receiver<bool>,
) -> Option<ParkableIo> {
    let max_buf = io.max_head();
    let progress = &conn.framing;
    let svc_conn = conn.clone();
    let svc = service_fn(move |req| crate::serve::request(&svc_conn, req));
    let mut builder = http1::Builder::new();
    super::settings!(&mut builder, max_buf);
    let mut hc = Box::pin(
        builder
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades(),
    );
    let mut shutting_down = *stop.borrow();
    if shutting_down {
        hc.as_mut().graceful_shutdown();
    }
    let mut park_at = None;
    let mut parking = false;
    let ended = loop {
        // hyper wakes this task for every read and write; the other waits are polled only
        // when one of their own wakers fired (see `when_woken`).
        let mut waits = when_woken(next_event(
            conn,
            &mut stop,
            park_at,
            park_at.is_none() && !parking && !shutting_down,
            !shutting_down,
        ));
        let event = tokio::select! {
            r = hc.as_mut() => break r,
            Some(event) = waits.next() => event,
        };
        drop(waits);
        match event {
            Event::Idle(epoch) => park_at = Some((tokio::time::Instant::now() + PARK_AFTER, epoch)),
            Event::ParkTime => {
                // hyper is not running now (it runs inside this task's poll of `hc`), so "no
                // byte since the idle period began" means its buffers hold nothing.
                if let Some((_, epoch)) = park_at.take()
                    && progress.still_idle(epoch)
                    && !shutting_down
                {
                    parking = true;
                    progress.set_parking(true);
                    hc.as_mut().graceful_shutdown();
                }
            }
            Event::Stop => {
                shutting_down = true;
                hc.as_mut().graceful_shutdown();
            }
            Event::Abuse => return None,
        }
    };
    progress.set_parking(false);
    if let Err(e) = ended {
        tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
        return None;
    }
    if !parking {
        return None;
    }
    // `None`: upgraded to a tunnel, which now owns the stream.
    let parts = Pin::into_inner(hc).into_parts()?;
    let mut io = parts.io.into_inner();
    io.put_back(&parts.read_buf);
    Some(io)
}

/// What ends a wait of [`serve_until_idle`] other than hyper's connection.
enum Event {
    /// An idle period began; its number.
    Idle(u64),
    /// The idle period the park timer was set for may have lasted [`PARK_AFTER`].
    ParkTime,
    /// The gateway is stopping.
    Stop,
    /// The connection abandoned most of its requests.
    Abuse,
}

/// The next of the waits [`serve_until_idle`] keeps beside hyper's connection: the start of an
/// idle period (when `watch_idle`), the park timer (when set), the stop signal (when
/// `watch_stop`) and the abuse signal.
async fn next_event(
    conn: &Conn,
    stop: &mut watch::Receiver<bool>,
    park_at: Option<(tokio::time::Instant, u64)>,
    watch_idle: bool,
    watch_stop: bool,
) -> Event {
    tokio::select! {
        epoch = conn.framing.idle_began(), if watch_idle => Event::Idle(epoch),
        _ = sleep_until(park_at.map(|(at, _)| at)), if park_at.is_some() => Event::ParkTime,
        _ = stopped(stop), if watch_stop => Event::Stop,
        _ = conn.abuse.notified() => Event::Abuse,
    }
}

/// `fut`, to be polled only when one of its own wakers fired.
///
/// `tokio::select!` polls every branch each time the task wakes, and an HTTP/1.1
/// connection's task wakes for every read and write: its waits beside hyper's connection
/// (stop, abuse, park timer) were polled that often, each poll locking a `Notify`'s waiter
/// list (docs/performance.md). `FuturesUnordered` gives the future a waker
/// of its own and polls it only after that waker fired.
fn when_woken<F: Future>(fut: F) -> futures_util::stream::FuturesUnordered<F> {
    std::iter::once(fut).collect()
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::future::poll_fn;
    use std::task::{Context, Poll, Waker};

    use futures_util::StreamExt;

    use super::when_woken;

    #[test]
    fn when_woken_polls_its_future_only_after_its_waker_fired() {
        let polls = Cell::new(0);
        let waker = RefCell::new(None::<Waker>);
        let mut waits = when_woken(poll_fn(|cx| {
            polls.set(polls.get() + 1);
            *waker.borrow_mut() = Some(cx.waker().clone());
            if polls.get() == 3 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }));
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..5 {
            assert!(waits.poll_next_unpin(&mut cx).is_pending());
        }
        assert_eq!(polls.get(), 1, "polled again without a wake-up");
        waker.borrow_mut().take().expect("waker").wake();
        assert!(waits.poll_next_unpin(&mut cx).is_pending());
        assert!(waits.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(polls.get(), 2);
        waker.borrow_mut().take().expect("waker").wake();
        assert_eq!(waits.poll_next_unpin(&mut cx), Poll::Ready(Some(())));
    }
}
