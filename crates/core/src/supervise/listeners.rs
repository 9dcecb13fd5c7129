//! Watching the listening sockets every worker shares: a socket a worker
//! shut down is made to listen again, a backlog a worker shrank is
//! restored, and a change of its file status flags is named.

use super::*;

/// A descriptor's file status flags (`O_NONBLOCK`, `O_APPEND`, …).
pub(super) fn status_flags(fd: &OwnedFd) -> Option<nix::fcntl::OFlag> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .ok()
        .map(nix::fcntl::OFlag::from_bits_truncate)
}

/// Each listening socket's backlog (accept queue limit) now; `None` for
/// sockets that do not report one (Unix ones).
pub(super) fn backlogs(sockets: &[protocol::Listener]) -> Vec<Option<u32>> {
    sockets
        .iter()
        .map(|l| crate::sys::listen_queue(l.fd.as_fd()).map(|(_, limit)| limit))
        .collect()
}

impl Driver {
    /// While paused, once a second: how full each backlog gets. Warned once
    /// per pause when, at the rate connections have been arriving, one
    /// would fill before the pause's limit (the kernel then drops new
    /// handshakes, and clients retry after a second or more).
    pub(super) fn watch_backlog(&mut self) {
        let Some((since, until)) = self.pool.paused() else {
            self.backlog_watch = None;
            return;
        };
        let now = Instant::now();
        let (next, warned) = self.backlog_watch.unwrap_or((now, false));
        if next > now || warned {
            return;
        }
        let mut warn = false;
        let elapsed = now.duration_since(since).as_secs_f64();
        for l in &self.cfg.sockets {
            let Some((queued, limit)) = crate::sys::listen_queue(l.fd.as_fd()) else {
                continue;
            };
            if elapsed < 0.5 || queued == 0 {
                continue;
            }
            let rate = queued as f64 / elapsed;
            let left = until.saturating_duration_since(now).as_secs_f64();
            if queued as f64 + rate * left > limit as f64 {
                warn = true;
                self.log(
                    -1,
                    Note::Paused,
                    &format!(
                        "listening socket {}: {queued} connections wait in a backlog of {limit}; at {rate:.0} a second it fills in {:.1}s, before the pause ends (a deeper --backlog and net.core.somaxconn, or a shorter pause)",
                        l.name,
                        (limit.saturating_sub(queued)) as f64 / rate
                    ),
                );
            }
        }
        self.backlog_watch = Some((now + Duration::from_secs(1), warn));
    }

    /// When [`Driver::watch_backlog`] looks next.
    pub(super) fn backlog_due(&self) -> Option<Instant> {
        self.pool.paused()?;
        match self.backlog_watch {
            Some((_, true)) => None,
            Some((t, false)) => Some(t),
            None => Some(Instant::now()),
        }
    }

    /// Node, gunicorn and uvicorn call `listen(2)` again on the socket
    /// they are given, with a backlog of their own (511, 2048): every
    /// worker shares it, so connections that wait during a reload would
    /// find a shorter queue. The supervisor owns the sockets: it puts its
    /// backlog back, and says so once per generation.
    pub(super) fn check_backlog(&mut self) {
        let mut restored = Vec::new();
        for (i, l) in self.cfg.sockets.iter().enumerate() {
            let Some(want) = self.backlogs.get(i).copied().flatten() else {
                continue;
            };
            let Some((_, now)) = crate::sys::listen_queue(l.fd.as_fd()) else {
                continue;
            };
            if now >= want {
                continue;
            }
            let again = nix::sys::socket::Backlog::new(want.min(i32::MAX as u32) as i32)
                .and_then(|b| nix::sys::socket::listen(&l.fd, b));
            restored.push(match again {
                Ok(()) => format!(
                    "listening socket {} ({}): a worker called listen(2) on it with a backlog of {now}; set back to {want} (see doc/protocol.md)",
                    l.name,
                    protocol::describe_local(l.fd.as_fd())
                ),
                Err(e) => format!(
                    "listening socket {}: a worker set its backlog to {now}, and it cannot be set back to {want}: {e}",
                    l.name
                ),
            });
        }
        if restored.is_empty() {
            return;
        }
        // Every worker of a generation does it: one warning each.
        let newest = self.pool.generation_ids().last().copied();
        let level = if newest.is_some() && newest == self.backlog_told {
            1
        } else {
            -1
        };
        self.backlog_told = newest;
        for msg in restored {
            self.log(level, Note::Supervisor, &msg);
        }
    }

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
            Ok(addr) => {
                let msg = format!(
                    "listening socket {name} ({addr}) stopped listening (a worker called shutdown(2) on it?); listening again"
                );
                self.canary_reorder(i);
                msg
            }
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
        // Most runtimes set O_NONBLOCK, and it harms only a worker that
        // accepts in blocking mode: news here, a warning when a worker
        // fails with it set (`blame_listener_flags`).
        for c in changes {
            self.log(1, Note::Supervisor, &c);
        }
    }

    /// A worker of `generation` failed while a listener's `O_NONBLOCK` is
    /// not what the supervisor gave it (some worker changed it): a worker
    /// that accepts in blocking mode then fails with `EAGAIN`, so this is
    /// where the change can do harm, and it is said (once a generation).
    pub(super) fn blame_listener_flags(&mut self, generation: GenId, pid: i32) {
        let nb = nix::fcntl::OFlag::O_NONBLOCK;
        if self.flags_blamed == Some(generation) {
            return;
        }
        let changed: Vec<String> = self
            .cfg
            .sockets
            .iter()
            .zip(&self.listener_flags_given)
            .filter_map(|(l, given)| {
                let now = status_flags(&l.fd)?;
                let given = (*given)?;
                (now.contains(nb) != given.contains(nb)).then(|| {
                    format!(
                        "{} is {}",
                        l.name,
                        if now.contains(nb) {
                            "non-blocking (a worker set O_NONBLOCK on it): a worker that accepts in blocking mode fails with EAGAIN"
                        } else {
                            "blocking (a worker cleared O_NONBLOCK on it): a worker that counts on non-blocking accept may hang"
                        }
                    )
                })
            })
            .collect();
        if changed.is_empty() {
            return;
        }
        self.flags_blamed = Some(generation);
        self.log(
            -1,
            Note::Supervisor,
            &format!(
                "worker pid {pid} of generation {generation} failed while listening socket {} (every worker shares it; see doc/protocol.md)",
                changed.join("; ")
            ),
        );
    }
}
