//! The control plane beside the request path: hot reload (watcher, SIGHUP, rebuild, publish
//! or keep) and the admin listener (/healthz, /metrics, /status).

pub mod acme;
pub mod admin;
pub mod reload;
