//! The only module of `dream-protocol` that uses `unsafe`: taking
//! ownership of descriptors a parent handed down by number, and unsetting
//! environment variables.
//!
//! `dream-core` uses these same functions (it re-exports them), so a
//! process has one registry of claimed descriptors whichever crate asks.

#![allow(unsafe_code)]

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// Descriptors already claimed by [`claim_inherited_fd`] in this process.
static CLAIMED: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Takes ownership of descriptor `fd`, which this process inherited.
///
/// Returns `None` if `fd` is not open or was already claimed: ownership of
/// an inherited descriptor can be taken once, so two `OwnedFd`s never close
/// the same number.
pub fn claim_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    let mut claimed = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
    if fd < 0 || claimed.contains(&fd) {
        return None;
    }
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    claimed.push(fd);
    // SAFETY: the descriptor is open (checked above), was handed to this
    // process by its parent for it to own, and is claimed at most once
    // (recorded in CLAIMED), so no other owner will close it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Borrows descriptor `fd` for inspection, if it is open.
///
/// The borrow is only used for the duration of `f`, during which this
/// thread does not close anything.
pub fn with_raw_fd<T>(fd: RawFd, f: impl FnOnce(BorrowedFd<'_>) -> T) -> Option<T> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the descriptor is open and the borrow does not outlive `f`;
    // a descriptor closed concurrently by another thread would at worst make
    // the queries in `f` fail with EBADF.
    Some(f(unsafe { BorrowedFd::borrow_raw(fd) }))
}

/// Whether this process has exactly one thread (from `/proc/self/stat`).
pub fn single_threaded() -> bool {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return false;
    };
    // Field 20 is num_threads; fields after the `)` of comm are plain.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(17))
        .is_some_and(|n| n == "1")
}

/// Removes environment variables, but only while this process has a single
/// thread; returns whether it did.
pub fn remove_env_vars(names: &[&str]) -> bool {
    if !single_threaded() {
        return false;
    }
    for name in names {
        // SAFETY: the process has one thread (checked just above), so no
        // other thread can be reading the environment concurrently.
        unsafe { std::env::remove_var(name) };
    }
    true
}
