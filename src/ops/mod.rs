//! Operator commands: `check`, and the lifecycle of a logon address (`tenant`, `domain`,
//! `cert`), each a read-modify-write of config files under an exclusive lock, validated as a
//! whole before an atomic write.

pub mod cert;
pub mod check;
pub mod dns;
pub mod edit;
pub mod lifecycle;

pub use check::{check, summary};

/// A refusal or failure of an operator command: one sentence naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OpError(pub String);

impl OpError {
    /// Builds an error from anything printable.
    pub fn new(msg: impl Into<String>) -> Self {
        OpError(msg.into())
    }
}
