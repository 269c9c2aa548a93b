//! HTTP/2 connections: streams polled inside their connection's task, and the lingering
//! close after GOAWAY.

pub mod linger;
pub mod streams;
