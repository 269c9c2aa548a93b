//! The access log: one structured line per request (target `access`), written when the
//! response body has been sent or abandoned, so bytes and durations are the real ones, as in
//! nginx. Bytes in are counted as the request body streams to the backend.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Uri};

use crate::host::HostBuf;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// Everything the line says except bytes out, gathered while the request is handled.
pub struct Record {
    pub started: Instant,
    pub client: SocketAddr,
    /// The authority as the client sent it; normalised when the line is written.
    pub host: Option<HeaderValue>,
    pub tenant: Option<HeaderValue>,
    pub method: Method,
    pub uri: Uri,
    pub status: u16,
    pub decision: &'static str,
    pub upstream: Option<Duration>,
    pub upstream_error: Option<&'static str>,
    /// Request body bytes; `None` for a request without a body.
    pub bytes_in: Option<Arc<AtomicU64>>,
}

impl Record {
    fn emit(&self, bytes_out: u64, completed: bool) {
        let mut buf: HostBuf = [0; crate::host::MAX_HOST_LEN + 2];
        let host = self
            .host
            .as_ref()
            .and_then(|h| crate::host::normalize_authority(h.as_bytes(), &mut buf))
            .unwrap_or("-");
        tracing::info!(
            target: "access",
            client = %self.client,
            host,
            tenant = self.tenant.as_ref().and_then(|t| t.to_str().ok()).unwrap_or("-"),
            method = self.method.as_str(),
            path = self.uri.path(),
            status = self.status,
            decision = self.decision,
            bytes_in = self.bytes_in.as_ref().map_or(0, |b| b.load(Ordering::Relaxed)),
            bytes_out,
            duration_us = self.started.elapsed().as_micros() as u64,
            upstream_us = self.upstream.map_or(0, |d| d.as_micros() as u64),
            upstream_error = self.upstream_error.unwrap_or("-"),
            completed,
        );
    }
}

/// A response body that counts what it sends and writes the access line at its end.
pub struct Logged<B> {
    inner: B,
    record: Option<Box<Record>>,
    bytes_out: u64,
    /// Nothing to send: hyper writes the head and never polls the body.
    empty: bool,
    /// Told when this response is done with (HTTP/1.1: the connection may then idle).
    progress: Option<Arc<crate::framing::Progress>>,
}

impl<B: Body> Logged<B> {
    /// Wraps `inner`; the line (if any) is written when it ends or is dropped, and
    /// `progress` told when it is dropped.
    pub fn new(
        inner: B,
        record: Option<Box<Record>>,
        progress: Option<Arc<crate::framing::Progress>>,
    ) -> Self {
        Logged {
            empty: inner.is_end_stream(),
            inner,
            record,
            bytes_out: 0,
            progress,
        }
    }
}

impl<B> Logged<B> {
    fn finish(&mut self, completed: bool) {
        if let Some(r) = self.record.take() {
            r.emit(self.bytes_out, completed);
        }
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        // Dropped before its end, the client went away (nginx logs these as 499); a body
        // that was empty from the start (204, 304, HEAD) is never polled, and is complete.
        self.finish(self.empty);
        if let Some(p) = &self.progress {
            p.finish();
        }
    }
}

impl<B> Body for Logged<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes_out += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
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

/// A request body that counts the bytes it passes on, and, for an HTTP/2 request with a
/// `content-length`, holds back the bytes that complete it until the stream has ended.
///
/// RFC 9113 §8.1.1: a request whose `content-length` differs from the sum of its DATA
/// frames is malformed, and an intermediary MUST NOT forward it. h2 resets such a stream
/// when its DATA run past the length or end short of it; but an HTTP/1.1 backend has the
/// whole request once it has `content-length` bytes, so the last of them wait here until
/// the stream's end is seen. A browser sends END_STREAM on its last DATA frame, so nothing
/// waits in practice.
pub struct Counted {
    inner: Incoming,
    count: Option<Arc<AtomicU64>>,
    /// HTTP/2 with a `content-length` only (boxed: nearly every request has none).
    exact: Option<Box<ExactLength>>,
}

/// The state of an HTTP/2 request body with a declared length.
struct ExactLength {
    /// Bytes still to come before the declared length is reached.
    remaining: u64,
    /// The frame that reached it, kept until the stream ends.
    held: Option<Frame<Bytes>>,
    /// Trailers seen after it, passed on after it.
    after: Option<Option<Result<Frame<Bytes>, BodyError>>>,
}

impl Counted {
    /// Wraps `inner`, adding to `count` (when there is one). `h2_length` is the
    /// `content-length` of an HTTP/2 request (h2 has checked it parses and is the only one).
    pub fn new(inner: Incoming, count: Option<Arc<AtomicU64>>, h2_length: Option<u64>) -> Self {
        let exact = h2_length
            .filter(|n| *n > 0 && !inner.is_end_stream())
            .map(|remaining| {
                Box::new(ExactLength {
                    remaining,
                    held: None,
                    after: None,
                })
            });
        Counted {
            inner,
            count,
            exact,
        }
    }
}

/// Why a request body was not passed on whole.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Polls `inner`, adding its data to `count`.
fn poll_counted(
    inner: &mut Incoming,
    count: Option<&AtomicU64>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    let polled = Pin::new(inner).poll_frame(cx);
    if let (Poll::Ready(Some(Ok(frame))), Some(count)) = (&polled, count)
        && let Some(d) = frame.data_ref()
    {
        count.fetch_add(d.len() as u64, Ordering::Relaxed);
    }
    polled.map_err(BodyError::from)
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Counted {
            inner,
            count,
            exact,
        } = &mut *self;
        let count = count.as_deref();
        let Some(exact) = exact.as_deref_mut() else {
            return poll_counted(inner, count, cx);
        };
        if let Some(after) = exact.after.take() {
            return Poll::Ready(after);
        }
        loop {
            let polled = std::task::ready!(poll_counted(inner, count, cx));
            let Some(held) = exact.held.take() else {
                if let Some(Ok(frame)) = &polled
                    && let Some(d) = frame.data_ref()
                {
                    exact.remaining = exact.remaining.saturating_sub(d.len() as u64);
                    if exact.remaining == 0 && !inner.is_end_stream() {
                        exact.held = polled.and_then(Result::ok);
                        continue;
                    }
                }
                return Poll::Ready(polled);
            };
            // The declared length is reached: only the stream's end, trailers, or empty DATA
            // frames may follow.
            match polled {
                Some(Ok(frame)) if frame.data_ref().is_some_and(|d| d.is_empty()) => {
                    exact.held = Some(held);
                    if inner.is_end_stream() {
                        return Poll::Ready(exact.held.take().map(Ok));
                    }
                }
                // h2 resets a stream whose DATA run past its length before passing them on;
                // should any come, the backend still never gets a whole request.
                Some(Ok(frame)) if frame.is_data() => {
                    return Poll::Ready(Some(Err(
                        "the request's DATA run past its content-length (RFC 9113 §8.1.1)".into(),
                    )));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                // Trailers, or the end: the request is whole.
                end => {
                    if end.is_some() {
                        exact.after = Some(end);
                    }
                    return Poll::Ready(Some(Ok(held)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let waiting = self
            .exact
            .as_ref()
            .is_some_and(|e| e.held.is_some() || e.after.is_some());
        !waiting && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
