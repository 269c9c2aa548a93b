//! Host names: the one place names are normalised (case, trailing dot, port, IDN).
//!
//! Config hosts, SNI and the request's `Host`/`:authority` all pass through here, so nothing
//! else compares raw strings. The request path uses [`normalize_authority`], which never
//! allocates; config and CLI input use [`HostName`].

use std::fmt;

/// Longest DNS name we accept, in presentation form without the trailing dot.
pub const MAX_HOST_LEN: usize = 253;

/// A stack buffer for [`normalize_authority`]; large enough for any valid authority's host.
pub type HostBuf = [u8; MAX_HOST_LEN + 2];

/// Why a name is not a well-formed DNS host name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the name is empty")]
    Empty,
    #[error("the name is longer than {MAX_HOST_LEN} characters")]
    TooLong,
    #[error("the name has an empty label")]
    EmptyLabel,
    #[error("the label `{0}` is longer than 63 characters")]
    LabelTooLong(String),
    #[error("the label `{0}` starts or ends with a hyphen")]
    Hyphen(String),
    #[error("the character {0:?} is not allowed in a host name")]
    BadChar(char),
    #[error(
        "the name is not in canonical form: write `{0}` (lower-case, punycode, no trailing dot)"
    )]
    NotCanonical(String),
    #[error("the internationalised name cannot be converted to punycode")]
    Idn,
}

/// A validated, canonical DNS host name: lower-case ASCII (IDN already in punycode), no
/// trailing dot, no port, letters/digits/hyphens in labels of 1 to 63 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(Box<str>);

impl HostName {
    /// Parses a name from a config file: it must already be canonical, so that what the
    /// operator reads in the file is exactly what is matched.
    pub fn parse_canonical(s: &str) -> Result<HostName, HostError> {
        let canonical = Self::from_user(s)?;
        if canonical.as_str() != s {
            return Err(HostError::NotCanonical(canonical.0.into()));
        }
        Ok(canonical)
    }

    /// Parses a name typed by an operator: upper case, a trailing dot and Unicode (IDN) are
    /// accepted and converted to the canonical form.
    pub fn from_user(s: &str) -> Result<HostName, HostError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(HostError::Empty);
        }
        let ascii = if s.is_ascii() {
            s.to_ascii_lowercase()
        } else {
            idna::domain_to_ascii(s).map_err(|_| HostError::Idn)?
        };
        let ascii = ascii.strip_suffix('.').unwrap_or(&ascii);
        validate_ldh(ascii)?;
        Ok(HostName(ascii.into()))
    }

    /// The canonical name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `self` lies strictly below `domain` (`a.example.net` below `example.net`).
    pub fn is_strictly_below(&self, domain: &HostName) -> bool {
        is_strictly_below(&self.0, &domain.0)
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for HostName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// True when `host` lies strictly below `domain`; both canonical.
pub fn is_strictly_below(host: &str, domain: &str) -> bool {
    host.len() > domain.len() + 1
        && host.ends_with(domain)
        && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
}

/// The name one label up (`example.net` for `a.example.net`), used for wildcard matching.
pub fn parent(host: &str) -> Option<&str> {
    host.split_once('.')
        .map(|(_, rest)| rest)
        .filter(|r| !r.is_empty())
}

/// Strict letters-digits-hyphen check for canonical names.
fn validate_ldh(s: &str) -> Result<(), HostError> {
    if s.is_empty() {
        return Err(HostError::Empty);
    }
    if s.len() > MAX_HOST_LEN {
        return Err(HostError::TooLong);
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel);
        }
        if label.len() > 63 {
            return Err(HostError::LabelTooLong(label.into()));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostError::Hyphen(label.into()));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(HostError::BadChar(c));
        }
    }
    Ok(())
}

/// Normalises a request's authority (`Host` header, `:authority`, or SNI) into `buf`:
/// lower-cased, port and one trailing dot removed. Returns `None` when it is malformed.
///
/// Lenient where browsers are (underscores, IP literals), because an unknown but well-formed
/// name deserves 421, not 400; strict about anything that could smuggle a second name.
pub fn normalize_authority<'b>(raw: &[u8], buf: &'b mut HostBuf) -> Option<&'b str> {
    let host = if raw.first() == Some(&b'[') {
        // IPv6 literal: `[..]` optionally followed by `:port`.
        let end = raw.iter().position(|&b| b == b']')?;
        check_port(&raw[end + 1..])?;
        let lit = &raw[..=end];
        if !lit[1..end]
            .iter()
            .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
        {
            return None;
        }
        lit
    } else {
        match raw.iter().rposition(|&b| b == b':') {
            Some(i) => {
                check_port(&raw[i..])?;
                &raw[..i]
            }
            None => raw,
        }
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty() || host.len() > MAX_HOST_LEN {
        return None;
    }
    let out = &mut buf[..host.len()];
    if host[0] != b'[' {
        let mut label_len = 0usize;
        for (o, &b) in out.iter_mut().zip(host) {
            let c = NAME_BYTE[usize::from(b)];
            if c == b'.' {
                if label_len == 0 {
                    return None;
                }
                label_len = 0;
            } else if c == 0 || label_len == 63 {
                return None;
            } else {
                label_len += 1;
            }
            *o = c;
        }
        if label_len == 0 {
            return None;
        }
    } else {
        for (o, &b) in out.iter_mut().zip(host) {
            *o = b.to_ascii_lowercase();
        }
    }
    std::str::from_utf8(out).ok()
}

/// What each byte of a host name becomes: letters lower-cased; digits, `-`, `_` and `.` kept;
/// 0 for any other byte. One lookup a byte: this runs for every request.
static NAME_BYTE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = match c {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => c,
            b'A'..=b'Z' => c.to_ascii_lowercase(),
            _ => 0,
        };
        b += 1;
    }
    t
};

/// Accepts an empty suffix or `:` followed by 1 to 5 digits.
fn check_port(rest: &[u8]) -> Option<()> {
    match rest {
        [] => Some(()),
        [b':', digits @ ..] if (1..=5).contains(&digits.len()) => {
            digits.iter().all(u8::is_ascii_digit).then_some(())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Option<String> {
        let mut buf = [0u8; MAX_HOST_LEN + 2];
        normalize_authority(s.as_bytes(), &mut buf).map(str::to_owned)
    }

    #[test]
    fn authority_is_normalised() {
        assert_eq!(
            norm("WebMail.Example.NET").as_deref(),
            Some("webmail.example.net")
        );
        assert_eq!(
            norm("webmail.example.net:8443").as_deref(),
            Some("webmail.example.net")
        );
        assert_eq!(
            norm("webmail.example.net.").as_deref(),
            Some("webmail.example.net")
        );
        assert_eq!(
            norm("webmail.example.net.:443").as_deref(),
            Some("webmail.example.net")
        );
        assert_eq!(norm("[::1]:443").as_deref(), Some("[::1]"));
        assert_eq!(norm("127.0.0.1:80").as_deref(), Some("127.0.0.1"));
        assert_eq!(norm("_Srv-1.a.net").as_deref(), Some("_srv-1.a.net"));
        let longest_label = format!("{}.net", "A".repeat(63));
        assert_eq!(
            norm(&longest_label),
            Some(longest_label.to_ascii_lowercase())
        );
    }

    #[test]
    fn every_byte_outside_a_name_is_refused() {
        let kept = |b: u8| b.is_ascii_alphanumeric() || b"-_.".contains(&b);
        for b in (0..=255u8).filter(|&b| !kept(b) && b != b':' && b != b'[') {
            let raw = [b'a', b, b'b'];
            let mut buf = [0u8; MAX_HOST_LEN + 2];
            assert_eq!(normalize_authority(&raw, &mut buf), None, "byte {b:#04x}");
        }
    }

    #[test]
    fn malformed_authority_is_refused() {
        for bad in [
            "", ":443", "a..b", ".a", "a b", "a/b", "a@b", "a:", "a:x", "a:123456", "a,b", "[::1",
            "é.net", "a.net..",
        ] {
            assert_eq!(norm(bad), None, "{bad:?} should be malformed");
        }
        let long_label = format!("{}.net", "a".repeat(64));
        assert_eq!(norm(&long_label), None);
        let long_name = vec!["abcdefghi"; 30].join(".");
        assert_eq!(norm(&long_name), None);
    }

    #[test]
    fn config_names_must_be_canonical() {
        assert!(HostName::parse_canonical("webmail.example.net").is_ok());
        assert_eq!(
            HostName::parse_canonical("WebMail.example.net"),
            Err(HostError::NotCanonical("webmail.example.net".into()))
        );
        assert_eq!(
            HostName::parse_canonical("webmail.bücher.de"),
            Err(HostError::NotCanonical("webmail.xn--bcher-kva.de".into()))
        );
        assert!(matches!(
            HostName::parse_canonical("-a.net"),
            Err(HostError::Hyphen(_))
        ));
        assert!(matches!(
            HostName::parse_canonical("a_b.net"),
            Err(HostError::BadChar('_'))
        ));
    }

    #[test]
    fn user_names_are_canonicalised() {
        assert_eq!(
            HostName::from_user("WebMail.Bücher.DE.").map(|h| h.to_string()),
            Ok("webmail.xn--bcher-kva.de".into())
        );
    }

    #[test]
    fn strictly_below() {
        assert!(is_strictly_below("webmail.example.net", "example.net"));
        assert!(is_strictly_below("webmail.win.example.net", "example.net"));
        assert!(!is_strictly_below("example.net", "example.net"));
        assert!(!is_strictly_below("webmailexample.net", "example.net"));
        assert!(!is_strictly_below("webmail.example.org", "example.net"));
    }
}
