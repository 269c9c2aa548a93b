//! ACME (SPEC §5, RFC 8555): ordering a certificate for one logon address ([`order`]), and
//! the files under `[acme] storage` that the orderer, the listeners answering challenges and
//! the CLI share ([`store`]). The gateway's background issuer is `control::acme`;
//! `cert issue` orders from the CLI through the same code.

pub mod order;
pub mod store;

pub use order::{AcmeError, Client, Issued, Outcome};
pub use store::{Challenge, HostState, Storage};

use std::time::{Duration, SystemTime};

use crate::config::certs::{CertEntry, unix_now};
use crate::config::table::{Logon, Table, Tenant};
use crate::config::{Acme, Edition};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// The longest a CA's Retry-After is followed: a week, Let's Encrypt's longest window.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(7 * 86_400);
/// A `rateLimited` problem without Retry-After waits at least this long.
const RATE_LIMITED_WAIT: Duration = Duration::from_secs(300);

/// One logon address's certificate facts, as `cert status`, `domain list` and `/status` show
/// them (SPEC §5).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertFacts {
    /// `uploaded`, `acme`, or `none`: where the certificate that serves the host comes from.
    pub source: &'static str,
    /// `YYYY-MM-DD` of the certificate served, if any.
    pub expires: Option<String>,
    /// Whole days until it expires.
    pub days_left: Option<i64>,
    /// `pending`, `valid`, `failed: <reason>`, or `-` (no `[acme]`, not enabled, or an
    /// uploaded certificate covers it).
    pub acme: String,
    /// When the next order may be made after a failure (`YYYY-MM-DD HH:MM:SS` UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
}

impl CertFacts {
    /// The certificate column of `domain list`: `uploaded, until DATE (Nd)`, `acme, until …`,
    /// `acme: pending`, `acme failed: …`, or `none`.
    pub fn column(&self) -> String {
        let until = match (&self.expires, self.days_left) {
            (Some(d), Some(n)) => format!("{d} ({n}d)"),
            _ => "?".to_owned(),
        };
        match (self.source, self.acme.strip_prefix("failed: ")) {
            ("uploaded", _) => format!("uploaded, until {until}"),
            ("acme", Some(why)) => format!("acme, until {until} (renewal failed: {why})"),
            ("acme", None) => format!("acme, until {until}"),
            (_, Some(why)) => format!("acme failed: {why}"),
            _ if self.acme == "pending" => "acme: pending".into(),
            _ => "none".into(),
        }
    }
}

/// Whether `cert` is one the ACME CA issued (kept under `[acme] storage`).
pub fn is_issued(table: &Table, cert: &CertEntry) -> bool {
    table
        .settings
        .acme
        .as_ref()
        .is_some_and(|a| cert.path.starts_with(a.certs_dir()))
}

/// The facts for `logon` of `tenant` in `table`, with the last outcome recorded in storage.
pub fn facts(table: &Table, tenant: &Tenant, logon: &Logon) -> CertFacts {
    let name = logon.host.as_str();
    let now = unix_now();
    let cert = table.cert_for(name).filter(|c| c.not_after > now);
    let issued = cert.is_some_and(|c| is_issued(table, c));
    let source = match cert {
        Some(_) if issued => "acme",
        Some(_) => "uploaded",
        None => "none",
    };
    let wanted = logon.enabled && tenant.edition != crate::config::Edition::Free;
    let acme = table.settings.acme.as_ref();
    let last = match acme {
        Some(a) if wanted && (issued || cert.is_none()) => Storage::of(a).state(name),
        _ => None,
    };
    // A failure recorded after the served certificate was issued is a failed renewal.
    let failed = last
        .as_ref()
        .filter(|s| s.state == "failed" && cert.is_none_or(|c| s.at >= c.not_before));
    let state = match (acme, cert) {
        (None, _) => "-".to_string(),
        (Some(_), _) if !wanted => "-".to_string(),
        (Some(_), Some(_)) if !issued => "-".to_string(),
        (Some(_), _) if failed.is_some() => format!(
            "failed: {}",
            failed
                .and_then(|s| s.reason.as_deref())
                .unwrap_or("unknown")
        ),
        (Some(_), Some(_)) => "valid".to_string(),
        (Some(_), None) => "pending".to_string(),
    };
    CertFacts {
        source,
        expires: cert.map(|c| crate::config::certs::date(c.not_after)),
        days_left: cert.map(|c| c.days_left()),
        acme: state,
        retry_at: failed
            .and_then(|s| s.retry_at)
            .filter(|&t| t > now)
            .map(crate::config::certs::date_time),
    }
}

/// Whether `host` may be ordered now: still enabled in `table`, and its CNAME chain still
/// reaches `cname_target` (looked up through `acme.nameserver`, or the system's resolver).
pub async fn ready_to_order(table: &Table, acme: &Acme, host: &str) -> Result<(), AcmeError> {
    let enabled = table.tenants.iter().any(|t| {
        t.edition != Edition::Free
            && t.logons
                .iter()
                .any(|l| l.enabled && l.host.as_str() == host)
    });
    if !enabled {
        return Err(AcmeError::Order(format!(
            "{host} is not an enabled logon address"
        )));
    }
    let name = crate::config::host::HostName::from_user(host)
        .map_err(|e| AcmeError::Order(format!("`{host}` is not a host name: {e}")))?;
    let target = &table.settings.cname_target;
    match crate::ops::dns::verify(&name, target, acme.nameserver).await {
        crate::ops::dns::Verdict::Reached(_) => Ok(()),
        other => Err(AcmeError::Order(format!(
            "not ordered: checked again before ordering, {}",
            other.describe(&name, target)
        ))),
    }
}

/// The wait after `failures` failed orders in a row: 1 s doubling, capped at 1 h, and never
/// less than what the CA asked for.
pub fn backoff(failures: u32, retry_after: Option<SystemTime>, rate_limited: bool) -> Duration {
    let ours = FIRST_BACKOFF
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(MAX_BACKOFF);
    let theirs = retry_after
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
        .map(|d| d.min(MAX_RETRY_AFTER));
    let floor = match (theirs, rate_limited) {
        (Some(d), _) => d,
        (None, true) => RATE_LIMITED_WAIT,
        (None, false) => Duration::ZERO,
    };
    ours.max(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPEC §5 / issue 26: per-host exponential backoff with a cap, never shorter than the
    /// CA's Retry-After (RFC 8555 §6.6), and a rate limit without one waits minutes.
    #[test]
    fn backoff_doubles_to_its_cap_and_follows_the_ca() {
        let secs = |f, ra, rl| backoff(f, ra, rl).as_secs();
        assert_eq!(
            (1..=6).map(|f| secs(f, None, false)).collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 32]
        );
        assert_eq!(secs(13, None, false), 3600);
        assert_eq!(secs(40, None, false), 3600);
        let later = SystemTime::now() + Duration::from_secs(7200);
        assert!((7198..=7200).contains(&secs(1, Some(later), true)));
        assert_eq!(secs(1, None, true), 300);
        let past = SystemTime::now() - Duration::from_secs(10);
        assert_eq!(secs(3, Some(past), false), 4);
        let far = SystemTime::now() + Duration::from_secs(30 * 86_400);
        assert_eq!(secs(1, Some(far), false), 7 * 86_400);
    }
}
