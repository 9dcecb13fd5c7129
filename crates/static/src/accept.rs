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

/// The signal that interrupts an accept thread blocked in `accept(2)`.
const INTERRUPT: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGURG;

/// Runs the accept loop on a new thread until `stop` becomes readable.
pub fn spawn(
    listener: OwnedFd,
    stop: OwnedFd,
    mut sink: impl Sink,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    static HANDLER: std::sync::Once = std::sync::Once::new();
    let mut installed = Ok(());
    HANDLER.call_once(|| installed = dream_core::install_interrupt_handler(INTERRUPT));
    installed?;
    std::thread::Builder::new()
        .name("dream-accept".into())
        .spawn(move || {
            // The drain signals go to another thread (whose handler makes
            // `stop` readable); blocked here, they show in sigpending(2)
            // from the moment they are sent, which closes the window
            // between a signal's arrival and its handler having run.
            let _ = drain_signals().thread_block();
            let mut warned = false;
            while sink.room() {
                if !wait_readable(listener.as_fd(), stop.as_fd()) {
                    return;
                }
                // The connection that woke us may have arrived after the
                // drain signal: the next generation's, not ours.
                if draining(stop.as_fd()) {
                    return;
                }
                match accept4(&listener, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC) {
                    Ok(conn) => {
                        warned = false;
                        sink.accepted(conn);
                    }
                    // Another worker took it, the client left first, or
                    // `stop` interrupted a blocking accept.
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
        })
}

/// Ends accept threads once their stop pipe is closed. A thread in
/// `poll` sees the pipe at once; one blocked inside `accept` (a blocking
/// listener whose connection another worker took) would take the next
/// connection after the drain began, and could be holding it when the
/// process exits: it is interrupted with a signal (`EINTR`), again until
/// it has ended, since the signal may land just before it enters `accept`.
pub fn stop(threads: Vec<std::thread::JoinHandle<()>>) {
    use std::os::unix::thread::JoinHandleExt;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    for t in threads {
        while !t.is_finished() && std::time::Instant::now() < deadline {
            let _ = nix::sys::pthread::pthread_kill(t.as_pthread_t(), INTERRUPT);
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The signals that start a drain.
pub fn drain_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::Signal;
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        set.add(s);
    }
    set
}

/// Whether a drain signal was sent (pending, or its handler already made
/// `stop` readable).
fn draining(stop: BorrowedFd<'_>) -> bool {
    if dream_core::signal_pending(&drain_signals()) {
        return true;
    }
    let mut fds = [PollFd::new(stop, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Sleeps in `poll(2)` until `fd` is readable.
pub fn wait_readable_fd(fd: BorrowedFd<'_>) {
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(Errno::EINTR) => {}
            _ => return,
        }
    }
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
