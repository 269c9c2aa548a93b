//! One request, from its head to its answer: the host policy (a pure decision), the refusal
//! pages, and the access record. Forwarding itself is `upstream`'s.

pub(crate) mod access;
pub(crate) mod handler;
pub mod policy;
pub(crate) mod progress;
