//! Prometheus metrics (prometheus-client): what the gateway decided, how long it took, TLS
//! handshakes, upstream errors, reloads and certificate expiry. Every label value comes from a
//! fixed set (decisions, status classes, error kinds) or from the operator's own config (a
//! certificate's file name); never from a client's Host header.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub decision: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    pub file: String,
}

/// Every decision label, in a fixed order (see `Metrics::request`).
pub const DECISIONS: [&str; 7] = [
    "forward",
    "redirect_https",
    "not_enabled",
    "unknown_host",
    "wrong_certificate",
    "bad_host",
    "bad_framing",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// All of the gateway's metrics.
pub struct Metrics {
    /// Counters of `requests`, resolved once so the request path does no label hashing.
    by_decision: Vec<[Counter; 5]>,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Histogram,
    pub connections: Family<ListenerLabel, Gauge>,
    /// Idle HTTP/1.1 connections parked (holding no HTTP state, see `park`).
    pub parked: Gauge,
    /// Requests waiting for a busy backend connection; set when scraped.
    pub backend_queued: Gauge,
    pub handshakes: Family<ResultLabel, Counter>,
    pub upstream_errors: Family<KindLabel, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    pub generation: Gauge<u64, AtomicU64>,
    pub cert_expiry: Family<CertLabel, Gauge>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `logon_gate` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("logon_gate");
        let requests: Family<RequestLabels, Counter> = Family::default();
        let by_decision = DECISIONS
            .iter()
            .map(|d| {
                CLASSES.map(|c| {
                    requests
                        .get_or_create(&RequestLabels {
                            decision: d,
                            status: c,
                        })
                        .clone()
                })
            })
            .collect();
        let m = Metrics {
            by_decision,
            requests,
            duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            connections: Family::default(),
            parked: Gauge::default(),
            backend_queued: Gauge::default(),
            handshakes: Family::default(),
            upstream_errors: Family::default(),
            reloads: Family::default(),
            generation: Gauge::default(),
            cert_expiry: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by policy decision and status class",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head",
            m.duration.clone(),
        );
        registry.register(
            "open_connections",
            "Open client connections by listener",
            m.connections.clone(),
        );
        registry.register(
            "parked_connections",
            "Idle HTTP/1.1 connections parked without HTTP buffers",
            m.parked.clone(),
        );
        registry.register(
            "backend_queued_requests",
            "Requests waiting for one of the busy backend connections (backend.queue_after_busy)",
            m.backend_queued.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes by result",
            m.handshakes.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed forwards by kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads by result",
            m.reloads.clone(),
        );
        registry.register(
            "config_generation",
            "Generation of the configuration served",
            m.generation.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until each loaded certificate expires",
            m.cert_expiry.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts one request.
    pub fn request(&self, decision: &'static str, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        match DECISIONS.iter().position(|d| *d == decision) {
            Some(i) => {
                self.by_decision[i][class].inc();
            }
            None => {
                self.requests
                    .get_or_create(&RequestLabels {
                        decision,
                        status: CLASSES[class],
                    })
                    .inc();
            }
        }
    }

    /// Sets the per-certificate expiry gauges from a table (old files disappear).
    pub fn set_certs(&self, table: &crate::table::Table) {
        self.cert_expiry.clear();
        let now = crate::certs::unix_now();
        for c in &table.certs {
            let file = c
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.cert_expiry
                .get_or_create(&CertLabel { file })
                .set(c.not_after - now);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
