//! Files to a validated table: the raw serde types of gateway.toml and the tenant files
//! (`raw`), host names (`host`), certificates (`certs`), and the compiled table with its
//! incremental loader (`table`). Nothing here knows about sockets; a `Table` that exists is
//! valid. The store the files come from (files today; etcd later) plugs in below the loader.

pub mod certs;
pub mod host;
mod raw;
pub mod table;

pub use raw::*;

use std::sync::Arc;

/// The crypto provider everything uses (aws-lc-rs): certificates are parsed with it, and TLS
/// is served with it.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
