//! Per-worker I/O: starting a worker with its descriptors and
//! environment, its notify socket (readiness, with the sender's
//! credentials checked), its output pipe (copied to the supervisor's
//! output, its tail kept for failure reports), its ready pipe, reaping it,
//! and ending what a generation left behind.

use super::*;

/// How much of a worker's stderr is kept for failure reports.
pub(super) const TAIL_BYTES: usize = 2048;
/// The most exited workers' stderr pipes kept open for what they started.
const MAX_ORPHANED: usize = 64;

pub(super) struct WorkerIo {
    pub(super) generation: GenId,
    pub(super) index: usize,
    pub(super) notify: UnixDatagram,
    /// The notify socket's file, removed when the worker is gone (none for
    /// an abstract socket).
    pub(super) notify_path: Option<PathBuf>,
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
/// The process group of a process, from `/proc/PID/stat`.
pub(super) fn pgrp(pid: i32) -> Option<i32> {
    crate::proc_stat(pid)?.get(2)?.parse().ok()
}
/// Sends `signal` to what a leftover entry names: a process, or with a
/// negative number (as `kill(2)` has it) a process group.
fn signal_leftover(pid: i32, signal: Signal) {
    if pid < 0 {
        let _ = killpg(Pid::from_raw(-pid), signal);
    } else {
        let _ = killpg(Pid::from_raw(pid), signal);
        let _ = kill(Pid::from_raw(pid), signal);
    }
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
            let mut generation = None;
            let tail = if self.workers.contains_key(&pid) {
                while self.pump_stderr(pid) {}
                let io = self.workers.remove(&pid).expect("checked");
                generation = Some(io.generation);
                if let Some(p) = &io.notify_path {
                    let _ = std::fs::remove_file(p);
                }
                if let Some(pipe) = io.stderr {
                    // At most a bounded number: past it, the oldest goes
                    // (and what writes to it gets EPIPE, as without this).
                    if self.orphaned.len() >= MAX_ORPHANED {
                        self.orphaned.remove(0);
                    }
                    self.orphaned.push(Some(pipe));
                }
                String::from_utf8_lossy(&io.tail).into_owned()
            } else {
                String::new()
            };
            let Some(how) = Exit::from_wait(status) else {
                continue;
            };
            // A failure of its own (an exit status, not the drain signal or
            // the kill at a deadline) may come from the shared flags.
            if let (Some(g), Exit::Code(1..)) = (generation, how) {
                self.blame_listener_flags(g, pid);
            }
            self.on(Event::Exited { pid, how, tail });
        }
    }

    /// Copies what an exited worker's stderr pipe holds; at its end (every
    /// writer gone) the pipe is let go.
    pub(super) fn pump_orphan(&mut self, i: usize) {
        let Some(Some(pipe)) = self.orphaned.get_mut(i) else {
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        match pipe.read(&mut buf) {
            Ok(n) if n > 0 => {
                self.output.write(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            _ => self.orphaned[i] = None,
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
                Note::Worker,
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
                Note::Worker,
                &format!("worker {generation}.{index} (pid {pid}) says {text}"),
            );
        }
        if ready {
            self.on(Event::Ready { generation, index });
        }
    }

    /// A new worker's notify socket: bound, and what its `NOTIFY_SOCKET`
    /// says. A file in `ROOT/.dream/notify/` (mode 0622 in a 0711
    /// directory, so a worker run as another user can send to it) unless
    /// abstract sockets were asked for, there is no root (`dream pool`),
    /// or the path would not fit a socket address.
    fn notify_socket(
        &mut self,
        generation: GenId,
        index: usize,
    ) -> Result<(UnixDatagram, Option<PathBuf>, String), String> {
        self.notify_seq += 1;
        if let Some(dir) = self.notify_dir() {
            let path = dir.join(format!("{generation}-{index}-{}.sock", self.notify_seq));
            if path.as_os_str().len() < 108 {
                let _ = std::fs::remove_file(&path);
                let sock = UnixDatagram::bind(&path).map_err(|e| format!("notify socket: {e}"))?;
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o622));
                let env = path.to_string_lossy().into_owned();
                return Ok((sock, Some(path), env));
            }
        }
        let name = format!(
            "dream/{}/{:x}/{generation}/{index}",
            std::process::id(),
            self.nonce
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(|e| e.to_string())?;
        let sock = UnixDatagram::bind_addr(&addr).map_err(|e| format!("notify socket: {e}"))?;
        Ok((sock, None, format!("@{name}")))
    }

    /// `ROOT/.dream/notify/`, made on first use, when notify sockets are
    /// files; `None` otherwise (said once if it cannot be made).
    fn notify_dir(&mut self) -> Option<PathBuf> {
        use crate::supervise::pool::NotifySocket;
        let Mode::Serve { root } = &self.cfg.mode else {
            return None;
        };
        if self.pool.settings().notify_socket != NotifySocket::Path || self.notify_dir_failed {
            return None;
        }
        let dir = crate::store::release::Store::new(root).notify_dir();
        if !self.notify_dir_made {
            use std::os::unix::fs::PermissionsExt;
            let made = crate::store::release::trusted_subdir(&dir).and_then(|()| {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
            });
            if let Err(e) = made {
                self.notify_dir_failed = true;
                self.log(
                    -1,
                    Note::Supervisor,
                    &format!(
                        "notify sockets: cannot use {} ({e}); abstract sockets instead",
                        dir.display()
                    ),
                );
                return None;
            }
            self.notify_dir_made = true;
        }
        Some(dir)
    }

    /// Starts one worker with its own notify socket and stderr pipe.
    pub(super) fn spawn(
        &mut self,
        generation: GenId,
        index: usize,
        release: &Release,
        background: bool,
        lane: crate::supervise::pool::Lane,
    ) -> Result<i32, String> {
        // A canary's worker (or its twin's) accepts on listeners of its own.
        self.make_lane_sockets(generation, lane)?;
        let (notify, notify_path, notify_env) = self.notify_socket(generation, index)?;
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
            crate::supervise::pool::Readiness::Fd(_) => Some(
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                    .map_err(|e| format!("pipe: {e}"))?,
            ),
            _ => None,
        };
        let mut cmd = Command::new(&self.cfg.program);
        if let (crate::supervise::pool::Readiness::Fd(n), Some((_, w))) =
            (self.pool.settings().readiness, &ready_pipe)
        {
            cmd.map_fd(w.as_fd(), n);
        }
        cmd.args(&self.cfg.args)
            .cwd(&release.dir)
            .sockets(self.lane_sockets(lane))
            .stderr(wr.as_fd())
            .env("DREAM_RELEASE", &release.id)
            .env("DREAM_RELEASE_DIR", &release.dir)
            .env("DREAM_GENERATION", generation.to_string())
            .env("DREAM_WORKER", index.to_string())
            .env(protocol::NOTIFY_SOCKET, notify_env)
            .process_group(true)
            // If the supervisor dies (killed, or a new program that crashed
            // in an upgrade), its workers drain: the requests they are
            // serving are answered, and whatever supervisor starts next
            // kills what is still there (`note_strays`, `end_strays_now`).
            .parent_death_signal(self.pool.settings().drain_signal);
        if let Some((uid, gid)) = self.cfg.user {
            cmd.user(uid, gid);
        }
        cmd.background(background);
        if let Some(procs) = self.cgroups.as_ref().and_then(|c| c.procs_file(generation)) {
            cmd.cgroup(&procs);
        }
        let pid = cmd.spawn().map_err(|e| e.to_string())?.as_raw();
        drop(wr);
        self.workers.insert(
            pid,
            WorkerIo {
                generation,
                index,
                notify,
                notify_path,
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
        let mut found = self.left_behind(generation);
        let from = match generation {
            Some(g) => format!("generation {g}"),
            None => "the workers".into(),
        };
        let pids = super::pid_list;
        match generation {
            // The supervisor is stopping: nothing may outlive it.
            None => {
                found.extend(self.leftovers.drain(..).map(|(pid, _, _)| pid));
                found.sort_unstable();
                found.dedup();
                for pid in &found {
                    signal_leftover(*pid, Signal::SIGKILL);
                }
                if !found.is_empty() {
                    self.log(
                        -1,
                        Note::Worker,
                        &format!(
                            "killed {} process(es) started by {from} that had left its process group: pid {}",
                            found.len(),
                            pids(&found)
                        ),
                    );
                }
            }
            // A generation is over: what it left behind may still hold
            // clients (a server whose start script a drain ended), so it
            // is drained like a worker: the drain signal now, SIGKILL at
            // the drain deadline if it is still there.
            Some(g) => {
                let signal = self.pool.settings().drain_signal;
                let deadline = Instant::now() + self.pool.settings().drain_timeout;
                // Members of a worker's group already had it (DrainGroup).
                let groups: Vec<i32> = self
                    .leftovers
                    .iter()
                    .filter(|(p, lg, _)| *p < 0 && *lg == g)
                    .map(|(p, _, _)| -p)
                    .collect();
                found.retain(|p| pgrp(*p).is_none_or(|pg| !groups.contains(&pg)));
                for pid in &found {
                    let _ = killpg(Pid::from_raw(*pid), signal);
                    let _ = kill(Pid::from_raw(*pid), signal);
                    self.leftovers.push((*pid, g, deadline));
                }
                if !found.is_empty() {
                    self.log(
                        -1,
                        Note::Worker,
                        &format!(
                            "sent {signal:?} to {} process(es) started by {from} that had left its process group (killed at its drain deadline if still there): pid {}",
                            found.len(),
                            pids(&found)
                        ),
                    );
                }
            }
        }
        if let Some(cg) = &self.cgroups {
            cg.tidy(&self.pool.generation_ids(), generation.is_none());
        }
    }

    /// Names what supervisors that are gone left running (their workers,
    /// which had the drain signal when their parent died, still finishing
    /// requests, as after a failed upgrade's takeover), and has it killed
    /// at this supervisor's drain deadline.
    pub(super) fn note_strays(&mut self) {
        let Some(cg) = &self.cgroups else {
            return;
        };
        let strays = cg.strays();
        if strays.is_empty() {
            return;
        }
        self.strays_due = Some(Instant::now() + self.pool.settings().drain_timeout);
        for (sup, pids) in strays {
            self.log(
                -1,
                Note::Worker,
                &format!(
                    "supervisor pid {sup} is gone and left {} process(es) running (its workers had the drain signal when it died): killed at the drain deadline if still there: pid {}",
                    pids.len(),
                    super::pid_list(&pids)
                ),
            );
        }
    }

    /// What `generation` (with `None`, every generation) started that is
    /// not a worker: children of ours from it (the subreaper's record) and,
    /// what the kernel counts as its whatever its parent, session or
    /// environment, its cgroup's members (a process cannot shed its cgroup).
    fn left_behind(&self, generation: Option<GenId>) -> Vec<i32> {
        let mut found: Vec<i32> = own_children()
            .into_iter()
            .filter(|p| {
                !self.workers.contains_key(p)
                    && (generation.is_none() || generation_of(*p) == generation)
            })
            .collect();
        if let Some(cg) = &self.cgroups {
            let members: Vec<i32> = match generation {
                Some(g) => cg.members(g),
                None => cg.all().into_iter().flat_map(|(_, p)| p).collect(),
            };
            for p in members {
                if !self.workers.contains_key(&p) && !found.contains(&p) {
                    found.push(p);
                }
            }
        }
        found
    }

    /// A worker that drained is gone: what it left in its process group
    /// gets the drain signal now, and SIGKILL at the drain deadline if it
    /// is still there ([`Driver::end_leftovers_due`]).
    pub(super) fn drain_group(&mut self, pgid: i32, generation: GenId) {
        let members = self.group_members(pgid, generation);
        if members.is_empty() {
            return;
        }
        let signal = self.pool.settings().drain_signal;
        let deadline = Instant::now() + self.pool.settings().drain_timeout;
        signal_leftover(-pgid, signal);
        self.leftovers.push((-pgid, generation, deadline));
        self.log(
            -1,
            Note::Worker,
            &format!(
                "sent {signal:?} to what worker pid {pgid} left in its process group (killed at its drain deadline if still there): pid {}",
                super::pid_list(&members)
            ),
        );
    }

    /// The processes of `generation` (its cgroup's members, or children of
    /// ours from it) in process group `pgid`: a group is named by a pid,
    /// which is checked to still be the generation's before it is signalled.
    fn group_members(&self, pgid: i32, generation: GenId) -> Vec<i32> {
        let mut v = self.left_behind(Some(generation));
        v.retain(|p| pgrp(*p) == Some(pgid));
        v
    }

    /// Kills what a generation left behind and still holds on past its
    /// drain deadline (still a member: its cgroup's, or a child of ours
    /// from that generation, so a reused pid is never hit).
    pub(super) fn end_leftovers_due(&mut self) {
        let now = Instant::now();
        if self.strays_due.is_some_and(|d| d <= now) {
            self.strays_due = None;
            let killed = self
                .cgroups
                .as_mut()
                .map(|c| c.end_strays())
                .unwrap_or_default();
            if !killed.is_empty() {
                self.log(
                    -1,
                    Note::Worker,
                    &format!(
                        "killed {} process(es) a supervisor that is gone left running, past the drain deadline: pid {}",
                        killed.len(),
                        super::pid_list(&killed)
                    ),
                );
            }
        }
        if !self.leftovers.iter().any(|(_, _, d)| *d <= now) {
            return;
        }
        let (due, later): (Vec<_>, Vec<_>) =
            self.leftovers.drain(..).partition(|(_, _, d)| *d <= now);
        self.leftovers = later;
        let mut killed = Vec::new();
        for (pid, g, _) in due {
            let theirs = if pid < 0 {
                !self.group_members(-pid, g).is_empty()
            } else {
                self.left_behind(Some(g)).contains(&pid)
            };
            if theirs {
                signal_leftover(pid, Signal::SIGKILL);
                killed.push(if pid < 0 {
                    format!("group {}", -pid)
                } else {
                    pid.to_string()
                });
            }
        }
        if !killed.is_empty() {
            self.log(
                -1,
                Note::Generation,
                &format!(
                    "killed {} process(es) left behind past their generation's drain deadline: pid {}",
                    killed.len(),
                    killed.join(", ")
                ),
            );
        }
        if let Some(cg) = &self.cgroups {
            cg.tidy(&self.pool.generation_ids(), false);
        }
    }
}
