//! TLS: read the ClientHello, choose the certificate for its SNI from the live table (exact
//! before wildcard), refuse unknown or missing SNI with `unrecognized_name` as nginx's
//! `ssl_reject_handshake` does, then finish the handshake with rustls.

use std::io;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::certs::CertEntry;
use crate::host::{self, HostBuf};
use crate::tls_stream::TlsStream;

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
}

impl HandshakeError {
    /// A bounded label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeError::NoSni | HandshakeError::UnknownSni(_) => "unknown_sni",
            HandshakeError::Protocol(_) => "protocol_error",
        }
    }
}

/// The ServerConfig every connection starts from: TLS 1.2 and 1.3 only, AEAD suites only (the
/// provider's defaults), ALPN h2 then http/1.1, a shared session cache and ticketer so that
/// resumption works across connections and survives reloads.
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
/// certificate (it reads the live table after the ClientHello has arrived). On success returns
/// the stream, the normalised SNI and the certificate presented.
pub async fn accept<IO, F>(
    io: IO,
    base: &Arc<ServerConfig>,
    lookup: F,
) -> Result<Accepted<IO>, HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&str) -> Option<Arc<CertEntry>>,
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
    drop(start);
    let stream = crate::tls_stream::handshake(io, received, Arc::new(config))
        .await
        .map_err(HandshakeError::Protocol)?;
    Ok((stream, sni, entry))
}
