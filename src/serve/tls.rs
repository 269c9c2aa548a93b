//! TLS: read the ClientHello, choose the certificate for its SNI from the live table (exact
//! before wildcard), refuse unknown or missing SNI with `unrecognized_name` as nginx's
//! `ssl_reject_handshake` does, then finish the handshake with rustls.

use std::io;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::certs::CertEntry;
use crate::config::host::{self, HostBuf};
use crate::serve::tls_stream::TlsStream;

/// Bytes read from the socket at a time while the ClientHello arrives.
const HELLO_READ: usize = 4096;
/// The largest ClientHello taken: rustls' own cap on a handshake message, plus its header.
const MAX_HELLO: usize = 0xffff + 4 + 5;

/// A fatal `unrecognized_name` (112) alert record, sent in plaintext in answer to the
/// ClientHello: rustls has no API to send it, and answering a resolver miss with rustls' own
/// `access_denied` would tell clients the wrong thing.
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the ClientHello has no SNI")]
    NoSni,
    #[error("no certificate for SNI {0}")]
    UnknownSni(String),
    #[error("TLS protocol error: {0}")]
    Protocol(io::Error),
    /// Not a failure: a tls-alpn-01 validation was answered (RFC 8737 §3), after which the
    /// connection closes.
    #[error("answered an ACME tls-alpn-01 validation")]
    AcmeChallenge,
}

impl HandshakeError {
    /// A bounded label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeError::NoSni | HandshakeError::UnknownSni(_) => "unknown_sni",
            HandshakeError::Protocol(_) => "protocol_error",
            HandshakeError::AcmeChallenge => "acme_challenge",
        }
    }
}

/// The ServerConfig every connection starts from: TLS 1.2 and 1.3 only, AEAD suites only (the
/// provider's defaults), ALPN h2 then http/1.1, a shared session cache and ticketer so that
/// resumption works across connections and survives reloads. `accept` sets the ticket count
/// per connection (`tickets_for`).
pub fn base_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Chosen(None)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.session_storage = ServerSessionMemoryCache::new(20_000);
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(Arc::new(cfg))
}

/// TLS 1.3 session tickets sent after a full handshake: two, so that a client can resume two
/// connections at once (OpenSSL's default, so nginx's and HAProxy's).
const TICKETS_FULL: usize = 2;
/// ...and after a client offered a ticket: one, to replace the ticket it just used. OpenSSL
/// does the same; rustls sends its configured count on every handshake. Each ticket costs the
/// server an encryption and the client a parse and a store, which shows with clients that
/// reconnect often (docs/spec-readings.md, "Session resumption"; docs/performance.md).
const TICKETS_RESUMED: usize = 1;

/// How many TLS 1.3 tickets to send on a connection whose first bytes are `received`.
fn tickets_for(received: &[u8]) -> usize {
    if offers_psk(received) {
        TICKETS_RESUMED
    } else {
        TICKETS_FULL
    }
}

/// The `pre_shared_key` extension (RFC 8446 §4.2.11): the client offers a session ticket.
const EXT_PRE_SHARED_KEY: u16 = 41;

/// True when the ClientHello in `records` (TLS records as received, already accepted by
/// rustls) offers a pre-shared key. Anything it cannot follow counts as no. Read here because
/// rustls' `ClientHello` does not say whether a ticket was offered.
fn offers_psk(records: &[u8]) -> bool {
    // The handshake message may span records: gather record bodies until it is whole.
    let mut joined = Vec::new();
    let mut rest = records;
    let message = loop {
        let Some((&[22, _, _, l1, l2], tail)) = rest.split_first_chunk::<5>() else {
            return false;
        };
        let Some((body, tail)) = tail.split_at_checked(usize::from(u16::from_be_bytes([l1, l2])))
        else {
            return false;
        };
        rest = tail;
        let whole = |m: &[u8]| m.len() >= 4 && m.len() >= 4 + u24(&m[1..4]);
        if joined.is_empty() && whole(body) {
            break body;
        }
        joined.extend_from_slice(body);
        if whole(&joined) {
            break joined.as_slice();
        }
    };
    client_hello_extensions(message).is_some_and(|mut exts| exts.any(|t| t == EXT_PRE_SHARED_KEY))
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// The extension types of a ClientHello handshake message (RFC 8446 §4.1.2).
fn client_hello_extensions(message: &[u8]) -> Option<impl Iterator<Item = u16> + '_> {
    let (&[1, a, b, c], body) = message.split_first_chunk::<4>()? else {
        return None;
    };
    let mut r = Reader(body.get(..u24(&[a, b, c]))?);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    let mut exts = Reader(r.vec16()?);
    Some(std::iter::from_fn(move || {
        let kind = exts.u16()?;
        exts.vec16()?;
        Some(kind)
    }))
}

/// Reads a TLS structure front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.take(1)?[0];
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// The certificate chosen for this connection from its ClientHello.
#[derive(Debug)]
struct Chosen(Option<Arc<CertifiedKey>>);

impl ResolvesServerCert for Chosen {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }
}

/// A finished handshake: the stream, the normalised SNI and the certificate presented.
pub type Accepted<IO = tokio::net::TcpStream> = (TlsStream<IO>, Box<str>, Arc<CertEntry>);

/// Runs the server side of a handshake on `io`. `lookup` maps a normalised SNI to its
/// certificate (it reads the live table after the ClientHello has arrived); `challenge` maps
/// it to the certificate answering a tls-alpn-01 validation under way, asked only of a
/// ClientHello that offers ALPN `acme-tls/1`. On success returns the stream, the normalised
/// SNI and the certificate presented.
pub async fn accept<IO, F, C>(
    io: IO,
    base: &Arc<ServerConfig>,
    lookup: F,
    challenge: C,
) -> Result<Accepted<IO>, HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&str) -> Option<Arc<CertEntry>>,
    C: FnOnce(&str) -> Option<Arc<CertifiedKey>>,
{
    // The ClientHello is read here, into a buffer that is then handed to the connection, so
    // that the certificate can be chosen (or the name refused) before rustls goes on.
    let mut io = io;
    let mut received = Vec::new();
    let mut acceptor = rustls::server::Acceptor::default();
    let start = loop {
        let have = received.len();
        if have >= MAX_HELLO {
            return Err(HandshakeError::Protocol(io::Error::new(
                io::ErrorKind::InvalidData,
                "ClientHello larger than 64 KB",
            )));
        }
        received.resize(have + HELLO_READ, 0);
        let n = io
            .read(&mut received[have..])
            .await
            .map_err(HandshakeError::Protocol)?;
        received.truncate(have + n);
        if n == 0 {
            return Err(HandshakeError::Protocol(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection before its ClientHello was complete",
            )));
        }
        let mut fresh = &received[have..];
        while !fresh.is_empty() {
            acceptor
                .read_tls(&mut fresh)
                .map_err(HandshakeError::Protocol)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => break accepted,
            Ok(None) => {}
            Err((e, mut alert)) => {
                let mut bytes = Vec::new();
                // Best effort: the client may already be gone.
                let _ = alert.write_all(&mut bytes);
                let _ = io.write_all(&bytes).await;
                return Err(HandshakeError::Protocol(io::Error::new(
                    io::ErrorKind::InvalidData,
                    e,
                )));
            }
        }
    };
    let mut buf: HostBuf = [0; host::MAX_HOST_LEN + 2];
    let hello = start.client_hello();
    let sni = hello.server_name().map(|raw| {
        host::normalize_authority(raw.as_bytes(), &mut buf)
            .map(Box::<str>::from)
            .ok_or_else(|| raw.to_string())
    });
    // RFC 8737 §3: the CA offers `acme-tls/1` alone, and is answered before any name check
    // (the host has no certificate yet), with the challenge certificate and that protocol;
    // no application data follows.
    let acme = hello
        .alpn()
        .is_some_and(|mut offered| offered.any(|p| p == crate::acme::order::ACME_TLS_ALPN));
    if acme
        && let Some(Ok(name)) = &sni
        && let Some(key) = challenge(name)
    {
        let mut config = (**base).clone();
        config.cert_resolver = Arc::new(Chosen(Some(key)));
        config.alpn_protocols = vec![crate::acme::order::ACME_TLS_ALPN.to_vec()];
        config.send_tls13_tickets = 0;
        drop(start);
        let mut stream = crate::serve::tls_stream::handshake(io, received, Arc::new(config))
            .await
            .map_err(HandshakeError::Protocol)?;
        let _ = stream.shutdown().await;
        return Err(HandshakeError::AcmeChallenge);
    }
    let chosen = match &sni {
        Some(Ok(name)) => lookup(name),
        _ => None,
    };
    let Some(entry) = chosen else {
        // Best effort: the client may already be gone.
        let _ = io.write_all(&UNRECOGNIZED_NAME_ALERT).await;
        let _ = io.shutdown().await;
        return Err(match sni {
            None => HandshakeError::NoSni,
            Some(Ok(n)) => HandshakeError::UnknownSni(n.into()),
            Some(Err(raw)) => HandshakeError::UnknownSni(raw),
        });
    };
    let Some(Ok(sni)) = sni else {
        return Err(HandshakeError::NoSni);
    };
    // One small clone per handshake pins the exact certificate this connection presents, so the
    // 421 check later compares against what the client really saw, even across a reload.
    let mut config = (**base).clone();
    config.cert_resolver = Arc::new(Chosen(Some(entry.key.clone())));
    config.send_tls13_tickets = tickets_for(&received);
    drop(start);
    let stream = crate::serve::tls_stream::handshake(io, received, Arc::new(config))
        .await
        .map_err(HandshakeError::Protocol)?;
    Ok((stream, sni, entry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    /// `/metrics` shows every result at 0 from the start, so each must be in the list.
    #[test]
    fn every_handshake_label_is_a_known_series() {
        for e in [
            HandshakeError::NoSni,
            HandshakeError::UnknownSni(String::new()),
            HandshakeError::Protocol(io::Error::other("x")),
        ] {
            assert!(
                crate::telemetry::metrics::HANDSHAKE_RESULTS.contains(&e.label()),
                "{e}"
            );
        }
    }

    /// A client session store that counts the TLS 1.3 tickets it is given.
    #[derive(Debug)]
    struct Counting {
        inner: ClientSessionMemoryCache,
        tickets: AtomicUsize,
    }

    impl ClientSessionStore for Counting {
        fn set_kx_hint(&self, n: ServerName<'static>, g: rustls::NamedGroup) {
            self.inner.set_kx_hint(n, g)
        }
        fn kx_hint(&self, n: &ServerName<'_>) -> Option<rustls::NamedGroup> {
            self.inner.kx_hint(n)
        }
        fn set_tls12_session(
            &self,
            n: ServerName<'static>,
            v: rustls::client::Tls12ClientSessionValue,
        ) {
            self.inner.set_tls12_session(n, v)
        }
        fn tls12_session(
            &self,
            n: &ServerName<'_>,
        ) -> Option<rustls::client::Tls12ClientSessionValue> {
            self.inner.tls12_session(n)
        }
        fn remove_tls12_session(&self, n: &ServerName<'static>) {
            self.inner.remove_tls12_session(n)
        }
        fn insert_tls13_ticket(
            &self,
            n: ServerName<'static>,
            v: rustls::client::Tls13ClientSessionValue,
        ) {
            self.tickets.fetch_add(1, Ordering::Relaxed);
            self.inner.insert_tls13_ticket(n, v)
        }
        fn take_tls13_ticket(
            &self,
            n: &ServerName<'static>,
        ) -> Option<rustls::client::Tls13ClientSessionValue> {
            self.inner.take_tls13_ticket(n)
        }
    }

    struct Setup {
        base: Arc<ServerConfig>,
        entry: Arc<CertEntry>,
        client: Arc<rustls::ClientConfig>,
        store: Arc<Counting>,
    }

    fn setup() -> Setup {
        let pki = crate::pki::Pki::new("tls test CA").expect("CA");
        let leaf = pki.issue(&["tls.test"]).expect("leaf");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let entry = crate::config::certs::load_pair(
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
            &provider,
        )
        .expect("pair");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(pki.ca_der())).expect("root");
        let store = Arc::new(Counting {
            inner: ClientSessionMemoryCache::new(8),
            tickets: AtomicUsize::new(0),
        });
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.resumption = Resumption::store(store.clone());
        Setup {
            base: base_config(provider).expect("base config"),
            entry: Arc::new(entry),
            client: Arc::new(client),
            store,
        }
    }

    /// One connection through `accept`: returns whether the client resumed and the tickets
    /// it was given (read before the server's first application data).
    async fn connect(s: &Setup) -> (bool, usize) {
        let before = s.store.tickets.load(Ordering::Relaxed);
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(s.client.clone());
        let name = ServerName::try_from("tls.test").expect("name");
        let entry = s.entry.clone();
        let server = async {
            let (mut stream, _, _) = accept(a, &s.base, |_| Some(entry), |_| None)
                .await
                .expect("server handshake");
            stream.write_all(b"hi").await.expect("write");
            stream.flush().await.expect("flush");
            stream
        };
        let (_server, client) = tokio::join!(server, connector.connect(name, b));
        let mut client = client.expect("client handshake");
        let mut hi = [0; 2];
        client.read_exact(&mut hi).await.expect("read");
        let resumed = client.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        (resumed, s.store.tickets.load(Ordering::Relaxed) - before)
    }

    #[tokio::test]
    async fn two_tickets_after_a_full_handshake_one_after_a_resumed_one() {
        let s = setup();
        assert_eq!(connect(&s).await, (false, TICKETS_FULL), "first connection");
        assert_eq!(
            connect(&s).await,
            (true, TICKETS_RESUMED),
            "resumed connection"
        );
        assert_eq!(connect(&s).await, (true, TICKETS_RESUMED), "resumed again");
    }

    /// The first flight of a client connection (its ClientHello records).
    fn client_hello(s: &Setup) -> Vec<u8> {
        let name = ServerName::try_from("tls.test").expect("name");
        let mut c = rustls::ClientConnection::new(s.client.clone(), name).expect("client");
        let mut out = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut out).expect("write_tls");
        }
        out
    }

    /// Splits a single-record flight into two records at `at` bytes of its body.
    fn split_record(flight: &[u8], at: usize) -> Vec<u8> {
        let body = &flight[5..];
        let mut out = Vec::new();
        for part in [&body[..at], &body[at..]] {
            out.extend_from_slice(&flight[..3]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[tokio::test]
    async fn a_ticket_offer_is_seen_in_one_record_or_several() {
        let s = setup();
        let fresh = client_hello(&s);
        assert!(!offers_psk(&fresh), "no ticket yet");
        connect(&s).await;
        let offer = client_hello(&s);
        assert!(offers_psk(&offer), "ticket offered");
        for at in [1, 3, 4, 40, offer.len() - 6] {
            assert!(offers_psk(&split_record(&offer, at)), "split at {at}");
        }
        for at in [1, 3, 4, 40, fresh.len() - 6] {
            assert!(!offers_psk(&split_record(&fresh, at)), "split at {at}");
        }
        // Cut short, or not a handshake at all: no.
        assert!(!offers_psk(&offer[..offer.len() - 1]));
        assert!(!offers_psk(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!offers_psk(&[]));
    }
}
