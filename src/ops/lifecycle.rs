//! The lifecycle of a logon address (SPEC §1 through §4's commands): `tenant add/edition`,
//! `domain add/verify/icp/enable/disable/remove/list`. Every change goes through
//! `edit::edit_tenant_file`: locked, validated as a whole, written atomically, comments kept.

use std::net::SocketAddr;
use std::path::Path;

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table as TomlTable, value};

use super::OpError;
use super::edit::{self, edit_tenant_file, parse_doc, set};
use crate::config::host::HostName;
use crate::config::table::{Route, Table, Tenant};
use crate::config::{CnameState, Edition, IcpState};

fn host_arg(raw: &str) -> Result<HostName, OpError> {
    HostName::from_user(raw)
        .map_err(|e| OpError::Refused(format!("`{raw}` is not a valid host name: {e}")))
}

fn tenant_of<'t>(table: &'t Table, domain: &HostName) -> Result<&'t Tenant, OpError> {
    table
        .tenants
        .iter()
        .find(|t| t.domain == *domain)
        .map(|t| &**t)
        .ok_or_else(|| {
            OpError::Refused(format!(
                "there is no tenant {domain}; create it with `logon-gate tenant add {domain} --edition standard`"
            ))
        })
}

/// The tenant that owns logon address `host`.
fn owner_of<'t>(table: &'t Table, host: &HostName) -> Result<&'t Tenant, OpError> {
    match table.route(host.as_str()) {
        Some(Route::Logon { tenant, .. }) => Ok(tenant),
        Some(Route::Platform) => Err(OpError::Refused(format!(
            "{host} is a platform host, not a tenant's logon address"
        ))),
        None => Err(OpError::Refused(format!(
            "{host} is not a logon address of any tenant; add it with `logon-gate domain add DOMAIN {host}`"
        ))),
    }
}

/// The `[[logon]]` entry for `host` in a tenant document.
fn logon_entry<'d>(
    doc: &'d mut DocumentMut,
    host: &HostName,
    file: &Path,
) -> Result<&'d mut TomlTable, OpError> {
    doc.get_mut("logon")
        .and_then(Item::as_array_of_tables_mut)
        .and_then(|a| {
            a.iter_mut()
                .find(|t| t.get("host").and_then(Item::as_str) == Some(host.as_str()))
        })
        .ok_or_else(|| {
            OpError::Refused(format!(
                "{} has no [[logon]] entry for {host}",
                file.display()
            ))
        })
}

/// `tenant add DOMAIN --edition E`.
pub fn tenant_add(config: &Path, domain: &str, edition: Edition) -> Result<String, OpError> {
    let domain = host_arg(domain)?;
    edit_tenant_file(config, |table| {
        if let Some(t) = table.tenants.iter().find(|t| t.domain == domain) {
            return Err(OpError::Refused(format!(
                "tenant {domain} already exists ({})",
                t.file.display()
            )));
        }
        let path = table.settings.tenants_dir.join(format!("{domain}.toml"));
        if path.exists() {
            return Err(OpError::Refused(format!(
                "{} already exists",
                path.display()
            )));
        }
        let text = format!(
            "# Tenant {domain}: its logon addresses follow as [[logon]] entries.\ndomain  = \"{domain}\"\nedition = \"{}\"            # free | standard | enterprise\n",
            edition.as_str()
        );
        Ok((
            path,
            text,
            format!("tenant {domain} added ({} edition)", edition.as_str()),
        ))
    })
}

/// `tenant edition DOMAIN E`.
pub fn tenant_edition(config: &Path, domain: &str, edition: Edition) -> Result<String, OpError> {
    let domain = host_arg(domain)?;
    edit_tenant_file(config, |table| {
        let tenant = tenant_of(table, &domain)?;
        if edition == Edition::Free
            && let Some(l) = tenant.logons.iter().find(|l| l.enabled)
        {
            return Err(OpError::Refused(format!(
                "tenant {domain} has the enabled logon address {}; the free edition cannot use custom logon addresses, so disable it first",
                l.host
            )));
        }
        let mut doc = parse_doc(&tenant.file)?;
        set(doc.as_table_mut(), "edition", edition.as_str());
        Ok((
            tenant.file.clone(),
            doc.to_string(),
            format!("tenant {domain} is now on the {} edition", edition.as_str()),
        ))
    })
}

/// `domain add DOMAIN HOST`.
pub fn domain_add(config: &Path, domain: &str, host: &str) -> Result<String, OpError> {
    let domain = host_arg(domain)?;
    let host = host_arg(host)?;
    if !host.is_strictly_below(&domain) {
        return Err(OpError::Refused(format!(
            "{host} does not lie below the tenant's domain {domain} (e.g. webmail.{domain})"
        )));
    }
    edit_tenant_file(config, |table| {
        let tenant = tenant_of(table, &domain)?;
        match table.route(host.as_str()) {
            Some(Route::Platform) => {
                return Err(OpError::Refused(format!("{host} is a platform host")));
            }
            Some(Route::Logon { tenant: other, .. }) => {
                return Err(OpError::Refused(format!(
                    "{host} already belongs to tenant {}",
                    other.domain
                )));
            }
            None => {}
        }
        let mut doc = parse_doc(&tenant.file)?;
        let mut entry = TomlTable::new();
        entry["host"] = value(host.as_str());
        entry["cname"] = value("pending");
        entry["icp"] = value("pending");
        entry["enabled"] = value(false);
        match doc.get_mut("logon") {
            Some(item) => item
                .as_array_of_tables_mut()
                .ok_or_else(|| {
                    OpError::Refused(format!(
                        "{}: `logon` is not a list of [[logon]] tables",
                        tenant.file.display()
                    ))
                })?
                .push(entry),
            None => {
                let mut arr = ArrayOfTables::new();
                arr.push(entry);
                doc.insert("logon", Item::ArrayOfTables(arr));
            }
        }
        Ok((
            tenant.file.clone(),
            doc.to_string(),
            format!(
                "{host} added to tenant {domain} (cname pending, icp pending, disabled); next: point a CNAME at {} and run `logon-gate domain verify {host}`",
                table.settings.cname_target
            ),
        ))
    })
}

/// Applies `change` to the `[[logon]]` entry of `host`; `change` may read the table and tenant.
fn edit_logon<F>(config: &Path, host: &HostName, mut change: F) -> Result<String, OpError>
where
    F: FnMut(&Table, &Tenant, &mut DocumentMut) -> Result<String, OpError>,
{
    edit_tenant_file(config, |table| {
        let tenant = owner_of(table, host)?;
        let mut doc = parse_doc(&tenant.file)?;
        let message = change(table, tenant, &mut doc)?;
        Ok((tenant.file.clone(), doc.to_string(), message))
    })
}

/// `domain verify HOST [--nameserver IP:PORT]`: real DNS first (no lock held), then the write.
pub async fn domain_verify(
    config: &Path,
    host: &str,
    nameserver: Option<SocketAddr>,
) -> Result<String, OpError> {
    let host = host_arg(host)?;
    let target = {
        let mut loader = crate::config::table::Loader::new(crate::config::crypto_provider());
        let table = edit::load(&mut loader, config)?;
        owner_of(&table, &host)?;
        table.settings.cname_target.clone()
    };
    let verdict = super::dns::verify(&host, &target, nameserver).await;
    let said = verdict.describe(&host, &target);
    if !matches!(verdict, super::dns::Verdict::Reached(_)) {
        return Err(OpError::Refused(format!("not verified: {said}")));
    }
    edit_logon(config, &host, |_, tenant, doc| {
        set(logon_entry(doc, &host, &tenant.file)?, "cname", "verified");
        Ok(format!("{host}: CNAME verified ({said})"))
    })
}

/// `domain icp HOST --number N`.
pub fn domain_icp(config: &Path, host: &str, number: &str) -> Result<String, OpError> {
    let host = host_arg(host)?;
    let number = number.trim();
    if number.is_empty() {
        return Err(OpError::Refused("--number must not be empty".into()));
    }
    edit_logon(config, &host, |_, tenant, doc| {
        let e = logon_entry(doc, &host, &tenant.file)?;
        set(e, "icp", "filed");
        set(e, "icp_number", number);
        Ok(format!("{host}: ICP filing {number} recorded"))
    })
}

/// `domain enable HOST`: checks every rule of SPEC §1, names the one that fails, and disables
/// the tenant's other addresses in the same write.
pub fn domain_enable(config: &Path, host: &str) -> Result<String, OpError> {
    let host = host_arg(host)?;
    edit_logon(config, &host, |table, tenant, doc| {
        let logon = tenant
            .logons
            .iter()
            .find(|l| l.host == host)
            .ok_or_else(|| {
                OpError::Refused(format!("{host} is not an address of {}", tenant.domain))
            })?;
        if tenant.edition == Edition::Free {
            return Err(OpError::Refused(format!(
                "cannot enable {host}: tenant {} is on the free edition, which cannot use custom logon addresses",
                tenant.domain
            )));
        }
        if logon.cname != CnameState::Verified {
            return Err(OpError::Refused(format!(
                "cannot enable {host}: its CNAME is not verified (run `logon-gate domain verify {host}`)"
            )));
        }
        if table.settings.require_icp && logon.icp != IcpState::Filed {
            return Err(OpError::Refused(format!(
                "cannot enable {host}: its ICP filing is not recorded (run `logon-gate domain icp {host} --number N`)"
            )));
        }
        let others: Vec<String> = tenant
            .logons
            .iter()
            .filter(|l| l.enabled && l.host != host)
            .map(|l| l.host.to_string())
            .collect();
        if let Some(arr) = doc.get_mut("logon").and_then(Item::as_array_of_tables_mut) {
            for t in arr.iter_mut() {
                let this = t.get("host").and_then(Item::as_str) == Some(host.as_str());
                let was = t.get("enabled").and_then(Item::as_bool).unwrap_or(false);
                if this || was {
                    set(t, "enabled", this);
                }
            }
        }
        logon_entry(doc, &host, &tenant.file)?;
        Ok(if others.is_empty() {
            format!("{host} enabled for tenant {}", tenant.domain)
        } else {
            format!(
                "{host} enabled for tenant {}; disabled {}",
                tenant.domain,
                others.join(", ")
            )
        })
    })
}

/// `domain disable HOST`.
pub fn domain_disable(config: &Path, host: &str) -> Result<String, OpError> {
    let host = host_arg(host)?;
    edit_logon(config, &host, |_, tenant, doc| {
        set(logon_entry(doc, &host, &tenant.file)?, "enabled", false);
        Ok(format!("{host} disabled"))
    })
}

/// `domain remove HOST`.
pub fn domain_remove(config: &Path, host: &str) -> Result<String, OpError> {
    let host = host_arg(host)?;
    edit_logon(config, &host, |_, tenant, doc| {
        let arr = doc
            .get_mut("logon")
            .and_then(Item::as_array_of_tables_mut)
            .ok_or_else(|| {
                OpError::Refused(format!(
                    "{} has no [[logon]] entries",
                    tenant.file.display()
                ))
            })?;
        let before = arr.len();
        arr.retain(|t| t.get("host").and_then(Item::as_str) != Some(host.as_str()));
        if arr.len() == before {
            return Err(OpError::Refused(format!(
                "{} has no [[logon]] entry for {host}",
                tenant.file.display()
            )));
        }
        if arr.is_empty() {
            doc.remove("logon");
        }
        Ok(format!("{host} removed from tenant {}", tenant.domain))
    })
}

/// One row of `domain list`.
#[derive(Debug, serde::Serialize)]
pub struct Row {
    pub tenant: String,
    pub edition: Edition,
    pub host: String,
    pub cname: CnameState,
    pub icp: IcpState,
    pub icp_number: Option<String>,
    /// Expiry of the certificate that would be served for the host, as `YYYY-MM-DD`.
    pub certificate_expires: Option<String>,
    pub certificate_days_left: Option<i64>,
    /// Where the certificate comes from and its ACME state (SPEC §5).
    pub certificate: crate::acme::CertFacts,
    pub enabled: bool,
}

/// `domain list [DOMAIN]`: the rows, sorted by tenant then host.
pub fn domain_list(config: &Path, domain: Option<&str>) -> Result<Vec<Row>, OpError> {
    let only = domain.map(host_arg).transpose()?;
    let mut loader = crate::config::table::Loader::new(crate::config::crypto_provider());
    let table = edit::load(&mut loader, config)?;
    if let Some(d) = &only {
        tenant_of(&table, d)?;
    }
    let mut rows = Vec::new();
    for t in &table.tenants {
        if only.as_ref().is_some_and(|d| *d != t.domain) {
            continue;
        }
        for l in &t.logons {
            let cert = table.cert_for(l.host.as_str());
            rows.push(Row {
                tenant: t.domain.to_string(),
                edition: t.edition,
                host: l.host.to_string(),
                cname: l.cname,
                icp: l.icp,
                icp_number: l.icp_number.clone(),
                certificate_expires: cert.map(|c| crate::config::certs::date(c.not_after)),
                certificate_days_left: cert.map(|c| c.days_left()),
                certificate: crate::acme::facts(&table, t, l),
                enabled: l.enabled,
            });
        }
    }
    rows.sort_by(|a, b| (&a.tenant, &a.host).cmp(&(&b.tenant, &b.host)));
    Ok(rows)
}

/// Renders rows as an aligned text table.
pub fn render(rows: &[Row]) -> String {
    let header = [
        "TENANT",
        "EDITION",
        "HOST",
        "CNAME",
        "ICP",
        "CERTIFICATE",
        "ENABLED",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.tenant.clone(),
                r.edition.as_str().into(),
                r.host.clone(),
                match r.cname {
                    CnameState::Pending => "pending".into(),
                    CnameState::Verified => "verified".into(),
                },
                match (&r.icp, &r.icp_number) {
                    (IcpState::Filed, Some(n)) => format!("filed ({n})"),
                    (IcpState::Filed, None) => "filed".into(),
                    (IcpState::Pending, _) => "pending".into(),
                },
                r.certificate.column(),
                if r.enabled { "yes".into() } else { "no".into() },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cols: Vec<&str>| {
        let parts: Vec<String> = cols
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &cells {
        line(row.iter().map(String::as_str).collect());
    }
    out
}
