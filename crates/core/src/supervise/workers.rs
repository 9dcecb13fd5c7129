//! Per-worker I/O: starting a worker with its descriptors and
//! environment, its notify socket (readiness, with the sender's
//! credentials checked), its output pipe (copied to the supervisor's
//! output, its tail kept for failure reports), its ready pipe, reaping it,
//! and ending what a generation left behind.

use super::*;

/// How much of a worker's stderr is kept for failure reports.
pub(super) const TAIL_BYTES: usize = 2048;
pub(super) struct WorkerIo {
    pub(super) generation: GenId,
    pub(super) index: usize,
    pub(super) notify: UnixDatagram,
    pub(super) stderr: Option<std::fs::File>,
    pub(super) tail: Vec<u8>,
    /// The read end of the notification-fd pipe (`--ready fd:N`).
    pub(super) ready_pipe: Option<std::fs::File>,
}
/// The pids of this process's children (of any of its threads).
pub(super) fn own_children() -> Vec<i32> {
    let mut pids: Vec<i32> = crate::sys::threads("self")
        .into_iter()
        .flatten()
        .flat_map(|(_, children)| children)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}
/// The generation a process came from, from its `DREAM_GENERATION`.
pub(super) fn generation_of(pid: i32) -> Option<u64> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"DREAM_GENERATION="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}
/// One datagram without waiting, and the uid the kernel says sent it.
pub(super) fn recv_with_uid(sock: &UnixDatagram, buf: &mut [u8]) -> Option<(usize, Option<u32>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, UnixCredentials, recvmsg};
    use std::os::fd::AsRawFd;
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(UnixCredentials);
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .ok()?;
    let uid = msg.cmsgs().ok()?.find_map(|c| match c {
        ControlMessageOwned::ScmCredentials(c) => Some(c.uid()),
        _ => None,
    });
    Some((msg.bytes, uid))
}

impl Driver {
    pub(super) fn reap(&mut self) {
        // A worker that exits may have changed the shared listeners' flags.
        self.check_listener_flags();
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let pid = match status {
                WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _) => pid.as_raw(),
                _ => continue,
            };
            if self.preflight_exited(pid, &status) {
                continue;
            }
            // Read what it wrote before it died, then report the exit.
            let tail = if self.workers.contains_key(&pid) {
                while self.pump_stderr(pid) {}
                let io = self.workers.remove(&pid).expect("checked");
                String::from_utf8_lossy(&io.tail).into_owned()
            } else {
                String::new()
            };
            self.on(Event::Exited {
                pid,
                how: describe(status),
                tail,
            });
        }
    }

    /// Copies what a worker wrote to stderr; false when nothing more is
    /// available now.
    pub(super) fn pump_stderr(&mut self, pid: i32) -> bool {
        let Some(w) = self.workers.get_mut(&pid) else {
            return false;
        };
        let Some(pipe) = w.stderr.as_mut() else {
            return false;
        };
        let mut buf = [0u8; 16 * 1024];
        match pipe.read(&mut buf) {
            Ok(0) => {
                w.stderr = None;
                false
            }
            Ok(n) => {
                self.output.write(&buf[..n]);
                w.tail.extend_from_slice(&buf[..n]);
                if w.tail.len() > TAIL_BYTES {
                    let cut = w.tail.len() - TAIL_BYTES;
                    w.tail.drain(..cut);
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(_) => false,
        }
    }

    /// s6's notification-fd: a newline on the inherited pipe means ready;
    /// the pipe is closed after it (or at EOF).
    pub(super) fn on_ready_pipe(&mut self, pid: i32) {
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        let Some(pipe) = w.ready_pipe.as_mut() else {
            return;
        };
        let mut buf = [0u8; 512];
        let ready = match pipe.read(&mut buf) {
            Ok(0) | Err(_) => {
                w.ready_pipe = None;
                false
            }
            Ok(n) => buf[..n].contains(&b'\n'),
        };
        if ready {
            w.ready_pipe = None;
            let (generation, index) = (w.generation, w.index);
            self.log(
                1,
                &format!("worker {generation}.{index} (pid {pid}) wrote its ready line"),
            );
            self.on(Event::Ready { generation, index });
        }
    }

    pub(super) fn on_notify(&mut self, pid: i32) {
        let Some(w) = self.workers.get(&pid) else {
            return;
        };
        let (generation, index) = (w.generation, w.index);
        let mut buf = [0u8; 4096];
        let mut ready = false;
        let mut said = Vec::new();
        let trusted = |uid: u32| {
            uid == 0
                || uid == nix::unistd::geteuid().as_raw()
                || self.cfg.user.is_some_and(|(u, _)| u == uid)
        };
        while let Some((n, uid)) = recv_with_uid(&w.notify, &mut buf) {
            let text =
                crate::logtext::value(&String::from_utf8_lossy(&buf[..n]).replace('\n', " "));
            // The socket's name is not a secret: only the worker's user (or
            // root, or ours) may make it ready.
            if !uid.is_some_and(trusted) {
                said.push(format!("{text} (ignored: sent by uid {uid:?})"));
                continue;
            }
            ready |= text.split(' ').any(|l| l == "READY=1");
            said.push(text);
        }
        for text in said {
            self.log(
                1,
                &format!("worker {generation}.{index} (pid {pid}) says {text}"),
            );
        }
        if ready {
            self.check_listener_flags();
            self.on(Event::Ready { generation, index });
        }
    }

    /// Starts one worker with its own notify socket and stderr pipe.
    pub(super) fn spawn(
        &mut self,
        generation: GenId,
        index: usize,
        release: &Release,
        background: bool,
    ) -> Result<i32, String> {
        let name = format!(
            "dream/{}/{:x}/{generation}/{index}",
            std::process::id(),
            self.nonce
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(|e| e.to_string())?;
        let notify = UnixDatagram::bind_addr(&addr).map_err(|e| format!("notify socket: {e}"))?;
        nix::sys::socket::setsockopt(&notify, nix::sys::socket::sockopt::PassCred, &true)
            .map_err(|e| format!("notify socket: {e}"))?;
        notify.set_nonblocking(true).map_err(|e| e.to_string())?;
        let (rd, wr) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| format!("pipe: {e}"))?;
        // The worker's end blocks like an ordinary stderr.
        let _ = nix::fcntl::fcntl(
            &wr,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        );
        let ready_pipe = match self.pool.settings().readiness {
            crate::pool::Readiness::Fd(_) => Some(
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                    .map_err(|e| format!("pipe: {e}"))?,
            ),
            _ => None,
        };
        let mut cmd = Command::new(&self.cfg.program);
        if let (crate::pool::Readiness::Fd(n), Some((_, w))) =
            (self.pool.settings().readiness, &ready_pipe)
        {
            cmd.map_fd(w.as_fd(), n);
        }
        cmd.args(&self.cfg.args)
            .cwd(&release.dir)
            .sockets(&self.cfg.sockets)
            .stderr(wr.as_fd())
            .env("DREAM_RELEASE", &release.id)
            .env("DREAM_RELEASE_DIR", &release.dir)
            .env("DREAM_GENERATION", generation.to_string())
            .env("DREAM_WORKER", index.to_string())
            .env(protocol::NOTIFY_SOCKET, format!("@{name}"))
            .process_group(true)
            .parent_death_signal(Signal::SIGKILL);
        if let Some((uid, gid)) = self.cfg.user {
            cmd.user(uid, gid);
        }
        cmd.background(background);
        let pid = cmd.spawn().map_err(|e| e.to_string())?.as_raw();
        drop(wr);
        self.workers.insert(
            pid,
            WorkerIo {
                generation,
                index,
                notify,
                stderr: Some(std::fs::File::from(rd)),
                tail: Vec::new(),
                ready_pipe: ready_pipe.map(|(r, _)| std::fs::File::from(r)),
            },
        );
        Ok(pid)
    }

    /// Kills the processes a generation started that left its process
    /// group (`setsid`, a daemonizing double fork), or with `None` every
    /// such process: nothing a generation started may outlive its drain
    /// deadline, serve an old release after a deploy, or hold a port after
    /// the supervisor stops. The supervisor is a child subreaper, so they
    /// become its children when their parents exit; which generation each
    /// came from is in its environment (`DREAM_GENERATION`), inherited
    /// from its worker.
    pub(super) fn sweep(&mut self, generation: Option<u64>) {
        let mut killed = Vec::new();
        for pid in own_children() {
            if self.workers.contains_key(&pid) {
                continue;
            }
            let theirs = generation_of(pid);
            if generation.is_none() || theirs == generation {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                killed.push(pid.to_string());
            }
        }
        if !killed.is_empty() {
            let from = match generation {
                Some(g) => format!("generation {g}"),
                None => "the workers".into(),
            };
            self.log(
                -1,
                &format!(
                    "killed {} process(es) started by {from} that had left its process group: pid {}",
                    killed.len(),
                    killed.join(", ")
                ),
            );
        }
    }
}
