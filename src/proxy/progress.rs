//! Where an HTTP/1.1 connection is between its requests, shared by the handler (which
//! begins and finishes requests) and the framing watch below hyper (which sees heads arrive,
//! spots the smuggling shape, and times idle periods; `serve::h1::framing`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Waker;

/// What the watch and the handler share for one connection: which request (1-based, in
/// arrival order) had both framing headers, and how many requests the handler has begun and
/// finished (response sent or abandoned).
#[derive(Debug)]
pub struct ConnProgress {
    flagged: AtomicU64,
    begun: AtomicU64,
    finished: AtomicU64,
    /// The connection's reader, parked while a response is under way: woken when it is done
    /// so the idle timer starts then, not at the next byte.
    reader: Mutex<Option<Waker>>,
    /// Counts idle periods; `idle` says whether the latest is still going on (no byte since).
    idle_epoch: AtomicU64,
    idle: AtomicBool,
    /// Told when an idle period begins (see `park`).
    idle_began: tokio::sync::Notify,
    /// Set while `park` takes the connection from hyper: shutdown must not close it then.
    parking: AtomicBool,
    /// Set when a response switched protocols: the stream is a tunnel from then on, with no
    /// requests to frame and no HTTP timeouts.
    tunnel: AtomicBool,
}

impl Default for ConnProgress {
    fn default() -> Self {
        ConnProgress {
            flagged: AtomicU64::new(u64::MAX),
            begun: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            reader: Mutex::new(None),
            idle_epoch: AtomicU64::new(0),
            idle: AtomicBool::new(false),
            idle_began: tokio::sync::Notify::new(),
            parking: AtomicBool::new(false),
            tunnel: AtomicBool::new(false),
        }
    }
}

impl ConnProgress {
    /// Called once per HTTP/1.x request as the handler starts it: true when this request's
    /// head carried both Content-Length and Transfer-Encoding. hyper serves a connection's
    /// requests one at a time in arrival order, so the handler's count matches the watch's.
    pub fn begin(&self) -> bool {
        let n = self.begun.fetch_add(1, Ordering::AcqRel) + 1;
        n == self.flagged.load(Ordering::Acquire)
    }

    /// Called once per begun request when its response is done with (sent, or dropped).
    pub fn finish(&self) {
        self.finished.fetch_add(1, Ordering::AcqRel);
        let reader = self.reader.lock().map(|mut r| r.take()).unwrap_or(None);
        if let Some(w) = reader {
            w.wake();
        }
    }

    /// Parks the reader until the response under way is done.
    pub(crate) fn wake_on_finish(&self, waker: &Waker) {
        if let Ok(mut r) = self.reader.lock() {
            match &mut *r {
                Some(w) if w.will_wake(waker) => {}
                slot => *slot = Some(waker.clone()),
            }
        }
    }

    /// Waits until an idle period begins; returns its number.
    pub async fn idle_began(&self) -> u64 {
        self.idle_began.notified().await;
        self.idle_epoch.load(Ordering::Acquire)
    }

    /// True while idle period `epoch` is still going on: no byte has arrived since it began.
    pub fn still_idle(&self, epoch: u64) -> bool {
        self.idle.load(Ordering::Acquire) && self.idle_epoch.load(Ordering::Acquire) == epoch
    }

    /// Marks the connection as switched to another protocol (a 101 answer).
    pub fn set_tunnel(&self) {
        self.tunnel.store(true, Ordering::Release);
    }

    /// Marks the connection as being taken from hyper (its shutdown then keeps the stream).
    pub fn set_parking(&self, on: bool) {
        self.parking.store(on, Ordering::Release);
    }

    pub(crate) fn idle_begins(&self) {
        self.idle_epoch.fetch_add(1, Ordering::AcqRel);
        self.idle.store(true, Ordering::Release);
        self.idle_began.notify_one();
    }

    /// Whether a request is still being answered, out of `heads` that have arrived. Counted
    /// from heads the watch has seen, not requests the handler has begun: hyper reads again
    /// before it first polls the handler, and that gap is not idle time.
    pub(crate) fn answering(&self, heads: u64) -> bool {
        self.finished.load(Ordering::Acquire) < heads
    }

    /// A byte arrived: the idle period, if any, is over.
    pub(crate) fn busy(&self) {
        self.idle.store(false, Ordering::Release);
    }

    /// Request `n` (1-based) carried both framing headers.
    pub(crate) fn flag(&self, n: u64) {
        self.flagged.store(n, Ordering::Release);
    }

    /// Whether the connection switched protocols (a tunnel from then on).
    pub(crate) fn is_tunnel(&self) -> bool {
        self.tunnel.load(Ordering::Acquire)
    }

    /// Whether `park` is taking the connection from hyper.
    pub(crate) fn is_parking(&self) -> bool {
        self.parking.load(Ordering::Acquire)
    }
}
