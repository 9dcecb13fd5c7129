//! The control server: accepting clients on `ROOT/.dream/control.sock`
//! (peer credentials checked), framing request lines, dispatching them,
//! and answering.

use super::*;
use crate::supervise::control::{Answer, Refusal};

/// Control clients served at once.
pub(super) const MAX_CLIENTS: usize = 64;
/// A control client idle this long (and not awaiting a reload) is dropped.
pub(super) const CLIENT_IDLE: Duration = Duration::from_secs(30);
pub(super) struct Client {
    pub(super) id: Waiter,
    pub(super) stream: UnixStream,
    pub(super) buf: Vec<u8>,
    pub(super) awaiting: usize,
    pub(super) last: Instant,
}
/// Refuses a second supervisor for `root`: one already answers on its
/// control socket. `dream serve` asks before it binds anything, so that
/// nothing says "listening" for a supervisor that will not run.
pub fn refuse_if_running(root: &Path) -> Result<(), SuperviseError> {
    let path = crate::store::release::Store::new(root).control_socket();
    if UnixStream::connect(&path).is_ok() {
        return Err(SuperviseError::Setup(format!(
            "a supervisor is already running for {} ({} answers); stop it first, or use `dream reload`",
            root.display(),
            path.display()
        )));
    }
    Ok(())
}

pub(super) fn bind_control(root: &Path) -> Result<UnixListener, SuperviseError> {
    let store = crate::store::release::Store::new(root);
    let dir = store.state();
    let trusted = crate::store::release::trusted_dir(root, true)
        .and_then(|()| crate::store::release::trusted_subdir(&dir));
    trusted.map_err(|e| SuperviseError::Setup(format!("cannot use {}: {e}", dir.display())))?;
    refuse_if_running(root)?;
    let path = store.control_socket();
    let spec = crate::sockets::spec::ListenSpec::Unix(path.clone());
    let bound = crate::sockets::listen::bind(&spec, 64)
        .map_err(|e| SuperviseError::Setup(format!("control socket: {e}")))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let listener: UnixListener = bound.fd.into();
    listener.set_nonblocking(true)?;
    Ok(listener)
}
pub(super) fn reply(stream: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())
}

impl Driver {
    pub(super) fn on_accept(&mut self) {
        let Some(listener) = &self.control else {
            return;
        };
        while let Ok((stream, _)) = listener.accept() {
            let mut stream = stream;
            let me = nix::unistd::geteuid().as_raw();
            let peer =
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
            let allowed = peer.is_ok_and(|c| c.uid() == me || c.uid() == 0);
            if !allowed {
                let _ = reply(
                    &mut stream,
                    &Answer::refused(
                        Refusal::Permission,
                        "permission denied: only the supervisor's user or root may control it",
                    )
                    .to_value(),
                );
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS {
                // Make room by dropping the client idle the longest (one
                // that waits for nothing); refuse only when every client
                // waits for an answer.
                let idlest = (0..self.clients.len())
                    .filter(|&i| self.clients[i].awaiting == 0)
                    .min_by_key(|&i| self.clients[i].last);
                match idlest {
                    Some(i) => {
                        self.clients.swap_remove(i);
                    }
                    None => {
                        let _ = reply(
                            &mut stream,
                            &Answer::refused(
                                Refusal::Busy,
                                "too many control clients, all waiting for an answer; try again",
                            )
                            .to_value(),
                        );
                        continue;
                    }
                }
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.next_client;
            self.next_client += 1;
            self.clients.push(Client {
                id,
                stream,
                buf: Vec::new(),
                awaiting: 0,
                last: Instant::now(),
            });
        }
    }

    pub(super) fn on_client(&mut self, i: usize) {
        let mut lines = Vec::new();
        {
            let Some(c) = self.clients.get_mut(i) else {
                return;
            };
            c.last = Instant::now();
            let mut buf = [0u8; 8192];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.id = 0; // closed: dropped after this round
                        break;
                    }
                    Ok(n) => c.buf.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        c.id = 0;
                        break;
                    }
                }
                if c.buf.len() > control::MAX_LINE {
                    break;
                }
            }
            while let Some(pos) = c.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = c.buf.drain(..=pos).collect();
                lines.push(line);
            }
            if c.buf.len() > control::MAX_LINE {
                let _ = reply(
                    &mut c.stream,
                    &Answer::failed(format!("request longer than {} bytes", control::MAX_LINE))
                        .to_value(),
                );
                c.id = 0;
                return;
            }
        }
        let id = self.clients[i].id;
        for line in lines {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            self.on_request(i, id, text);
        }
    }

    pub(super) fn on_request(&mut self, i: usize, id: Waiter, text: &str) {
        self.log(
            1,
            Note::ControlRequest,
            &format!("control: {}", crate::logtext::value(text)),
        );
        // The strict parser: an unknown command or field is refused with
        // the reason, and nothing is done.
        let request = match Request::parse(text) {
            Ok(r) => r,
            Err(e) => {
                self.answer_index(i, &Answer::failed(format!("bad request: {e}")).to_value());
                return;
            }
        };
        match request {
            Request::Status => {
                let s = serde_json::to_value(self.status()).expect("a status serializes");
                self.answer_index(i, &s);
            }
            Request::Reload {
                confirm_within_ms,
                canary,
            } => {
                let confirm = confirm_within_ms.map(Duration::from_millis);
                let canary = match canary
                    .map(|c| c.plan(self.pool.settings().workers))
                    .transpose()
                    .and_then(|c| {
                        if c.is_some() {
                            self.canary_possible()?;
                        }
                        Ok(c)
                    }) {
                    Ok(c) => c,
                    Err(e) => {
                        let refused = Answer::refused(control::Refusal::Unsupported, e);
                        self.answer_index(i, &refused.to_value());
                        return;
                    }
                };
                // A request taken is carried out, whether or not its client
                // is still there to read the answer.
                let waiter = (id != 0).then_some(id);
                if id != 0 {
                    self.clients[i].awaiting += 1;
                }
                self.on(Event::ReloadRequested {
                    waiter,
                    confirm_within: confirm,
                    canary,
                });
            }
            Request::Confirm { generation } => {
                if id != 0 {
                    self.clients[i].awaiting += 1;
                }
                self.on(Event::Confirm {
                    generation,
                    waiter: (id != 0).then_some(id),
                });
            }
            Request::Extend {
                generation,
                within_ms,
            } => {
                if id != 0 {
                    self.clients[i].awaiting += 1;
                }
                self.on(Event::Extend {
                    generation,
                    within: Duration::from_millis(within_ms),
                    waiter: (id != 0).then_some(id),
                });
            }
            Request::Settle {
                generation,
                within_ms,
            } => {
                // Nobody to answer: nothing to wait for.
                if id == 0 {
                    return;
                }
                self.clients[i].awaiting += 1;
                self.on(Event::Settle {
                    generation,
                    within: Duration::from_millis(within_ms),
                    waiter: id,
                });
            }
            Request::Scale { workers } => {
                if let Err(e) = crate::supervise::pool::check_workers(workers) {
                    self.answer_index(i, &Answer::failed(e).to_value());
                    return;
                }
                self.on(Event::Scale(workers));
                self.answer_index(
                    i,
                    &Answer::done(control::Done::Scaled { workers }).to_value(),
                );
            }
            Request::Upgrade { binary } => {
                // Answered when the new program runs (or the upgrade failed).
                self.request_upgrade((id != 0).then_some(id), binary);
            }
            Request::Pause { max_ms } => {
                let max =
                    max_ms.map_or(crate::supervise::pool::DEFAULT_PAUSE, Duration::from_millis);
                if id != 0 {
                    self.clients[i].awaiting += 1;
                }
                self.on(Event::Pause {
                    max,
                    waiter: (id != 0).then_some(id),
                });
            }
            Request::Resume => {
                if self.pool.paused().is_none() {
                    let e = "not paused (dream pause first; a reload in progress resumes already)";
                    self.answer_index(i, &Answer::failed(e.to_string()).to_value());
                    return;
                }
                if id != 0 {
                    self.clients[i].awaiting += 1;
                }
                self.request_reload((id != 0).then_some(id), None);
            }
            Request::Stop => {
                self.answer_index(i, &Answer::done(control::Done::Stopping).to_value());
                self.on(Event::Stop(Stop::Graceful));
            }
        }
    }

    pub(super) fn answer_index(&mut self, i: usize, v: &Value) {
        if let Some(c) = self.clients.get_mut(i)
            && reply(&mut c.stream, v).is_err()
        {
            c.id = 0;
        }
    }

    pub(super) fn answer(&mut self, waiter: Waiter, v: &Value) {
        if let Some(c) = self
            .clients
            .iter_mut()
            .find(|c| c.id == waiter && waiter != 0)
        {
            c.awaiting = c.awaiting.saturating_sub(1);
            c.last = Instant::now();
            if reply(&mut c.stream, v).is_err() {
                c.id = 0;
            }
        }
    }
}
