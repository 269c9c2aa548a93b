//! The server side of a TLS connection, over rustls' unbuffered API.
//!
//! rustls' buffered `ServerConnection`, which tokio-rustls wraps, keeps a 4 KB read buffer for
//! the connection's whole life and has no call to give it back, which adds up over many idle
//! keep-alive connections (docs/performance.md). Here the stream owns its buffers, so a parked
//! connection (`park`) releases them ([`TlsStream::release_buffers`]) and keeps only rustls'
//! protocol state. Writes are encrypted straight into the outgoing buffer rather than into a
//! record allocated per write.
//!
//! rustls does all of TLS; this module only moves bytes between the socket, rustls' state
//! machine and the reader.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use rustls::server::ServerConnectionData;

/// Free space asked of the socket per read, as rustls' buffered connection does.
const READ_SIZE: usize = 4096;
/// The most received TLS bytes held unprocessed: a 64 KB handshake message (rustls' own cap)
/// plus a record. More than that means the peer is not speaking TLS as rustls allows.
const MAX_IN: usize = 0xffff + 16384 + 2048 + 5;
/// Plaintext encrypted per write call: four full records.
const WRITE_CHUNK: usize = 4 * 16384;
/// Writes this large go out at once even when coalescing: a batch that size is worth its
/// record and system call, and a download is not held up once per chunk.
const COALESCE_BELOW: usize = 4096;
/// Room first offered to rustls per record written; it asks for more when it needs it.
const RECORD_OVERHEAD: usize = 64;

/// A server TLS stream whose handshake is complete (see [`handshake`]).
pub struct TlsStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// Received TLS bytes not yet processed: `inb[..in_len]`. The rest is spare room, zeroed
    /// once when it grew.
    inb: Vec<u8>,
    in_len: usize,
    bufs: Bufs,
    /// The peer sent close_notify or ended the stream: reads return end of stream.
    read_closed: bool,
    /// close_notify is queued: nothing more may be written.
    write_closed: bool,
    /// Small writes wait for one turn of the runtime before they go out ([`Self::coalesce`]).
    coalesce: bool,
    /// The write under way has had its turn.
    deferred: bool,
}

/// The stream's other buffers, apart from the received bytes that rustls borrows.
#[derive(Default)]
struct Bufs {
    /// Decrypted data the reader has not taken: `plain[plain_pos..]`.
    plain: Vec<u8>,
    plain_pos: usize,
    /// TLS bytes not yet sent: `out[out_pos..out_end]`.
    out: Vec<u8>,
    out_pos: usize,
    out_end: usize,
}

/// What to do if rustls says application data may be written.
#[derive(Clone, Copy)]
enum Out<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// What one pass of rustls' state machine came to.
#[derive(Debug, PartialEq)]
enum RustlsStep {
    /// Something was done (records read, handshake bytes encoded): go on.
    Again,
    /// The handshake needs more bytes from the peer.
    Blocked,
    /// The handshake is over and nothing is left to process: data may be written, and more
    /// bytes are needed to read further.
    Open,
    /// `Out::Data`'s first `n` bytes, or `Out::CloseNotify`, were encrypted into `out`.
    Wrote(usize),
    /// The peer sent close_notify (reported once).
    PeerClosed,
    /// Both sides sent close_notify.
    Closed,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Bufs {
    fn out_pending(&self) -> bool {
        self.out_pos < self.out_end
    }

    /// Spare room of at least `need` bytes after the pending output.
    fn out_room(&mut self, need: usize) -> &mut [u8] {
        if !self.out_pending() {
            self.out_pos = 0;
            self.out_end = 0;
        }
        if self.out.len() < self.out_end + need {
            self.out.resize(self.out_end + need, 0);
        }
        &mut self.out[self.out_end..]
    }

    /// Hands decrypted bytes to the reader's buffer while it has room and nothing is waiting
    /// before them; keeps the rest.
    fn deliver(&mut self, mut payload: &[u8], rd: Option<&mut ReadBuf<'_>>) {
        if self.plain_pos == self.plain.len() {
            self.plain.clear();
            self.plain_pos = 0;
            if let Some(rd) = rd {
                let n = rd.remaining().min(payload.len());
                rd.put_slice(&payload[..n]);
                payload = &payload[n..];
            }
        }
        self.plain.extend_from_slice(payload);
    }

    /// Copies waiting plaintext to the reader; whether there was any.
    fn take_plain(&mut self, rd: &mut ReadBuf<'_>) -> bool {
        if self.plain_pos == self.plain.len() {
            return false;
        }
        let n = rd.remaining().min(self.plain.len() - self.plain_pos);
        rd.put_slice(&self.plain[self.plain_pos..self.plain_pos + n]);
        self.plain_pos += n;
        true
    }

    fn encode(&mut self, e: &mut EncodeTlsData<'_, ServerConnectionData>) {
        let mut need = READ_SIZE;
        loop {
            match e.encode(self.out_room(need)) {
                Ok(n) => {
                    self.out_end += n;
                    return;
                }
                Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                    need = required_size;
                }
                Err(EncodeError::AlreadyEncoded) => return,
            }
        }
    }

    fn encrypt(
        &mut self,
        w: &mut WriteTraffic<'_, ServerConnectionData>,
        what: Out<'_>,
    ) -> io::Result<usize> {
        let data = match what {
            Out::Data(d) => &d[..d.len().min(WRITE_CHUNK)],
            _ => &[][..],
        };
        let mut need = data.len() + (data.len() / 16384 + 1) * RECORD_OVERHEAD;
        loop {
            let room = self.out_room(need);
            let r = match what {
                Out::CloseNotify => w.queue_close_notify(room),
                _ => w.encrypt(data, room),
            };
            match r {
                Ok(n) => {
                    self.out_end += n;
                    return Ok(data.len());
                }
                Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                    need = required_size;
                }
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    /// The socket under the TLS layer.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The ALPN protocol agreed in the handshake.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// Makes a write smaller than [`COALESCE_BELOW`] wait until the tasks already queued on
    /// the thread have run (the task wakes itself and goes to the back of the queue), then go
    /// out with whatever was written meanwhile. For HTTP/2: the responses of many streams
    /// finish one after another as their backend answers arrive, and each flush would
    /// otherwise be a TLS record, a system call and a wake-up of the client of its own.
    pub fn coalesce(&mut self, on: bool) {
        self.coalesce = on;
    }

    /// Whether received bytes are waiting here (decrypted, or a record not yet complete), so
    /// that the socket's readiness is not the whole story.
    pub fn has_buffered(&self) -> bool {
        self.in_len > 0 || self.bufs.plain_pos < self.bufs.plain.len()
    }

    /// Frees the buffers that hold nothing, for a connection about to idle. They are
    /// allocated again by the next read or write.
    pub fn release_buffers(&mut self) {
        let b = &mut self.bufs;
        if self.in_len == 0 {
            self.inb = Vec::new();
        }
        if b.plain_pos == b.plain.len() {
            b.plain = Vec::new();
            b.plain_pos = 0;
        }
        if !b.out_pending() {
            b.out = Vec::new();
            b.out_pos = 0;
            b.out_end = 0;
        }
    }

    /// One pass of rustls over the received bytes. Decrypted data goes to `rd` where it fits
    /// and is kept otherwise; `out` says what to encrypt if writing is possible.
    fn process(&mut self, rd: Option<&mut ReadBuf<'_>>, out: Out<'_>) -> io::Result<RustlsStep> {
        let Self {
            conn,
            inb,
            in_len,
            bufs,
            ..
        } = self;
        let status = conn.process_tls_records(&mut inb[..*in_len]);
        let discard = status.discard;
        let step = match status.state {
            Err(e) => Err(tls_error(e)),
            Ok(ConnectionState::ReadTraffic(mut t)) => {
                let mut rd = rd;
                let mut r = Ok(RustlsStep::Again);
                while let Some(rec) = t.next_record() {
                    match rec {
                        Ok(rec) => bufs.deliver(rec.payload, rd.as_deref_mut()),
                        Err(e) => {
                            r = Err(tls_error(e));
                            break;
                        }
                    }
                }
                r
            }
            Ok(ConnectionState::EncodeTlsData(mut e)) => {
                bufs.encode(&mut e);
                Ok(RustlsStep::Again)
            }
            // The encoded bytes stay in `out`, which is sent before anything written after.
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                Ok(RustlsStep::Again)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(RustlsStep::Blocked),
            Ok(ConnectionState::WriteTraffic(mut w)) => match out {
                Out::Nothing => Ok(RustlsStep::Open),
                _ => bufs.encrypt(&mut w, out).map(RustlsStep::Wrote),
            },
            Ok(ConnectionState::PeerClosed) => Ok(RustlsStep::PeerClosed),
            Ok(ConnectionState::Closed) => Ok(RustlsStep::Closed),
            // Early data is never enabled, and nothing else exists in this rustls.
            Ok(other) => Err(io::Error::other(format!("unexpected TLS state {other:?}"))),
        };
        if discard > 0 {
            inb.copy_within(discard..*in_len, 0);
            *in_len -= discard;
        }
        step
    }

    /// After rustls reported an error: encodes the alert it queued, and ends the stream.
    fn encode_alert(&mut self) {
        // The connection is dead: what was received is no longer of use.
        self.in_len = 0;
        for _ in 0..8 {
            if !matches!(self.process(None, Out::Nothing), Ok(RustlsStep::Again)) {
                break;
            }
        }
        self.read_closed = true;
        self.write_closed = true;
    }

    /// [`Self::encode_alert`], and one try at sending it.
    fn fail(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        self.encode_alert();
        let _ = self.poll_send(cx);
        e
    }

    /// Sends the pending output.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let b = &mut self.bufs;
        while b.out_pos < b.out_end {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &b.out[b.out_pos..b.out_end])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => b.out_pos += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        b.out_pos = 0;
        b.out_end = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads more bytes from the socket; how many (0 at end of stream).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.inb.len() < self.in_len + READ_SIZE {
            if self.in_len >= MAX_IN {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS peer sent more than a record's worth of unusable bytes",
                )));
            }
            self.inb.resize(self.in_len + READ_SIZE, 0);
        }
        let mut rb = ReadBuf::new(&mut self.inb[self.in_len..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        self.in_len += n;
        Poll::Ready(Ok(n))
    }
}

/// Completes the server side of a handshake on `io` with `config`. `received` holds the bytes
/// already read from `io` (the ClientHello at least), which rustls processes first.
pub async fn handshake<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    received: Vec<u8>,
    config: Arc<ServerConfig>,
) -> io::Result<TlsStream<IO>> {
    let in_len = received.len();
    let mut s = TlsStream {
        io,
        conn: UnbufferedServerConnection::new(config).map_err(tls_error)?,
        inb: received,
        in_len,
        bufs: Bufs::default(),
        read_closed: false,
        write_closed: false,
        coalesce: false,
        deferred: false,
    };
    loop {
        let step = match s.process(None, Out::Nothing) {
            Ok(step) => step,
            Err(e) => {
                s.encode_alert();
                // Best effort: the handshake timeout bounds this wait.
                let _ = poll_fn(|cx| s.poll_send(cx)).await;
                return Err(e);
            }
        };
        match step {
            RustlsStep::Again => {}
            RustlsStep::Open if !s.conn.is_handshaking() => break,
            // A client that closes right after its Finished (an ACME CA's tls-alpn-01
            // validation does, RFC 8737 §3) completed the handshake: its close is read later.
            RustlsStep::PeerClosed if !s.conn.is_handshaking() => {
                s.read_closed = true;
                break;
            }
            RustlsStep::Blocked | RustlsStep::Open => {
                poll_fn(|cx| s.poll_send(cx)).await?;
                if poll_fn(|cx| s.poll_fill(cx)).await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection during the TLS handshake",
                    ));
                }
            }
            RustlsStep::PeerClosed | RustlsStep::Closed | RustlsStep::Wrote(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the TLS handshake",
                ));
            }
        }
    }
    // The last flight and the session tickets.
    poll_fn(|cx| s.poll_send(cx)).await?;
    Ok(s)
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.bufs.take_plain(buf) {
            return Poll::Ready(Ok(()));
        }
        let start = buf.filled().len();
        loop {
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // What rustls queued to send (a KeyUpdate answer) goes out as soon as it can.
            if this.bufs.out_pending()
                && let Poll::Ready(Err(e)) = this.poll_send(cx)
            {
                return Poll::Ready(Err(e));
            }
            match this.process(Some(buf), Out::Nothing) {
                Err(e) => return Poll::Ready(Err(this.fail(cx, e))),
                Ok(RustlsStep::Again) => {
                    if buf.filled().len() > start || this.bufs.plain_pos < this.bufs.plain.len() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Ok(RustlsStep::PeerClosed | RustlsStep::Closed) => this.read_closed = true,
                Ok(RustlsStep::Blocked | RustlsStep::Open | RustlsStep::Wrote(_)) => {
                    // A peer that ends the stream without close_notify ends it all the same:
                    // HTTP's own framing tells a cut-off message.
                    if ready!(this.poll_fill(cx))? == 0 {
                        this.read_closed = true;
                    }
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // Take no more while the last write still waits for the socket.
        if this.bufs.out_pending() {
            ready!(this.poll_send(cx))?;
        }
        if this.coalesce && data.len() < COALESCE_BELOW && !this.deferred {
            this.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.deferred = false;
        loop {
            match this.process(None, Out::Data(data)) {
                Ok(RustlsStep::Wrote(n)) => {
                    // Sent now if the socket takes it, else by the next write or flush.
                    if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(RustlsStep::Again) => {}
                Ok(RustlsStep::PeerClosed) => this.read_closed = true,
                Ok(RustlsStep::Closed) => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
                Ok(RustlsStep::Blocked | RustlsStep::Open) => {
                    return Poll::Ready(Err(io::Error::other("TLS handshake not complete")));
                }
                Err(e) => return Poll::Ready(Err(this.fail(cx, e))),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            ready!(this.poll_send(cx))?;
            this.write_closed = true;
            for _ in 0..8 {
                match this.process(None, Out::CloseNotify) {
                    Ok(RustlsStep::Again) => {}
                    Ok(RustlsStep::PeerClosed) => this.read_closed = true,
                    // Wrote: queued; Closed: already sent; an error: close the socket anyway.
                    _ => break,
                }
            }
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    type Client = tokio_rustls::client::TlsStream<DuplexStream>;

    /// A server stream and a tokio-rustls client joined by an in-memory pipe; `tls12` pins the
    /// client to TLS 1.2.
    async fn pair(tls12: bool) -> (TlsStream<DuplexStream>, Client) {
        let pki = crate::pki::Pki::new("tls-stream test CA").expect("CA");
        let leaf = pki.issue(&["tls.test"]).expect("leaf");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key"),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(pki.ca_der())).expect("root");
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = ServerName::try_from("tls.test").expect("name");
        let (s, c) = tokio::join!(
            handshake(a, Vec::new(), Arc::new(server)),
            connector.connect(name, b)
        );
        (s.expect("server handshake"), c.expect("client handshake"))
    }

    /// Sends `n` patterned bytes each way at once and checks what arrives.
    async fn exchange(s: &mut TlsStream<DuplexStream>, c: &mut Client, n: usize) {
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let (mut sr, mut sw) = tokio::io::split(s);
        let (mut cr, mut cw) = tokio::io::split(c);
        let (mut got_s, mut got_c) = (vec![0; n], vec![0; n]);
        let (r1, r2, r3, r4) = tokio::join!(
            async {
                sw.write_all(&data).await?;
                sw.flush().await
            },
            async {
                cw.write_all(&data).await?;
                cw.flush().await
            },
            sr.read_exact(&mut got_s),
            cr.read_exact(&mut got_c),
        );
        r1.expect("server write");
        r2.expect("client write");
        r3.expect("server read");
        r4.expect("client read");
        assert!(got_s == data, "server received other bytes than sent");
        assert!(got_c == data, "client received other bytes than sent");
    }

    #[tokio::test]
    async fn both_versions_carry_data_both_ways() {
        for tls12 in [false, true] {
            let (mut s, mut c) = pair(tls12).await;
            // Small, then larger than a record and than the pipe.
            exchange(&mut s, &mut c, 10).await;
            exchange(&mut s, &mut c, 300_000).await;
        }
    }

    /// Counts wake-ups.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn coalesced_small_writes_wait_one_turn_and_large_ones_do_not() {
        let (mut s, mut c) = pair(false).await;
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let woken = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);
        let small: Vec<u8> = (0..100u8).collect();
        let large = vec![7u8; COALESCE_BELOW];

        s.coalesce(true);
        let first = Pin::new(&mut s).poll_write(&mut cx, &small);
        assert!(first.is_pending(), "a small write went out at once");
        assert_eq!(woken(), 1, "the deferred write would never be polled again");
        assert_eq!(
            s.bufs.out_end, 0,
            "the deferred write was encrypted already"
        );
        let again = Pin::new(&mut s).poll_write(&mut cx, &small);
        assert!(matches!(again, Poll::Ready(Ok(100))), "{again:?}");
        let big = Pin::new(&mut s).poll_write(&mut cx, &large);
        assert!(
            matches!(big, Poll::Ready(Ok(n)) if n == large.len()),
            "{big:?}"
        );
        s.coalesce(false);
        let plain = Pin::new(&mut s).poll_write(&mut cx, &small);
        assert!(matches!(plain, Poll::Ready(Ok(100))), "{plain:?}");
        assert_eq!(woken(), 1);
        s.flush().await.expect("flush");

        let mut got = vec![0; 200 + large.len()];
        c.read_exact(&mut got).await.expect("client read");
        assert_eq!(got[..100], small[..]);
        assert_eq!(got[100..100 + large.len()], large[..]);
        assert_eq!(got[100 + large.len()..], small[..]);
    }

    #[tokio::test]
    async fn key_update_from_the_client_is_followed() {
        let (mut s, mut c) = pair(false).await;
        exchange(&mut s, &mut c, 1000).await;
        c.get_mut().1.refresh_traffic_keys().expect("key update");
        exchange(&mut s, &mut c, 1000).await;
        exchange(&mut s, &mut c, 70_000).await;
    }

    #[tokio::test]
    async fn released_buffers_come_back_on_use() {
        let (mut s, mut c) = pair(false).await;
        exchange(&mut s, &mut c, 5000).await;
        assert!(!s.has_buffered());
        s.release_buffers();
        assert_eq!(
            s.inb.capacity() + s.bufs.plain.capacity() + s.bufs.out.capacity(),
            0
        );
        exchange(&mut s, &mut c, 5000).await;
    }

    #[tokio::test]
    async fn shutdown_sends_close_notify_and_peer_close_ends_reads() {
        let (mut s, mut c) = pair(false).await;
        s.shutdown().await.expect("server shutdown");
        let mut rest = Vec::new();
        // tokio-rustls reports a stream cut without close_notify as an error.
        c.read_to_end(&mut rest)
            .await
            .expect("clean end at the client");
        assert!(rest.is_empty());
        c.shutdown().await.expect("client shutdown");
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).await.expect("server read after close"), 0);
    }

    #[tokio::test]
    async fn garbage_after_the_handshake_is_an_error() {
        let (mut s, c) = pair(false).await;
        let (mut raw, _conn) = c.into_inner();
        raw.write_all(&[0x17, 0x03, 0x03, 0x00, 0x20])
            .await
            .expect("write");
        raw.write_all(&[0u8; 32]).await.expect("write");
        let mut buf = [0u8; 16];
        let e = s
            .read(&mut buf)
            .await
            .expect_err("a record that does not decrypt");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
