//! logon-gate: the edge gateway that makes custom webmail logon addresses real.
//!
//! ```text
//! request:  server (accept) -> workers (a serving thread) -> TLS handshake under a timeout
//!           -> tls (SNI -> certificate, from the live table) -> tls_stream (rustls)
//!           -> handler (one request) -> policy (pure decision) -> forward (to the backend)
//! config:   config (serde file types) -> certs (PEM -> CertifiedKey) -> table (compiled,
//!           immutable) -> live snapshot (ArcSwap) <- reload (watcher, SIGHUP,
//!           debounce, rebuild off the async threads, publish or keep)
//! operator: cli (clap types, in main.rs) -> ops (check, demo) -> atomic writes
//! ```

pub mod access;
pub mod admin;
pub mod certs;
pub mod config;
pub mod demo;
pub mod forward;
pub mod framing;
pub mod handler;
pub mod host;
pub mod linger;
pub mod logfmt;
pub mod metrics;
pub mod ops;
pub mod park;
pub mod pki;
pub mod policy;
pub mod pool;
pub mod reload;
pub mod server;
pub mod streams;
pub mod table;
pub mod tls;
pub mod tls_stream;
pub mod workers;
