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
//! * control clients speak [`crate::supervise::control`] on `ROOT/.dream/control.sock`.
//!
//! Between events the thread sleeps in `poll` until the pool's next
//! deadline; when idle, it has no deadline at all.
//!
//! This file is the loop (waiting, signals, carrying out actions); the
//! jobs it dispatches to live beside it: `workers` (spawning, notify
//! sockets, output pipes, reaping, ending escapees), `server` (the control
//! socket), `listeners` (the shared listening sockets' health) and
//! `status` (status as JSON and for people).
//!
//! Races handled here: a `SIGCHLD` may be read before the worker's last
//! stderr bytes, so the pipe is drained before the exit is reported; pids are
//! only signalled while the worker is unreaped (a zombie's pid cannot be
//! reused), and the process group is killed by its leader's pid.

pub mod canary;
pub mod cgroup;
pub mod clock;
pub mod control;
mod guard;
mod listeners;
mod metrics;
mod note;
pub mod output;
pub mod pool;
mod preflight;
pub mod respawn;
mod server;
mod status;
mod systemd;
mod upgrade;
mod workers;

pub use guard::{guard, taking_over};
pub use preflight::upgrade_check;
pub use server::refuse_if_running;
pub use upgrade::{STATE_VERSION, resume, resuming, version};

use listeners::status_flags;
pub use note::Note;
use server::{CLIENT_IDLE, Client, bind_control};
use workers::WorkerIo;

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
use serde_json::Value;

use crate::exit::Exit;
use crate::protocol::{self, Listener};
use crate::signals::{Signals, timeout_until};
use crate::sockets::spawn::Command;
use crate::supervise::pool::{
    Action, Event, GenId, Pool, Release, Settings, Stop, Systemd, Waiter,
};
use control::Request;

/// Where workers run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    pub sockets: Vec<Listener>,
    /// Unix socket paths to remove at final shutdown.
    pub unix_paths: Vec<PathBuf>,
    /// Where to serve Prometheus metrics (`--metrics`).
    pub metrics: Option<Listener>,
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
        // Not a store: the release is named by DREAM_RELEASE, else by its
        // directory (a release's directory is named by its id).
        Mode::Pool { dir, .. } => Ok(Release {
            id: std::env::var("DREAM_RELEASE")
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| {
                    let dir = std::fs::canonicalize(dir).ok()?;
                    Some(dir.file_name()?.to_string_lossy().into_owned())
                })
                .unwrap_or_else(|| "/".into()),
            dir: dir.clone(),
        }),
    }
}

/// Resolves `ROOT/current` to a release.
pub fn resolve_current(root: &Path) -> Result<Release, String> {
    crate::store::release::Store::new(root).resolve_current()
}

#[derive(Clone, Copy)]
enum Source {
    Signals,
    Control,
    Client(usize),
    Notify(i32),
    Stderr(i32),
    /// The stderr pipe of a worker that has exited, still held by what it
    /// started.
    Orphan(usize),
    ReadyPipe(i32),
    /// A listening socket reported a hang-up: it no longer listens.
    Listener(usize),
    Metrics,
    Scraper(usize),
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
    output: crate::supervise::output::Output,
    /// Per listening socket: its file status flags as last seen (workers
    /// share them; see `check_listener_flags`), and whether it could not be
    /// made to listen again (then it is left out of the poll set).
    listener_flags: Vec<Option<nix::fcntl::OFlag>>,
    /// The flags each listener had when this program took it, and the
    /// generation last told that a change of them may have failed it.
    listener_flags_given: Vec<Option<nix::fcntl::OFlag>>,
    flags_blamed: Option<GenId>,
    listener_lost: Vec<bool>,
    /// Per listening socket: the backlog it had when this program took it
    /// (TCP only), which `check_backlog` restores when a worker's own
    /// `listen(2)` shrinks it; and the generation last told about that.
    backlogs: Vec<Option<u32>>,
    backlog_told: Option<GenId>,
    /// Notify socket files: a counter for their names, whether their
    /// directory was made, or could not be (then abstract sockets).
    notify_seq: u64,
    notify_dir_made: bool,
    notify_dir_failed: bool,
    /// The supervisor's exit status once the pool has finished.
    exit_code: i32,
    /// The path this supervisor's program had when it first started: what
    /// `dream upgrade` execs by default (after a package upgrade, the new
    /// program is there).
    exe: PathBuf,
    /// An `O_PATH` descriptor of the running program, to go back to.
    self_exe: OwnedFd,
    /// The command line it started with, kept across upgrades.
    argv: Vec<OsString>,
    upgrades: u64,
    upgrade: Option<upgrade::Pending>,
    /// An upgrade's pre-flight, running.
    preflight: Option<preflight::Preflight>,
    /// One cgroup per generation, where the kernel offers them.
    cgroups: Option<crate::supervise::cgroup::Cgroups>,
    /// What finished generations and drained workers left behind, sent
    /// the drain signal: (pid, or minus a process group as `kill(2)` has
    /// it, generation, when it is killed if still there).
    leftovers: Vec<(i32, GenId, Instant)>,
    /// When what supervisors that are gone left running is killed
    /// ([`crate::supervise::cgroup::Cgroups::strays`]).
    strays_due: Option<Instant>,
    /// The version that ran before the last upgrade (this one's, at first).
    previous_version: String,
    /// After an upgrade: the client that asked for it, to be answered.
    resumed_asker: Option<Waiter>,
    /// `--metrics`: its listener and the scrapers being answered.
    metrics: Option<crate::protocol::StdListener>,
    scrapers: Vec<metrics::Scraper>,
    /// Stderr pipes of exited workers that something they started may
    /// still write to (a server a wrapper started, draining): read until
    /// their end, so a line logged meanwhile is copied out, not a SIGPIPE.
    orphaned: Vec<Option<std::fs::File>>,
    /// A canary's listeners and judge, while it has any.
    canary: Option<canary::Canary>,
    /// While paused: when the backlogs are looked at next, and whether
    /// one was found filling too fast.
    backlog_watch: Option<(Instant, bool)>,
}

/// The signals the supervisor takes from its signalfd.
const SIGNALS: &[Signal] = &[
    Signal::SIGCHLD,
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Runs the supervisor until it is stopped; returns the exit code.
/// `settings` become the pool's: from then on `Pool::settings` is the one
/// copy (`scale` changes it there).
/// Pids as a log line names them: `12, 34`.
pub fn pid_list(pids: &[i32]) -> String {
    pids.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Driver {
    /// A driver with nothing started yet: the pool, the signals, the
    /// control socket and the metrics listener it was given.
    fn new(
        cfg: Config,
        settings: Settings,
        signals: Signals,
        control: Option<UnixListener>,
        metrics: Option<crate::protocol::StdListener>,
    ) -> Result<Driver, SuperviseError> {
        let systemd = std::env::var_os(protocol::NOTIFY_SOCKET);
        let nonce = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Ok(Driver {
            pool: Pool::new(settings),
            cfg,
            signals,
            control,
            clients: Vec::new(),
            next_client: 1,
            workers: HashMap::new(),
            systemd,
            started: Instant::now(),
            nonce,
            output: crate::supervise::output::Output::stderr(),
            listener_flags: Vec::new(),
            listener_flags_given: Vec::new(),
            flags_blamed: None,
            backlogs: Vec::new(),
            backlog_told: None,
            notify_seq: 0,
            notify_dir_made: false,
            notify_dir_failed: false,
            listener_lost: Vec::new(),
            exit_code: 0,
            exe: std::env::current_exe()
                .map_err(|e| SuperviseError::Setup(format!("the supervisor's own path: {e}")))?,
            self_exe: upgrade::open_self_exe()?,
            argv: std::env::args_os().collect(),
            upgrades: 0,
            upgrade: None,
            preflight: None,
            cgroups: crate::supervise::cgroup::Cgroups::create(nonce),
            leftovers: Vec::new(),
            strays_due: None,
            previous_version: version(),
            resumed_asker: None,
            metrics,
            scrapers: Vec::new(),
            orphaned: Vec::new(),
            canary: None,
            backlog_watch: None,
        })
    }
}

pub fn run(mut cfg: Config, settings: Settings) -> Result<i32, SuperviseError> {
    let metrics = cfg.metrics.take().map(metrics_listener).transpose()?;
    let signals = Signals::new(SIGNALS)?;
    if let crate::supervise::pool::Readiness::Fd(n) = settings.readiness {
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
    let mut d = Driver::new(cfg, settings, signals, control, metrics)?;
    d.listener_flags = d.cfg.sockets.iter().map(|l| status_flags(&l.fd)).collect();
    d.listener_flags_given = d.listener_flags.clone();
    d.backlogs = listeners::backlogs(&d.cfg.sockets);
    // Notify sockets a killed supervisor of this root left (one supervisor
    // per root: none of them is anyone's).
    if let Mode::Serve { root } = &d.cfg.mode {
        let dir = crate::store::release::Store::new(root).notify_dir();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().ends_with(".sock") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    d.store_sockets_with_systemd();
    d.listener_lost = vec![false; d.cfg.sockets.len()];
    d.log(
        0,
        Note::Started,
        &format!(
            "pid {}, {}, {}, ready {}",
            std::process::id(),
            crate::plural(d.cfg.sockets.len(), "socket"),
            crate::plural(d.pool.settings().workers, "worker"),
            d.pool.settings().readiness
        ),
    );
    if let Some(why) = guard::took_over() {
        d.log(
            -1,
            Note::Upgrade,
            &format!("taking over from a failed upgrade ({why}): same sockets, new workers"),
        );
    }
    d.note_strays();
    let actions = d.pool.on(Event::ReleaseResolved(Ok(first)), Instant::now());
    d.apply(actions);
    let result = d.event_loop();
    d.cleanup();
    result.map(|()| d.exit_code)
}

impl Driver {
    fn log(&self, level: i8, note: Note, msg: &str) {
        if level <= self.cfg.verbosity && crate::logtext::json() {
            let level = match level {
                ..0 => crate::logtext::Level::Warn,
                0 => crate::logtext::Level::Info,
                _ => crate::logtext::Level::Debug,
            };
            let line = crate::logtext::json_line(
                level,
                note.as_str(),
                msg,
                &[("from", self.cfg.name.into())],
            );
            self.output.write(line.as_bytes());
        } else if level <= self.cfg.verbosity {
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
                self.log(0, Note::Exiting, "all workers gone; exiting");
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
                    Source::Orphan(i) => self.pump_orphan(i),
                    Source::ReadyPipe(pid) => self.on_ready_pipe(pid),
                    Source::Listener(i) => self.on_listener_hangup(i),
                    Source::Metrics => self.on_metrics_accept(),
                    Source::Scraper(i) => self.on_scraper(i),
                }
            }
            // A worker that came up may have called listen(2) itself, or
            // changed the shared flags: checked at every wake-up (a change
            // undone before the next one changed nothing for anyone).
            self.check_backlog();
            self.check_listener_flags();
            self.clients.retain(|c| c.id != 0);
            let now = Instant::now();
            self.clients
                .retain(|c| c.awaiting > 0 || now.duration_since(c.last) < CLIENT_IDLE);
            // A timed readiness about to fire is checked against how long
            // the worker really could run first.
            for pid in self.pool.timed_readiness_due(Instant::now()) {
                if let Ok(waited) = crate::sys::cpu_wait(pid) {
                    self.on(Event::CpuWaited { pid, waited });
                }
            }
            self.on(Event::Tick);
            self.judge_if_due();
            self.watch_backlog();
            self.end_leftovers_due();
            self.preflight_if_late();
            self.upgrade_if_due();
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
        if let Some(m) = &self.metrics {
            sources.push(Source::Metrics);
            fds.push(match m {
                crate::protocol::StdListener::Tcp(l) => l.as_fd(),
                crate::protocol::StdListener::Unix(l) => l.as_fd(),
            });
        }
        for (i, s) in self.scrapers.iter().enumerate() {
            sources.push(Source::Scraper(i));
            fds.push(s.fd());
        }
        self.orphaned.retain(Option::is_some);
        for (i, f) in self.orphaned.iter().enumerate() {
            if let Some(f) = f {
                sources.push(Source::Orphan(i));
                fds.push(f.as_fd());
            }
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
        if let Some(p) = &self.preflight {
            deadline = Some(deadline.map_or(p.deadline, |d| d.min(p.deadline)));
        }
        if let Some(t) = self.backlog_due() {
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        }
        if let Some(t) = self.judge_due() {
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        }
        if let Some(t) = self
            .leftovers
            .iter()
            .map(|(_, _, t)| *t)
            .chain(self.strays_due)
            .min()
        {
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        }
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
        for (i, Listener { fd, .. }) in self.cfg.sockets.iter().enumerate() {
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

    fn on_signals(&mut self) -> Result<(), SuperviseError> {
        while let Some(sig) = self.signals.try_next()? {
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
                        self.log(0, Note::Supervisor, "HUP: reload requested");
                        self.request_reload(None, None);
                    }
                }
                Signal::SIGTERM | Signal::SIGINT => {
                    let how = if self.pool.stopping().is_some() {
                        Stop::Fast
                    } else {
                        Stop::Graceful
                    };
                    self.on(Event::Stop(how));
                }
                Signal::SIGQUIT => {
                    let how = match self.cfg.mode {
                        Mode::Pool { .. } => Stop::Graceful,
                        Mode::Serve { .. } => Stop::Fast,
                    };
                    self.on(Event::Stop(how));
                }
                Signal::SIGTTIN | Signal::SIGTTOU => {
                    let n = self.pool.settings().workers;
                    let n = if sig == Signal::SIGTTIN {
                        (n + 1).min(crate::supervise::pool::MAX_WORKERS)
                    } else {
                        n.saturating_sub(1).max(1)
                    };
                    self.on(Event::Scale(n));
                }
                Signal::SIGUSR2 => {
                    if let Mode::Serve { .. } = self.cfg.mode {
                        self.log(0, Note::Upgrade, "USR2: upgrade requested");
                        self.request_upgrade(None, None);
                    }
                }
                Signal::SIGUSR1 => {
                    let status = self.status().human();
                    self.log(-1, Note::Supervisor, &status);
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn request_reload(&mut self, waiter: Option<Waiter>, confirm_within: Option<Duration>) {
        self.on(Event::ReloadRequested {
            waiter,
            confirm_within,
            canary: None,
        });
    }

    /// The pool reverted a generation: `current` goes back to `to` if it
    /// still names the failing release, and the history says so (the
    /// failing release is bad from then on). The deploy lock is taken if
    /// it is free; a deploy holding it (waiting to confirm this very
    /// generation, say) learns of the revert from its answer.
    fn record_revert(&self, generation: GenId, release: &str, to: &Release, reason: &str) {
        let Mode::Serve { root } = &self.cfg.mode else {
            return;
        };
        let store = crate::store::release::Store::new(root);
        let _lock = crate::store::lock::Lock::acquire(
            &store.lock_path(),
            &crate::store::lock::Holder::me("dream serve (reverting a release)"),
            crate::store::lock::Wait::No,
        );
        // Back to the very release it ran (an unconfirmed reload of what
        // was already live): the generation is replaced, the release is
        // not bad, and nothing is recorded against it.
        if to.id == release {
            self.log(
                0,
                Note::Reverted,
                &format!(
                    "generation {generation} reverted to a new generation of the same release {release}; nothing marked bad"
                ),
            );
            return;
        }
        self.record(
            crate::store::release::EventKind::Reverted,
            release,
            Some(&to.id),
            Some(format!("generation {generation}: {reason}")),
        );
        match store.switch_back(
            release,
            &to.id,
            format!("reverted from {release}: {reason}"),
        ) {
            Ok(true) => self.log(
                0,
                Note::Reverted,
                &format!("current switched back to {}", to.id),
            ),
            Ok(false) => {}
            Err(e) => self.log(
                -1,
                Note::Supervisor,
                &format!("cannot switch current back to {}: {e}", to.id),
            ),
        }
    }

    /// Appends to the history (a revert, a canary's start, its promotion).
    pub(super) fn record(
        &self,
        kind: crate::store::release::EventKind,
        release: &str,
        previous: Option<&str>,
        reason: Option<String>,
    ) {
        let Mode::Serve { root } = &self.cfg.mode else {
            return;
        };
        let store = crate::store::release::Store::new(root);
        let mut ev = crate::store::release::Event::new(kind, release);
        ev.previous = previous.map(str::to_string);
        ev.reason = reason;
        if let Err(e) = store.append(&ev) {
            let what = serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            self.log(
                -1,
                Note::Supervisor,
                &format!("cannot record the {what} of {release} in the history: {e}"),
            );
        }
    }

    /// Feeds the pool one event and carries out what it answers.
    fn on(&mut self, event: Event) {
        let actions = self.pool.on(event, Instant::now());
        self.apply(actions);
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
                    background,
                    lane,
                } => match self.spawn(generation, index, &release, background, lane) {
                    // The worker's clock starts when it exists, not when
                    // this action was taken.
                    Ok(pid) => queue.extend(self.pool.on(
                        Event::Spawned {
                            generation,
                            index,
                            pid,
                        },
                        Instant::now(),
                    )),
                    Err(error) => queue.extend(self.pool.on(
                        Event::SpawnFailed {
                            generation,
                            index,
                            error,
                        },
                        now,
                    )),
                },
                Action::Foreground { pid } => {
                    if let Err(e) = crate::sys::foreground(pid)
                        && e.raw_os_error() != Some(libc::ESRCH)
                        && e.kind() != io::ErrorKind::NotFound
                    {
                        self.log(
                            -1,
                            Note::Worker,
                            &format!(
                                "worker pid {pid}: cannot put it back at normal priority: {e}"
                            ),
                        );
                    }
                }
                Action::Signal { pid, signal } => {
                    let _ = kill(Pid::from_raw(pid), signal);
                }
                Action::KillGroup { pid } => {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                Action::DrainGroup { pid, generation } => self.drain_group(pid, generation),
                Action::StartReload => {
                    let resolved = release_of(&self.cfg.mode);
                    queue.extend(self.pool.on(Event::ReleaseResolved(resolved), now));
                }
                Action::ReloadDone { waiters, outcome } => {
                    let v = match &outcome {
                        Ok((generation, release)) => control::Answer::done(control::Done::Live {
                            generation: *generation,
                            release: release.clone(),
                        })
                        .to_value(),
                        Err(e) => control::Answer::failed(e.clone()).to_value(),
                    };
                    for w in waiters {
                        self.answer(w, &v);
                    }
                }
                Action::Systemd(what) => self.tell_systemd(what),
                Action::Log(note, msg) => self.log(0, note, &msg),
                Action::Warn(note, msg) => self.log(-1, note, &msg),
                Action::Sweep(generation) => {
                    self.sweep(Some(generation));
                    self.canary_gone(generation);
                }
                Action::CanaryLive {
                    generation,
                    release,
                    baseline,
                    plan,
                    twin,
                } => self.canary_live(generation, &release, &baseline, plan, twin),
                Action::CanaryEnded { generation } => self.canary_ended(generation),
                Action::Promoted {
                    generation,
                    release,
                    baseline,
                    figures,
                } => self.record(
                    crate::store::release::EventKind::Promoted,
                    &release,
                    Some(&baseline),
                    Some(format!("generation {generation}: {figures}")),
                ),
                Action::Revert {
                    generation,
                    release,
                    to,
                    reason,
                } => self.record_revert(generation, &release, &to, &reason),
                Action::GiveUp(reason) => {
                    self.log(-1, Note::GaveUp, &format!("giving up: {reason}"));
                    self.exit_code = 1;
                    queue.extend(self.pool.on(Event::Stop(Stop::Fast), now));
                }
            }
        }
    }

    fn cleanup(&mut self) {
        self.sweep(None);
        for w in self.workers.values() {
            if let Some(p) = &w.notify_path {
                let _ = std::fs::remove_file(p);
            }
        }
        self.output.finish(Duration::from_secs(2));
        if let Mode::Serve { root } = &self.cfg.mode {
            let _ = std::fs::remove_file(control::socket_path(root));
        }
        for p in &self.cfg.unix_paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The metrics listener, non-blocking, as a std listener.
fn metrics_listener(l: Listener) -> Result<crate::protocol::StdListener, SuperviseError> {
    let l = l.into_std()?;
    match &l {
        crate::protocol::StdListener::Tcp(t) => t.set_nonblocking(true)?,
        crate::protocol::StdListener::Unix(u) => u.set_nonblocking(true)?,
    }
    Ok(l)
}
