//! The end-to-end tests, one binary: the real gateway on port 0 (in-process through the
//! library, or the built binary), real TLS and HTTP/1.1 and HTTP/2 clients that trust only
//! the test CA, and real peers (a DNS server, Python's http.server, PHP, curl, python-h2,
//! Chromium with Roundcube and Dovecot). Tests that need Debian packages are `#[ignore]`d
//! by a bare `cargo test` and run by `.ci/run`.

mod support;

mod acme;
mod admin;
mod cli;
#[cfg(feature = "etcd")]
mod etcd;
mod gateway;
mod hardening;
mod lifecycle;
mod reload;
mod translation;
mod webmail;
