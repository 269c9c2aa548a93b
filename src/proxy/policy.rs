//! The host policy of SPEC §3 as one pure function: (table, TLS facts, authority) -> decision.
//! No I/O, no allocation; unit-tested row by row and benchmarked without sockets.

use http::StatusCode;

use crate::config::certs::CertEntry;
use crate::config::host::{self, HostBuf};
use crate::config::table::{Route, Table, Tenant};

/// What the TLS handshake of this connection established.
#[derive(Debug, Clone)]
pub struct TlsFacts<'a> {
    /// The normalised SNI the client sent.
    pub sni: &'a str,
    /// The certificate this connection presented.
    pub cert: &'a CertEntry,
}

/// The verdict for one request.
#[derive(Debug, Clone, Copy)]
pub enum Decision<'t, 'b> {
    /// Missing or malformed Host: 400.
    BadHost,
    /// Ambiguous body framing (request smuggling shapes): 400. Decided by the handler.
    BadFraming,
    /// Over HTTPS, a Host the presented certificate does not cover: 421.
    WrongCertificate { host: &'b str },
    /// Neither a platform host nor a configured logon address: 421.
    UnknownHost { host: &'b str },
    /// A configured logon address that is not enabled: 403.
    NotEnabled { host: &'b str, tenant: &'t Tenant },
    /// Served host over plain HTTP with a certificate available: 308 to HTTPS.
    RedirectHttps {
        host: &'b str,
        tenant: Option<&'t Tenant>,
    },
    /// Forward to the backend; `tenant` is `None` for platform hosts.
    Forward {
        host: &'b str,
        tenant: Option<&'t Tenant>,
    },
}

impl Decision<'_, '_> {
    /// The status code SPEC §3 assigns (forwarded requests get the backend's).
    pub fn status(&self) -> StatusCode {
        match self {
            Decision::BadHost | Decision::BadFraming => StatusCode::BAD_REQUEST,
            Decision::WrongCertificate { .. } | Decision::UnknownHost { .. } => {
                StatusCode::MISDIRECTED_REQUEST
            }
            Decision::NotEnabled { .. } => StatusCode::FORBIDDEN,
            Decision::RedirectHttps { .. } => StatusCode::PERMANENT_REDIRECT,
            Decision::Forward { .. } => StatusCode::OK,
        }
    }

    /// A short, bounded label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::BadHost => "bad_host",
            Decision::BadFraming => "bad_framing",
            Decision::WrongCertificate { .. } => "wrong_certificate",
            Decision::UnknownHost { .. } => "unknown_host",
            Decision::NotEnabled { .. } => "not_enabled",
            Decision::RedirectHttps { .. } => "redirect_https",
            Decision::Forward { .. } => "forward",
        }
    }

    /// The normalised host, when there is one.
    pub fn host(&self) -> Option<&str> {
        match *self {
            Decision::BadHost | Decision::BadFraming => None,
            Decision::WrongCertificate { host }
            | Decision::UnknownHost { host }
            | Decision::NotEnabled { host, .. }
            | Decision::RedirectHttps { host, .. }
            | Decision::Forward { host, .. } => Some(host),
        }
    }

    /// The tenant concerned, when there is one.
    pub fn tenant(&self) -> Option<&Tenant> {
        match *self {
            Decision::NotEnabled { tenant, .. } => Some(tenant),
            Decision::Forward { tenant, .. } | Decision::RedirectHttps { tenant, .. } => tenant,
            _ => None,
        }
    }
}

/// Decides one request. `tls` is `Some` for requests over HTTPS; `authority` is the raw Host
/// (or `:authority`) value, `None` when absent; `buf` holds the normalised host.
#[inline]
pub fn decide<'t, 'b>(
    table: &'t Table,
    tls: Option<&TlsFacts<'_>>,
    authority: Option<&[u8]>,
    buf: &'b mut HostBuf,
) -> Decision<'t, 'b> {
    let Some(host) = authority.and_then(|a| host::normalize_authority(a, buf)) else {
        return Decision::BadHost;
    };
    if let Some(tls) = tls
        && host != tls.sni
        && !tls.cert.covers(host)
    {
        return Decision::WrongCertificate { host };
    }
    let tenant = match table.route(host) {
        None => return Decision::UnknownHost { host },
        Some(Route::Platform) => None,
        Some(Route::Logon { tenant, enabled }) => {
            if !enabled {
                return Decision::NotEnabled { host, tenant };
            }
            Some(&**tenant)
        }
    };
    if tls.is_none() && table.settings.listen.https.is_some() && table.cert_for(host).is_some() {
        return Decision::RedirectHttps { host, tenant };
    }
    Decision::Forward { host, tenant }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::table::validate_tenant;
    use crate::config::{self, Source};

    const TENANT: &str = r#"
domain = "example.net"
edition = "enterprise"
[[logon]]
host = "webmail.example.net"
cname = "verified"
icp = "filed"
enabled = true
[[logon]]
host = "mail.example.net"
cname = "verified"
icp = "filed"
[[logon]]
host = "nocert.example.net"
"#;
    const FREE: &str = r#"
domain = "example.com"
edition = "free"
[[logon]]
host = "webmail.example.com"
"#;

    struct Fixture {
        table: Table,
        exact: Arc<CertEntry>,
        wildcard: Arc<CertEntry>,
    }

    fn fixture(https_listener: bool) -> Fixture {
        let gw = Source {
            path: "gateway.toml".into(),
            text: format!(
                "cname_target = \"logon.provider.test\"\n[listen]\nhttps = \"{}\"\nhttp = \"127.0.0.1:0\"\n[backend]\nurl = \"http://127.0.0.1:1\"\n",
                if https_listener { "127.0.0.1:0" } else { "" }
            ),
        };
        let (settings, platform) = config::load_gateway(&gw).expect("gateway");
        let platform = platform
            .iter()
            .map(|h| crate::config::host::HostName::parse_canonical(h.get_ref()).expect("host"))
            .chain([
                crate::config::host::HostName::parse_canonical("mail.provider.test").expect("host"),
            ])
            .collect();
        let tenant = |file: &str, text: &str| {
            let src = Source {
                path: file.into(),
                text: text.into(),
            };
            let raw = src.parse().expect("parse");
            Arc::new(validate_tenant(&src, &raw, true).expect("valid tenant"))
        };
        let pki = crate::pki::Pki::new("test").expect("ca");
        let provider = crate::config::crypto_provider();
        let load = |names: &[&str]| {
            let i = pki.issue(names).expect("issue");
            Arc::new(
                crate::config::certs::load_pair(
                    i.cert_pem.as_bytes(),
                    i.key_pem.as_bytes(),
                    &provider,
                )
                .expect("pair"),
            )
        };
        let exact = load(&["webmail.example.net"]);
        let wildcard = load(&["*.example.net"]);
        let platform_cert = load(&["mail.provider.test"]);
        let table = Table::build(
            settings,
            platform,
            vec![
                tenant("example.net.toml", TENANT),
                tenant("example.com.toml", FREE),
            ],
            vec![exact.clone(), wildcard.clone(), platform_cert],
            vec![],
        )
        .expect("table");
        Fixture {
            table,
            exact,
            wildcard,
        }
    }

    fn run(
        f: &Fixture,
        tls: Option<(&str, &CertEntry)>,
        authority: Option<&str>,
        buf: &mut HostBuf,
    ) -> (&'static str, StatusCode) {
        let facts = tls.map(|(sni, cert)| TlsFacts { sni, cert });
        let d = decide(&f.table, facts.as_ref(), authority.map(str::as_bytes), buf);
        (d.label(), d.status())
    }

    #[test]
    fn each_row_of_the_policy_table() {
        let f = fixture(true);
        let mut b = [0; crate::config::host::MAX_HOST_LEN + 2];
        let exact = Some(("webmail.example.net", &*f.exact));
        let wild = Some(("mail.example.net", &*f.wildcard));

        // Missing or malformed Host: 400.
        assert_eq!(
            run(&f, exact, None, &mut b),
            ("bad_host", StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            run(&f, None, Some("a b"), &mut b).1,
            StatusCode::BAD_REQUEST
        );
        // Over HTTPS, Host not covered by this connection's certificate: 421.
        assert_eq!(
            run(&f, exact, Some("mail.example.net"), &mut b),
            ("wrong_certificate", StatusCode::MISDIRECTED_REQUEST)
        );
        // ...but covered by it (HTTP/2 reuse across names one certificate covers): allowed.
        assert_eq!(
            run(&f, wild, Some("webmail.example.net"), &mut b).0,
            "forward"
        );
        // Neither platform nor logon address: 421.
        assert_eq!(
            run(&f, wild, Some("nobody.example.net"), &mut b),
            ("unknown_host", StatusCode::MISDIRECTED_REQUEST)
        );
        assert_eq!(run(&f, None, Some("other.test"), &mut b).0, "unknown_host");
        // Configured but not enabled: 403; free tenant: 403.
        assert_eq!(
            run(&f, wild, Some("mail.example.net"), &mut b),
            ("not_enabled", StatusCode::FORBIDDEN)
        );
        assert_eq!(
            run(&f, None, Some("webmail.example.com"), &mut b).1,
            StatusCode::FORBIDDEN
        );
        // Enabled over plain HTTP with a certificate: 308; platform host too.
        assert_eq!(
            run(&f, None, Some("webmail.example.net"), &mut b),
            ("redirect_https", StatusCode::PERMANENT_REDIRECT)
        );
        assert_eq!(
            run(&f, None, Some("mail.provider.test"), &mut b).0,
            "redirect_https"
        );
        // Enabled: forwarded, with port, case and trailing dot ignored.
        assert_eq!(
            run(&f, exact, Some("WebMail.Example.NET.:443"), &mut b).0,
            "forward"
        );
        assert_eq!(
            run(
                &f,
                Some(("mail.provider.test", &*f.exact)),
                Some("mail.provider.test"),
                &mut b
            )
            .0,
            "forward"
        );
    }

    #[test]
    fn plain_http_is_served_without_a_certificate_or_https_listener() {
        let f = fixture(false);
        let mut b = [0; crate::config::host::MAX_HOST_LEN + 2];
        assert_eq!(
            run(&f, None, Some("webmail.example.net"), &mut b).0,
            "forward"
        );
    }

    #[test]
    fn forward_names_the_tenant_only_for_logon_hosts() {
        let f = fixture(true);
        let mut b = [0; crate::config::host::MAX_HOST_LEN + 2];
        let facts = TlsFacts {
            sni: "webmail.example.net",
            cert: &f.exact,
        };
        let d = decide(&f.table, Some(&facts), Some(b"webmail.example.net"), &mut b);
        assert_eq!(d.tenant().map(|t| t.domain.as_str()), Some("example.net"));
        let mut b = [0; crate::config::host::MAX_HOST_LEN + 2];
        let d = decide(&f.table, None, Some(b"mail.provider.test"), &mut b);
        assert!(matches!(d, Decision::RedirectHttps { tenant: None, .. }));
    }
}
