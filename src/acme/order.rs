//! One ACME order (RFC 8555 §7.4) for one logon address: the account, the challenge
//! (http-01 or tls-alpn-01, answered through `Storage` by whichever listener the CA reaches),
//! the CSR, the certificate written under storage, and the CA's renewal window (RFC 9773).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse,
    CertificateIdentifier, ChallengeType, ExternalAccountKey, HttpClient, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::acme::store::{Challenge, Storage};
use crate::config::Acme;

/// The longest one order may take, CA polling included; a slot is never held longer.
pub const ORDER_DEADLINE: Duration = Duration::from_secs(300);

/// How the order's and the certificate's state are polled: the CA's Retry-After when it
/// gives one (instant-acme honours it), else 200 ms growing by half each time, for 90 s.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(200))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));

/// The ALPN protocol of a tls-alpn-01 validation (RFC 8737 §6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Why an order failed, in the CA's words where it gave them.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("the ACME CA said")]
    Ca(#[from] instant_acme::Error),
    /// The CA refused the order or its validation, with its problem document (RFC 8555 §6.7).
    #[error("{detail} ({kind})")]
    Refused { detail: String, kind: String },
    #[error("{0}")]
    Order(String),
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the key or CSR")]
    Csr(#[from] rcgen::Error),
}

impl AcmeError {
    /// The problem type the CA gave (`urn:ietf:params:acme:error:...`), if any.
    pub fn problem_type(&self) -> Option<&str> {
        match self {
            AcmeError::Ca(instant_acme::Error::Api(p)) => p.r#type.as_deref(),
            AcmeError::Refused { kind, .. } => Some(kind),
            _ => None,
        }
    }

    /// Whether the CA said to slow down (RFC 8555 §6.7 `rateLimited`).
    pub fn rate_limited(&self) -> bool {
        self.problem_type() == Some("urn:ietf:params:acme:error:rateLimited")
    }
}

/// An order's outcome, with the CA's Retry-After (RFC 8555 §6.6, RFC 9110 §10.2.3) from any
/// error response it gave on the way.
pub struct Outcome {
    pub result: Result<Issued, AcmeError>,
    pub retry_after: Option<SystemTime>,
}

/// A certificate the CA issued and that is now stored.
#[derive(Debug)]
pub struct Issued {
    /// Unix seconds at which the CA suggests renewing (RFC 9773), when it serves renewal
    /// information.
    pub renew_at: Option<i64>,
    /// The leaf's serial, hex, for matching `renew_at` to the certificate later.
    pub serial: String,
}

tokio::task_local! {
    /// The latest Retry-After seen on an error response in this order's task.
    static RETRY_AFTER: Cell<Option<SystemTime>>;
}

/// The HTTP client instant-acme uses, noting Retry-After on error responses: instant-acme
/// turns those into problem documents and drops the header.
struct NotesRetryAfter(Box<dyn HttpClient>);

impl HttpClient for NotesRetryAfter {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = self.0.request(req);
        Box::pin(async move {
            let rsp = fut.await?;
            let status = rsp.parts.status;
            if (status.is_client_error() || status.is_server_error())
                && let Some(at) = retry_after(&rsp.parts.headers)
            {
                let _ = RETRY_AFTER.try_with(|c| c.set(Some(at)));
            }
            Ok(rsp)
        })
    }
}

/// A Retry-After value: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn retry_after(headers: &http::HeaderMap) -> Option<SystemTime> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    match value.parse::<u64>() {
        Ok(secs) => Some(SystemTime::now() + Duration::from_secs(secs)),
        Err(_) => httpdate::parse_http_date(value).ok(),
    }
}

/// The HTTPS client to the CA: the system's roots, or `directory_ca` alone.
fn http_client(acme: &Acme) -> Result<Box<dyn HttpClient>, AcmeError> {
    use hyper_rustls::HttpsConnectorBuilder;
    let builder = match &acme.directory_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let pem = std::fs::read(path).map_err(|source| AcmeError::Io {
                what: "read",
                path: path.clone(),
                source,
            })?;
            for der in CertificateDer::pem_slice_iter(&pem) {
                let der = der.map_err(|e| AcmeError::Order(format!("{}: {e}", path.display())))?;
                roots
                    .add(der)
                    .map_err(|e| AcmeError::Order(format!("{}: {e}", path.display())))?;
            }
            let tls = rustls::ClientConfig::builder_with_provider(crate::config::crypto_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| AcmeError::Order(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            HttpsConnectorBuilder::new().with_tls_config(tls)
        }
        None => HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| AcmeError::Order(format!("cannot load the system's roots: {e}")))?,
    };
    let connector = builder
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, BodyWrapper<Bytes>>(connector);
    Ok(Box::new(NotesRetryAfter(Box::new(client))))
}

use rustls_pki_types::pem::PemObject as _;

/// An ACME account, ready to order.
pub struct Client {
    account: Account,
    ari: bool,
}

impl Client {
    /// The account in `storage/account.json`, or a new one (bound to the external account when
    /// `eab_kid` is set; saved there, 0600).
    pub async fn open(acme: &Acme, storage: &Storage) -> Result<Client, AcmeError> {
        let file = storage.account_file();
        let builder =
            || -> Result<_, AcmeError> { Ok(Account::builder_with_http(http_client(acme)?)) };
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Ok(creds) = serde_json::from_str::<AccountCredentials>(&text)
        {
            let account = builder()?.from_credentials(creds).await?;
            return Ok(Client::of(account).await);
        }
        let eab = match &acme.eab {
            Some((kid, key)) => {
                use base64::Engine as _;
                let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(key.trim_end_matches('='))
                    .map_err(|e| {
                        AcmeError::Order(format!("acme.eab_hmac_key is not base64url: {e}"))
                    })?;
                Some(ExternalAccountKey::new(kid.clone(), &raw))
            }
            None => None,
        };
        let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
        let (account, creds) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                acme.directory.clone(),
                eab.as_ref(),
            )
            .await?;
        let json = serde_json::to_vec(&creds).map_err(|e| AcmeError::Order(e.to_string()))?;
        crate::acme::store::write_private(&file, &json)?;
        Ok(Client::of(account).await)
    }

    async fn of(account: Account) -> Client {
        // Whether the directory has `renewalInfo` shows only in an ARI call: one with a
        // made-up identifier answers Unsupported at once when it has none, with no request.
        let probe = CertificateIdentifier {
            authority_key_identifier: "AA".into(),
            serial: "AA".into(),
        };
        let ari = !matches!(
            account.renewal_info(&probe).await,
            Err(instant_acme::Error::Unsupported(_))
        );
        Client { account, ari }
    }

    /// Orders a certificate for `host` and stores it; `attempt` picks the challenge when both
    /// are allowed (http-01 first, then each one in turn, so a blocked port does not keep a
    /// host from its certificate).
    pub async fn issue(&self, acme: &Acme, storage: &Storage, host: &str, attempt: u32) -> Outcome {
        let kind = match (acme.http01, acme.tls_alpn01) {
            (true, true) if !attempt.is_multiple_of(2) => Challenge::TlsAlpn01,
            (true, _) => Challenge::Http01,
            _ => Challenge::TlsAlpn01,
        };
        let order = self.order(storage, host, kind);
        let timed = async {
            match tokio::time::timeout(ORDER_DEADLINE, order).await {
                Ok(r) => r,
                Err(_) => Err(AcmeError::Order(format!(
                    "the order took longer than {}s",
                    ORDER_DEADLINE.as_secs()
                ))),
            }
        };
        RETRY_AFTER
            .scope(Cell::new(None), async {
                let result = timed.await;
                Outcome {
                    result,
                    retry_after: RETRY_AFTER.with(Cell::get),
                }
            })
            .await
    }

    async fn order(
        &self,
        storage: &Storage,
        host: &str,
        kind: Challenge,
    ) -> Result<Issued, AcmeError> {
        let ids = [Identifier::Dns(host.to_owned())];
        let mut order = self.account.new_order(&NewOrder::new(&ids)).await?;
        let mut published = Vec::new();
        let result = async {
            let mut authzs = order.authorizations();
            while let Some(authz) = authzs.next().await {
                let mut authz = authz?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => return Err(AcmeError::Order(format!("authorization is {other:?}"))),
                }
                let (ty, name) = match kind {
                    Challenge::Http01 => (ChallengeType::Http01, "http-01"),
                    Challenge::TlsAlpn01 => (ChallengeType::TlsAlpn01, "tls-alpn-01"),
                };
                let mut challenge = authz.challenge(ty).ok_or_else(|| {
                    AcmeError::Order(format!("the CA offers no {name} challenge"))
                })?;
                let auth = challenge.key_authorization();
                let answer = match kind {
                    Challenge::Http01 => auth.as_str().to_owned(),
                    Challenge::TlsAlpn01 => to_hex(auth.digest().as_ref()),
                };
                let key = match kind {
                    Challenge::Http01 => challenge.token.clone(),
                    Challenge::TlsAlpn01 => host.to_owned(),
                };
                storage.put_challenge(kind, &key, &answer)?;
                published.push(key);
                challenge.set_ready().await?;
            }
            let status = order.poll_ready(&POLL).await?;
            if status != OrderStatus::Ready {
                return Err(refusal(order.state().error.as_ref(), status));
            }
            let key = rcgen::KeyPair::generate()?;
            let csr =
                rcgen::CertificateParams::new(vec![host.to_owned()])?.serialize_request(&key)?;
            order.finalize_csr(csr.der()).await?;
            let chain = order.poll_certificate(&POLL).await?;
            let pem = format!("{chain}{}", key.serialize_pem());
            crate::acme::store::write_private(&storage.cert_file(host), pem.as_bytes())?;
            Ok(chain)
        }
        .await;
        for key in &published {
            storage.remove_challenge(kind, key);
        }
        let chain = result?;
        let leaf = CertificateDer::pem_slice_iter(chain.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| AcmeError::Order("the CA sent no certificate".into()))?;
        let serial = serial_hex(&leaf);
        let renew_at = match self.ari {
            true => self.renewal_at(&leaf).await.map(|(at, _)| at),
            false => None,
        };
        Ok(Issued { renew_at, serial })
    }

    /// RFC 9773 §4.2: when the CA suggests renewing `leaf` (a random point of its window, as
    /// §4.2 asks, so a fleet's renewals spread out), and when to ask again.
    pub async fn renewal_at(&self, leaf: &CertificateDer<'_>) -> Option<(i64, Duration)> {
        if !self.ari {
            return None;
        }
        let id = CertificateIdentifier::try_from(leaf).ok()?;
        match self.account.renewal_info(&id).await {
            Ok((info, again)) => {
                let start = info.suggested_window.start.unix_timestamp();
                let end = info.suggested_window.end.unix_timestamp().max(start);
                let at = start + (rand_u64() % ((end - start) as u64 + 1)) as i64;
                Some((at, again))
            }
            Err(e) => {
                tracing::debug!(error = %crate::error::sentence(&e), "no ACME renewal information");
                None
            }
        }
    }

    /// Whether the CA serves renewal information (RFC 9773).
    pub fn has_ari(&self) -> bool {
        self.ari
    }
}

/// The problem the CA gave for an order that did not become ready.
fn refusal(problem: Option<&instant_acme::Problem>, status: OrderStatus) -> AcmeError {
    match problem {
        Some(p) => AcmeError::Refused {
            detail: p
                .detail
                .clone()
                .unwrap_or_else(|| format!("the order is {status:?}")),
            kind: p
                .r#type
                .clone()
                .unwrap_or_else(|| "no problem type".to_owned()),
        },
        None => AcmeError::Order(format!("the order is {status:?}")),
    }
}

/// A leaf's serial number, hex.
pub fn serial_hex(leaf: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(leaf.as_ref())
        .map(|(_, c)| c.raw_serial_as_string().replace(':', ""))
        .unwrap_or_default()
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // Not for secrecy: a point in a renewal window (zero if the source fails: its start).
    let _ = crate::config::crypto_provider().secure_random.fill(&mut b);
    u64::from_le_bytes(b)
}

/// The certificate that answers a tls-alpn-01 validation of `host` (RFC 8737 §3): self-signed,
/// `host` as its only name, and `digest_hex` (the SHA-256 digest of the key authorization, as
/// the orderer stored it) in a critical acmeIdentifier extension.
pub fn tls_alpn01_key(host: &str, digest_hex: &str) -> Result<Arc<CertifiedKey>, AcmeError> {
    let digest = from_hex(digest_hex.trim())
        .filter(|d| d.len() == 32)
        .ok_or_else(|| {
            AcmeError::Order(format!(
                "the stored tls-alpn-01 answer for {host} is not a SHA-256 digest"
            ))
        })?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_owned()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&digest)];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = crate::config::crypto_provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| AcmeError::Order(format!("cannot load the challenge key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9110 §10.2.3: Retry-After is delay-seconds or an HTTP-date.
    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = http::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("120"),
        );
        let at = retry_after(&h).expect("seconds");
        let ahead = at
            .duration_since(SystemTime::now())
            .expect("ahead")
            .as_secs();
        assert!((119..=120).contains(&ahead), "{ahead}");
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("Fri, 31 Dec 2100 23:59:59 GMT"),
        );
        let at = retry_after(&h).expect("date");
        let unix = at
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after")
            .as_secs();
        assert_eq!(unix, 4_133_980_799);
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("soon"),
        );
        assert_eq!(retry_after(&h), None);
    }

    /// RFC 8737 §3: the answer names the host alone and carries the digest in a critical
    /// id-pe-acmeIdentifier (1.3.6.1.5.5.7.1.31) extension, as an OCTET STRING.
    #[test]
    fn the_tls_alpn01_certificate_carries_the_digest_critically() {
        let digest: Vec<u8> = (0u8..32).collect();
        let key = tls_alpn01_key("webmail.example.net", &to_hex(&digest)).expect("key");
        let (_, cert) = x509_parser::parse_x509_certificate(key.cert[0].as_ref()).expect("parse");
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(ext.critical);
        let mut der = vec![0x04, 32];
        der.extend_from_slice(&digest);
        assert_eq!(ext.value, der.as_slice());
        let names: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .map(|n| n.to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(names, ["DNSName(webmail.example.net)"]);
        assert!(tls_alpn01_key("webmail.example.net", "abcd").is_err());
    }
}
