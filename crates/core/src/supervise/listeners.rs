//! Watching the listening sockets every worker shares: a socket a worker
//! shut down is made to listen again, and a change of its file status
//! flags is named.

use super::*;

/// A descriptor's file status flags (`O_NONBLOCK`, `O_APPEND`, …).
pub(super) fn status_flags(fd: &OwnedFd) -> Option<nix::fcntl::OFlag> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .ok()
        .map(nix::fcntl::OFlag::from_bits_truncate)
}

impl Driver {
    /// A listening socket stopped listening: every worker shares it, so
    /// one worker's `shutdown(2)` refuses connections for all of them and
    /// for every later generation. The supervisor owns the sockets: it
    /// makes this one listen again (same socket, same port, so every
    /// worker is healed at once) and says so; no release is blamed.
    pub(super) fn on_listener_hangup(&mut self, i: usize) {
        use nix::sys::socket::{Backlog, getsockopt, listen, sockopt::AcceptConn};
        let protocol::Listener { fd, name } = &self.cfg.sockets[i];
        if getsockopt(fd, AcceptConn).unwrap_or(true) {
            return;
        }
        let before = protocol::describe_local(fd.as_fd());
        let restored = listen(fd, Backlog::MAXCONN)
            .map_err(io::Error::from)
            .and_then(|()| {
                let after = protocol::describe_local(fd.as_fd());
                if after == before {
                    Ok(after)
                } else {
                    Err(io::Error::other(format!(
                        "the kernel gave it another address ({after}): it was bound to port 0"
                    )))
                }
            });
        let msg = match restored {
            Ok(addr) => format!(
                "listening socket {name} ({addr}) stopped listening (a worker called shutdown(2) on it?); listening again"
            ),
            Err(e) => {
                self.listener_lost[i] = true;
                format!(
                    "listening socket {name} ({before}) stopped listening (a worker called shutdown(2) on it?) and cannot listen again: {e}; restart dream serve to bind it anew"
                )
            }
        };
        self.log(-1, Note::Supervisor, &msg);
    }

    /// Workers share each listener's open file description, so a worker
    /// that sets or clears `O_NONBLOCK` on it changes it for all of them
    /// (one doing a plain blocking `accept` then fails with `EAGAIN`). The
    /// supervisor cannot know which worker did it, but it says what changed.
    pub(super) fn check_listener_flags(&mut self) {
        let mut changes = Vec::new();
        for (i, protocol::Listener { fd, name }) in self.cfg.sockets.iter().enumerate() {
            let now = status_flags(fd);
            let was = self.listener_flags[i];
            if now != was
                && let (Some(now), Some(was)) = (now, was)
            {
                let nb = nix::fcntl::OFlag::O_NONBLOCK;
                let what = match (was.contains(nb), now.contains(nb)) {
                    (false, true) => "set O_NONBLOCK on it: workers that accept in blocking mode now fail with EAGAIN".to_string(),
                    (true, false) => "cleared O_NONBLOCK on it: workers that count on non-blocking accept may now block".to_string(),
                    _ => format!("changed its file status flags ({was:?} -> {now:?})"),
                };
                changes.push(format!(
                    "a worker {what} (listening socket {name} is shared by every worker; see doc/protocol.md)"
                ));
            }
            self.listener_flags[i] = now;
        }
        for c in changes {
            self.log(-1, Note::Supervisor, &c);
        }
    }
}
