//! The compiled routing table: everything a request or a handshake needs, validated as a whole
//! and immutable. A `Table` that exists is safe to serve; reloads build a new one and swap it.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::HeaderValue;
use rustls::crypto::CryptoProvider;

use crate::config::certs::{CertCache, CertEntry};
use crate::config::host::{self, HostName};
use crate::config::{
    self, CnameState, ConfigError, Edition, IcpState, RawTenant, Settings, Source,
};

/// A tenant (a mail customer, identified by its mail domain).
#[derive(Debug)]
pub struct Tenant {
    pub domain: HostName,
    pub edition: Edition,
    /// The tenant's file.
    pub file: PathBuf,
    pub logons: Vec<Logon>,
    /// `X-Logon-Tenant` value, built once.
    pub header: HeaderValue,
}

/// One logon address of a tenant.
#[derive(Debug, Clone)]
pub struct Logon {
    pub host: HostName,
    pub cname: CnameState,
    pub icp: IcpState,
    pub icp_number: Option<String>,
    pub enabled: bool,
    /// Line of `host = ...` in the tenant file.
    pub line: usize,
}

/// What a host name is to the gateway.
#[derive(Debug, Clone)]
pub enum Route {
    /// One of `[platform] hosts`: always served.
    Platform,
    /// A tenant's logon address; `enabled` already accounts for the edition.
    Logon { tenant: Arc<Tenant>, enabled: bool },
}

/// The compiled, validated configuration.
#[derive(Debug)]
pub struct Table {
    pub settings: Settings,
    pub platform_hosts: Vec<HostName>,
    pub tenants: Vec<Arc<Tenant>>,
    pub certs: Vec<Arc<CertEntry>>,
    /// Non-fatal findings (loose key permissions, unused keys...), for the log.
    pub warnings: Vec<String>,
    routes: HashMap<Box<str>, Route>,
    certs_exact: HashMap<Box<str>, Arc<CertEntry>>,
    certs_wild: HashMap<Box<str>, Arc<CertEntry>>,
}

impl Table {
    /// Compiles validated parts into lookup maps. Fails when hosts collide across tenants or
    /// with platform hosts; per-tenant rules were checked by [`validate_tenant`].
    pub fn build(
        settings: Settings,
        platform_hosts: Vec<HostName>,
        tenants: Vec<Arc<Tenant>>,
        certs: Vec<Arc<CertEntry>>,
        warnings: Vec<String>,
    ) -> Result<Table, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut routes: HashMap<Box<str>, Route> =
            HashMap::with_capacity(platform_hosts.len() + tenants.len() * 2);
        for h in &platform_hosts {
            routes.insert(h.as_str().into(), Route::Platform);
        }
        let mut domains: HashMap<&str, &Path> = HashMap::with_capacity(tenants.len());
        for t in &tenants {
            if let Some(other) = domains.insert(t.domain.as_str(), &t.file) {
                errors.push(ConfigError::file(
                    &t.file,
                    format!("tenant {} is also defined in {}", t.domain, other.display()),
                ));
            }
            for l in &t.logons {
                let enabled = l.enabled && t.edition != Edition::Free;
                let route = Route::Logon {
                    tenant: t.clone(),
                    enabled,
                };
                match routes.insert(l.host.as_str().into(), route) {
                    None => {}
                    Some(Route::Platform) => errors.push(ConfigError {
                        file: t.file.clone(),
                        line: Some(l.line),
                        message: format!(
                            "host {} is a platform host and cannot be a logon address",
                            l.host
                        ),
                    }),
                    Some(Route::Logon { tenant: other, .. }) => errors.push(ConfigError {
                        file: t.file.clone(),
                        line: Some(l.line),
                        message: if Arc::ptr_eq(&other, t) {
                            format!("host {} is listed twice", l.host)
                        } else {
                            format!(
                                "host {} already belongs to tenant {} ({})",
                                l.host,
                                other.domain,
                                other.file.display()
                            )
                        },
                    }),
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        let mut certs_exact: HashMap<Box<str>, Arc<CertEntry>> = HashMap::new();
        let mut certs_wild: HashMap<Box<str>, Arc<CertEntry>> = HashMap::new();
        // Uploaded certificates first: one the CA issued serves only names no uploaded one
        // covers (SPEC §5).
        let acme_dir = settings.acme.as_ref().map(|a| a.certs_dir());
        let issued = |c: &CertEntry| acme_dir.as_ref().is_some_and(|d| c.path.starts_with(d));
        for acme in [false, true] {
            for c in certs.iter().filter(|c| issued(c) == acme) {
                for name in &c.names {
                    let (map, key) = match name.strip_prefix("*.") {
                        Some(base) => (&mut certs_wild, base),
                        None => (&mut certs_exact, &**name),
                    };
                    // Two certificates of one source for one name: serve the one that lives
                    // longer, as Caddy does.
                    match map.get(key) {
                        Some(old) if issued(old) != acme || old.not_after >= c.not_after => {}
                        _ => {
                            map.insert(key.into(), c.clone());
                        }
                    }
                }
            }
        }

        Ok(Table {
            settings,
            platform_hosts,
            tenants,
            certs,
            warnings,
            routes,
            certs_exact,
            certs_wild,
        })
    }

    /// The route for a normalised host.
    #[inline]
    pub fn route(&self, host: &str) -> Option<&Route> {
        self.routes.get(host)
    }

    /// The certificate for a normalised name: an exact SAN first, then a wildcard.
    #[inline]
    pub fn cert_for(&self, host: &str) -> Option<&Arc<CertEntry>> {
        self.certs_exact
            .get(host)
            .or_else(|| host::parent(host).and_then(|p| self.certs_wild.get(p)))
    }

    /// Number of hosts (platform and logon) in the table.
    pub fn host_count(&self) -> usize {
        self.routes.len()
    }
}

/// Checks one tenant file against SPEC §2's rules, collecting every error.
pub fn validate_tenant(
    src: &Source,
    raw: &RawTenant,
    require_icp: bool,
) -> Result<Tenant, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let domain = match HostName::parse_canonical(raw.domain.get_ref()) {
        Ok(d) => Some(d),
        Err(e) => {
            errors.push(src.error_at(raw.domain.span(), format!("domain: {e}")));
            None
        }
    };
    if let Some(d) = &domain {
        let expected = format!("{d}.toml");
        let actual = src
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        if actual.as_deref() != Some(expected.as_str()) {
            errors.push(src.error_at(
                raw.domain.span(),
                format!("the file must be named {expected} to match domain = \"{d}\""),
            ));
        }
    }
    let edition = *raw.edition.get_ref();
    let mut logons = Vec::with_capacity(raw.logon.len());
    let mut enabled_hosts: Vec<&str> = Vec::new();
    for l in &raw.logon {
        let span = l.host.span();
        let host = match HostName::parse_canonical(l.host.get_ref()) {
            Ok(h) => h,
            Err(e) => {
                errors
                    .push(src.error_at(span.clone(), format!("host `{}`: {e}", l.host.get_ref())));
                continue;
            }
        };
        if let Some(d) = &domain
            && !host.is_strictly_below(d)
        {
            errors.push(src.error_at(
                span.clone(),
                format!("host {host} does not lie below the tenant's domain {d}"),
            ));
        }
        let enabled = l.enabled.as_ref().is_some_and(|e| *e.get_ref());
        if enabled {
            let at = l.enabled.as_ref().map_or(span.clone(), |e| e.span());
            if edition == Edition::Free {
                errors.push(src.error_at(
                    at.clone(),
                    format!("host {host} is enabled, but tenant is on the free edition, which cannot use custom logon addresses"),
                ));
            }
            if l.cname != CnameState::Verified {
                errors.push(src.error_at(
                    at.clone(),
                    format!("host {host} is enabled, but its CNAME is not verified"),
                ));
            }
            if require_icp && l.icp != IcpState::Filed {
                errors.push(src.error_at(
                    at.clone(),
                    format!("host {host} is enabled, but its ICP filing is not recorded (require_icp = true)"),
                ));
            }
            enabled_hosts.push(l.host.get_ref());
        }
        logons.push(Logon {
            line: src.error_at(span, "").line.unwrap_or(0),
            host,
            cname: l.cname,
            icp: l.icp,
            icp_number: l.icp_number.clone(),
            enabled,
        });
    }
    if enabled_hosts.len() > 1 {
        errors.push(ConfigError::file(
            &src.path,
            format!(
                "more than one logon address is enabled ({}); at most one per tenant may be",
                enabled_hosts.join(", ")
            ),
        ));
    }
    match domain {
        Some(domain) if errors.is_empty() => {
            let header = HeaderValue::from_str(domain.as_str()).map_err(|_| {
                vec![ConfigError::file(
                    &src.path,
                    "domain is not a valid header value",
                )]
            })?;
            Ok(Tenant {
                domain,
                edition,
                file: src.path.clone(),
                logons,
                header,
            })
        }
        _ => Err(errors),
    }
}

type TenantCacheEntry = (
    u64,
    Option<crate::config::certs::Stamp>,
    Arc<Result<Arc<Tenant>, Vec<ConfigError>>>,
);

/// Loads config files into a [`Table`], keeping parsed tenants and certificates between loads
/// so a reload re-parses only files whose content changed.
pub struct Loader {
    provider: Arc<CryptoProvider>,
    certs: CertCache,
    /// The certificates ACME issued (`[acme] storage`).
    acme_certs: CertCache,
    tenants: HashMap<PathBuf, TenantCacheEntry>,
    last_require_icp: Option<bool>,
}

impl Loader {
    /// A loader with empty caches.
    /// The crypto provider certificates are loaded with (and served with).
    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        Loader {
            provider,
            certs: CertCache::default(),
            acme_certs: CertCache::default(),
            tenants: HashMap::new(),
            last_require_icp: None,
        }
    }

    /// Reads gateway.toml, the tenants folder and the certs folder it names, and builds a
    /// table; every error found is returned, each naming its file (and line).
    pub fn load(&mut self, gateway_path: &Path) -> Result<Table, Vec<ConfigError>> {
        self.load_with(gateway_path, &HashMap::new())
    }

    /// Like [`Loader::load`], but tenant files in `overrides` are taken from the map instead
    /// of disk (added if absent): how the CLI validates an edit before writing it.
    pub fn load_with(
        &mut self,
        gateway_path: &Path,
        overrides: &HashMap<PathBuf, String>,
    ) -> Result<Table, Vec<ConfigError>> {
        let src = Source::read(gateway_path).map_err(|e| vec![e])?;
        let (settings, raw_platform) = config::load_gateway(&src)?;
        let mut errors = Vec::new();
        let mut platform_hosts = Vec::with_capacity(raw_platform.len());
        for h in &raw_platform {
            match HostName::parse_canonical(h.get_ref()) {
                Ok(n) => platform_hosts.push(n),
                Err(e) => errors
                    .push(src.error_at(h.span(), format!("platform host `{}`: {e}", h.get_ref()))),
            }
        }
        // A change of require_icp changes every tenant's validity: drop cached verdicts.
        if self.last_require_icp != Some(settings.require_icp) {
            self.tenants.clear();
            self.last_require_icp = Some(settings.require_icp);
        }
        let tenants = self.load_tenants(&settings, overrides, &mut errors);
        let mut certs = self.certs.load(&settings.certs_dir, &self.provider);
        if let Some(acme) = &settings.acme {
            // None issued yet is no error: the folder is made with the first one.
            let dir = acme.certs_dir();
            if dir.is_dir() {
                let issued = self.acme_certs.load(&dir, &self.provider);
                certs.entries.extend(issued.entries);
                certs.errors.extend(issued.errors);
                certs.warnings.extend(issued.warnings);
            }
        }
        errors.extend(certs.errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Table::build(
            settings,
            platform_hosts,
            tenants,
            certs.entries,
            certs.warnings,
        )
    }

    fn load_tenants(
        &mut self,
        settings: &Settings,
        overrides: &HashMap<PathBuf, String>,
        errors: &mut Vec<ConfigError>,
    ) -> Vec<Arc<Tenant>> {
        let dir = &settings.tenants_dir;
        let mut files = match crate::config::certs::list_files(dir) {
            Ok(f) => f,
            Err(e) => {
                errors.push(e);
                return Vec::new();
            }
        };
        for extra in overrides.keys() {
            if extra.parent() == Some(dir.as_path()) && !files.contains(extra) {
                files.push(extra.clone());
            }
        }
        let mut fresh = HashMap::with_capacity(files.len());
        let mut tenants = Vec::with_capacity(files.len());
        for path in files {
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            // A settled file whose stamp did not change is not read again (see `Stamp`).
            let stamp = if overrides.contains_key(&path) {
                None
            } else {
                crate::config::certs::Stamp::of(&path).map(|(st, _)| st)
            };
            if let (Some((hash, Some(old), r)), Some(now)) = (self.tenants.get(&path), stamp)
                && *old == now
            {
                let (hash, r) = (*hash, r.clone());
                match r.as_ref() {
                    Ok(t) => tenants.push(t.clone()),
                    Err(e) => errors.extend(e.iter().cloned()),
                }
                fresh.insert(path, (hash, Some(now), r));
                continue;
            }
            let text = match overrides.get(&path) {
                Some(t) => t.clone(),
                None => match std::fs::read_to_string(&path) {
                    Ok(t) => t,
                    Err(e) => {
                        errors.push(ConfigError::file(
                            &path,
                            format!("cannot read the file: {e}"),
                        ));
                        continue;
                    }
                },
            };
            let mut h = std::collections::hash_map::DefaultHasher::new();
            text.hash(&mut h);
            let hash = h.finish();
            let result = match self.tenants.get(&path) {
                Some((old, _, r)) if *old == hash => r.clone(),
                _ => {
                    let src = Source {
                        path: path.clone(),
                        text,
                    };
                    let r = src
                        .parse::<RawTenant>()
                        .map_err(|e| vec![e])
                        .and_then(|raw| validate_tenant(&src, &raw, settings.require_icp))
                        .map(Arc::new);
                    Arc::new(r)
                }
            };
            match result.as_ref() {
                Ok(t) => tenants.push(t.clone()),
                Err(e) => errors.extend(e.iter().cloned()),
            }
            let settled = stamp.filter(crate::config::certs::Stamp::settled);
            fresh.insert(path, (hash, settled, result));
        }
        self.tenants = fresh;
        tenants
    }
}
