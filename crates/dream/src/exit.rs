//! The one exit-code contract (daemontools convention), and the error type
//! every subcommand returns.

use std::fmt;

/// Done.
pub const OK: i32 = 0;
/// The operation failed, and nothing was changed.
pub const FAILED: i32 = 1;
/// Usage error: fix the command line.
pub const USAGE: i32 = 100;
/// Temporary failure (a lock is held, an address is in use, a disk is
/// full): safe to retry.
pub const TEMPORARY: i32 = 111;

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl fmt::Display) -> Failure {
        Failure {
            code: USAGE,
            message: message.to_string(),
        }
    }

    pub fn temporary(message: impl fmt::Display) -> Failure {
        Failure {
            code: TEMPORARY,
            message: message.to_string(),
        }
    }

    pub fn failed(message: impl fmt::Display) -> Failure {
        Failure {
            code: FAILED,
            message: message.to_string(),
        }
    }

    /// Exit with `code` and nothing more to say (the command already
    /// reported, e.g. `check` printed its report).
    pub fn silent(code: i32) -> Failure {
        Failure {
            code,
            message: String::new(),
        }
    }
}

impl From<dream_core::sockets::listen::ListenError> for Failure {
    fn from(e: dream_core::sockets::listen::ListenError) -> Failure {
        use dream_core::sockets::listen::ListenError::*;
        let code = match &e {
            Spec(_) => USAGE,
            _ if e.is_temporary() => TEMPORARY,
            _ => FAILED,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

impl From<dream_core::deploy::DeployError> for Failure {
    fn from(e: dream_core::deploy::DeployError) -> Failure {
        use dream_core::deploy::Kind;
        let code = match e.kind {
            Kind::Usage => USAGE,
            Kind::Failed => FAILED,
            Kind::Temporary => TEMPORARY,
            // As a shell reports a command killed by a signal.
            Kind::Interrupted(sig) => 128 + sig,
        };
        Failure {
            code,
            message: e.message,
        }
    }
}

impl From<dream_core::supervise::SuperviseError> for Failure {
    fn from(e: dream_core::supervise::SuperviseError) -> Failure {
        match e {
            dream_core::supervise::SuperviseError::Setup(msg) => Failure::failed(msg),
            e => Failure::failed(e),
        }
    }
}

impl From<dream_core::sockets::spawn::SpawnError> for Failure {
    fn from(e: dream_core::sockets::spawn::SpawnError) -> Failure {
        // setlock and tcpserver exit 111 when they cannot run the program.
        Failure::temporary(e)
    }
}

pub type Result<T = ()> = std::result::Result<T, Failure>;
