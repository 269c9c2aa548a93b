//! Lingering close for HTTP/2 connections, as nginx's `lingering_close` does.
//!
//! When the gateway ends an HTTP/2 connection (idle for `keepalive_timeout`, or a graceful
//! stop), h2 sends GOAWAY, the TLS stream its close_notify and the socket a FIN. The client
//! may still have frames on the way: a WINDOW_UPDATE for the data it just read, a PING or
//! SETTINGS acknowledgement. Closed with those unread, the socket answers them with a reset,
//! and the client sees its connection fail ("broken pipe") instead of a clean close. So a
//! stream that was shut down is not closed when dropped: a task keeps it, reads and drops what
//! still arrives, and closes it once the client closes its side or [`LINGER`] has passed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The longest a shut-down stream is kept for the client to close its side (nginx's
/// `lingering_timeout`).
pub const LINGER: Duration = Duration::from_secs(5);

/// A stream that lingers once shut down (see the module doc). A stream dropped without a
/// shutdown (a connection cut for abuse, or that ignored its GOAWAY) is closed at once.
pub struct Lingering<S: AsyncRead + Unpin + Send + 'static> {
    /// `None` only while dropped.
    io: Option<S>,
    shut: bool,
}

impl<S: AsyncRead + Unpin + Send + 'static> Lingering<S> {
    /// Wraps `io`.
    pub fn new(io: S) -> Self {
        Lingering {
            io: Some(io),
            shut: false,
        }
    }
}

fn gone() -> io::Error {
    io::Error::from(io::ErrorKind::NotConnected)
}

impl<S: AsyncRead + Unpin + Send + 'static> AsyncRead for Lingering<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().io.as_mut() {
            Some(io) => Pin::new(io).poll_read(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Lingering<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().io.as_mut() {
            Some(io) => Pin::new(io).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().io.as_mut() {
            Some(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io.as_mut() {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let done = ready!(Pin::new(io).poll_shutdown(cx));
        this.shut |= done.is_ok();
        Poll::Ready(done)
    }
}

impl<S: AsyncRead + Unpin + Send + 'static> Drop for Lingering<S> {
    fn drop(&mut self) {
        if !self.shut {
            return;
        }
        let (Some(io), Ok(rt)) = (self.io.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        rt.spawn(drain(io));
    }
}

/// Reads and drops what arrives on `io` until the peer closes its side, an error, or [`LINGER`].
async fn drain<S: AsyncRead + Unpin>(mut io: S) {
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(1..) = io.read(&mut sink).await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair on loopback: (client, server).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    /// What the client sees when it writes twice after the server shut down and dropped its
    /// stream (with `linger`, through [`Lingering`]), then reads: the second write's result
    /// and the read's.
    async fn writes_after_close(linger: bool) -> (io::Result<()>, io::Result<usize>) {
        let (mut client, server) = pair().await;
        if linger {
            let mut server = Lingering::new(server);
            server.shutdown().await.expect("shutdown");
        } else {
            let mut server = server;
            server.shutdown().await.expect("shutdown");
        }
        let pause = || tokio::time::sleep(Duration::from_millis(50));
        pause().await;
        // Frames the client had on the way when the server closed.
        let _ = client.write_all(b"WINDOW_UPDATE").await;
        pause().await;
        let second = client.write_all(b"PING ack").await;
        pause().await;
        let mut buf = [0u8; 16];
        let read = client.read(&mut buf).await;
        (second, read)
    }

    #[tokio::test]
    async fn a_shut_down_stream_reads_what_still_arrives_instead_of_resetting() {
        let (second, read) = writes_after_close(true).await;
        assert!(second.is_ok(), "the late write failed: {second:?}");
        assert_eq!(
            read.ok(),
            Some(0),
            "the client should see a clean end of stream"
        );
        // Without lingering, the same client is reset: this is what the wrapper is for.
        let (second, read) = writes_after_close(false).await;
        assert!(
            second.is_err() || read.is_err(),
            "expected a reset without lingering: {second:?} {read:?}"
        );
    }

    /// A stream that says when it is dropped (closed).
    struct Probe(TcpStream, std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl Drop for Probe {
        fn drop(&mut self) {
            self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl AsyncRead for Probe {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Probe {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }

    /// A server stream, shut down and dropped through [`Lingering`], with its closed flag.
    async fn lingering() -> (TcpStream, std::sync::Arc<std::sync::atomic::AtomicBool>) {
        let (client, server) = pair().await;
        let closed = std::sync::Arc::default();
        let mut server = Lingering::new(Probe(server, std::sync::Arc::clone(&closed)));
        server.shutdown().await.expect("shutdown");
        drop(server);
        (client, closed)
    }

    fn is_closed(closed: &std::sync::atomic::AtomicBool) -> bool {
        closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn the_lingering_stream_closes_once_the_client_closes_its_side() {
        let (mut client, closed) = lingering().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !is_closed(&closed),
            "closed while the client's side was open"
        );
        client.shutdown().await.expect("client shutdown");
        for _ in 0..100 {
            if is_closed(&closed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("still open 1 s after the client closed its side");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_closes_is_not_waited_for_beyond_the_linger_time() {
        let (_client, closed) = lingering().await;
        tokio::time::sleep(LINGER - Duration::from_millis(100)).await;
        assert!(!is_closed(&closed), "closed before the linger time");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(is_closed(&closed), "still open after the linger time");
    }
}
