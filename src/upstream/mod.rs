//! The webmail backend: the request as the backend gets it (proxy headers, hop-by-hop
//! fields out, HTTP/2 cookies joined), the pooled HTTP/1.1 connections, and the timeouts.

pub mod body;
mod forward;
pub mod pool;

pub use forward::*;
