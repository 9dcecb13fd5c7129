//! The synchronous core of dream: listen specs and binding, the socket
//! hand-off protocols, process spawning with an exact descriptor layout,
//! signals as events, and locks.
//!
//! Theory of operation: a long-lived process owns every listening socket
//! and hands it to workers, which only `accept(2)`. Replacing a worker
//! therefore never closes the socket, and clients that arrive meanwhile wait
//! in the kernel's backlog instead of being refused. This crate never links
//! an async runtime: the supervisor is one thread sleeping in `poll(2)`.

pub mod listen;
pub mod lock;
pub mod protocol;
pub mod respawn;
pub mod signals;
pub mod spawn;
pub mod spec;
mod sys;

pub use sys::{single_threaded, with_raw_fd};
