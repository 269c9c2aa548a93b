//! Operator commands: `check`, and the lifecycle of a logon address (`tenant`, `domain`,
//! `cert`), each a read-modify-write of config files under an exclusive lock, validated as a
//! whole before an atomic write.

pub mod cert;
pub mod check;
pub mod dns;
pub mod edit;
pub mod lifecycle;
pub mod store;

pub use check::{check, summary};

/// A refusal or failure of an operator command: one sentence naming what is wrong (with
/// its cause after a colon, [`OpError::sentence`]).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// What the operator asked breaks a rule, or names something that is not there.
    #[error("{0}")]
    Refused(String),
    /// A file could not be read, locked or written.
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl OpError {
    /// A refusal saying `msg`.
    pub fn new(msg: impl Into<String>) -> Self {
        OpError::Refused(msg.into())
    }

    /// `what` failed on `path`.
    pub fn io(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| OpError::Io { what, path, source }
    }

    /// The error and its causes in one sentence, each cause after a colon.
    pub fn sentence(&self) -> String {
        crate::error::sentence(self)
    }
}
