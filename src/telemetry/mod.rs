//! What the gateway tells about itself: Prometheus metrics and the log formats.

pub mod logfmt;
pub mod metrics;
