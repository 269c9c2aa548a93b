//! The backend connection pool: idle HTTP/1.1 connections to the one backend, reused newest
//! first. A connection goes back to the pool when the response body it carried has been read to
//! its end; one abandoned mid-body, or upgraded, is closed instead. A request that a reused
//! connection could not even send (it had closed meanwhile) is retried on another.
//!
//! Written instead of hyper-util's legacy client because that one spawns a task per request to
//! watch the connection become idle again; the load profile showed its checkout and spawn as
//! the largest user-space cost on the forwarding path (benches/load/README.md).

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::access::Counted;

type Sender = SendRequest<Counted>;

/// Why a request could not be sent.
#[derive(Debug)]
pub enum PoolError {
    /// No connection could be made.
    Connect(String),
    /// The connection failed while sending or before the response head.
    Request(hyper::Error),
}

/// Pooled connections to one backend.
pub struct Pool {
    authority: Authority,
    connect_timeout: Duration,
    max_idle: usize,
    /// Idle connections, one list per serving thread (`workers::shard`): a connection's task
    /// runs on the thread that made it, so a request reuses one made on its own thread.
    idle: Box<[Mutex<Vec<Sender>>]>,
    /// Idle connections in all lists, held to `max_idle` as one pool would be.
    idle_count: AtomicUsize,
}

/// Idle lists kept: serving threads beyond this share lists.
const SHARDS: usize = 64;

impl Pool {
    /// An empty pool for `authority`.
    pub fn new(authority: Authority, connect_timeout: Duration, max_idle: usize) -> Arc<Pool> {
        Arc::new(Pool {
            authority,
            connect_timeout,
            max_idle,
            idle: (0..SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
            idle_count: AtomicUsize::new(0),
        })
    }

    /// Sends `req` (origin-form URI, Host already set) and returns the response with a body
    /// that hands the connection back when it is read to the end.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Counted>,
    ) -> Result<Response<PoolBody>, PoolError> {
        loop {
            let (mut sender, reused) = match self.checkout().await {
                Some(s) => (s, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let pool = Arc::clone(self);
                    return Ok(resp.map(|body| PoolBody::new(body, sender, pool)));
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: the reused connection had closed. Try another one.
                    Some(back) if reused => req = back,
                    _ => return Err(PoolError::Request(e.into_error())),
                },
            }
        }
    }

    async fn checkout(&self) -> Option<Sender> {
        loop {
            // No idle clock: the backend closes connections it finds idle too long, hyper
            // notices, and a request that still races such a close is retried above.
            let mut sender = self.lock().pop()?;
            self.idle_count.fetch_sub(1, Ordering::Relaxed);
            if sender.is_closed() {
                continue;
            }
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<Sender, PoolError> {
        let addr = self.authority.as_str();
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                PoolError::Connect(format!(
                    "connecting to {addr} timed out after {:?}",
                    self.connect_timeout
                ))
            })?
            .map_err(|e| PoolError::Connect(format!("cannot connect to {addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
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

    fn put_back(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        if self.idle_count.fetch_add(1, Ordering::Relaxed) < self.max_idle {
            self.lock().push(sender);
        } else {
            self.idle_count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sender>> {
        self.idle[crate::workers::shard() % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// A backend response body that returns its connection to the pool once read to the end.
pub struct PoolBody {
    inner: Incoming,
    back: Option<(Sender, Arc<Pool>)>,
}

impl PoolBody {
    fn new(inner: Incoming, sender: Sender, pool: Arc<Pool>) -> Self {
        let mut b = PoolBody {
            inner,
            back: Some((sender, pool)),
        };
        if b.inner.is_end_stream() {
            b.release();
        }
        b
    }

    fn release(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            pool.put_back(sender);
        }
    }

    /// Keeps the connection out of the pool (it is being upgraded).
    pub fn detach(&mut self) {
        self.back = None;
    }
}

impl Body for PoolBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.back = None,
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
