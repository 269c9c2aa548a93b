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
    certs_exact: CertMap,
    certs_wild: CertMap,
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
            insert_routes(&mut routes, t, &mut errors);
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        let (certs_exact, certs_wild) = cert_maps(&settings, &certs);
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

/// Adds `t`'s logon addresses to `routes`, with an error for each host that is a platform host
/// or already another tenant's (or listed twice).
fn insert_routes(
    routes: &mut HashMap<Box<str>, Route>,
    t: &Arc<Tenant>,
    errors: &mut Vec<ConfigError>,
) {
    for l in &t.logons {
        let enabled = l.enabled && t.edition != Edition::Free;
        let route = Route::Logon {
            tenant: t.clone(),
            enabled,
        };
        let previous = routes.insert(l.host.as_str().into(), route);
        let message = match previous {
            None => continue,
            Some(Route::Platform) => format!(
                "host {} is a platform host and cannot be a logon address",
                l.host
            ),
            Some(Route::Logon { tenant: other, .. }) if Arc::ptr_eq(&other, t) => {
                format!("host {} is listed twice", l.host)
            }
            Some(Route::Logon { tenant: other, .. }) => format!(
                "host {} already belongs to tenant {} ({})",
                l.host,
                other.domain,
                other.file.display()
            ),
        };
        errors.push(ConfigError {
            file: t.file.clone(),
            line: Some(l.line),
            message,
        });
    }
}

/// Certificates by exact name and by wildcard base. Uploaded certificates first: one the CA
/// issued serves only names no uploaded one covers (SPEC §5). Two certificates of one source
/// for one name: the one that lives longer serves, as Caddy does.
fn cert_maps(settings: &Settings, certs: &[Arc<CertEntry>]) -> (CertMap, CertMap) {
    let mut exact = CertMap::with_capacity(certs.len());
    let mut wild = CertMap::new();
    let acme_dir = settings.acme.as_ref().map(|a| a.certs_dir());
    let issued = |c: &CertEntry| acme_dir.as_ref().is_some_and(|d| c.path.starts_with(d));
    for acme in [false, true] {
        for c in certs.iter().filter(|c| issued(c) == acme) {
            for name in &c.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(base) => (&mut wild, base),
                    None => (&mut exact, &**name),
                };
                match map.get(key) {
                    Some(old) if issued(old) != acme || old.not_after >= c.not_after => {}
                    _ => {
                        map.insert(key.into(), c.clone());
                    }
                }
            }
        }
    }
    (exact, wild)
}

type CertMap = HashMap<Box<str>, Arc<CertEntry>>;

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
    /// The last load succeeded: the table it gave matches the files, so a change to a few of
    /// them can be applied to it alone ([`Loader::apply`]).
    last_good: bool,
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
            last_good: false,
        }
    }

    /// Reads gateway.toml, the tenants folder and the certs folder it names, and builds a
    /// table; every error found is returned, each naming its file (and line).
    pub fn load(&mut self, gateway_path: &Path) -> Result<Table, Vec<ConfigError>> {
        let result = self.load_with(gateway_path, &HashMap::new());
        self.last_good = result.is_ok();
        result
    }

    /// Applies a change to the files at `changed` to `previous`, the table this loader's last
    /// load gave, reading only those files: a tenant file (`*.toml` in the tenants folder)
    /// added, changed or removed, or a certificate file holding its chain and key together
    /// (as `cert install` and ACME write them). The other files are not listed, read or
    /// checked again, and the table is not rebuilt: its maps are copied and patched. Errors
    /// are those a full load would give for the changed files. `None` when the change cannot
    /// be applied alone (gateway.toml, a folder, Kubernetes' `..data`, a certificate and key
    /// in separate files, a file that does not load, or a last load that failed): the caller
    /// loads everything.
    pub fn apply(
        &mut self,
        previous: &Table,
        changed: &[PathBuf],
    ) -> Option<Result<Table, Vec<ConfigError>>> {
        if !self.last_good || changed.is_empty() {
            return None;
        }
        let s = &previous.settings;
        let acme_dir = s.acme.as_ref().map(|a| a.certs_dir());
        let (mut tenant_files, mut cert_files) = (Vec::new(), Vec::new());
        for path in changed {
            let name = path.file_name()?.to_str()?;
            if name.starts_with('.') {
                return None;
            }
            let parent = path.parent()?;
            if parent == s.tenants_dir && name.ends_with(".toml") {
                tenant_files.push(path);
            } else if parent == s.certs_dir || Some(parent) == acme_dir.as_deref() {
                cert_files.push(path);
            } else {
                return None;
            }
        }
        tenant_files.sort();
        tenant_files.dedup();
        cert_files.sort();
        cert_files.dedup();
        let mut errors = Vec::new();
        let mut tenants = previous.tenants.clone();
        let mut routes = previous.routes.clone();
        for path in tenant_files {
            if let Some(i) = tenants.iter().position(|t| t.file == *path) {
                let old = tenants.remove(i);
                for l in &old.logons {
                    let ours = matches!(routes.get(l.host.as_str()),
                        Some(Route::Logon { tenant, .. }) if Arc::ptr_eq(tenant, &old));
                    if ours {
                        routes.remove(l.host.as_str());
                    }
                }
            }
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    errors.push(ConfigError::file(
                        path,
                        format!("cannot read the file: {e}"),
                    ));
                    continue;
                }
            };
            let src = Source {
                path: path.clone(),
                text,
            };
            let tenant = match src
                .parse::<RawTenant>()
                .map_err(|e| vec![e])
                .and_then(|raw| validate_tenant(&src, &raw, s.require_icp))
            {
                Ok(t) => Arc::new(t),
                Err(e) => {
                    errors.extend(e);
                    continue;
                }
            };
            if let Some(other) = tenants.iter().find(|o| o.domain == tenant.domain) {
                errors.push(ConfigError::file(
                    path,
                    format!(
                        "tenant {} is also defined in {}",
                        tenant.domain,
                        other.file.display()
                    ),
                ));
                continue;
            }
            insert_routes(&mut routes, &tenant, &mut errors);
            // Kept in file order, as a full load lists them.
            let at = tenants.partition_point(|t| t.file < tenant.file);
            tenants.insert(at, tenant);
        }
        if !errors.is_empty() {
            self.last_good = false;
            return Some(Err(errors));
        }
        let (certs, (certs_exact, certs_wild)) = if cert_files.is_empty() {
            let maps = (previous.certs_exact.clone(), previous.certs_wild.clone());
            (previous.certs.clone(), maps)
        } else {
            let mut certs = previous.certs.clone();
            for path in cert_files {
                // A pair across two files is re-paired by a full load.
                if certs
                    .iter()
                    .any(|c| (c.path == *path) != (c.key_path == *path))
                {
                    return None;
                }
                certs.retain(|c| c.path != *path);
                match std::fs::read(path) {
                    Ok(pem) => {
                        let mut entry =
                            crate::config::certs::load_pair(&pem, &pem, &self.provider).ok()?;
                        entry.path = path.clone();
                        entry.key_path = path.clone();
                        certs.push(Arc::new(entry));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(_) => return None,
                }
            }
            certs.sort_by(|a, b| a.path.cmp(&b.path));
            let maps = cert_maps(s, &certs);
            (certs, maps)
        };
        Some(Ok(Table {
            settings: s.clone(),
            platform_hosts: previous.platform_hosts.clone(),
            tenants,
            certs,
            warnings: Vec::new(),
            routes,
            certs_exact,
            certs_wild,
        }))
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
        files.retain(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"));
        // Independent per file: a cold start of 100,000 tenants parses on every core.
        let cached = &self.tenants;
        let one = |path: PathBuf| -> Result<(PathBuf, TenantCacheEntry), ConfigError> {
            // A settled file whose stamp did not change is not read again (see `Stamp`).
            let stamp = if overrides.contains_key(&path) {
                None
            } else {
                crate::config::certs::Stamp::of(&path).map(|(st, _)| st)
            };
            if let (Some((hash, Some(old), r)), Some(now)) = (cached.get(&path), stamp)
                && *old == now
            {
                return Ok((path, (*hash, Some(now), r.clone())));
            }
            let text = match overrides.get(&path) {
                Some(t) => t.clone(),
                None => std::fs::read_to_string(&path)
                    .map_err(|e| ConfigError::file(&path, format!("cannot read the file: {e}")))?,
            };
            let mut h = std::collections::hash_map::DefaultHasher::new();
            text.hash(&mut h);
            let hash = h.finish();
            let result = match cached.get(&path) {
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
            let settled = stamp.filter(crate::config::certs::Stamp::settled);
            Ok((path, (hash, settled, result)))
        };
        let outcomes = crate::config::certs::in_parallel(files, &one);
        let mut fresh = HashMap::with_capacity(outcomes.len());
        let mut tenants = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            let (path, entry) = match outcome {
                Ok(x) => x,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            match entry.2.as_ref() {
                Ok(t) => tenants.push(t.clone()),
                Err(e) => errors.extend(e.iter().cloned()),
            }
            fresh.insert(path, entry);
        }
        self.tenants = fresh;
        tenants
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// What a table serves, in a form two tables compare by.
    fn served(t: &Table) -> Vec<String> {
        let mut out: Vec<String> = t
            .routes
            .iter()
            .map(|(h, r)| match r {
                Route::Platform => format!("route {h} platform"),
                Route::Logon { tenant, enabled } => {
                    format!("route {h} {} {enabled}", tenant.domain)
                }
            })
            .collect();
        for (kind, map) in [("exact", &t.certs_exact), ("wild", &t.certs_wild)] {
            out.extend(
                map.iter()
                    .map(|(n, c)| format!("{kind} {n} {} {}", c.path.display(), c.not_after)),
            );
        }
        out.extend(
            t.tenants
                .iter()
                .map(|x| format!("tenant {} {}", x.domain, x.file.display())),
        );
        out.sort();
        out
    }

    fn tenant(domain: &str, hosts: &[(&str, bool)]) -> String {
        let mut s = format!("domain = \"{domain}\"\nedition = \"standard\"\n");
        for (h, on) in hosts {
            s.push_str(&format!(
                "[[logon]]\nhost = \"{h}\"\ncname = \"verified\"\nicp = \"filed\"\nenabled = {on}\n"
            ));
        }
        s
    }

    /// Issue 27: a change applied to the last table alone serves exactly what a full load of
    /// the same files would, refuses what a full load refuses, and leaves to a full load what
    /// it cannot do alone.
    #[test]
    fn a_change_applied_alone_serves_what_a_full_load_would() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let (tenants, certs) = (root.join("tenants"), root.join("certs"));
        std::fs::create_dir_all(&tenants).expect("mkdir");
        std::fs::create_dir_all(&certs).expect("mkdir");
        let gateway = root.join("gateway.toml");
        std::fs::write(
            &gateway,
            "cname_target = \"logon.provider.test\"\n[backend]\nurl = \"http://127.0.0.1:9\"\n[platform]\nhosts = [\"mail.provider.test\"]\n[paths]\ntenants = \"tenants\"\ncerts = \"certs\"\n",
        )
        .expect("write");
        let pki = crate::pki::Pki::new("table test").expect("ca");
        let cert = |file: &str, names: &[&str], days: u64| {
            let c = pki
                .issue_lasting(names, Duration::ZERO, Duration::from_secs(days * 86_400))
                .expect("issue");
            std::fs::write(certs.join(file), format!("{}{}", c.cert_pem, c.key_pem))
                .expect("write");
            certs.join(file)
        };
        let write = |domain: &str, hosts: &[(&str, bool)]| {
            let path = tenants.join(format!("{domain}.toml"));
            std::fs::write(&path, tenant(domain, hosts)).expect("write");
            path
        };
        for i in 0..20 {
            write(
                &format!("t{i}.test"),
                &[(&format!("webmail.t{i}.test"), i % 2 == 0)],
            );
        }
        cert("t0.pem", &["webmail.t0.test"], 30);
        cert("wild.pem", &["*.t1.test"], 30);

        let provider = crate::config::crypto_provider();
        let mut loader = Loader::new(provider.clone());
        let mut live = loader.load(&gateway).expect("first load");
        let full = |what: &str| {
            Loader::new(provider.clone())
                .load(&gateway)
                .unwrap_or_else(|e| panic!("{what}: full load: {e:?}"))
        };

        type Step<'a> = (&'a str, Box<dyn Fn() -> Vec<PathBuf> + 'a>);
        let steps: Vec<Step> = vec![
            (
                "a tenant changed",
                Box::new(|| {
                    vec![write(
                        "t1.test",
                        &[("webmail.t1.test", true), ("mail.t1.test", false)],
                    )]
                }),
            ),
            (
                "a tenant added",
                Box::new(|| vec![write("t99.test", &[("webmail.t99.test", true)])]),
            ),
            (
                "a tenant removed",
                Box::new(|| {
                    let p = tenants.join("t2.test.toml");
                    std::fs::remove_file(&p).expect("rm");
                    vec![p]
                }),
            ),
            (
                "a certificate replaced",
                Box::new(|| vec![cert("t0.pem", &["webmail.t0.test"], 60)]),
            ),
            (
                "a certificate added",
                Box::new(|| vec![cert("t99.pem", &["webmail.t99.test", "*.t3.test"], 40)]),
            ),
            (
                "a certificate removed",
                Box::new(|| {
                    let p = certs.join("wild.pem");
                    std::fs::remove_file(&p).expect("rm");
                    vec![p]
                }),
            ),
            (
                "a tenant renamed",
                Box::new(|| {
                    let (from, to) = (tenants.join("t4.test.toml"), tenants.join("t44.test.toml"));
                    std::fs::remove_file(&from).expect("rm");
                    vec![from, write("t44.test", &[("webmail.t44.test", true)]), to]
                }),
            ),
        ];
        for (what, step) in steps {
            let changed = step();
            let applied = loader
                .apply(&live, &changed)
                .unwrap_or_else(|| panic!("{what}: not applied alone"))
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            assert_eq!(served(&applied), served(&full(what)), "{what}");
            live = applied;
        }

        // Refused like a full load refuses it, and the next change then needs a full load.
        let inner = write("x.t8.test", &[("webmail.x.t8.test", false)]);
        live = loader
            .apply(&live, &[inner])
            .expect("applied alone")
            .expect("a tenant below another");
        let clash = write(
            "t8.test",
            &[("webmail.t8.test", true), ("webmail.x.t8.test", false)],
        );
        let errors = loader
            .apply(&live, std::slice::from_ref(&clash))
            .expect("applied alone")
            .expect_err("a host of another tenant");
        assert!(
            errors.iter().any(|e| e
                .to_string()
                .contains("webmail.x.t8.test already belongs to tenant x.t8.test")),
            "{errors:?}"
        );
        assert!(Loader::new(provider.clone()).load(&gateway).is_err());
        let fixed = write("t8.test", &[("webmail.t8.test", true)]);
        assert!(loader.apply(&live, &[fixed]).is_none(), "after a refusal");
        live = loader.load(&gateway).expect("full load");

        // Left to a full load: gateway.toml, and a certificate whose key is in another file.
        assert!(
            loader
                .apply(&live, std::slice::from_ref(&gateway))
                .is_none()
        );
        let split = pki.issue(&["webmail.t7.test"]).expect("issue");
        std::fs::write(certs.join("t7.crt"), &split.cert_pem).expect("write");
        std::fs::write(certs.join("t7.key"), &split.key_pem).expect("write");
        assert!(
            loader
                .apply(&live, &[certs.join("t7.crt"), certs.join("t7.key")])
                .is_none()
        );
    }
}
