//! Accepting on a listening socket shared with other processes, without
//! touching its file status flags.
//!
//! Every worker, of every generation, holds the same open file description
//! of the listener, so `O_NONBLOCK` set by one worker is set for all: a
//! worker that sets it breaks every worker doing a plain blocking
//! `accept(2)` (they fail with `EAGAIN` and crash-loop), and one that clears
//! it can block a worker that counted on it. So this worker never changes
//! the flags and accepts in a way that works in either mode, on a thread
//! of its own: `poll(2)` until the listener is readable (or the stop pipe
//! is), then `accept4(2)` giving the *new* socket `SOCK_NONBLOCK`. In
//! non-blocking mode a lost race is `EAGAIN` and the thread polls again; in
//! blocking mode the thread waits inside `accept` for the next connection
//! (the kernel wakes one waiter per connection), which costs nothing but
//! that thread. See `doc/protocol.md` for what worker authors may do.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{SockFlag, accept4};

/// What the accept loop does with each accepted connection; returns false
/// to stop accepting.
pub trait Sink: Send + 'static {
    /// Waits until one more connection may be taken (the connection cap);
    /// false when stopping.
    fn room(&mut self) -> bool;
    fn accepted(&mut self, conn: OwnedFd);
}

/// Runs the accept loop on a new thread until `stop` becomes readable.
pub fn spawn(listener: OwnedFd, stop: OwnedFd, mut sink: impl Sink) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("dream-accept".into())
        .spawn(move || {
            let mut warned = false;
            while sink.room() {
                if !wait_readable(listener.as_fd(), stop.as_fd()) {
                    return;
                }
                match accept4(&listener, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC) {
                    Ok(conn) => {
                        warned = false;
                        sink.accepted(conn);
                    }
                    // Another worker took it, or the client left first.
                    Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED | Errno::EPROTO) => {}
                    Err(e) => {
                        // Out of descriptors or memory, or a listener that no
                        // longer listens (the supervisor restores it): back
                        // off instead of spinning; clients wait in the backlog.
                        if !warned {
                            eprintln!("dream static: accept: {e}; pausing accepts");
                            warned = true;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(())
}

/// Sleeps in `poll(2)` until the listener has a connection (true) or the
/// stop pipe is readable (false).
fn wait_readable(listener: BorrowedFd<'_>, stop: BorrowedFd<'_>) -> bool {
    loop {
        let mut fds = [
            PollFd::new(listener, PollFlags::POLLIN),
            PollFd::new(stop, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {
                if fds[1].any().unwrap_or(false) {
                    return false;
                }
                if fds[0].any().unwrap_or(false) {
                    return true;
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
}
