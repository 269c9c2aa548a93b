//! Throwaway certificates made with rcgen, for `logon-gate demo` and the tests: a CA and leaf
//! certificates (ECDSA P-256) for any set of names. Never for production use.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The leaf certificate, DER, for comparing with what a server presented.
    pub cert_der: Vec<u8>,
}

/// A throwaway certificate authority.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// Makes a new CA named `name`.
    pub fn new(name: &str) -> Result<Pki, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Pki { ca })
    }

    /// The CA certificate, PEM: what clients must trust.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> Vec<u8> {
        self.ca.der().to_vec()
    }

    /// Issues a leaf certificate for `names` (wildcards allowed), valid now.
    pub fn issue(&self, names: &[&str]) -> Result<Issued, rcgen::Error> {
        self.issue_with(names, |_| {})
    }

    /// Issues a leaf certificate valid from `before` ago until `left` from now.
    pub fn issue_lasting(
        &self,
        names: &[&str],
        before: std::time::Duration,
        left: std::time::Duration,
    ) -> Result<Issued, rcgen::Error> {
        let now = time_now();
        self.issue_with(names, |p| {
            p.not_before = now - before;
            p.not_after = now + left;
        })
    }

    /// Issues a leaf certificate that expired in 2020.
    pub fn issue_expired(&self, names: &[&str]) -> Result<Issued, rcgen::Error> {
        self.issue_with(names, |p| {
            p.not_before = rcgen::date_time_ymd(2019, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 1, 1);
        })
    }

    fn issue_with(
        &self,
        names: &[&str],
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Result<Issued, rcgen::Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        let now = time_now();
        params.not_before = now - std::time::Duration::from_secs(3600);
        params.not_after = now + std::time::Duration::from_secs(90 * 86_400);
        tweak(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        })
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}
