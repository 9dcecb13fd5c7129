//! The synchronous core of dream: listen specs and binding, the socket
//! hand-off protocols, process spawning with an exact descriptor layout,
//! signals as events, and locks.
//!
//! Theory of operation: a long-lived process owns every listening socket
//! and hands it to workers, which only `accept(2)`. Replacing a worker
//! therefore never closes the socket, and clients that arrive meanwhile wait
//! in the kernel's backlog instead of being refused. This crate never links
//! an async runtime: the supervisor is one thread sleeping in `poll(2)`.

pub mod child;
pub mod deploy;
pub mod exit;
pub mod fleet;
pub mod logtext;
pub mod probe;
pub mod signals;
pub mod sockets;
pub mod store;
pub mod supervise;
mod sys;

/// The worker side of the protocols (sockets in, `READY=1` out), also the
/// home of [`protocol::Listener`], the one named listening socket type.
pub use dream_protocol as protocol;

pub use sys::{
    install_interrupt_handler, listen_queue, may_foreground, reflink, release_free_memory,
    signal_pending, signal_pipe, single_threaded, unread_bytes, with_raw_fd,
};

/// For the crash tests: `DREAM_TEST_STOP_AFTER=<point>` makes the process
/// stop itself (SIGSTOP) at that point (a deploy phase, an upgrade step),
/// so a test can kill it exactly there.
///
/// Compiled only with the `test-hooks` feature, which dream's own tests
/// turn on (a dev-dependency); `cargo build` and `cargo install` leave it
/// out, so an inherited environment variable can never freeze a
/// production deploy.
#[cfg(feature = "test-hooks")]
pub fn test_point(point: &str) {
    if std::env::var("DREAM_TEST_STOP_AFTER").is_ok_and(|p| p == point) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}

/// Without the `test-hooks` feature: nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn test_point(_point: &str) {}

/// The fields of `/proc/PID/stat` after the command name (which may hold
/// anything, spaces and parentheses included): state, ppid, pgrp, … as
/// `proc(5)` numbers them from 3.
pub(crate) fn proc_stat(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(String::from)
            .collect(),
    )
}

/// The time at the start of every log line: RFC 3339, UTC, milliseconds.
pub fn log_time() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// `1 worker`, `2 workers`.
pub fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `250ms`, `1.5s`, `2m03s`: a duration for log lines.
pub fn fmt_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let s = d.as_secs_f64();
        if s.fract() < 0.05 {
            format!("{}s", s.round())
        } else {
            format!("{s:.1}s")
        }
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}
