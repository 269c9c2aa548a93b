//! What is measured: the per-request decision (Host normalisation + table lookup + policy) and
//! SNI certificate resolution, on tables of 10, 10k and 1M hosts. "hot" asks for one host over
//! and over; "spread" cycles through 4096 different hosts of the table, so at 1M hosts most
//! lookups miss the CPU caches, as real traffic across many tenants would.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::HeaderValue;
use logon_gate::config::certs::CertEntry;
use logon_gate::config::host::{HostBuf, HostName, MAX_HOST_LEN};
use logon_gate::config::table::{Logon, Table, Tenant};
use logon_gate::config::{self, CnameState, Edition, IcpState, Source};
use logon_gate::proxy::policy::{TlsFacts, decide};

fn table(hosts: usize) -> (Table, Vec<String>) {
    let src = Source {
        path: "gateway.toml".into(),
        text: "cname_target = \"logon.provider.test\"\n[listen]\nhttps = \"127.0.0.1:0\"\n[backend]\nurl = \"http://127.0.0.1:8080\"\n".into(),
    };
    let (settings, _) = config::load_gateway(&src).expect("settings");
    let pki = logon_gate::pki::Pki::new("bench").expect("ca");
    let issued = pki.issue(&["bench.example"]).expect("issue");
    let provider = logon_gate::config::crypto_provider();
    let key = logon_gate::config::certs::load_pair(
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
        &provider,
    )
    .expect("pair")
    .key;
    let mut tenants = Vec::with_capacity(hosts);
    let mut certs = Vec::with_capacity(hosts);
    let mut names = Vec::with_capacity(hosts);
    for i in 0..hosts {
        let domain = format!("tenant{i}.example");
        let host = format!("webmail.{domain}");
        tenants.push(Arc::new(Tenant {
            domain: HostName::parse_canonical(&domain).expect("domain"),
            edition: Edition::Enterprise,
            file: format!("{domain}.toml").into(),
            logons: vec![Logon {
                host: HostName::parse_canonical(&host).expect("host"),
                cname: CnameState::Verified,
                icp: IcpState::Filed,
                icp_number: None,
                enabled: true,
                line: 1,
            }],
            header: HeaderValue::from_str(&domain).expect("header"),
        }));
        certs.push(Arc::new(CertEntry {
            path: format!("{host}.pem").into(),
            key_path: format!("{host}.pem").into(),
            key: key.clone(),
            names: vec![host.clone().into_boxed_str()],
            not_before: 0,
            not_after: i64::MAX,
        }));
        names.push(host);
    }
    let t = Table::build(settings, vec![], tenants, certs, vec![]).expect("table");
    (t, names)
}

fn bench(c: &mut Criterion) {
    for size in [10usize, 10_000, 1_000_000] {
        let (t, names) = table(size);
        // Hosts as a client would send them: mixed case with a port.
        let step = (size / 4096).max(1);
        let picks: Vec<(String, String)> = names
            .iter()
            .step_by(step)
            .take(4096)
            .map(|n| (n.clone(), format!("WebMail{}:443", &n["webmail".len()..])))
            .collect();
        let certs: Vec<Arc<CertEntry>> = picks
            .iter()
            .map(|(n, _)| t.cert_for(n).expect("cert").clone())
            .collect();

        let mut g = c.benchmark_group("decision");
        g.bench_function(BenchmarkId::new("hot", size), |b| {
            let (sni, authority) = &picks[0];
            let facts = TlsFacts {
                sni,
                cert: &certs[0],
            };
            b.iter(|| {
                let mut buf: HostBuf = [0; MAX_HOST_LEN + 2];
                let d = decide(
                    &t,
                    Some(&facts),
                    Some(black_box(authority.as_bytes())),
                    &mut buf,
                );
                black_box(d.label());
            })
        });
        g.bench_function(BenchmarkId::new("spread", size), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) % picks.len();
                let (sni, authority) = &picks[i];
                let facts = TlsFacts {
                    sni,
                    cert: &certs[i],
                };
                let mut buf: HostBuf = [0; MAX_HOST_LEN + 2];
                let d = decide(
                    &t,
                    Some(&facts),
                    Some(black_box(authority.as_bytes())),
                    &mut buf,
                );
                black_box(d.label());
            })
        });
        g.finish();

        let mut g = c.benchmark_group("sni_resolve");
        g.bench_function(BenchmarkId::new("hot", size), |b| {
            let sni = picks[0].0.as_str();
            b.iter(|| black_box(t.cert_for(black_box(sni)).is_some()))
        });
        g.bench_function(BenchmarkId::new("spread", size), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) % picks.len();
                black_box(t.cert_for(black_box(picks[i].0.as_str())).is_some())
            })
        });
        g.finish();
    }
}

/// The HTTP/1.1 framing watch (`framing`), per request, on the head wrk sends in the load
/// benchmark and on a browser-sized one: what answering CL+TE with 400 costs.
fn framing(c: &mut Criterion) {
    let wrk = b"GET / HTTP/1.1\r\nHost: webmail.example.net:8443\r\n\r\n".to_vec();
    let browser = b"GET /owa/?ae=Folder&t=IPF.Note HTTP/1.1\r\nHost: webmail.example.net\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\nAccept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\nCookie: session=0123456789abcdef0123456789abcdef; lang=en\r\nUpgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\n\r\n".to_vec();
    let mut g = c.benchmark_group("framing");
    for (name, head) in [("wrk", wrk), ("browser", browser)] {
        g.bench_function(name, |b| {
            let mut f = logon_gate::serve::h1::framing::Framing::new(8192);
            b.iter(|| black_box(f.feed(black_box(&head))))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench, framing
}
criterion_main!(benches);
