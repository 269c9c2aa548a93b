//! logon-gate: the edge gateway that makes custom webmail logon addresses real.
//!
//! ```text
//! request:  serve (accept, a serving thread, TLS handshake under a timeout: serve::tls picks
//!           the certificate by SNI from the live table; h1/ and h2/ drive hyper)
//!           -> proxy (one request: policy decides, a page refuses)
//!           -> upstream (proxy headers, pooled HTTP/1.1 connections to the backend)
//! config:   config (raw files -> host names, certificates -> Table, valid by construction)
//!           -> state (the live Snapshot in an ArcSwap, shared by every task)
//!           <- control (reload: watcher, SIGHUP, rebuild off the async threads, publish
//!              or keep; admin: /healthz, /metrics, /status)
//! operator: main (clap) -> ops (check, tenant, domain, cert) -> atomic file edits -> config
//! acme:     control::acme (the background issuer: queue, bound, backoff)
//!           -> acme (one order; the storage the issuer, `cert issue`, and the listeners
//!              answering challenges share) -> config
//! ```
//!
//! Imports point down this list: serve -> control, proxy -> upstream -> state -> config,
//! telemetry, shard; `acme` sits beside `ops` and imports `config` and `ops::dns` only.
//! `state` imports none of the modules that use it; `ops` reads `config` (and `acme` for
//! `cert issue` and `cert status`), never the serving side. `store` (SPEC §6, the `etcd`
//! feature) keeps the `[paths]` folders a copy of etcd, so the reload serves etcd's changes
//! as it serves file edits.

pub mod acme;
pub mod config;
mod control;
pub mod demo;
pub mod error;
pub mod ops;
pub mod pki;
pub mod proxy;
pub mod serve;
mod shard;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod upstream;
