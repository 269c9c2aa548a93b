//! HTTP/1.1 connections: the framing watch beside hyper (smuggling shapes, header and
//! keep-alive timeouts) and parking of idle connections without hyper's buffers.

pub mod framing;
pub(crate) mod park;

use crate::config::Limits;

/// The largest request head hyper buffers (431 past `max_request_header_bytes`).
pub(crate) fn max_buf(limits: &Limits) -> usize {
    limits.max_request_header_bytes.max(8192)
}

/// hyper's HTTP/1.1 settings, in one place for both ways a connection is served over HTTP/1.1:
/// a TLS connection with ALPN `http/1.1` (`park`, on hyper's `http1::Builder`) and plain
/// HTTP (the auto builder's `http1()`, which may also meet HTTP/2 with prior knowledge). The
/// two builders share no type, hence a macro.
macro_rules! settings {
    ($builder:expr, $max_buf:expr) => {
        $builder
            .timer(hyper_util::rt::TokioTimer::new())
            // Off: hyper's timer also runs while a connection idles between requests, so it
            // would close keep-alive connections at the header timeout. `framing::Watched`
            // keeps both timeouts.
            .header_read_timeout(None)
            .max_buf_size($max_buf)
            .keep_alive(true)
    };
}
pub(crate) use settings;
