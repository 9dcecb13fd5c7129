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
/// The longest a pre-flight check may take.
const PREFLIGHT_LIMIT: Duration = Duration::from_secs(10);
/// The largest state a pre-flight reads.
const MAX_STATE: usize = 64 << 20;

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

/// `dream --upgrade-check V`: whether this program can take over a state
/// of version `V`. Prints one line and returns the exit code.
pub fn upgrade_check(v: &str) -> i32 {
    match v.parse::<u32>() {
        Ok(STATE_VERSION) => {
            // The supervisor hands the real state on stdin: parse it as
            // the resume would, so a program that cannot take it over is
            // refused before the exec, not after.
            use std::io::IsTerminal;
            let mut text = String::new();
            if !std::io::stdin().is_terminal() {
                let _ = std::io::stdin()
                    .take(MAX_STATE as u64)
                    .read_to_string(&mut text);
            }
            if !text.trim().is_empty()
                && let Err(why) = take_over_refusal(&text).and_then(|s| {
                    serde_json::from_value::<Pool>(s.pool)
                        .map(drop)
                        .map_err(|e| format!("the pool: {e}"))
                })
            {
                eprintln!(
                    "dream {}: cannot take over this supervisor's state: {why}",
                    version()
                );
                return 1;
            }
            println!("dream {} reads upgrade state {STATE_VERSION}", version());
            println!("{}", super::guard::PREFLIGHT_LINE);
            0
        }
        _ => {
            eprintln!(
                "dream {}: cannot take over upgrade state version {v:?} (reads {STATE_VERSION})",
                version()
            );
            1
        }
    }
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
struct State {
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
    pool: Value,
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

/// A pre-flight under way: `NEW --upgrade-check STATE_VERSION` with the
/// real state on its stdin. The supervisor does not wait for it: its exit
/// is reaped like a worker's ([`Driver::reap`]), and past
/// [`PREFLIGHT_LIMIT`] it is killed and the upgrade refused, so a new
/// program that hangs never holds the event loop.
pub(super) struct Preflight {
    pid: i32,
    stdout: std::process::ChildStdout,
    stderr: std::process::ChildStderr,
    asker: Option<Waiter>,
    binary: PathBuf,
    pub(super) deadline: Instant,
}

/// Starts the pre-flight of `binary`, handing it `state`.
fn start_preflight(
    binary: &Path,
    state: &State,
    asker: Option<Waiter>,
) -> Result<Preflight, String> {
    use std::process::{Command, Stdio};
    let shown = binary.display();
    let meta = std::fs::metadata(binary).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a file"));
    }
    let text = serde_json::to_vec(state).map_err(|e| e.to_string())?;
    let mut child = Command::new(binary)
        .args(["--upgrade-check", &STATE_VERSION.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown}: {e}"))?;
    // Written on a thread of its own: a program that does not read its
    // input must not block the supervisor.
    if let Some(mut input) = child.stdin.take() {
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = input.write_all(&text);
        });
    }
    Ok(Preflight {
        pid: child.id() as i32,
        stdout: child.stdout.take().expect("piped"),
        stderr: child.stderr.take().expect("piped"),
        asker,
        binary: binary.to_path_buf(),
        deadline: Instant::now() + PREFLIGHT_LIMIT,
    })
}

/// What a finished pre-flight said: the new program's version and whether
/// it knows the guardian, or why not.
fn preflight_verdict(p: &mut Preflight, status: &WaitStatus) -> Result<(String, bool), String> {
    let shown = p.binary.display();
    let read_all = |f: &mut dyn Read| {
        let mut v = Vec::new();
        let _ = f.take(1 << 20).read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    };
    for fd in [p.stdout.as_raw_fd(), p.stderr.as_raw_fd()] {
        // What it left running may hold them: read what is there.
        let _ = crate::with_raw_fd(fd, |b| {
            nix::fcntl::fcntl(
                b,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
        });
    }
    let stdout = read_all(&mut p.stdout);
    let stderr = read_all(&mut p.stderr);
    let said = stderr.trim().lines().last().unwrap_or("").to_string();
    if !matches!(status, WaitStatus::Exited(_, 0)) {
        return Err(format!(
            "{shown} --upgrade-check {}{}",
            crate::exit::Exit::from_wait(*status).map_or(format!("{status:?}"), |e| e.to_string()),
            if said.is_empty() {
                String::new()
            } else {
                format!(": {}", crate::logtext::value(&said))
            }
        ));
    }
    let line = stdout.lines().next().unwrap_or("").trim();
    let accepted = format!("reads upgrade state {STATE_VERSION}");
    match line
        .strip_prefix("dream ")
        .and_then(|r| r.strip_suffix(&accepted))
    {
        Some(v) => Ok((
            v.trim().to_string(),
            stdout.lines().nth(1).map(str::trim) == Some(super::guard::PREFLIGHT_LINE),
        )),
        None => Err(format!(
            "{shown} --upgrade-check did not say it reads upgrade state {STATE_VERSION} (it said {:?})",
            crate::logtext::value(line)
        )),
    }
}

impl Driver {
    /// `dream upgrade` or SIGUSR2: checks the new program now, and carries
    /// the upgrade out once no reload is in progress.
    pub(super) fn request_upgrade(&mut self, asker: Option<Waiter>, binary: Option<PathBuf>) {
        let refuse = |d: &mut Driver, msg: String| {
            d.log(-1, Note::Upgrade, &format!("upgrade refused: {msg}"));
            if let Some(w) = asker {
                d.answer(w, &control::Answer::failed(msg).to_value());
            }
        };
        if self.upgrade.is_some() || self.preflight.is_some() {
            return refuse(self, "an upgrade is already in progress".into());
        }
        if self.pool.stopping().is_some() {
            return refuse(self, "the supervisor is stopping".into());
        }
        let binary = binary.unwrap_or_else(|| self.exe.clone());
        let state = self.state(asker);
        match start_preflight(&binary, &state, asker) {
            Ok(p) => {
                if let Some(w) = asker
                    && let Some(c) = self.clients.iter_mut().find(|c| c.id == w)
                {
                    c.awaiting += 1;
                }
                self.preflight = Some(p);
            }
            Err(e) => refuse(self, format!("pre-flight failed: {e}")),
        }
    }

    /// The pre-flight's process exited (`reap` saw `pid`): go on with the
    /// upgrade, or refuse it. False if `pid` is not the pre-flight's.
    pub(super) fn preflight_exited(&mut self, pid: i32, status: &WaitStatus) -> bool {
        if self.preflight.as_ref().is_none_or(|p| p.pid != pid) {
            return false;
        }
        let mut p = self.preflight.take().expect("checked");
        let verdict = preflight_verdict(&mut p, status);
        self.after_preflight(p, verdict);
        true
    }

    /// A pre-flight past its limit is killed (its exit, reaped later, is
    /// then nobody's) and the upgrade refused.
    pub(super) fn preflight_if_late(&mut self) {
        if self
            .preflight
            .as_ref()
            .is_none_or(|p| Instant::now() < p.deadline)
        {
            return;
        }
        let p = self.preflight.take().expect("checked");
        let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
        let why = format!(
            "{} --upgrade-check did not finish within {}",
            p.binary.display(),
            crate::fmt_duration(PREFLIGHT_LIMIT)
        );
        self.after_preflight(p, Err(why));
    }

    fn after_preflight(&mut self, p: Preflight, verdict: Result<(String, bool), String>) {
        let (asker, binary) = (p.asker, p.binary);
        let (to_version, guarded) = match verdict {
            Ok(v) => v,
            Err(e) => {
                let msg = format!("pre-flight failed: {e}");
                self.log(-1, Note::Upgrade, &format!("upgrade refused: {msg}"));
                if let Some(w) = asker {
                    self.answer(w, &control::Answer::failed(msg).to_value());
                }
                return;
            }
        };
        self.log(
            0,
            Note::Upgrade,
            &format!(
                "upgrade to {} (dream {to_version}) checked{}",
                binary.display(),
                if self.pool.reloading() || self.pool.reload_pending() {
                    "; waiting for the reload in progress"
                } else {
                    ""
                }
            ),
        );
        self.upgrade = Some(Pending {
            asker,
            binary,
            to_version,
            guarded,
        });
    }

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

    fn state(&self, asker: Option<Waiter>) -> State {
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
fn take_over_refusal(text: &str) -> Result<State, String> {
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
        Err(why) => {
            // Give the state back to the program that wrote it.
            let Some(old) = old_exe.and_then(crate::sys::claim_inherited_fd) else {
                return Err(SuperviseError::Setup(format!(
                    "cannot take over the upgrade ({why}), and the old program is not at hand"
                )));
            };
            let _ = file.rewind();
            let _ = set_cloexec(file.as_raw_fd(), false);
            let _ = set_cloexec(old.as_raw_fd(), false);
            let argv: Vec<OsString> = std::env::args_os().collect();
            let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
            env.push((STATE_FD_ENV.into(), file.as_raw_fd().to_string().into()));
            env.push((OLD_EXE_FD_ENV.into(), old.as_raw_fd().to_string().into()));
            env.push((FALLBACK_ENV.into(), why.clone().into()));
            // The guardian waits for the old program's resume now.
            if let Some(g) = &guard {
                let _ = set_cloexec(g.as_raw_fd(), false);
                env.push((
                    super::guard::GUARD_FD_ENV.into(),
                    g.as_raw_fd().to_string().into(),
                ));
            }
            let err = crate::sys::reexec(Err(old.as_fd()), &argv, &env);
            return Err(SuperviseError::Setup(format!(
                "cannot take over the upgrade ({why}), and cannot go back to the old program: {err}"
            )));
        }
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
    let asker = d.resumed_asker.take();
    match &fallback {
        None => {
            d.upgrades += 1;
            let msg = format!(
                "upgraded in place: dream {} -> {}, pid {}, {} kept, {} upgrade{} so far",
                d.previous_version,
                version(),
                std::process::id(),
                crate::plural(d.workers.len(), "worker"),
                d.upgrades,
                if d.upgrades == 1 { "" } else { "s" }
            );
            d.log(0, Note::Upgrade, &msg);
            if let Some(w) = asker {
                let v = control::Answer {
                    version: Some(version()),
                    previous_version: Some(d.previous_version.clone()),
                    ..control::Answer::done()
                };
                d.answer(w, &v.to_value());
            }
        }
        Some(why) => {
            let msg = format!(
                "upgrade failed: the new program could not take over ({why}); dream {} keeps running",
                version()
            );
            d.log(-1, Note::Upgrade, &msg);
            if let Some(w) = asker {
                d.answer(w, &control::Answer::failed(msg).to_value());
            }
        }
    }
    // Exits and signals from the window: reaped and handled now.
    d.reap();
    d.tell_systemd(Systemd::Ready);
    let result = d.event_loop();
    d.cleanup();
    result.map(|()| d.exit_code)
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
fn adopt(state: State) -> Result<Driver, SuperviseError> {
    crate::logtext::set_json(state.json_logs);
    let claim = |fd: RawFd| -> Result<OwnedFd, SuperviseError> {
        let owned = crate::sys::claim_inherited_fd(fd).ok_or_else(|| {
            SuperviseError::Setup(format!("upgrade state names fd {fd}, which is not open"))
        })?;
        set_cloexec(owned.as_raw_fd(), true)?;
        Ok(owned)
    };
    let sockets = state
        .sockets
        .iter()
        .map(|(fd, name)| Ok(Listener::new(claim(*fd)?, name.clone())))
        .collect::<Result<Vec<_>, SuperviseError>>()?;
    let mut workers = HashMap::new();
    for w in state.workers {
        workers.insert(
            w.pid,
            WorkerIo {
                generation: w.generation,
                index: w.index,
                notify: UnixDatagram::from(claim(w.notify)?),
                stderr: w.stderr.map(claim).transpose()?.map(std::fs::File::from),
                tail: w.tail,
                ready_pipe: w
                    .ready_pipe
                    .map(claim)
                    .transpose()?
                    .map(std::fs::File::from),
            },
        );
    }
    let control = state
        .control
        .map(claim)
        .transpose()?
        .map(UnixListener::from);
    let clients = state
        .clients
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
        .collect::<Result<Vec<_>, SuperviseError>>()?;
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
    let listener_flags = cfg.sockets.iter().map(|l| status_flags(&l.fd)).collect();
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
        listener_flags,
        backlogs,
        backlog_told: None,
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
        previous_version: state.written_by,
        resumed_asker: None,
        metrics,
        scrapers: Vec::new(),
        // Not carried over: what still writes to them gets EPIPE.
        orphaned: Vec::new(),
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
