//! The supervisor replacing its own program in place (`dream upgrade`,
//! SIGUSR2): same pid, same listening sockets, same workers.
//!
//! 1. **Pre-flight**: `NEW --upgrade-check STATE_VERSION` must exit 0 and
//!    say it reads that state version; otherwise nothing changes.
//! 2. **Wait** until no reload is starting or queued (an upgrade never cuts
//!    one short); a second upgrade meanwhile is refused.
//! 3. **State**: the pool (deadlines as monotonic times), every worker's
//!    notify socket, output pipe and ready pipe, the control listener and
//!    every control client (the one that asked included), the listening
//!    sockets, and an `O_PATH` descriptor of the running program, written
//!    as JSON into a sealed memfd. Those descriptors, and only those, lose
//!    close-on-exec for the exec.
//! 4. **Exec** `NEW` with the original argv and `DREAM_UPGRADE_STATE_FD`,
//!    through [`crate::sys::reexec`], which keeps the signal mask: a HUP,
//!    TERM or CHLD that arrives in the window stays pending and is read
//!    from the new program's signalfd.
//! 5. **Resume** ([`resume`], called by `main` before anything else): read
//!    the state, take the descriptors back (close-on-exec again), reap the
//!    workers that exited in the window, answer the client that asked. A
//!    program that cannot take the state over (an unknown version, a
//!    parse error) execs the old program again from its `O_PATH`
//!    descriptor, with the same state and the reason, and that one keeps
//!    serving and reports why.
//! 6. **Guardian** ([`super::guard`]): a program that dies or hangs before
//!    it resumes cannot hand anything back; a process started just before
//!    the exec, holding copies of the sockets, starts the old program
//!    again on them.

use std::io::Seek;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use serde::{Deserialize, Serialize};

use super::*;

/// The layout of [`State`]; a program reads only the versions it knows.
pub const STATE_VERSION: u32 = 1;
/// The memfd holding the state, in the new program's environment.
pub const STATE_FD_ENV: &str = "DREAM_UPGRADE_STATE_FD";
/// The old program's `O_PATH` descriptor, for falling back to it.
const OLD_EXE_FD_ENV: &str = "DREAM_UPGRADE_OLD_EXE_FD";
/// Why the new program handed the state back (set for the old program).
const FALLBACK_ENV: &str = "DREAM_UPGRADE_FALLBACK";

/// This build's version, as status and upgrade answers show it.
pub fn version() -> String {
    // The upgrade tests run two copies of one build; this hook gives each
    // its own version: `DREAM_TEST_VERSIONS=PATH=VERSION;PATH=VERSION`.
    #[cfg(feature = "test-hooks")]
    if let (Ok(map), Ok(exe)) = (
        std::env::var("DREAM_TEST_VERSIONS"),
        std::env::current_exe(),
    ) && let Some(v) = map
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .find(|(p, _)| Path::new(p) == exe)
        .map(|(_, v)| v.to_string())
    {
        return v;
    }
    env!("CARGO_PKG_VERSION").to_string()
}

/// An upgrade asked for and not yet carried out.
pub(super) struct Pending {
    pub(super) asker: Option<Waiter>,
    pub(super) binary: PathBuf,
    pub(super) to_version: String,
    /// The new program stands a guardian down once it resumes.
    pub(super) guarded: bool,
}

#[derive(Serialize, Deserialize)]
struct WorkerFds {
    pid: i32,
    generation: GenId,
    index: usize,
    notify: RawFd,
    /// Its notify socket's file, if not abstract.
    #[serde(default)]
    notify_path: Option<PathBuf>,
    stderr: Option<RawFd>,
    ready_pipe: Option<RawFd>,
    tail: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct ClientFds {
    id: Waiter,
    fd: RawFd,
    buf: Vec<u8>,
    awaiting: usize,
    #[serde(with = "crate::supervise::clock::mono")]
    last: Instant,
}

/// Everything the supervisor is, by value or by descriptor number.
#[derive(Serialize, Deserialize)]
pub(super) struct State {
    version: u32,
    written_by: String,
    argv: Vec<Vec<u8>>,
    mode: Mode,
    program: Vec<u8>,
    args: Vec<Vec<u8>>,
    sockets: Vec<(RawFd, String)>,
    unix_paths: Vec<PathBuf>,
    user: Option<(u32, u32)>,
    verbosity: i8,
    /// `--log-format json`: a process-wide setting, not in argv's reach
    /// of the new program (it resumes before parsing arguments).
    #[serde(default)]
    json_logs: bool,
    /// The [`Pool`], whole.
    pub(super) pool: Value,
    workers: Vec<WorkerFds>,
    control: Option<RawFd>,
    /// `--metrics`' listener (its scrapers are let go).
    #[serde(default)]
    metrics: Option<RawFd>,
    clients: Vec<ClientFds>,
    next_client: Waiter,
    nonce: u64,
    #[serde(with = "crate::supervise::clock::mono")]
    started: Instant,
    listener_lost: Vec<bool>,
    exit_code: i32,
    exe: PathBuf,
    upgrades: u64,
    /// The client that asked for this upgrade, to be answered by the new
    /// program (or by the old one, after a fallback).
    asker: Option<Waiter>,
    /// The count in notify socket names, so a new one never takes a name
    /// in use.
    #[serde(default)]
    notify_seq: u64,
}

impl State {
    /// Every descriptor the state names: what crosses the exec.
    fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.sockets.iter().map(|(fd, _)| *fd).collect();
        fds.extend(self.control);
        fds.extend(self.metrics);
        fds.extend(self.clients.iter().map(|c| c.fd));
        for w in &self.workers {
            fds.push(w.notify);
            fds.extend(w.stderr);
            fds.extend(w.ready_pipe);
        }
        fds
    }
}

fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let flag = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    crate::with_raw_fd(fd, |b| fcntl(b, FcntlArg::F_SETFD(flag)))
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?
        .map(|_| ())
        .map_err(io::Error::from)
}

impl Driver {
    /// Carries out a pending upgrade if nothing holds it back. On success
    /// this never returns: the new program continues.
    pub(super) fn upgrade_if_due(&mut self) {
        if self.upgrade.is_none()
            || self.pool.reloading()
            || self.pool.reload_pending()
            || self.pool.stopping().is_some()
        {
            if self.pool.stopping().is_some()
                && let Some(p) = self.upgrade.take()
                && let Some(w) = p.asker
            {
                self.answer(
                    w,
                    &control::Answer::failed("the supervisor is stopping").to_value(),
                );
            }
            return;
        }
        let pending = self.upgrade.take().expect("checked");
        let err = self.exec_upgrade(&pending);
        // Still here: the exec failed, and nothing was handed over.
        self.output = crate::supervise::output::Output::stderr();
        let msg = format!("upgrade to {} failed: {err}", pending.binary.display());
        self.log(-1, Note::Upgrade, &msg);
        if let Some(w) = pending.asker {
            self.answer(w, &control::Answer::failed(msg).to_value());
        }
    }

    pub(super) fn state(&self, asker: Option<Waiter>) -> State {
        State {
            version: STATE_VERSION,
            written_by: version(),
            argv: self.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
            mode: self.cfg.mode.clone(),
            program: self.cfg.program.as_bytes().to_vec(),
            args: self
                .cfg
                .args
                .iter()
                .map(|a| a.as_bytes().to_vec())
                .collect(),
            sockets: self
                .cfg
                .sockets
                .iter()
                .map(|l| (l.fd.as_raw_fd(), l.name.clone()))
                .collect(),
            unix_paths: self.cfg.unix_paths.clone(),
            user: self.cfg.user,
            verbosity: self.cfg.verbosity,
            json_logs: crate::logtext::json(),
            pool: serde_json::to_value(&self.pool).expect("a pool serializes"),
            workers: self
                .workers
                .iter()
                .map(|(pid, w)| WorkerFds {
                    pid: *pid,
                    generation: w.generation,
                    index: w.index,
                    notify: w.notify.as_raw_fd(),
                    notify_path: w.notify_path.clone(),
                    stderr: w.stderr.as_ref().map(|f| f.as_raw_fd()),
                    ready_pipe: w.ready_pipe.as_ref().map(|f| f.as_raw_fd()),
                    tail: w.tail.clone(),
                })
                .collect(),
            control: self.control.as_ref().map(|c| c.as_raw_fd()),
            metrics: self.metrics.as_ref().map(|m| match m {
                crate::protocol::StdListener::Tcp(l) => l.as_raw_fd(),
                crate::protocol::StdListener::Unix(l) => l.as_raw_fd(),
            }),
            clients: self
                .clients
                .iter()
                .filter(|c| c.id != 0)
                .map(|c| ClientFds {
                    id: c.id,
                    fd: c.stream.as_raw_fd(),
                    buf: c.buf.clone(),
                    awaiting: c.awaiting,
                    last: c.last,
                })
                .collect(),
            next_client: self.next_client,
            nonce: self.nonce,
            started: self.started,
            listener_lost: self.listener_lost.clone(),
            exit_code: self.exit_code,
            exe: self.exe.clone(),
            upgrades: self.upgrades,
            asker,
            notify_seq: self.notify_seq,
        }
    }

    /// Writes the state and execs the new program. Returns only if the
    /// exec failed, with every descriptor close-on-exec again.
    fn exec_upgrade(&mut self, pending: &Pending) -> io::Error {
        self.log(
            0,
            Note::Upgrade,
            &format!(
                "upgrading in place: dream {} -> {} ({}), pid {}, {} kept",
                version(),
                pending.to_version,
                pending.binary.display(),
                std::process::id(),
                crate::plural(self.workers.len(), "worker")
            ),
        );
        // What is queued for stderr is written before the writer thread
        // ends with the exec.
        self.output.finish(Duration::from_secs(1));
        let state = self.state(pending.asker);
        let memfd = match write_state(&state) {
            Ok(f) => f,
            Err(e) => return e,
        };
        let guard = self.start_guardian(pending, &state);
        let mut keep: Vec<RawFd> = vec![memfd.as_raw_fd(), self.self_exe.as_raw_fd()];
        keep.extend(state.fds());
        keep.extend(guard.as_ref().map(|g| g.as_raw_fd()));
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| {
                k != STATE_FD_ENV
                    && k != OLD_EXE_FD_ENV
                    && k != FALLBACK_ENV
                    && k != super::guard::GUARD_FD_ENV
            })
            .collect();
        env.push((STATE_FD_ENV.into(), memfd.as_raw_fd().to_string().into()));
        env.push((
            OLD_EXE_FD_ENV.into(),
            self.self_exe.as_raw_fd().to_string().into(),
        ));
        if let Some(g) = &guard {
            env.push((
                super::guard::GUARD_FD_ENV.into(),
                g.as_raw_fd().to_string().into(),
            ));
        }
        let err = match keep.iter().try_for_each(|fd| set_cloexec(*fd, false)) {
            Err(e) => e,
            Ok(()) => {
                crate::test_point("upgrade-exec");
                crate::sys::reexec(Ok(&pending.binary), &self.argv, &env)
            }
        };
        // Still here: the old program goes on, and needs no guardian.
        restore_cloexec(&keep);
        if let Some(g) = guard {
            super::guard::stand_down(g);
        }
        err
    }

    /// The guardian for this exec, where there is one to have (see
    /// [`super::guard`]); an upgrade without one is still an upgrade.
    fn start_guardian(&self, pending: &Pending, state: &State) -> Option<OwnedFd> {
        if !pending.guarded || self.systemd.is_some() {
            return None;
        }
        let asker = state
            .asker
            .and_then(|w| state.clients.iter().find(|c| c.id == w))
            .map(|c| c.fd);
        let started = match asker {
            Some(fd) => crate::with_raw_fd(fd, |b| {
                super::guard::start(&self.cfg.sockets, Some(b), &self.argv)
            })
            .unwrap_or_else(|| Err(io::Error::from_raw_os_error(libc::EBADF))),
            None => super::guard::start(&self.cfg.sockets, None, &self.argv),
        };
        match started {
            Ok(g) => Some(g),
            Err(e) => {
                self.log(
                    -1,
                    Note::Upgrade,
                    &format!("upgrading without a guardian (it could not start: {e})"),
                );
                None
            }
        }
    }
}

fn restore_cloexec(fds: &[RawFd]) {
    for fd in fds {
        let _ = set_cloexec(*fd, true);
    }
}

/// The state as JSON in a sealed memfd (close-on-exec until the exec).
fn write_state(state: &State) -> io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(
        c"dream-upgrade-state",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    serde_json::to_writer(&mut file, state).map_err(io::Error::other)?;
    file.rewind()?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(file.into())
}

/// Why a program could not take a state over.
pub(super) fn take_over_refusal(text: &str) -> Result<State, String> {
    #[derive(Deserialize)]
    struct Head {
        version: u32,
        written_by: String,
    }
    let head: Head = serde_json::from_str(text).map_err(|e| format!("unreadable state: {e}"))?;
    if head.version != STATE_VERSION {
        return Err(format!(
            "state version {} (written by dream {}) is not the one this program reads ({STATE_VERSION})",
            head.version, head.written_by
        ));
    }
    serde_json::from_str(text).map_err(|e| format!("unreadable state: {e}"))
}

/// For the tests: `DREAM_TEST_UPGRADE_REFUSE=PATH` makes the program at
/// PATH refuse a state it resumes after passing the pre-flight, as a
/// program would that checks something only then.
fn refused_by_test_hook() -> Result<(), String> {
    #[cfg(feature = "test-hooks")]
    if std::env::var_os("DREAM_TEST_UPGRADE_REFUSE")
        .is_some_and(|p| std::env::current_exe().is_ok_and(|e| e.as_os_str() == p))
    {
        return Err("refused by the test hook DREAM_TEST_UPGRADE_REFUSE".into());
    }
    Ok(())
}

/// For the tests: `DREAM_TEST_UPGRADE_CRASH=PATH` makes the program at
/// PATH die of SIGSEGV before it resumes, `DREAM_TEST_UPGRADE_HANG=PATH`
/// makes it hang there, as a broken new program would.
fn crashed_by_test_hook() {
    #[cfg(feature = "test-hooks")]
    {
        let this = |var: &str| {
            std::env::var_os(var)
                .is_some_and(|p| std::env::current_exe().is_ok_and(|e| e.as_os_str() == p))
        };
        if this("DREAM_TEST_UPGRADE_CRASH") {
            // A real fault cannot be blocked; a raised one can.
            let _ = nix::sys::signal::SigSet::from(Signal::SIGSEGV).thread_unblock();
            // Rust's own SIGSEGV handler (stack overflow detection) takes
            // the first one, finds no fault, and puts the default back.
            let _ = nix::sys::signal::raise(Signal::SIGSEGV);
            let _ = nix::sys::signal::raise(Signal::SIGSEGV);
        }
        if this("DREAM_TEST_UPGRADE_HANG") {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

/// Whether this process was started by an upgrade (its state descriptor
/// is in the environment).
pub fn resuming() -> bool {
    std::env::var_os(STATE_FD_ENV).is_some()
}

/// Continues a supervisor from the state an upgrade handed over. Call it
/// first thing in `main`, while the process has one thread. If this program
/// cannot take the state over, it execs the old program with it instead;
/// on success it runs the supervisor until it stops and returns its exit
/// code.
pub fn resume() -> Result<i32, SuperviseError> {
    let number = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<RawFd>().ok())
    };
    let state_fd = number(STATE_FD_ENV);
    let old_exe = number(OLD_EXE_FD_ENV);
    let fallback = std::env::var(FALLBACK_ENV).ok();
    let guard = super::guard::inherited();
    crashed_by_test_hook();
    // Workers must not see these.
    crate::sys::remove_env_vars(&[STATE_FD_ENV, OLD_EXE_FD_ENV, FALLBACK_ENV]);
    let Some(state_fd) = state_fd.and_then(crate::sys::claim_inherited_fd) else {
        return Err(SuperviseError::Setup(format!(
            "{STATE_FD_ENV} does not name an open descriptor"
        )));
    };
    let mut file = std::fs::File::from(state_fd);
    let mut text = String::new();
    let read = file.read_to_string(&mut text);
    let state = read
        .map_err(|e| format!("cannot read the state: {e}"))
        .and_then(|_| take_over_refusal(&text))
        .and_then(|s| takeable(&s).map(|()| s))
        .and_then(|s| refused_by_test_hook().map(|()| s));
    let state = match state {
        Ok(s) => s,
        Err(why) => return Err(hand_back(file, old_exe, guard.as_ref(), &why)),
    };
    drop(file);
    // The old program's descriptor: this one keeps its own from now on.
    if let Some(fd) = old_exe.and_then(crate::sys::claim_inherited_fd) {
        drop(fd);
    }
    let mut d = adopt(state)?;
    if let Some(g) = guard {
        super::guard::stand_down(g);
    }
    d.announce_resume(fallback.as_deref());
    // Exits and signals from the window: reaped and handled now.
    d.reap();
    d.tell_systemd(Systemd::Ready);
    let result = d.event_loop();
    d.cleanup();
    result.map(|()| d.exit_code)
}

/// Gives the state back to the program that wrote it: execs the old
/// program (its `O_PATH` descriptor) with the state, the reason, and the
/// guardian's pipe. Returns only if that cannot be done.
fn hand_back(
    mut file: std::fs::File,
    old_exe: Option<RawFd>,
    guard: Option<&OwnedFd>,
    why: &str,
) -> SuperviseError {
    let Some(old) = old_exe.and_then(crate::sys::claim_inherited_fd) else {
        return SuperviseError::Setup(format!(
            "cannot take over the upgrade ({why}), and the old program is not at hand"
        ));
    };
    let _ = file.rewind();
    let _ = set_cloexec(file.as_raw_fd(), false);
    let _ = set_cloexec(old.as_raw_fd(), false);
    let argv: Vec<OsString> = std::env::args_os().collect();
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    env.push((STATE_FD_ENV.into(), file.as_raw_fd().to_string().into()));
    env.push((OLD_EXE_FD_ENV.into(), old.as_raw_fd().to_string().into()));
    env.push((FALLBACK_ENV.into(), why.into()));
    // The guardian waits for the old program's resume now.
    if let Some(g) = guard {
        let _ = set_cloexec(g.as_raw_fd(), false);
        env.push((
            super::guard::GUARD_FD_ENV.into(),
            g.as_raw_fd().to_string().into(),
        ));
    }
    let err = crate::sys::reexec(Err(old.as_fd()), &argv, &env);
    SuperviseError::Setup(format!(
        "cannot take over the upgrade ({why}), and cannot go back to the old program: {err}"
    ))
}

impl Driver {
    /// Says how the upgrade ended, in the log and to the client that asked:
    /// upgraded, or (`fallback`) handed back and why.
    fn announce_resume(&mut self, fallback: Option<&str>) {
        let asker = self.resumed_asker.take();
        let answer = match fallback {
            None => {
                self.upgrades += 1;
                let msg = format!(
                    "upgraded in place: dream {} -> {}, pid {}, {} kept, {} upgrade{} so far",
                    self.previous_version,
                    version(),
                    std::process::id(),
                    crate::plural(self.workers.len(), "worker"),
                    self.upgrades,
                    if self.upgrades == 1 { "" } else { "s" }
                );
                self.log(0, Note::Upgrade, &msg);
                control::Answer::done(control::Done::Upgraded {
                    version: version(),
                    previous_version: self.previous_version.clone(),
                })
            }
            Some(why) => {
                let msg = format!(
                    "upgrade failed: the new program could not take over ({why}); dream {} keeps running",
                    version()
                );
                self.log(-1, Note::Upgrade, &msg);
                control::Answer::failed(msg)
            }
        };
        if let Some(w) = asker {
            self.answer(w, &answer.to_value());
        }
    }
}

/// Whether [`adopt`] can take `state` over, judged before anything is
/// claimed (a descriptor claimed and then dropped would be closed): the
/// pool parses, and every descriptor it names is open. Anything else is
/// handed back to the old program, which keeps serving.
fn takeable(state: &State) -> Result<(), String> {
    serde_json::from_value::<Pool>(state.pool.clone()).map_err(|e| format!("the pool: {e}"))?;
    match state
        .fds()
        .into_iter()
        .find(|fd| crate::with_raw_fd(*fd, |_| ()).is_none())
    {
        Some(fd) => Err(format!("the state names fd {fd}, which is not open")),
        None => Ok(()),
    }
}

/// Takes every descriptor named in the state back and builds the driver.
/// Takes descriptor `fd`, named by the state, back (close-on-exec again).
fn claim(fd: RawFd) -> Result<OwnedFd, SuperviseError> {
    let owned = crate::sys::claim_inherited_fd(fd).ok_or_else(|| {
        SuperviseError::Setup(format!("upgrade state names fd {fd}, which is not open"))
    })?;
    set_cloexec(owned.as_raw_fd(), true)?;
    Ok(owned)
}

/// Each worker's descriptors, claimed, by pid.
fn adopt_workers(workers: Vec<WorkerFds>) -> Result<HashMap<i32, WorkerIo>, SuperviseError> {
    let file = |fd: Option<RawFd>| -> Result<Option<std::fs::File>, SuperviseError> {
        Ok(fd.map(claim).transpose()?.map(std::fs::File::from))
    };
    let mut out = HashMap::new();
    for w in workers {
        let io = WorkerIo {
            generation: w.generation,
            index: w.index,
            notify: UnixDatagram::from(claim(w.notify)?),
            notify_path: w.notify_path,
            stderr: file(w.stderr)?,
            tail: w.tail,
            ready_pipe: file(w.ready_pipe)?,
        };
        out.insert(w.pid, io);
    }
    Ok(out)
}

/// The control clients, their connections claimed.
fn adopt_clients(clients: Vec<ClientFds>) -> Result<Vec<Client>, SuperviseError> {
    clients
        .into_iter()
        .map(|c| {
            Ok(Client {
                id: c.id,
                stream: UnixStream::from(claim(c.fd)?),
                buf: c.buf,
                awaiting: c.awaiting,
                last: c.last,
            })
        })
        .collect()
}

fn adopt(state: State) -> Result<Driver, SuperviseError> {
    crate::logtext::set_json(state.json_logs);
    let sockets = state
        .sockets
        .iter()
        .map(|(fd, name)| Ok(Listener::new(claim(*fd)?, name.clone())))
        .collect::<Result<Vec<_>, SuperviseError>>()?;
    let workers = adopt_workers(state.workers)?;
    let control = state
        .control
        .map(claim)
        .transpose()?
        .map(UnixListener::from);
    let clients = adopt_clients(state.clients)?;
    let os = |b: Vec<u8>| OsString::from_vec(b);
    let pool: Pool = serde_json::from_value(state.pool)
        .map_err(|e| SuperviseError::Setup(format!("upgrade state: the pool: {e}")))?;
    let name = match state.mode {
        Mode::Serve { .. } => "serve",
        Mode::Pool { .. } => "pool",
    };
    let metrics = state
        .metrics
        .map(|fd| claim(fd).map(|fd| Listener::new(fd, "metrics")))
        .transpose()?
        .map(super::metrics_listener)
        .transpose()?;
    let cfg = Config {
        metrics: None,
        mode: state.mode,
        program: os(state.program),
        args: state.args.into_iter().map(os).collect(),
        sockets,
        unix_paths: state.unix_paths,
        user: state.user,
        verbosity: state.verbosity,
        name,
    };
    let signals = Signals::new(SIGNALS)?;
    let listener_flags: Vec<_> = cfg.sockets.iter().map(|l| status_flags(&l.fd)).collect();
    // As the sockets are now (a shrink before the upgrade is not seen).
    let backlogs = super::listeners::backlogs(&cfg.sockets);
    let mut d = Driver {
        pool,
        cfg,
        signals,
        control,
        clients,
        next_client: state.next_client,
        workers,
        systemd: std::env::var_os(protocol::NOTIFY_SOCKET),
        started: state.started,
        nonce: state.nonce,
        output: crate::supervise::output::Output::stderr(),
        // As they are now (a change before the upgrade is not seen).
        listener_flags_given: listener_flags.clone(),
        flags_blamed: None,
        listener_flags,
        backlogs,
        backlog_told: None,
        notify_seq: state.notify_seq,
        notify_dir_made: false,
        notify_dir_failed: false,
        listener_lost: state.listener_lost,
        exit_code: state.exit_code,
        exe: state.exe,
        self_exe: open_self_exe()?,
        argv: state.argv.into_iter().map(os).collect(),
        upgrades: state.upgrades,
        upgrade: None,
        preflight: None,
        // The same path as before the exec (pid and nonce are kept).
        cgroups: crate::supervise::cgroup::Cgroups::create(state.nonce),
        // Leftovers signalled before the upgrade are ended at the exit sweep
        // (their deadlines are not carried over).
        leftovers: Vec::new(),
        strays_due: None,
        previous_version: state.written_by,
        resumed_asker: None,
        metrics,
        scrapers: Vec::new(),
        // Not carried over: what still writes to them gets EPIPE.
        orphaned: Vec::new(),
        // Upgrades wait for a canary's verdict and its end.
        canary: None,
        backlog_watch: None,
    };
    d.resumed_asker = state.asker;
    Ok(d)
}

/// An `O_PATH` descriptor of the running program: it stays valid when a
/// package manager replaces the file, so a failed upgrade can always go
/// back to exactly this program.
pub(super) fn open_self_exe() -> Result<OwnedFd, SuperviseError> {
    nix::fcntl::open(
        "/proc/self/exe",
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| SuperviseError::Setup(format!("/proc/self/exe: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_of_another_version_is_refused_with_both_versions_named() {
        let err = take_over_refusal(r#"{"version": 99, "written_by": "9.9.9"}"#)
            .err()
            .expect("refused");
        assert!(err.contains("99") && err.contains("9.9.9"), "{err}");
        assert!(err.contains(&STATE_VERSION.to_string()), "{err}");
        let err = take_over_refusal("{").err().expect("refused");
        assert!(err.starts_with("unreadable state"), "{err}");
    }

    #[test]
    fn the_state_this_release_wrote_is_still_resumed() {
        // Written by dream 0.1.0's supervisor (handed to a pre-flight):
        // two workers of a provisional reload, live and on probation.
        // Never edit it: every later build must take it over
        // (a new state version adds a file of its own).
        let text = include_str!("testdata/upgrade-state-v1.json");
        let state = take_over_refusal(text).expect("the golden state parses");
        assert_eq!(state.written_by, "0.1.0");
        let pool: Pool = serde_json::from_value(state.pool).expect("its pool parses");
        let s = pool.status(Instant::now());
        assert_eq!(s.workers_target, 2);
        assert_eq!(s.generations.len(), 1, "{:?}", s.generations);
        assert!(s.generations[0].confirm_in_s.is_some(), "still provisional");
        assert_eq!(state.workers.len(), 2);
    }

    #[test]
    fn the_check_accepts_only_its_own_state_version() {
        assert_eq!(upgrade_check(&STATE_VERSION.to_string()), 0);
        assert_eq!(upgrade_check("0"), 1);
        assert_eq!(upgrade_check("two"), 1);
    }
}
