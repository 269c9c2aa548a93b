//! What is measured: loading a configuration of 10k tenants with 10k certificates (one ECDSA
//! P-256 certificate + key file each) from disk: a cold start (empty caches, every file parsed)
//! and an incremental reload after one tenant file changed (the loader's caches re-parse only
//! that file). Targets: cold under 3 s, incremental under 100 ms on the 2-core machine.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use logon_gate::config::table::Loader;

#[path = "common/mod.rs"]
mod common;
use common::tenant;

const TENANTS: usize = 10_000;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let made = Instant::now();
    common::generate(dir.path(), TENANTS, "");
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
            std::fs::write(&file, tenant(42, !flip, None)).expect("write");
            let t = loader.load(&gw).expect("valid");
            assert_eq!(t.host_count(), TENANTS);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
