//! The request body on its way to the backend: counted for the access log, and held to
//! its declared length over HTTP/2 (RFC 9113 §8.1.1).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// A request body that counts the bytes it passes on, and, for an HTTP/2 request with a
/// `content-length`, holds back the bytes that complete it until the stream has ended.
///
/// RFC 9113 §8.1.1: a request whose `content-length` differs from the sum of its DATA
/// frames is malformed, and an intermediary MUST NOT forward it. h2 resets such a stream
/// when its DATA run past the length or end short of it; but an HTTP/1.1 backend has the
/// whole request once it has `content-length` bytes, so the last of them wait here until
/// the stream's end is seen. A browser sends END_STREAM on its last DATA frame, so nothing
/// waits in practice. A declared length of 0 on a stream still open has no bytes to hold:
/// such a request is sent only once the stream has ended ([`RequestBody::wait_for_end`]).
pub struct RequestBody {
    inner: Incoming,
    count: Option<Arc<AtomicU64>>,
    /// HTTP/2 with a `content-length` only (boxed: nearly every request has none).
    exact: Option<Box<ExactLength>>,
    /// HTTP/2, `content-length: 0`, and the stream not yet ended.
    empty_but_open: bool,
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

impl RequestBody {
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
        let empty_but_open = h2_length == Some(0) && !inner.is_end_stream();
        RequestBody {
            inner,
            count,
            exact,
            empty_but_open,
        }
    }

    /// Whether the request must wait for [`RequestBody::wait_for_end`] before it is sent:
    /// hyper's HTTP/1.1 client writes a request with `content-length: 0` whole at once, so
    /// DATA that followed it (a malformed request, RFC 9113 §8.1.1) would come too late.
    pub fn must_end_first(&self) -> bool {
        self.empty_but_open
    }

    /// Reads a body declared empty to its end: the end, trailers and empty DATA frames pass;
    /// any data (h2 resets the stream over it) is an error.
    pub async fn wait_for_end(&mut self) -> Result<(), BodyError> {
        use http_body_util::BodyExt as _;
        while let Some(frame) = self.inner.frame().await {
            if frame?.data_ref().is_some_and(|d| !d.is_empty()) {
                return Err("DATA after content-length: 0 (RFC 9113 §8.1.1)".into());
            }
        }
        self.empty_but_open = false;
        Ok(())
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
    let mut polled = Pin::new(inner).poll_frame(cx);
    if let Poll::Ready(Some(Ok(frame))) = &mut polled {
        if let (Some(d), Some(count)) = (frame.data_ref(), count) {
            count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        // An HTTP/1.1 client's trailers lose their hop-by-hop fields (RFC 9110 §7.6.1).
        if let Some(trailers) = frame.trailers_mut() {
            super::strip_hop_by_hop(trailers);
        }
    }
    polled.map_err(BodyError::from)
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let RequestBody {
            inner,
            count,
            exact,
            ..
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
        match &self.exact {
            Some(e) => {
                let held = e
                    .held
                    .as_ref()
                    .and_then(Frame::data_ref)
                    .map_or(0, |d| d.len());
                SizeHint::with_exact(e.remaining + held as u64)
            }
            None => self.inner.size_hint(),
        }
    }
}
