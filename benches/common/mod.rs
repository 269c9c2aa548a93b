//! What the `reload` and `scale` benchmarks both generate: N tenants with one logon address
//! each, and N certificate files (ECDSA P-256 chain and key, 0600), one per address.

use std::path::Path;

/// Tenant `i`'s file: webmail.tenant{i}.example (`enabled` or not), and `extra` as a second,
/// pending address when given.
pub fn tenant(i: usize, enabled: bool, extra: Option<&str>) -> String {
    let mut s = format!(
        "domain = \"tenant{i}.example\"\nedition = \"enterprise\"\n\n[[logon]]\nhost = \"webmail.tenant{i}.example\"\ncname = \"verified\"\nicp = \"filed\"\nicp_number = \"ICP-{i}\"\nenabled = {enabled}\n"
    );
    if let Some(h) = extra {
        s.push_str(&format!(
            "\n[[logon]]\nhost = \"{h}\"\ncname = \"pending\"\nicp = \"pending\"\nenabled = false\n"
        ));
    }
    s
}

/// Writes gateway.toml (`gateway_extra` appended), `n` tenants and `n` certificates under `dir`.
pub fn generate(dir: &Path, n: usize, gateway_extra: &str) {
    std::fs::create_dir_all(dir.join("tenants")).expect("mkdir");
    std::fs::create_dir_all(dir.join("certs")).expect("mkdir");
    std::fs::write(
        dir.join("gateway.toml"),
        format!(
            "cname_target = \"logon.provider.test\"\n[backend]\nurl = \"http://127.0.0.1:8080\"\n[paths]\ntenants = \"tenants\"\ncerts = \"certs\"\n{gateway_extra}"
        ),
    )
    .expect("write");
    let pki = logon_gate::pki::Pki::new("bench CA").expect("ca");
    for i in 0..n {
        std::fs::write(
            dir.join("tenants").join(format!("tenant{i}.example.toml")),
            tenant(i, true, None),
        )
        .expect("write");
        let issued = pki
            .issue(&[&format!("webmail.tenant{i}.example")])
            .expect("issue");
        let path = dir.join("certs").join(format!("tenant{i}.pem"));
        std::fs::write(&path, format!("{}{}", issued.cert_pem, issued.key_pem)).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
    }
}
