//! What is measured: loading a configuration of 10k tenants with 10k certificates (one ECDSA
//! P-256 certificate + key file each) from disk: a cold start (empty caches, every file parsed)
//! and an incremental reload after one tenant file changed (the loader's caches re-parse only
//! that file). Targets: cold under 3 s, incremental under 100 ms on the 2-core machine.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use logon_gate::config::table::Loader;

const TENANTS: usize = 10_000;

fn tenant(i: usize, enabled: bool) -> String {
    format!(
        "domain = \"tenant{i}.example\"\nedition = \"enterprise\"\n\n[[logon]]\nhost = \"webmail.tenant{i}.example\"\ncname = \"verified\"\nicp = \"filed\"\nicp_number = \"ICP-{i}\"\nenabled = {enabled}\n"
    )
}

fn generate(dir: &Path) {
    std::fs::create_dir_all(dir.join("tenants")).expect("mkdir");
    std::fs::create_dir_all(dir.join("certs")).expect("mkdir");
    std::fs::write(
        dir.join("gateway.toml"),
        "cname_target = \"logon.provider.test\"\n[backend]\nurl = \"http://127.0.0.1:8080\"\n[paths]\ntenants = \"tenants\"\ncerts = \"certs\"\n",
    )
    .expect("write");
    let pki = logon_gate::pki::Pki::new("bench CA").expect("ca");
    for i in 0..TENANTS {
        std::fs::write(
            dir.join("tenants").join(format!("tenant{i}.example.toml")),
            tenant(i, true),
        )
        .expect("write");
        let issued = pki
            .issue(&[&format!("webmail.tenant{i}.example")])
            .expect("issue");
        let path = dir.join("certs").join(format!("tenant{i}.pem"));
        std::fs::write(&path, format!("{}{}", issued.cert_pem, issued.key_pem)).expect("write");
        set_private(&path);
    }
}

#[cfg(unix)]
fn set_private(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

#[cfg(not(unix))]
fn set_private(_: &Path) {}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let made = Instant::now();
    generate(dir.path());
    eprintln!(
        "generated {TENANTS} tenants + certificates in {:?}",
        made.elapsed()
    );
    let gw = dir.path().join("gateway.toml");

    let mut g = c.benchmark_group("reload_10k");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("cold_start", |b| {
        b.iter(|| {
            let mut loader = Loader::new(logon_gate::config::crypto_provider());
            let t = loader.load(&gw).expect("valid");
            assert_eq!(t.host_count(), TENANTS);
        })
    });

    let mut loader = Loader::new(logon_gate::config::crypto_provider());
    loader.load(&gw).expect("valid");
    let file = dir.path().join("tenants/tenant42.example.toml");
    let mut flip = false;
    g.bench_function("one_tenant_changed", |b| {
        b.iter(|| {
            flip = !flip;
            std::fs::write(&file, tenant(42, !flip)).expect("write");
            let t = loader.load(&gw).expect("valid");
            assert_eq!(t.host_count(), TENANTS);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
