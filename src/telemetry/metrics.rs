//! Prometheus metrics (prometheus-client): what the gateway decided, how long it took, TLS
//! handshakes, upstream errors, reloads and certificate expiry. Every label value comes from a
//! fixed set (decisions, status classes, error kinds) or from the operator's own config (a
//! certificate's file name); never from a client's Host header.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_utils::CachePadded;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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
pub const DECISIONS: [&str; 8] = [
    "forward",
    "redirect_https",
    "not_enabled",
    "unknown_host",
    "wrong_certificate",
    "bad_host",
    "bad_framing",
    "acme_challenge",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Every listener label of `open_connections`.
pub const LISTENERS: [&str; 2] = ["https", "http"];
/// Every result label of `tls_handshakes` (`tls::HandshakeError::label`, or `ok`/`timeout`).
pub const HANDSHAKE_RESULTS: [&str; 5] = [
    "ok",
    "timeout",
    "unknown_sni",
    "protocol_error",
    "acme_challenge",
];
/// Every kind label of `upstream_errors` (`forward::ForwardError::label`).
pub const UPSTREAM_ERROR_KINDS: [&str; 4] = ["connect", "timeout", "failed", "busy"];
/// Every result label of `reloads`.
pub const RELOAD_RESULTS: [&str; 2] = ["ok", "error"];
/// Every result label of `acme_orders`.
pub const ACME_ORDER_RESULTS: [&str; 3] = ["ok", "failed", "skipped"];
/// Every source label of `certificates`: installed in certs/, or issued by the ACME CA.
pub const CERT_SOURCES: [&str; 2] = ["uploaded", "acme"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

/// All of the gateway's metrics.
pub struct Metrics {
    /// `requests` and `request_duration_seconds`, counted per serving thread.
    requests: RequestStats,
    pub connections: Family<ListenerLabel, Gauge>,
    /// Idle HTTP/1.1 connections parked (holding no HTTP state, see `park`).
    pub parked: Gauge,
    /// Requests waiting for a busy backend connection; set when scraped.
    pub backend_queued: Gauge,
    /// Requests sent or waiting to be sent to the backend, without their response head yet,
    /// and open WebSocket tunnels (`backend_max_in_flight`); set when scraped.
    pub backend_in_flight: Gauge,
    pub handshakes: Family<ResultLabel, Counter>,
    pub upstream_errors: Family<KindLabel, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    pub generation: Gauge<u64, AtomicU64>,
    pub cert_expiry: Family<CertLabel, Gauge>,
    /// ACME orders by result (`control::acme`).
    pub acme_orders: Family<ResultLabel, Counter>,
    /// Certificates loaded, by source.
    pub certificates: Family<SourceLabel, Gauge>,
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
        let m = Metrics {
            requests: RequestStats::default(),
            connections: Family::default(),
            parked: Gauge::default(),
            backend_queued: Gauge::default(),
            backend_in_flight: Gauge::default(),
            handshakes: Family::default(),
            upstream_errors: Family::default(),
            reloads: Family::default(),
            generation: Gauge::default(),
            cert_expiry: Family::default(),
            acme_orders: Family::default(),
            certificates: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by policy decision and status class",
            RequestCounts(Arc::clone(&m.requests.shards)),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head",
            RequestDurations(Arc::clone(&m.requests.shards)),
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
            "backend_in_flight_requests",
            "Requests to the backend without their response head yet, and open tunnels (limits.backend_max_in_flight)",
            m.backend_in_flight.clone(),
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
        registry.register(
            "acme_orders",
            "ACME orders by result",
            m.acme_orders.clone(),
        );
        registry.register(
            "certificates",
            "Certificates loaded, by source (uploaded to certs/, or issued by the ACME CA)",
            m.certificates.clone(),
        );
        // Every series whose labels are known in advance exists from the start, at 0: a
        // `rate()` or an alert on a series that appears only with its first event misses it.
        for listener in LISTENERS {
            let _ = m.connections.get_or_create(&ListenerLabel { listener });
        }
        for result in HANDSHAKE_RESULTS {
            let _ = m.handshakes.get_or_create(&ResultLabel { result });
        }
        for kind in UPSTREAM_ERROR_KINDS {
            let _ = m.upstream_errors.get_or_create(&KindLabel { kind });
        }
        for result in RELOAD_RESULTS {
            let _ = m.reloads.get_or_create(&ResultLabel { result });
        }
        for result in ACME_ORDER_RESULTS {
            let _ = m.acme_orders.get_or_create(&ResultLabel { result });
        }
        for source in CERT_SOURCES {
            let _ = m.certificates.get_or_create(&SourceLabel { source });
        }
        Metrics { registry, ..m }
    }

    /// Counts one request, decided `decision` (one of [`DECISIONS`]) and answered `status`
    /// after `took`.
    pub fn request(&self, decision: &'static str, status: u16, took: Duration) {
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        // Every decision's label is in DECISIONS (the tests, which meet every decision, would
        // stop here otherwise); one missed there is counted as the last, not lost.
        let d = DECISIONS.iter().position(|d| *d == decision);
        debug_assert!(d.is_some(), "decision {decision} is not in DECISIONS");
        let d = d.unwrap_or(DECISIONS.len() - 1);
        let shard = &self.requests.shards[crate::shard::slot()];
        shard.counts[d][class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = DURATION_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BOUNDS.len());
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        shard.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Sets the per-certificate expiry gauges from a table (old files disappear).
    pub fn set_certs(&self, table: &crate::config::table::Table) {
        let acme = table.settings.acme.as_ref().map(|a| a.certs_dir());
        let issued = table
            .certs
            .iter()
            .filter(|c| acme.as_ref().is_some_and(|d| c.path.starts_with(d)))
            .count();
        for (source, n) in [("uploaded", table.certs.len() - issued), ("acme", issued)] {
            self.certificates
                .get_or_create(&SourceLabel { source })
                .set(n as i64);
        }
        self.cert_expiry.clear();
        let now = crate::config::certs::unix_now();
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

/// Upper bounds of `request_duration_seconds`' finite buckets, in seconds: 0.5 ms doubling
/// to about 16 s.
const DURATION_BOUNDS: [f64; 16] = {
    let mut b = [0.0005; 16];
    let mut i = 1;
    while i < 16 {
        b[i] = b[i - 1] * 2.0;
        i += 1;
    }
    b
};

/// Request counts and durations, one set per serving thread (`shard::slot`), summed when
/// scraped. prometheus-client's counter and histogram are one counter and one mutex that
/// every serving thread wrote on every request, moving their cache lines from core to core
/// (docs/performance.md); each thread now writes only its own lines.
#[derive(Debug)]
struct RequestStats {
    shards: Shards,
}

/// One [`ShardStats`] per slot of per-thread state (`shard::SLOTS`).
type Shards = Arc<[CachePadded<ShardStats>; crate::shard::SLOTS]>;

impl Default for RequestStats {
    fn default() -> Self {
        RequestStats {
            shards: Arc::new(std::array::from_fn(|_| CachePadded::default())),
        }
    }
}

/// One thread's statistics (kept on cache lines of their own).
#[derive(Debug, Default)]
struct ShardStats {
    /// By decision (`DECISIONS`) and status class (`CLASSES`).
    counts: [[AtomicU64; CLASSES.len()]; DECISIONS.len()],
    /// Requests by the first duration bucket they fall in; the last is `+Inf`.
    buckets: [AtomicU64; DURATION_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

/// The `requests` counter family, read from the shards.
#[derive(Debug)]
struct RequestCounts(Shards);

impl EncodeMetric for RequestCounts {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (d, decision) in DECISIONS.iter().enumerate() {
            for (c, status) in CLASSES.iter().enumerate() {
                let n: u64 = self
                    .0
                    .iter()
                    .map(|s| s.counts[d][c].load(Ordering::Relaxed))
                    .sum();
                encoder
                    .encode_family(&RequestLabels { decision, status })?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// The `request_duration_seconds` histogram, read from the shards.
#[derive(Debug)]
struct RequestDurations(Shards);

impl EncodeMetric for RequestDurations {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets: Vec<(f64, u64)> = DURATION_BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .map(|b| (b, 0))
            .collect();
        let mut sum_nanos = 0u64;
        for shard in self.0.iter() {
            for (b, n) in buckets.iter_mut().zip(&shard.buckets) {
                b.1 += n.load(Ordering::Relaxed);
            }
            sum_nanos = sum_nanos.saturating_add(shard.sum_nanos.load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|b| b.1).sum();
        encoder.encode_histogram::<NoLabelSet>(sum_nanos as f64 / 1e9, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Series with labels known in advance are there, at 0, before any event.
    #[test]
    fn known_series_start_at_zero() {
        let text = Metrics::new().encode();
        let mut want: Vec<String> = Vec::new();
        for l in LISTENERS {
            want.push(format!("logon_gate_open_connections{{listener=\"{l}\"}} 0"));
        }
        for r in HANDSHAKE_RESULTS {
            want.push(format!(
                "logon_gate_tls_handshakes_total{{result=\"{r}\"}} 0"
            ));
        }
        for k in UPSTREAM_ERROR_KINDS {
            want.push(format!(
                "logon_gate_upstream_errors_total{{kind=\"{k}\"}} 0"
            ));
        }
        for r in RELOAD_RESULTS {
            want.push(format!("logon_gate_reloads_total{{result=\"{r}\"}} 0"));
        }
        for r in ACME_ORDER_RESULTS {
            want.push(format!("logon_gate_acme_orders_total{{result=\"{r}\"}} 0"));
        }
        for s in CERT_SOURCES {
            want.push(format!("logon_gate_certificates{{source=\"{s}\"}} 0"));
        }
        for (d, c) in DECISIONS
            .iter()
            .flat_map(|d| CLASSES.iter().map(move |c| (d, c)))
        {
            want.push(format!(
                "logon_gate_requests_total{{decision=\"{d}\",status=\"{c}\"}} 0"
            ));
        }
        for line in &want {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
