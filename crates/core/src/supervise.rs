//! The supervisor's driver: one thread, one `poll(2)`, no busy loop.
//!
//! It owns the listening sockets, carries out the [`Pool`]'s actions
//! (spawn, signal, kill), and turns everything that happens into events
//! for it:
//!
//! * signals arrive on a signalfd (HUP reload, TERM/INT graceful stop, QUIT
//!   fast stop, TTIN/TTOU scale, USR1 status, CHLD reap);
//! * each worker gets its own sd_notify socket (an abstract Unix datagram
//!   socket), so a `READY=1` identifies its sender without credentials, even
//!   when a wrapper script forked the real server;
//! * each worker's stderr is a pipe that the supervisor copies to its own
//!   stderr, keeping the tail for failure reports;
//! * control clients speak [`crate::control`] on `ROOT/.dream/control.sock`.
//!
//! Between events the thread sleeps in `poll` until the pool's next
//! deadline; when idle, it has no deadline at all.
//!
//! Races handled here: a `SIGCHLD` may be read before the worker's last
//! stderr bytes, so the pipe is drained before the exit is reported; pids are
//! only signalled while the worker is unreaped (a zombie's pid cannot be
//! reused), and the process group is killed by its leader's pid.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::control::{self, Request};
use crate::pool::{Action, GenId, Pool, Release, Settings, Stop, Waiter};
use crate::protocol;
use crate::respawn::describe;
use crate::signals::{Signals, timeout_until};
use crate::spawn::{Command, Handoff};

/// How much of a worker's stderr is kept for failure reports.
const TAIL_BYTES: usize = 2048;
/// Control clients served at once.
const MAX_CLIENTS: usize = 64;
/// A control client idle this long (and not awaiting a reload) is dropped.
const CLIENT_IDLE: Duration = Duration::from_secs(30);

/// Where workers run.
#[derive(Debug, Clone)]
pub enum Mode {
    /// `dream serve`: each generation runs in what `ROOT/current` resolves
    /// to; a control socket at `ROOT/.dream/control.sock`.
    Serve { root: PathBuf },
    /// `dream pool`: workers run in `dir`; HUP starts a new generation, or
    /// is relayed to the workers with `relay_hup`.
    Pool { dir: PathBuf, relay_hup: bool },
}

/// Everything the supervisor needs.
pub struct Config {
    pub mode: Mode,
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Listening sockets with their `LISTEN_FDNAMES` names.
    pub sockets: Vec<(OwnedFd, String)>,
    /// Unix socket paths to remove at final shutdown.
    pub unix_paths: Vec<PathBuf>,
    pub settings: Settings,
    /// Run workers as this uid/gid.
    pub user: Option<(u32, u32)>,
    /// -1 quiet, 0 normal, 1 verbose.
    pub verbosity: i8,
    /// Name for log lines: `serve` or `pool`.
    pub name: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What a new generation runs: what `ROOT/current` names now, or the
/// pool's fixed directory.
fn release_of(mode: &Mode) -> Result<Release, String> {
    match mode {
        Mode::Serve { root } => resolve_current(root),
        Mode::Pool { dir, .. } => Ok(Release {
            id: std::env::var("DREAM_RELEASE").unwrap_or_default(),
            dir: dir.clone(),
        }),
    }
}

/// Resolves `ROOT/current` to a release.
pub fn resolve_current(root: &Path) -> Result<Release, String> {
    let current = root.join("current");
    let dir = std::fs::canonicalize(&current).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            format!(
                "{} does not exist: deploy a release first (dream deploy SOURCE --root {})",
                current.display(),
                root.display()
            )
        } else {
            format!("cannot resolve {}: {e}", current.display())
        }
    })?;
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", current.display()));
    }
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Release { id, dir })
}

struct WorkerIo {
    generation: GenId,
    index: usize,
    notify: UnixDatagram,
    stderr: Option<std::fs::File>,
    tail: Vec<u8>,
    /// The read end of the notification-fd pipe (`--ready fd:N`).
    ready_pipe: Option<std::fs::File>,
}

struct Client {
    id: Waiter,
    stream: UnixStream,
    buf: Vec<u8>,
    awaiting: usize,
    last: Instant,
}

#[derive(Clone, Copy)]
enum Source {
    Signals,
    Control,
    Client(usize),
    Notify(i32),
    Stderr(i32),
    ReadyPipe(i32),
    /// A listening socket reported a hang-up: it no longer listens.
    Listener(usize),
}

struct Driver {
    cfg: Config,
    pool: Pool,
    signals: Signals,
    control: Option<UnixListener>,
    clients: Vec<Client>,
    next_client: Waiter,
    workers: HashMap<i32, WorkerIo>,
    systemd: Option<OsString>,
    started: Instant,
    nonce: u64,
    /// Where log lines and workers' stderr go, never blocking the loop.
    output: crate::output::Output,
    /// Per listening socket: its file status flags as last seen (workers
    /// share them; see `check_listener_flags`), and whether it could not be
    /// made to listen again (then it is left out of the poll set).
    listener_flags: Vec<Option<nix::fcntl::OFlag>>,
    listener_lost: Vec<bool>,
    /// The supervisor's exit status once the pool has finished.
    exit_code: i32,
}

/// Runs the supervisor until it is stopped; returns the exit code.
pub fn run(cfg: Config) -> Result<i32, SuperviseError> {
    let signals = Signals::new(&[
        Signal::SIGCHLD,
        Signal::SIGHUP,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGUSR1,
    ])?;
    if let crate::pool::Readiness::Fd(n) = cfg.settings.readiness {
        let first_free = 3 + cfg.sockets.len() as i32;
        if n < first_free {
            return Err(SuperviseError::Setup(format!(
                "--ready fd:{n} would collide with the listening sockets at fds 3..{}; use fd:{first_free} or higher",
                first_free - 1
            )));
        }
    }
    let control = match &cfg.mode {
        Mode::Serve { root } => Some(bind_control(root)?),
        Mode::Pool { .. } => None,
    };
    // Descendants that leave their worker's process group become our
    // children when their parents exit, so that `sweep` can end them.
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| SuperviseError::Setup(format!("PR_SET_CHILD_SUBREAPER: {e}")))?;
    let first = release_of(&cfg.mode).map_err(SuperviseError::Setup)?;
    let systemd = std::env::var_os(protocol::NOTIFY_SOCKET);
    let nonce = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut d = Driver {
        pool: Pool::new(cfg.settings.clone()),
        cfg,
        signals,
        control,
        clients: Vec::new(),
        next_client: 1,
        workers: HashMap::new(),
        systemd,
        started: Instant::now(),
        nonce,
        output: crate::output::Output::stderr(),
        listener_flags: Vec::new(),
        listener_lost: Vec::new(),
        exit_code: 0,
    };
    d.listener_flags = d
        .cfg
        .sockets
        .iter()
        .map(|(fd, _)| status_flags(fd))
        .collect();
    d.listener_lost = vec![false; d.cfg.sockets.len()];
    d.log(
        0,
        &format!(
            "pid {}, {}, {}, ready {}",
            std::process::id(),
            crate::plural(d.cfg.sockets.len(), "socket"),
            crate::plural(d.cfg.settings.workers, "worker"),
            d.cfg.settings.readiness
        ),
    );
    let actions = d.pool.begin_generation(first, Instant::now());
    d.apply(actions);
    let result = d.event_loop();
    d.cleanup();
    result.map(|()| d.exit_code)
}

fn bind_control(root: &Path) -> Result<UnixListener, SuperviseError> {
    let dir = control::state_dir(root);
    let trusted = crate::release::trusted_dir(root, true).and_then(|()| {
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        crate::release::trusted_dir(&dir, false)
    });
    trusted.map_err(|e| SuperviseError::Setup(format!("cannot use {}: {e}", dir.display())))?;
    let path = control::socket_path(root);
    if UnixStream::connect(&path).is_ok() {
        return Err(SuperviseError::Setup(format!(
            "a supervisor is already running for {} ({} answers); stop it first, or use `dream reload`",
            root.display(),
            path.display()
        )));
    }
    let spec = crate::spec::ListenSpec::Unix(path.clone());
    let bound = crate::listen::bind(&spec, 64)
        .map_err(|e| SuperviseError::Setup(format!("control socket: {e}")))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let listener: UnixListener = OwnedFd::from(bound).into();
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl Driver {
    fn log(&self, level: i8, msg: &str) {
        if level <= self.cfg.verbosity {
            let ts = humantime::format_rfc3339_millis(SystemTime::now());
            // A message's own lines stay lines; whatever a value inside
            // it carries (a worker's stderr tail, a control request, a
            // notify message) cannot forge one, nor send terminal escapes.
            use std::fmt::Write as _;
            let mut text = String::new();
            for line in msg.lines() {
                let line = crate::logtext::bounded(line, 4096);
                let _ = writeln!(text, "{ts} dream {}: {line}", self.cfg.name);
            }
            self.output.write(text.as_bytes());
        }
    }

    fn event_loop(&mut self) -> Result<(), SuperviseError> {
        loop {
            if self.pool.finished() {
                self.log(0, "all workers gone; exiting");
                return Ok(());
            }
            let ready = self.wait()?;
            for source in ready {
                match source {
                    Source::Signals => self.on_signals()?,
                    Source::Control => self.on_accept(),
                    Source::Client(i) => self.on_client(i),
                    Source::Notify(pid) => self.on_notify(pid),
                    Source::Stderr(pid) => {
                        self.pump_stderr(pid);
                    }
                    Source::ReadyPipe(pid) => self.on_ready_pipe(pid),
                    Source::Listener(i) => self.on_listener_hangup(i),
                }
            }
            self.clients.retain(|c| c.id != 0);
            let now = Instant::now();
            self.clients
                .retain(|c| c.awaiting > 0 || now.duration_since(c.last) < CLIENT_IDLE);
            let actions = self.pool.tick(now);
            self.apply(actions);
        }
    }

    /// Sleeps in poll until something is readable or a deadline passes.
    fn wait(&mut self) -> Result<Vec<Source>, SuperviseError> {
        let mut sources = vec![Source::Signals];
        let mut fds: Vec<BorrowedFd<'_>> = vec![self.signals.as_fd()];
        if let Some(c) = &self.control {
            sources.push(Source::Control);
            fds.push(c.as_fd());
        }
        for (i, c) in self.clients.iter().enumerate() {
            sources.push(Source::Client(i));
            fds.push(c.stream.as_fd());
        }
        for (pid, w) in &self.workers {
            sources.push(Source::Notify(*pid));
            fds.push(w.notify.as_fd());
            if let Some(e) = &w.stderr {
                sources.push(Source::Stderr(*pid));
                fds.push(e.as_fd());
            }
            if let Some(r) = &w.ready_pipe {
                sources.push(Source::ReadyPipe(*pid));
                fds.push(r.as_fd());
            }
        }
        let mut deadline = self.pool.next_deadline();
        if let Some(oldest) = self
            .clients
            .iter()
            .filter(|c| c.awaiting == 0)
            .map(|c| c.last)
            .min()
        {
            let t = oldest + CLIENT_IDLE;
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        }
        let mut polls: Vec<PollFd<'_>> = fds
            .iter()
            .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
            .collect();
        // The listeners with no events asked: poll reports only a hang-up,
        // which a listening socket shows once it no longer listens (a
        // worker called shutdown(2) on it). Connections waiting do not
        // wake the supervisor.
        for (i, (fd, _)) in self.cfg.sockets.iter().enumerate() {
            if !self.listener_lost[i] {
                sources.push(Source::Listener(i));
                polls.push(PollFd::new(fd.as_fd(), PollFlags::empty()));
            }
        }
        match poll(&mut polls, timeout_until(deadline)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Vec::new()),
            Err(e) => return Err(io::Error::from(e).into()),
        }
        let ready = polls
            .iter()
            .zip(sources)
            .filter(|(p, _)| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, s)| s)
            .collect();
        Ok(ready)
    }

    /// A listening socket stopped listening: every worker shares it, so
    /// one worker's `shutdown(2)` refuses connections for all of them and
    /// for every later generation. The supervisor owns the sockets: it
    /// makes this one listen again (same socket, same port, so every
    /// worker is healed at once) and says so; no release is blamed.
    fn on_listener_hangup(&mut self, i: usize) {
        use nix::sys::socket::{Backlog, getsockopt, listen, sockopt::AcceptConn};
        let (fd, name) = &self.cfg.sockets[i];
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
        self.log(-1, &msg);
    }

    /// Workers share each listener's open file description, so a worker
    /// that sets or clears `O_NONBLOCK` on it changes it for all of them
    /// (one doing a plain blocking `accept` then fails with `EAGAIN`). The
    /// supervisor cannot know which worker did it, but it says what changed.
    fn check_listener_flags(&mut self) {
        let mut changes = Vec::new();
        for (i, (fd, name)) in self.cfg.sockets.iter().enumerate() {
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
            self.log(-1, &c);
        }
    }

    fn on_signals(&mut self) -> Result<(), SuperviseError> {
        while let Some(sig) = self.signals.try_next()? {
            let now = Instant::now();
            match sig {
                Signal::SIGCHLD => self.reap(),
                Signal::SIGHUP => {
                    if let Mode::Pool {
                        relay_hup: true, ..
                    } = self.cfg.mode
                    {
                        for pid in self.pool.pids() {
                            let _ = kill(Pid::from_raw(pid), Signal::SIGHUP);
                        }
                    } else {
                        self.log(0, "HUP: reload requested");
                        self.request_reload(None);
                    }
                }
                Signal::SIGTERM | Signal::SIGINT => {
                    let how = if self.pool.stopping().is_some() {
                        Stop::Fast
                    } else {
                        Stop::Graceful
                    };
                    let actions = self.pool.stop(how, now);
                    self.apply(actions);
                }
                Signal::SIGQUIT => {
                    let how = match self.cfg.mode {
                        Mode::Pool { .. } => Stop::Graceful,
                        Mode::Serve { .. } => Stop::Fast,
                    };
                    let actions = self.pool.stop(how, now);
                    self.apply(actions);
                }
                Signal::SIGTTIN | Signal::SIGTTOU => {
                    let n = self.pool.settings().workers;
                    let n = if sig == Signal::SIGTTIN {
                        (n + 1).min(crate::pool::MAX_WORKERS)
                    } else {
                        n.saturating_sub(1).max(1)
                    };
                    let actions = self.pool.scale(n, now);
                    self.apply(actions);
                }
                Signal::SIGUSR1 => {
                    let status = self.status();
                    self.log(-1, &human_status(&status));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn request_reload(&mut self, waiter: Option<Waiter>) {
        if self.pool.stopping().is_some() {
            if let Some(w) = waiter {
                self.answer(
                    w,
                    &json!({"ok": false, "error": "the supervisor is stopping"}),
                );
            }
            return;
        }
        if self.pool.request_reload(waiter) {
            self.apply(vec![Action::StartReload]);
        } else if self.pool.reloading() {
            self.log(0, "reload queued behind the one in progress");
        } else if self.pool.reload_held() {
            self.log(
                0,
                "reload held until a draining generation finishes or reaches its drain deadline",
            );
        }
    }

    fn reap(&mut self) {
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
            // Read what it wrote before it died, then report the exit.
            let tail = if self.workers.contains_key(&pid) {
                while self.pump_stderr(pid) {}
                let io = self.workers.remove(&pid).expect("checked");
                String::from_utf8_lossy(&io.tail).into_owned()
            } else {
                String::new()
            };
            let actions = self
                .pool
                .exited(pid, &describe(status), &tail, Instant::now());
            self.apply(actions);
        }
    }

    /// Copies what a worker wrote to stderr; false when nothing more is
    /// available now.
    fn pump_stderr(&mut self, pid: i32) -> bool {
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
    fn on_ready_pipe(&mut self, pid: i32) {
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
            let actions = self.pool.ready(generation, index, Instant::now());
            self.apply(actions);
        }
    }

    fn on_notify(&mut self, pid: i32) {
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
            let actions = self.pool.ready(generation, index, Instant::now());
            self.apply(actions);
        }
    }

    fn on_accept(&mut self) {
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
                    &json!({"ok": false, "refused": "permission", "error": "permission denied: only the supervisor's user or root may control it"}),
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
                            &json!({"ok": false, "refused": "busy", "error": "too many control clients, all waiting for an answer; try again"}),
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

    fn on_client(&mut self, i: usize) {
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
                    &json!({"ok": false, "error": format!("request longer than {} bytes", control::MAX_LINE)}),
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

    fn on_request(&mut self, i: usize, id: Waiter, text: &str) {
        self.log(1, &format!("control: {}", crate::logtext::value(text)));
        // The strict parser: an unknown command or field is refused with
        // the reason, and nothing is done.
        let request = match Request::parse(text) {
            Ok(r) => r,
            Err(e) => {
                self.answer_index(
                    i,
                    &json!({"ok": false, "error": format!("bad request: {e}")}),
                );
                return;
            }
        };
        let now = Instant::now();
        match request {
            Request::Status => {
                let s = self.status();
                self.answer_index(i, &s);
            }
            Request::Reload => {
                // A request taken is carried out, whether or not its client
                // is still there to read the answer.
                if id == 0 {
                    self.request_reload(None);
                    return;
                }
                self.clients[i].awaiting += 1;
                self.request_reload(Some(id));
            }
            Request::Scale { workers } => {
                if let Err(e) = crate::pool::check_workers(workers) {
                    self.answer_index(i, &json!({"ok": false, "error": e}));
                    return;
                }
                let actions = self.pool.scale(workers, now);
                self.apply(actions);
                self.answer_index(i, &json!({"ok": true, "workers": workers}));
            }
            Request::Stop => {
                self.answer_index(i, &json!({"ok": true, "stopping": true}));
                let actions = self.pool.stop(Stop::Graceful, now);
                self.apply(actions);
            }
        }
    }

    fn answer_index(&mut self, i: usize, v: &Value) {
        if let Some(c) = self.clients.get_mut(i)
            && reply(&mut c.stream, v).is_err()
        {
            c.id = 0;
        }
    }

    fn answer(&mut self, waiter: Waiter, v: &Value) {
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

    fn status(&self) -> Value {
        let now = Instant::now();
        let root = match &self.cfg.mode {
            Mode::Serve { root } => Some(root.clone()),
            Mode::Pool { .. } => None,
        };
        json!({
            "ok": true,
            "pid": std::process::id(),
            "root": root,
            "uptime_s": now.duration_since(self.started).as_secs_f64(),
            // Output dropped because its reader stalled (see output.rs).
            "output_dropped_bytes": self.output.dropped(),
            "sockets": self.cfg.sockets.iter().map(|(fd, name)| json!({
                "name": name,
                "address": protocol::describe_local(fd.as_fd()),
            })).collect::<Vec<_>>(),
            "pool": self.pool.status(now),
            // What `current` names now, which may differ from what the live
            // generation runs (a reload pending, or one that failed).
            "current": match &self.cfg.mode {
                Mode::Serve { root } => resolve_current(root).ok().map(|r| r.id),
                Mode::Pool { .. } => None,
            },
        })
    }

    fn apply(&mut self, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let now = Instant::now();
            match action {
                Action::Spawn {
                    generation,
                    index,
                    release,
                } => match self.spawn(generation, index, &release) {
                    Ok(pid) => queue.extend(self.pool.spawned(generation, index, pid, now)),
                    Err(e) => queue.extend(self.pool.spawn_failed(generation, index, e, now)),
                },
                Action::Signal { pid, signal } => {
                    let _ = kill(Pid::from_raw(pid), signal);
                }
                Action::KillGroup { pid } => {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                Action::StartReload => {
                    let resolved = release_of(&self.cfg.mode);
                    match resolved {
                        Ok(release) => queue.extend(self.pool.begin_generation(release, now)),
                        Err(reason) => queue.extend(self.pool.reload_unavailable(reason)),
                    }
                }
                Action::ReloadDone { waiters, outcome } => {
                    let v = match &outcome {
                        Ok((generation, release)) => {
                            json!({"ok": true, "generation": generation, "release": release})
                        }
                        Err(e) => json!({"ok": false, "error": e}),
                    };
                    for w in waiters {
                        self.answer(w, &v);
                    }
                }
                Action::Systemd(msg) => self.tell_systemd(&msg),
                Action::Log(msg) => self.log(0, &msg),
                Action::Warn(msg) => self.log(-1, &msg),
                Action::Sweep(generation) => self.sweep(Some(generation)),
                Action::GiveUp(reason) => {
                    self.log(-1, &format!("giving up: {reason}"));
                    self.exit_code = 1;
                    queue.extend(self.pool.stop(Stop::Fast, now));
                }
            }
        }
    }

    fn tell_systemd(&self, msg: &str) {
        let Some(path) = &self.systemd else {
            return;
        };
        let mut text = msg.to_string();
        if msg == "RELOADING=1"
            && let Ok(t) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        {
            let usec = t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000;
            text.push_str(&format!("\nMONOTONIC_USEC={usec}"));
        }
        if let Err(e) = protocol::notify_to(path, &text) {
            self.log(-1, &format!("cannot notify systemd: {e}"));
        }
    }

    /// Starts one worker with its own notify socket and stderr pipe.
    fn spawn(&mut self, generation: GenId, index: usize, release: &Release) -> Result<i32, String> {
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
        let handoffs: Vec<Handoff<'_>> = self
            .cfg
            .sockets
            .iter()
            .map(|(fd, name)| Handoff {
                fd: fd.as_fd(),
                name: name.as_str(),
            })
            .collect();
        let ready_pipe = match self.cfg.settings.readiness {
            crate::pool::Readiness::Fd(_) => Some(
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                    .map_err(|e| format!("pipe: {e}"))?,
            ),
            _ => None,
        };
        let mut cmd = Command::new(&self.cfg.program);
        if let (crate::pool::Readiness::Fd(n), Some((_, w))) =
            (self.cfg.settings.readiness, &ready_pipe)
        {
            cmd.map_fd(w.as_fd(), n);
        }
        cmd.args(&self.cfg.args)
            .cwd(&release.dir)
            .sockets(&handoffs)
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
    fn sweep(&mut self, generation: Option<u64>) {
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

    fn cleanup(&mut self) {
        self.sweep(None);
        self.output.finish(Duration::from_secs(2));
        if let Mode::Serve { root } = &self.cfg.mode {
            let _ = std::fs::remove_file(control::socket_path(root));
        }
        for p in &self.cfg.unix_paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The pids of this process's children (of any of its threads).
fn own_children() -> Vec<i32> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The generation a process came from, from its `DREAM_GENERATION`.
fn generation_of(pid: i32) -> Option<u64> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"DREAM_GENERATION="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

/// A descriptor's file status flags (`O_NONBLOCK`, `O_APPEND`, …).
fn status_flags(fd: &OwnedFd) -> Option<nix::fcntl::OFlag> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .ok()
        .map(nix::fcntl::OFlag::from_bits_truncate)
}

/// One datagram without waiting, and the uid the kernel says sent it.
fn recv_with_uid(sock: &UnixDatagram, buf: &mut [u8]) -> Option<(usize, Option<u32>)> {
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

fn reply(stream: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())
}

/// A status snapshot as a few lines for people.
pub fn human_status(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "supervisor pid {}, up {}{}",
        v["pid"],
        crate::fmt_duration(Duration::from_secs_f64(
            v["uptime_s"].as_f64().unwrap_or(0.0)
        )),
        v["root"]
            .as_str()
            .map(|r| format!(", root {r}"))
            .unwrap_or_default()
    );
    for sock in v["sockets"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "listening on {}",
            sock["address"].as_str().unwrap_or("?")
        );
    }
    let pool = &v["pool"];
    let live = pool["generations"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["state"] == "live")
        .and_then(|g| g["release"].as_str());
    if let (Some(current), Some(live)) = (v["current"].as_str(), live)
        && current != live
    {
        let _ = writeln!(
            s,
            "warning: current is {current}, but the live generation runs {live} (a reload failed or has not run: dream reload, or dream rollback)"
        );
    }
    let _ = writeln!(
        s,
        "workers: {} wanted, {} restarts{}",
        pool["workers_target"],
        pool["restarts"],
        if pool["reloading"] == true {
            ", reload in progress"
        } else {
            ""
        }
    );
    for g in pool["generations"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "generation {} {}: release {} ({}), age {}",
            g["id"],
            g["state"].as_str().unwrap_or("?"),
            g["release"].as_str().unwrap_or("?"),
            g["release_dir"].as_str().unwrap_or("?"),
            crate::fmt_duration(Duration::from_secs_f64(g["age_s"].as_f64().unwrap_or(0.0)))
        );
        for w in g["workers"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "  worker {}.{} pid {} {}, restarts {}",
                g["id"],
                w["index"],
                w["pid"],
                w["state"].as_str().unwrap_or("?"),
                w["restarts"]
            );
        }
    }
    s.trim_end().to_string()
}
