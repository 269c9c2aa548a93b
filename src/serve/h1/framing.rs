//! Spots HTTP/1.1 requests that carry both Content-Length and Transfer-Encoding.
//!
//! hyper reads such a request as chunked and drops its Content-Length before any handler sees
//! it (RFC 9112 §6.3 allows that), so the handler alone cannot refuse it. [`Watched`] wraps a
//! connection's byte stream and follows its message framing the way hyper does (the same
//! httparse call for heads, the same chunked grammar for bodies), so it knows which request on
//! the connection had both headers; the handler then answers that request 400 without
//! forwarding it. hyper closes the connection after such a request, so nothing after it is
//! ever served and the watch can stop there.
//!
//! The watch only reports; it never changes bytes (it can hand back, once, bytes hyper read
//! and did not use: see [`Watched::put_back`]). If it loses the thread (bytes hyper would
//! reject anyway, a head over the size limit, an upgraded connection's tunnel) it stops
//! reporting for the rest of the connection.
//!
//! Knowing where a connection is between requests also gives HTTP/1.1 the two timeouts an
//! nginx operator expects, which hyper's single header timer conflates (it starts when hyper
//! begins waiting for a head, so it also closes idle keep-alive connections):
//! `header_read_timeout` from the first byte of a head to its end (and for the first request,
//! from the handshake), `keepalive_timeout` while the connection idles between requests.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::proxy::progress::ConnProgress;

/// hyper's default cap on request header lines; a head with more is an error to both of us.
const MAX_HEADERS: usize = 100;

/// Where the watch is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages, or inside a head (its bytes so far are in `Framing::head`).
    Head,
    /// Inside a body of known length: this many bytes left.
    Fixed(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Stopped: flagged, or lost the thread.
    Off,
}

/// The chunked grammar as hyper's decoder walks it (hyper/src/proto/h1/decode.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Body,
    BodyCr,
    BodyLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

/// Follows request framing over a byte stream fed in arbitrary pieces.
#[derive(Debug)]
pub struct Framing {
    state: State,
    chunk_size: u64,
    /// A head that arrived in more than one piece, so far.
    head: Vec<u8>,
    /// Heads completed so far.
    heads: u64,
    /// Largest head followed; hyper refuses larger ones with 431 and closes.
    max_head: usize,
}

impl Framing {
    /// A watch for a fresh connection whose heads hyper caps at `max_head` bytes.
    pub fn new(max_head: usize) -> Self {
        Framing {
            state: State::Head,
            chunk_size: 0,
            head: Vec::new(),
            heads: 0,
            max_head,
        }
    }

    /// Follows `data`, the next bytes the client sent. Returns the 1-based number of a request
    /// whose head carried both Content-Length and Transfer-Encoding, if one completed.
    pub fn feed(&mut self, mut data: &[u8]) -> Option<u64> {
        while !data.is_empty() {
            match self.state {
                State::Off => return None,
                State::Head => {
                    if self.head.is_empty() {
                        // Usual case: the whole head in one read, parsed where it lies.
                        match self.head_in(data) {
                            Some(Ok(n)) => data = &data[n..],
                            Some(Err(flag)) => return flag,
                            None => {
                                self.keep_partial(data);
                                return None;
                            }
                        }
                    } else {
                        self.head.extend_from_slice(data);
                        let head = std::mem::take(&mut self.head);
                        // A head can only end at a newline: skip the parse until one comes,
                        // so a head sent a byte at a time costs no more than hyper's own.
                        let parsed = if data.contains(&b'\n') {
                            self.head_in(&head)
                        } else {
                            None
                        };
                        return match parsed {
                            Some(Ok(n)) => self.feed(&head[n..]),
                            Some(Err(flag)) => flag,
                            None => {
                                if head.len() > self.max_head {
                                    self.off();
                                } else {
                                    self.head = head;
                                }
                                None
                            }
                        };
                    }
                }
                State::Fixed(left) => {
                    let n = left.min(data.len() as u64);
                    data = &data[n as usize..];
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Fixed(left - n)
                    };
                }
                State::Chunked(Chunk::Body) => {
                    let n = self.chunk_size.min(data.len() as u64);
                    data = &data[n as usize..];
                    self.chunk_size -= n;
                    if self.chunk_size == 0 {
                        self.state = State::Chunked(Chunk::BodyCr);
                    }
                }
                State::Chunked(c) => {
                    self.state = self.chunk_byte(c, data[0]);
                    data = &data[1..];
                }
            }
        }
        None
    }

    /// True while part of a head has arrived and its end has not.
    fn head_in_progress(&self) -> bool {
        self.state == State::Head && !self.head.is_empty()
    }

    /// True between messages: no head or body bytes are awaited mid-message.
    fn between_messages(&self) -> bool {
        self.state == State::Head && self.head.is_empty()
    }

    fn keep_partial(&mut self, data: &[u8]) {
        if data.len() > self.max_head {
            self.off();
        } else {
            self.head.extend_from_slice(data);
        }
    }

    fn off(&mut self) {
        self.state = State::Off;
        self.head = Vec::new();
    }

    /// Parses a head at the start of `buf`. `None`: incomplete. `Some(Ok(len))`: a head of
    /// `len` bytes was followed and the body state set. `Some(Err(flag))`: the watch stopped,
    /// with the flagged request if that is why.
    fn head_in(&mut self, buf: &[u8]) -> Option<Result<usize, Option<u64>>> {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut req,
            buf,
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => {
                // hyper answers 400 (or 431) and closes: nothing more to follow.
                self.off();
                return Some(Err(None));
            }
        };
        if len > self.max_head {
            self.off();
            return Some(Err(None));
        }
        self.heads += 1;
        let mut te = false;
        let mut cl = None;
        let mut has_cl = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
            } else if h.name.eq_ignore_ascii_case("content-length") {
                has_cl = true;
                cl = digits(h.value);
            }
        }
        if te && has_cl {
            self.off();
            return Some(Err(Some(self.heads)));
        }
        self.state = if te {
            // Not chunked-last, or HTTP/1.0: hyper refuses it and closes, so the guess is moot.
            self.chunk_size = 0;
            State::Chunked(Chunk::Start)
        } else if has_cl {
            match cl {
                Some(0) => State::Head,
                Some(n) => State::Fixed(n),
                // Unparsable or conflicting: hyper answers 400 and closes.
                None => {
                    self.off();
                    return Some(Err(None));
                }
            }
        } else {
            State::Head
        };
        Some(Ok(len))
    }

    /// One byte of chunked framing outside chunk data; anything hyper rejects stops the watch.
    fn chunk_byte(&mut self, c: Chunk, b: u8) -> State {
        use Chunk::*;
        let next = match (c, b) {
            (Start | Size, _) if b.is_ascii_hexdigit() => {
                let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                match self
                    .chunk_size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(d))
                {
                    Some(s) => self.chunk_size = s,
                    None => return State::Off,
                }
                Size
            }
            (Size | SizeLws, b'\t' | b' ') => SizeLws,
            (Size | SizeLws, b';') => Extension,
            (Size | SizeLws | Extension, b'\r') => SizeLf,
            (Extension, b'\n') => return State::Off,
            (Extension, _) => Extension,
            (SizeLf, b'\n') if self.chunk_size == 0 => EndCr,
            (SizeLf, b'\n') => Body,
            (BodyCr, b'\r') => BodyLf,
            (BodyLf, b'\n') => Start,
            (Trailer, b'\r') => TrailerLf,
            (Trailer, _) => Trailer,
            (TrailerLf, b'\n') => EndCr,
            (EndCr, b'\r') => EndLf,
            (EndCr, _) => Trailer,
            (EndLf, b'\n') => return State::Head,
            _ => return State::Off,
        };
        State::Chunked(next)
    }
}

/// A Content-Length value as hyper reads it: ASCII digits only, no sign, no list.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// The two HTTP/1.1 read timeouts (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From a head's first byte to its end; also from connect to the first request's head.
    pub header: Duration,
    /// Idle between a response and the next request's first byte.
    pub keepalive: Duration,
}

/// Which timeout the armed timer stands for, and for which head (heads completed before it):
/// a wait that has not changed keeps its deadline however many bytes trickle in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Header(u64),
    Idle(u64),
}

/// A client stream whose incoming bytes are followed by a [`Framing`], with the HTTP/1.1 read
/// timeouts enforced on it; writes pass through.
pub struct Watched<S> {
    inner: S,
    framing: Framing,
    progress: Arc<ConnProgress>,
    timeouts: Timeouts,
    /// What the timer currently stands for; it is re-armed only when that changes.
    armed: Option<Wait>,
    /// Allocated at the first bounded wait, then reset in place.
    timer: Option<Pin<Box<Sleep>>>,
    /// Bytes already read and followed, served again before the stream (see `put_back`).
    replay: Bytes,
}

impl<S> Watched<S> {
    /// Watches `inner`, reporting into `progress`.
    pub fn new(inner: S, max_head: usize, progress: Arc<ConnProgress>, timeouts: Timeouts) -> Self {
        Watched {
            inner,
            framing: Framing::new(max_head),
            progress,
            timeouts,
            timer: None,
            armed: None,
            replay: Bytes::new(),
        }
    }

    /// Puts bytes already read from this stream back in front of it, for the next reader
    /// (`park` hands them from one hyper connection to the next). They are copied: a slice of
    /// hyper's read buffer, even an empty one, would keep the whole buffer alive.
    pub fn put_back(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut b = BytesMut::with_capacity(bytes.len() + self.replay.len());
        b.extend_from_slice(bytes);
        b.extend_from_slice(&self.replay);
        self.replay = b.freeze();
    }

    /// True when bytes put back are waiting to be read.
    pub fn has_replay(&self) -> bool {
        !self.replay.is_empty()
    }

    /// The largest head followed, which is hyper's read buffer cap.
    pub fn max_head(&self) -> usize {
        self.framing.max_head
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream, to change.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// When the current idle period runs out (`keepalive_timeout` after it began).
    pub fn idle_deadline(&self) -> Instant {
        match (&self.timer, self.armed) {
            (Some(sleep), Some(Wait::Idle(_))) => sleep.deadline(),
            _ => Instant::now() + self.timeouts.keepalive,
        }
    }

    /// What the connection is waiting for, when that wait is bounded.
    fn wait(&self) -> Option<Wait> {
        let heads = self.framing.heads;
        if self.progress.is_tunnel() {
            return None;
        }
        if self.framing.head_in_progress() {
            return Some(Wait::Header(heads));
        }
        if !self.framing.between_messages() {
            // Mid-body, or the watch stopped (an upgraded tunnel, or hyper is closing).
            return None;
        }
        match (heads, self.progress.answering(heads)) {
            (_, true) => None,
            (0, false) => Some(Wait::Header(heads)),
            (_, false) => Some(Wait::Idle(heads)),
        }
    }

    /// Arms, keeps or disarms the timer for the current wait; true when it has run out.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        let mut wait = self.wait();
        if wait.is_none() && self.framing.between_messages() {
            // A response is under way. Ask to be woken when it is done, then look again so
            // one that finished just now is not missed.
            self.progress.wake_on_finish(cx.waker());
            wait = self.wait();
        }
        if wait != self.armed {
            self.armed = wait;
            let limit = match wait {
                None => return false,
                Some(Wait::Header(_)) => self.timeouts.header,
                Some(Wait::Idle(_)) => {
                    self.progress.idle_begins();
                    self.timeouts.keepalive
                }
            };
            let deadline = Instant::now() + limit;
            match &mut self.timer {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        match (&mut self.timer, self.armed) {
            (Some(sleep), Some(_)) => sleep.as_mut().poll(cx).is_ready(),
            _ => false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            // Already followed when first read: served again as they are.
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            if this.replay.is_empty() {
                this.replay = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if !new.is_empty() {
                    this.progress.busy();
                }
                if this.framing.state != State::Off
                    && let Some(n) = this.framing.feed(new)
                {
                    this.progress.flag(n);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.timed_out(cx) {
                    return Poll::Ready(match this.armed {
                        // Idle past keepalive_timeout: end it as a clean close.
                        Some(Wait::Idle(_)) => Ok(()),
                        _ => Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request head not received within header_read_timeout",
                        )),
                    });
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.progress.is_parking() {
            // hyper is handing the connection back (see `park`), not closing it.
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` in pieces of `step` bytes; returns every flag raised.
    fn run(stream: &[u8], step: usize) -> Vec<u64> {
        let mut f = Framing::new(8192);
        stream.chunks(step).filter_map(|c| f.feed(c)).collect()
    }

    fn every_split(stream: &str, want: &[u64]) {
        for step in [1, 2, 3, 7, 16, stream.len()] {
            assert_eq!(
                run(stream.as_bytes(), step),
                want,
                "step {step}: {stream:?}"
            );
        }
    }

    const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";

    #[test]
    fn flags_content_length_with_transfer_encoding_in_either_order() {
        every_split(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            &[1],
        );
        every_split(
            "POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            &[1],
        );
    }

    #[test]
    fn follows_fixed_and_chunked_bodies_to_the_next_head() {
        let body_looks_like_a_head =
            "GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let fixed = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{body_looks_like_a_head}",
            body_looks_like_a_head.len()
        );
        let chunked = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{:x};ext=1\r\n{body_looks_like_a_head}\r\n3 \r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n",
            body_looks_like_a_head.len()
        );
        let bad =
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n";
        every_split(&format!("{GET}{fixed}{chunked}{GET}{bad}{GET}"), &[5]);
        every_split(&format!("\r\n{GET}{fixed}{GET}"), &[]);
    }

    #[test]
    fn stops_where_hyper_would_close() {
        // Malformed chunk size, then an ambiguous head: hyper never reads that far.
        let bad = "POST / HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n";
        every_split(
            &format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{bad}"),
            &[],
        );
        // An unparsable Content-Length, and an HTTP/2 preface.
        every_split(
            &format!("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello{bad}"),
            &[],
        );
        every_split(&format!("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n{bad}"), &[]);
        // A head larger than the cap.
        let mut f = Framing::new(64);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(100));
        assert_eq!(f.feed(long.as_bytes()), None);
        assert_eq!(f.feed(bad.as_bytes()), None);
    }

    #[test]
    fn verdict_matches_the_request_it_was_raised_for() {
        let v = ConnProgress::default();
        v.flag(2);
        assert!(!v.begin());
        assert!(v.begin());
        assert!(!v.begin());
    }
}
