//! `domain verify`: follow a host's CNAME chain with real DNS (hickory-resolver; the system's
//! resolv.conf, or one `--nameserver IP:PORT`) and say whether it reaches the CNAME target.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};

use crate::config::host::HostName;

/// Longest CNAME chain followed before giving up.
const MAX_HOPS: usize = 8;

/// What DNS said about a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The chain (host first) reaches the target.
    Reached(Vec<String>),
    /// The chain ends somewhere else.
    Elsewhere(Vec<String>),
    /// The host has A/AAAA records but no CNAME.
    AddressOnly(Vec<String>),
    /// The host exists but has no CNAME and no address.
    NoRecord,
    /// A name in the chain does not exist.
    NxDomain(Vec<String>),
    /// The chain loops.
    Loop(Vec<String>),
    /// The chain is longer than `MAX_HOPS`.
    TooLong(Vec<String>),
    /// DNS did not answer in time.
    Timeout,
    /// Any other failure.
    Failed(String),
}

impl Verdict {
    /// One sentence for the operator.
    pub fn describe(&self, host: &HostName, target: &HostName) -> String {
        let chain = |c: &[String]| c.join(" -> ");
        match self {
            Verdict::Reached(c) => format!("the CNAME chain {} reaches {target}", chain(c)),
            Verdict::Elsewhere(c) => format!(
                "the CNAME chain {} ends at {}, not at {target}",
                chain(c),
                c.last().map_or("?", String::as_str)
            ),
            Verdict::AddressOnly(ips) => format!(
                "{host} has only address records ({}), no CNAME to {target}",
                ips.join(", ")
            ),
            Verdict::NoRecord => format!("{host} has no CNAME record (expected one to {target})"),
            Verdict::NxDomain(c) if c.len() <= 1 => {
                format!("{host} does not exist in DNS (NXDOMAIN); add a CNAME to {target}")
            }
            Verdict::NxDomain(c) => format!(
                "the CNAME chain {} ends in a name that does not exist (NXDOMAIN)",
                chain(c)
            ),
            Verdict::Loop(c) => format!("the CNAME chain {} loops", chain(c)),
            Verdict::TooLong(c) => format!(
                "the CNAME chain {} is longer than {MAX_HOPS} hops",
                chain(c)
            ),
            Verdict::Timeout => format!("DNS did not answer in time for {host}"),
            Verdict::Failed(e) => format!("the DNS lookup of {host} failed: {e}"),
        }
    }
}

fn resolver(nameserver: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match nameserver {
        Some(ns) => {
            // UDP only: a test or lab server often has no TCP side, and a refused TCP fallback
            // would hide a timeout behind "connection refused".
            let mut server = NameServerConfig::udp(ns.ip());
            for c in &mut server.connections {
                c.port = ns.port();
            }
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => Resolver::builder_tokio()
            .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?,
    };
    let opts = builder.options_mut();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    opts.cache_size = 0;
    builder
        .build()
        .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
}

fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

/// Follows `host`'s CNAME chain (bounded, loops detected) and compares its end with `target`.
pub async fn verify(host: &HostName, target: &HostName, nameserver: Option<SocketAddr>) -> Verdict {
    let resolver = match resolver(nameserver) {
        Ok(r) => r,
        Err(e) => return Verdict::Failed(e),
    };
    let mut chain = vec![host.to_string()];
    let mut seen: HashSet<String> = chain.iter().cloned().collect();
    let mut name = host.to_string();
    for _ in 0..=MAX_HOPS {
        if name == target.as_str() {
            return Verdict::Reached(chain);
        }
        match resolver.lookup(fqdn(&name), RecordType::CNAME).await {
            Ok(lookup) => {
                let next = lookup.answers().iter().find_map(|r| match &r.data {
                    RData::CNAME(c) => {
                        Some(c.0.to_ascii().trim_end_matches('.').to_ascii_lowercase())
                    }
                    _ => None,
                });
                let Some(next) = next else {
                    return end_of_chain(&resolver, chain, &name).await;
                };
                chain.push(next.clone());
                if !seen.insert(next.clone()) {
                    return Verdict::Loop(chain);
                }
                name = next;
            }
            Err(e) if e.is_nx_domain() => return Verdict::NxDomain(chain),
            Err(e) if e.is_no_records_found() => {
                return end_of_chain(&resolver, chain, &name).await;
            }
            Err(e) if e.to_string().to_ascii_lowercase().contains("timed out") => {
                return Verdict::Timeout;
            }
            Err(e) => return Verdict::Failed(e.to_string()),
        }
    }
    Verdict::TooLong(chain)
}

/// The chain stopped at `name` (no further CNAME): say what is there instead.
async fn end_of_chain(resolver: &TokioResolver, chain: Vec<String>, name: &str) -> Verdict {
    if chain.len() > 1 {
        return Verdict::Elsewhere(chain);
    }
    match resolver.lookup_ip(fqdn(name)).await {
        Ok(ips) => {
            let ips: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
            if ips.is_empty() {
                Verdict::NoRecord
            } else {
                Verdict::AddressOnly(ips)
            }
        }
        Err(e) if e.is_nx_domain() => Verdict::NxDomain(chain),
        Err(_) => Verdict::NoRecord,
    }
}
