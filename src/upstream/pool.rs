//! The backend connection pool: idle HTTP/1.1 connections to the one backend, reused newest
//! first. A connection goes back to the pool when the response body it carried has been read to
//! its end; one abandoned mid-body, or upgraded, is closed instead. A request that a reused
//! connection could not even send (it had closed meanwhile) is retried on another.
//!
//! Each serving thread keeps its own connections. Once `queue_after_busy` of them are busy, a
//! further request waits for one to come back (first come, first served) rather than opening
//! another, but no longer than `queue_wait`: then it opens its own, so long polls holding
//! connections never hold other requests up for long. The default (512 per thread) is a
//! safety bound against a burst opening thousands of connections, not a tuning: a queue that
//! is reached under steady load sends the requests that waited one at a time, as connections
//! come back, where they would have gone out together; the backend and the clients then see
//! more, smaller writes, and the gateway more context switches (docs/performance.md).
//!
//! Written instead of hyper-util's legacy client because that one spawns a task per request to
//! watch the connection become idle again; the load profile showed its checkout and spawn as
//! the largest user-space cost on the forwarding path (docs/performance.md).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_utils::CachePadded;
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::TrySendError;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::config::Backend;
use crate::upstream::body::RequestBody;

type Sender = SendRequest<RequestBody>;

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made within `connect_timeout`.
    #[error("connecting to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
    /// No connection could be made.
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The connection failed while sending or before the response head.
    #[error(transparent)]
    Request(hyper::Error),
}

impl PoolError {
    /// Whether no connection could be made (rather than one failing).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            PoolError::ConnectTimeout { .. } | PoolError::Connect { .. }
        )
    }
}

/// Pooled connections to one backend, and the count of requests in flight to it.
pub struct Pool {
    /// Requests between [`Pool::enter`] and their response head (or the end of their tunnel),
    /// held to `max_in_flight`. Counted here, not in a semaphore of its own: the place rides
    /// along in the request's [`Lease`], which holds this pool's `Arc` anyway, and a plain
    /// counter takes two atomic operations per request where tokio's semaphore took six
    /// (its `Arc`, and a mutex on every release), each on a cache line that both serving
    /// threads write.
    in_flight: CachePadded<AtomicUsize>,
    /// Read on every request; kept off the cache lines written on every request (this
    /// `Arc`'s count, `in_flight`), so that reading them does not wait for the other core.
    settings: CachePadded<Settings>,
}

/// What the pool reads on every request and rarely writes.
struct Settings {
    /// One per serving thread (`shard::slot`): a connection's task runs on the thread that
    /// made it, so a request reuses one made on its own thread. Padded: each thread locks its
    /// own on every request, which would otherwise move a line shared with its neighbour's.
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    max_in_flight: usize,
    authority: Authority,
    connect_timeout: Duration,
    max_idle: usize,
    queue_after_busy: usize,
    queue_wait: Duration,
}

/// One serving thread's connections.
#[derive(Default)]
struct Shard {
    /// Held to the pool's `max_idle` per thread.
    idle: Vec<Sender>,
    /// Connections handed to requests and not back yet (each held by a [`Lease`]).
    busy: usize,
    /// Requests waiting for a busy connection, oldest first, with the tick they came in.
    waiters: VecDeque<(u64, oneshot::Sender<Grant>)>,
    /// Ticks of the queue's watch, which runs while requests wait (one timer for all of
    /// them, instead of one per request).
    tick: u64,
    watched: bool,
}

/// What a waiting request is handed along with the busy place it waited for.
enum Grant {
    /// A connection that just came back.
    Conn(Sender),
    /// A place only (the connection it held has closed, or the wait ran out): open a new
    /// connection.
    Place,
}

impl Pool {
    /// An empty pool for `backend` that lets `max_in_flight` requests be in flight at once,
    /// and keeps as many idle connections per serving thread.
    pub fn new(backend: &Backend, max_in_flight: usize) -> Arc<Pool> {
        Arc::new(Pool {
            in_flight: CachePadded::new(AtomicUsize::new(0)),
            settings: CachePadded::new(Settings {
                shards: (0..crate::shard::SLOTS)
                    .map(|_| CachePadded::new(Mutex::default()))
                    .collect(),
                max_in_flight,
                authority: backend.authority.clone(),
                connect_timeout: backend.connect_timeout,
                max_idle: max_in_flight,
                queue_after_busy: backend.queue_after_busy,
                queue_wait: backend.queue_wait,
            }),
        })
    }

    /// A place among the requests in flight, or `None` when `max_in_flight` are.
    pub fn enter(self: &Arc<Self>) -> Option<InFlight> {
        let max = self.settings.max_in_flight;
        self.in_flight
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(InFlight {
            pool: Arc::clone(self),
            counted: true,
        })
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    /// Sends `req` (origin-form URI, Host already set) and returns the response with a body
    /// that hands the connection back when it is read to the end.
    ///
    /// When the thread has a place free and its newest idle connection is ready, the request
    /// goes into that connection's queue here, before the future exists, and the future only
    /// waits for the response ([`Sent`]). Otherwise (no idle connection, one not ready yet,
    /// the queue, a retry) the future is a boxed [`Pool::sending`], which awaits each of those
    /// steps. Either way the request is kept once: every byte of this future is copied when
    /// an HTTP/2 stream starts, into memory last written hundreds of requests before, so the
    /// common case keeps only hyper's response future, not the space of all the awaits of
    /// the rare ones (docs/performance.md).
    ///
    /// Takes the request's place in flight, whose pool `Arc` becomes the request's [`Lease`].
    pub fn send(
        entered: InFlight,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Result<Response<PoolBody>, PoolError>> + Send + 'static {
        let shard = crate::shard::slot();
        let placed = {
            let pool = &entered.pool;
            let mut sh = pool.lock(shard);
            // The limit holds even with idle connections at hand: those are left over from a
            // burst that went past it, and using them would keep the pool that large.
            (sh.busy < pool.settings.queue_after_busy).then(|| {
                sh.busy += 1;
                pool.take_idle(&mut sh)
            })
        };
        match placed {
            Some(Some(mut sender)) if sender.is_ready() => {
                // The busy place is this request's from here: dropped, the lease frees it.
                let lease = entered.placed(shard);
                let response = sender.try_send_request(req);
                Sent {
                    response: Some(response),
                    held: Some((sender, lease)),
                    slow: None,
                }
            }
            Some(idle) => Sent {
                response: None,
                held: None,
                slow: Some(Box::pin(Pool::sending(entered.placed(shard), idle, req))),
            },
            None => Sent {
                response: None,
                held: None,
                slow: Some(Box::pin(async move {
                    let idle = entered.pool.wait_for_place(shard).await;
                    // The busy place is this request's from here (no await between).
                    Pool::sending(entered.placed(shard), idle, req).await
                })),
            },
        }
    }

    /// Sends `req` holding `lease`'s place, on `idle` once it is ready, else on another idle
    /// connection or a new one; a request that a reused connection could not even send (it
    /// had closed meanwhile) is retried on another.
    async fn sending(
        lease: Lease,
        mut idle: Option<Sender>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PoolBody>, PoolError> {
        let shard = lease.shard;
        loop {
            let (mut sender, reused) = match idle.take() {
                Some(mut s) => {
                    if s.ready().await.is_err() {
                        idle = lease.pool().pop_idle(shard);
                        continue;
                    }
                    (s, true)
                }
                // A failed connect drops the lease, which frees its place.
                None => (lease.pool().connect().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(PoolBody::response(resp, sender, lease)),
                Err(mut e) => match e.take_message() {
                    // Never sent: the reused connection had closed. Try another one.
                    Some(back) if reused => {
                        req = back;
                        idle = lease.pool().pop_idle(shard);
                    }
                    _ => return Err(PoolError::Request(e.into_error())),
                },
            }
        }
    }

    /// A busy place on `shard` once the thread has too many (`queue_after_busy`): waits for a
    /// busy connection to come back, or for the wait to run out, and returns the connection
    /// to use, if any (`None`: open one). The caller makes the place its lease's at once (no
    /// await between).
    async fn wait_for_place(self: &Arc<Self>, shard: usize) -> Option<Sender> {
        let rx = {
            let mut sh = self.lock(shard);
            // Freed since `send` looked.
            if sh.busy < self.settings.queue_after_busy {
                sh.busy += 1;
                return self.take_idle(&mut sh);
            }
            let (tx, rx) = oneshot::channel();
            let tick = sh.tick;
            sh.waiters.push_back((tick, tx));
            if !sh.watched {
                sh.watched = true;
                tokio::spawn(Arc::clone(self).watch(shard));
            }
            rx
        };
        let mut waiting = Waiting {
            rx,
            pool: self,
            shard,
        };
        // The place passes to this request along with the grant.
        let granted = (&mut waiting.rx).await;
        drop(waiting);
        match granted {
            Ok(Grant::Conn(s)) => Some(s),
            // Past the limit, on an idle connection when there is one.
            Ok(Grant::Place) => self.pop_idle(shard),
            // Not sent while the pool lives; should it happen, go beyond the limit.
            Err(_) => {
                let mut sh = self.lock(shard);
                sh.busy += 1;
                self.take_idle(&mut sh)
            }
        }
    }

    /// Runs while requests on `shard` wait: each half `queue_wait` it lets those that came
    /// in two ticks ago or earlier (so have waited at least half of it, at most all of it)
    /// open connections of their own, beyond the limit.
    async fn watch(self: Arc<Self>, shard: usize) {
        let every = (self.settings.queue_wait / 2).max(Duration::from_millis(1));
        loop {
            tokio::time::sleep(every).await;
            let mut sh = self.lock(shard);
            sh.tick += 1;
            while let Some(&(came, _)) = sh.waiters.front() {
                if sh.tick - came < 2 {
                    break;
                }
                if let Some((_, w)) = sh.waiters.pop_front()
                    && w.send(Grant::Place).is_ok()
                {
                    sh.busy += 1;
                }
            }
            if sh.waiters.is_empty() {
                sh.watched = false;
                return;
            }
        }
    }

    /// Requests waiting for a busy connection now (read when scraped: a request that gave up
    /// leaves a closed entry behind until a connection comes back).
    pub fn queued(&self) -> usize {
        (0..crate::shard::SLOTS)
            .map(|i| {
                let sh = self.lock(i);
                sh.waiters.iter().filter(|(_, w)| !w.is_closed()).count()
            })
            .sum()
    }

    /// An idle connection for a request that already holds a place.
    fn pop_idle(&self, shard: usize) -> Option<Sender> {
        let mut sh = self.lock(shard);
        self.take_idle(&mut sh)
    }

    fn take_idle(&self, sh: &mut Shard) -> Option<Sender> {
        // No idle clock: the backend closes connections it finds idle too long, hyper
        // notices, and a request that still races such a close is retried (`Sent`, `sending`).
        while let Some(s) = sh.idle.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Sender, PoolError> {
        let addr = self.settings.authority.as_str();
        let tcp = tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| PoolError::ConnectTimeout {
                addr: addr.to_owned(),
                after: self.settings.connect_timeout,
            })?
            .map_err(|source| PoolError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        // One plain send(2) per request instead of hyper's writev(2): the head (and a small
        // body) is one buffer anyway, and writev costs more per call (docs/performance.md).
        // Larger bodies are copied into hyper's buffer instead.
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(PoolError::Request)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "backend connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Ends a lease: its place, with `sender` when that can be reused, goes to the oldest
    /// waiting request, or else is freed and `sender` kept idle.
    fn give_back(&self, shard: usize, sender: Option<Sender>) {
        let mut sender = sender.filter(|s| !s.is_closed());
        let mut sh = self.lock(shard);
        while let Some((_, waiter)) = sh.waiters.pop_front() {
            let grant = sender.take().map_or(Grant::Place, Grant::Conn);
            match waiter.send(grant) {
                Ok(()) => return,
                // That request stopped waiting.
                Err(Grant::Conn(s)) => sender = Some(s),
                Err(Grant::Place) => {}
            }
        }
        sh.busy = sh.busy.saturating_sub(1);
        // Per thread: a count over all threads would be one more cache line that both write
        // on every request.
        if let Some(s) = sender
            && sh.idle.len() < self.settings.max_idle
        {
            sh.idle.push(s);
        }
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        self.settings.shards[shard]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// A request's place among those in flight to the backend ([`Pool::enter`]), until its
/// response head is in or, for an upgrade, its tunnel ends.
pub struct InFlight {
    pool: Arc<Pool>,
    /// False once the place is given up ([`PoolBody::responded`]) while the pool's `Arc` is
    /// still needed to hand the connection back.
    counted: bool,
}

impl InFlight {
    /// Takes a busy place on `shard` too (already counted there).
    fn placed(self, shard: usize) -> Lease {
        Lease {
            entered: self,
            shard,
            conn: None,
        }
    }

    fn end(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.pool.leave();
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.end();
    }
}

/// A request's busy place on its thread, and its place in flight while it lasts. Dropping it
/// ends both: with `conn` set, that connection goes back for reuse.
struct Lease {
    entered: InFlight,
    shard: usize,
    conn: Option<Sender>,
}

impl Lease {
    fn pool(&self) -> &Pool {
        &self.entered.pool
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.entered.pool.give_back(self.shard, self.conn.take());
    }
}

/// A request waiting for a connection. Dropped (once granted, or with the request abandoned
/// while it waits), it closes the channel and passes on anything granted in the meantime.
struct Waiting<'a> {
    rx: oneshot::Receiver<Grant>,
    pool: &'a Pool,
    shard: usize,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Grant::Conn(s)) => self.pool.give_back(self.shard, Some(s)),
            Ok(Grant::Place) => self.pool.give_back(self.shard, None),
            Err(_) => {}
        }
    }
}

/// What the slow path of [`Pool::send`] is kept as: boxed, so that its awaits take no room in
/// the common case's future.
type Sending = Pin<Box<dyn Future<Output = Result<Response<PoolBody>, PoolError>> + Send>>;

pin_project_lite::pin_project! {
    /// [`Pool::send`]'s future: hyper's response future for a request already handed to a
    /// ready connection (`response`, with the connection and its place in `held`), or the
    /// slow path. A request that the connection gives back unsent (it closed meanwhile) goes
    /// on to the slow path.
    struct Sent<F> {
        #[pin]
        response: Option<F>,
        held: Option<(Sender, Lease)>,
        slow: Option<Sending>,
    }
}

impl<F> Future for Sent<F>
where
    F: Future<Output = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>>,
{
    type Output = Result<Response<PoolBody>, PoolError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(slow) = this.slow.as_mut() {
            return slow.as_mut().poll(cx);
        }
        let Some(response) = this.response.as_mut().as_pin_mut() else {
            // Polled again after it answered.
            return Poll::Pending;
        };
        let result = std::task::ready!(response.poll(cx));
        this.response.set(None);
        let Some((sender, lease)) = this.held.take() else {
            return Poll::Pending;
        };
        match result {
            Ok(resp) => Poll::Ready(Ok(PoolBody::response(resp, sender, lease))),
            Err(mut e) => match e.take_message() {
                // Never sent: the connection had closed. Try another one.
                Some(req) => {
                    drop(sender);
                    let idle = lease.pool().pop_idle(lease.shard);
                    let slow = this.slow.insert(Box::pin(Pool::sending(lease, idle, req)));
                    slow.as_mut().poll(cx)
                }
                None => Poll::Ready(Err(PoolError::Request(e.into_error()))),
            },
        }
    }
}

/// A backend response body that returns its connection to the pool once read to the end.
pub struct PoolBody {
    inner: Incoming,
    sender: Option<Sender>,
    /// Dropped without `sender` (the body was abandoned, failed or upgraded), it frees the
    /// place and the connection closes.
    lease: Option<Lease>,
}

impl PoolBody {
    /// The response with its body wrapped. An upgrade's connection is never reused (it
    /// becomes the tunnel's), and its lease, with the request's place in flight, is kept
    /// until the caller detaches it for the tunnel or the body is dropped.
    fn response(resp: Response<Incoming>, sender: Sender, lease: Lease) -> Response<PoolBody> {
        let upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        resp.map(|inner| {
            let mut b = PoolBody {
                inner,
                sender: (!upgrade).then_some(sender),
                lease: Some(lease),
            };
            if !upgrade && b.inner.is_end_stream() {
                b.release();
            }
            b
        })
    }

    fn release(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            lease.conn = self.sender.take();
        }
    }

    /// Gives up the request's place in flight: its response head is in.
    pub fn responded(&mut self) {
        if let Some(lease) = self.lease.as_mut() {
            lease.entered.end();
        }
    }

    /// Keeps the connection out of the pool (it is being upgraded, or failed), and returns
    /// the request's place in flight, if it still has one, for the tunnel to hold.
    pub fn detach(&mut self) -> Option<InFlight> {
        self.sender = None;
        let mut lease = self.lease.take()?;
        let counted = std::mem::take(&mut lease.entered.counted);
        counted.then(|| InFlight {
            pool: Arc::clone(&lease.entered.pool),
            counted,
        })
    }
}

impl Body for PoolBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        // Trailers lose their hop-by-hop fields too (RFC 9110 §7.6.1); an HTTP/2 client's
        // stream would be reset over them (RFC 9113 §8.2.2).
        if let Poll::Ready(Some(Ok(frame))) = &mut polled
            && let Some(trailers) = frame.trailers_mut()
        {
            super::strip_hop_by_hop(trailers);
        }
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => drop(self.detach()),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    //! The queue for busy connections (`queue_after_busy`, `queue_wait`), on places alone:
    //! no connection is made, so a grant of a place is what a request would open one with.

    use super::*;

    fn pool(queue_after_busy: usize, queue_wait: Duration) -> Arc<Pool> {
        let backend = Backend {
            authority: http::uri::Authority::from_static("127.0.0.1:9"),
            base_path: String::new(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            queue_after_busy,
            queue_wait,
        };
        Pool::new(&backend, 1024)
    }

    fn busy(p: &Pool) -> usize {
        p.lock(0).busy
    }

    /// Polls `f` once; true when it finished.
    fn ready<F: Future + Unpin>(f: &mut F) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(f).poll(&mut cx).is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn below_the_limit_a_place_is_taken_at_once() {
        let p = pool(2, Duration::from_millis(20));
        assert!(
            p.wait_for_place(0).await.is_none(),
            "no idle connection to reuse"
        );
        assert!(p.wait_for_place(0).await.is_none());
        assert_eq!(busy(&p), 2);
        assert_eq!(p.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_limit_requests_wait_and_are_granted_in_arrival_order() {
        let p = pool(1, Duration::from_secs(10));
        p.wait_for_place(0).await;
        let mut first = Box::pin(p.wait_for_place(0));
        let mut second = Box::pin(p.wait_for_place(0));
        assert!(!ready(&mut first) && !ready(&mut second));
        assert_eq!(p.queued(), 2);
        // A place comes back: it passes to the oldest waiter, still counted busy.
        p.give_back(0, None);
        assert!(ready(&mut first), "the first waiter was not granted");
        assert!(
            !ready(&mut second),
            "the second waiter was granted out of turn"
        );
        assert_eq!(busy(&p), 1);
        p.give_back(0, None);
        assert!(ready(&mut second));
        assert_eq!((busy(&p), p.queued()), (1, 0));
        // The last one back frees its place.
        p.give_back(0, None);
        assert_eq!(busy(&p), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_waited_queue_wait_goes_past_the_limit() {
        let wait = Duration::from_millis(20);
        let p = pool(1, wait);
        p.wait_for_place(0).await;
        let started = tokio::time::Instant::now();
        // Nothing comes back: the watch lets it open a connection of its own.
        assert!(p.wait_for_place(0).await.is_none());
        let waited = started.elapsed();
        assert!(
            waited >= wait / 2 && waited <= wait + Duration::from_millis(1),
            "waited {waited:?} for a queue_wait of {wait:?}"
        );
        assert_eq!((busy(&p), p.queued()), (2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_wait_loses_no_place() {
        let p = pool(1, Duration::from_secs(10));
        p.wait_for_place(0).await;
        let mut gone = Box::pin(p.wait_for_place(0));
        let mut kept = Box::pin(p.wait_for_place(0));
        assert!(!ready(&mut gone) && !ready(&mut kept));
        // The client goes away while its request waits.
        drop(gone);
        p.give_back(0, None);
        assert!(ready(&mut kept), "the place went to the abandoned request");
        assert_eq!(busy(&p), 1);
        // Granted and then abandoned before it ran: the place is handed back, not leaked.
        let mut late = Box::pin(p.wait_for_place(0));
        assert!(!ready(&mut late));
        p.give_back(0, None);
        drop(late);
        assert_eq!(busy(&p), 0);
    }
}
