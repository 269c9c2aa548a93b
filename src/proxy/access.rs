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

use crate::config::host::HostBuf;
use hyper::body::{Body, Frame, SizeHint};

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
        let mut buf: HostBuf = [0; crate::config::host::MAX_HOST_LEN + 2];
        let host = self
            .host
            .as_ref()
            .and_then(|h| crate::config::host::normalize_authority(h.as_bytes(), &mut buf))
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
    progress: Option<Arc<crate::proxy::progress::ConnProgress>>,
}

impl<B: Body> Logged<B> {
    /// Wraps `inner`; the line (if any) is written when it ends or is dropped, and
    /// `progress` told when it is dropped.
    pub fn new(
        inner: B,
        record: Option<Box<Record>>,
        progress: Option<Arc<crate::proxy::progress::ConnProgress>>,
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
