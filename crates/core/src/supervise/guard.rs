//! The upgrade's guardian: what keeps the site up when the new program
//! dies (or hangs) between the exec and its resume.
//!
//! Just before the exec the supervisor starts the guardian: its own
//! program again (`/proc/self/exe --upgrade-guard`), holding a copy of
//! every listening socket, a copy of the connection of the client that
//! asked for the upgrade, and the read end of a pipe whose write end
//! crosses the exec. Whichever program resumes (the new one, or the old
//! one after a hand-back) writes one byte on the pipe and closes it: the
//! guardian exits. The same byte stands it down when the exec itself
//! failed.
//!
//! If the pipe ends without the byte (the supervisor process is gone: a
//! crash, an exit, a kill) or no byte comes within [`LIMIT`] (the
//! supervisor is killed first, through a pidfd), the guardian answers the
//! client that the upgrade failed and execs the old program with the
//! original command line and the sockets as `LISTEN_FDS` (which `dream
//! serve` takes by name, as after systemd's fd store): a new supervisor
//! on the same sockets, starting workers on `current`. The dead
//! supervisor's workers had the drain signal when it died (their
//! parent-death signal): they answer what they hold and exit, and the new
//! supervisor kills what is still there at its drain deadline.
//! Connections that arrive meanwhile wait in the sockets' backlog, and
//! none is refused.
//!
//! Only a new program that says it knows the guardian (the pre-flight's
//! second line) gets one: a program that does not would keep the pipe
//! open for its whole life, and its later exit would look like a crash.
//! Under systemd there is none either: the unit's fd store and
//! `Restart=` do this, and a guardian could not become the unit's main
//! process.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::protocol::Listener;

/// The write end of the guardian's pipe, in the new program's environment.
pub(super) const GUARD_FD_ENV: &str = "DREAM_UPGRADE_GUARD_FD";
/// Why the guardian took over, in the environment of the program it
/// starts (logged once, then removed).
const TOOK_OVER_ENV: &str = "DREAM_UPGRADE_TOOK_OVER";
/// What the pre-flight prints, on its second line, when the program
/// writes the byte the guardian waits for.
pub(super) const PREFLIGHT_LINE: &str = "keeps the upgrade guardian's pipe";
/// The longest the guardian waits for the new program to resume.
const LIMIT: Duration = Duration::from_secs(15);
/// The byte that stands the guardian down.
const STAND_DOWN: u8 = b'r';

/// The guardian's limit (a test can shorten it).
fn limit() -> Duration {
    #[cfg(feature = "test-hooks")]
    if let Some(ms) = std::env::var("DREAM_TEST_GUARD_LIMIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    LIMIT
}

/// Starts the guardian of an upgrade about to exec. Returns the pipe's
/// write end (close-on-exec: the caller clears that for the exec).
pub(super) fn start(
    sockets: &[Listener],
    asker: Option<BorrowedFd<'_>>,
    argv: &[OsString],
) -> io::Result<OwnedFd> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let pipe_at = crate::protocol::SD_LISTEN_FDS_START + sockets.len() as RawFd;
    let asker_at = pipe_at + 1;
    let mut cmd = crate::sockets::spawn::Command::new("/proc/self/exe");
    cmd.args([
        OsString::from("--upgrade-guard"),
        std::process::id().to_string().into(),
        limit().as_millis().to_string().into(),
        pipe_at.to_string().into(),
        asker
            .map_or("-".to_string(), |_| asker_at.to_string())
            .into(),
        if crate::logtext::json() {
            "json"
        } else {
            "text"
        }
        .into(),
        "--".into(),
    ])
    .args(argv.iter().cloned())
    .sockets(sockets)
    .map_fd(read.as_fd(), pipe_at);
    if let Some(fd) = asker {
        cmd.map_fd(fd, asker_at);
    }
    cmd.spawn().map_err(|e| match e {
        crate::sockets::spawn::SpawnError::Exec { source, .. } => source,
        other => io::Error::other(other.to_string()),
    })?;
    Ok(write)
}

/// Tells the guardian it is not needed (the program resumed, or the exec
/// failed and the old program goes on).
pub(super) fn stand_down(pipe: OwnedFd) {
    let _ = std::fs::File::from(pipe).write_all(&[STAND_DOWN]);
}

/// The write end named in the environment of a resuming program, claimed
/// (the variable is removed: workers must not see it).
pub(super) fn inherited() -> Option<OwnedFd> {
    let fd = std::env::var(GUARD_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok());
    crate::sys::remove_env_vars(&[GUARD_FD_ENV]);
    let fd = fd.and_then(crate::sys::claim_inherited_fd)?;
    let _ = nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Some(fd)
}

/// Whether this process was started by a guardian taking over (its
/// sockets are the ones the guardian kept).
pub fn taking_over() -> bool {
    std::env::var_os(TOOK_OVER_ENV).is_some()
}

/// Why a guardian took over, for the supervisor it started to log once.
pub(super) fn took_over() -> Option<String> {
    let why = std::env::var(TOOK_OVER_ENV).ok();
    crate::sys::remove_env_vars(&[TOOK_OVER_ENV]);
    why
}

/// How the wait for the resume ended.
enum Waited {
    StoodDown,
    Ended,
    Late,
}

fn wait(pipe: &OwnedFd, until: Instant) -> Waited {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Waited::Late;
        }
        let ms = u16::try_from(left.as_millis().clamp(1, u16::MAX as u128)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return Waited::Ended,
            Ok(_) => {
                let mut byte = [0u8; 1];
                let mut file = std::fs::File::from(pipe.try_clone().expect("dup the pipe"));
                return match file.read(&mut byte) {
                    Ok(1) if byte[0] == STAND_DOWN => Waited::StoodDown,
                    _ => Waited::Ended,
                };
            }
        }
    }
}

/// `dream --upgrade-guard PID LIMIT_MS PIPE_FD ASKER_FD|- json|text --
/// ARGV...`: the guardian's whole life. Returns an exit code when it is
/// not needed or cannot act; otherwise it becomes the new supervisor.
pub fn guard(args: &[OsString]) -> i32 {
    let text: Vec<String> = args
        .iter()
        .take(6)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let argv: Vec<OsString> = args.iter().skip(6).cloned().collect();
    let parsed = (|| {
        let pid: libc::pid_t = text.first()?.parse().ok()?;
        let limit = Duration::from_millis(text.get(1)?.parse().ok()?);
        let pipe: RawFd = text.get(2)?.parse().ok()?;
        let asker: Option<RawFd> = match text.get(3)?.as_str() {
            "-" => None,
            n => Some(n.parse().ok()?),
        };
        let json = text.get(4)? == "json";
        (text.get(5)? == "--" && !argv.is_empty()).then_some((pid, limit, pipe, asker, json))
    })();
    let Some((pid, limit, pipe, asker, json)) = parsed else {
        eprintln!(
            "dream --upgrade-guard: started by hand? it is dream's own (see `dream upgrade`)"
        );
        return 1;
    };
    crate::logtext::set_json(json);
    let Some(pipe) = crate::sys::claim_inherited_fd(pipe) else {
        return 1;
    };
    let asker = asker.and_then(crate::sys::claim_inherited_fd);
    let started = Instant::now();
    // The supervisor, by a descriptor that cannot name another process.
    let parent = (nix::unistd::getppid().as_raw() == pid)
        .then(|| crate::sys::pidfd_open(pid).ok())
        .flatten();
    let why = match wait(&pipe, started + limit) {
        Waited::StoodDown => return 0,
        Waited::Ended => "the new program ended before it resumed".to_string(),
        Waited::Late => {
            if let Some(p) = &parent {
                let _ = crate::sys::pidfd_kill(p.as_fd(), nix::sys::signal::Signal::SIGKILL);
            }
            // Its end closes the pipe; a few seconds at most.
            if let Waited::StoodDown = wait(&pipe, Instant::now() + Duration::from_secs(5)) {
                return 0;
            }
            format!(
                "the new program did not resume within {}; it was killed",
                crate::fmt_duration(limit)
            )
        }
    };
    drop(pipe);
    let msg = format!(
        "upgrade failed: {why}; dream {} takes over with the same sockets (pid {})",
        super::version(),
        std::process::id()
    );
    say(&msg);
    if let Some(a) = asker {
        let mut line = super::control::Answer::failed(msg.clone())
            .to_value()
            .to_string();
        line.push('\n');
        let _ = std::fs::File::from(a).write_all(line.as_bytes());
    }
    // fd 0 held a copy of the first socket: the supervisor gets /dev/null.
    if let (Ok(null), Some(mut zero)) = (
        std::fs::File::open("/dev/null"),
        crate::sys::claim_inherited_fd(0),
    ) {
        let _ = nix::unistd::dup2(&null, &mut zero);
        // fd 0 stays open (now /dev/null) for the program exec'd below.
        std::mem::forget(zero);
    }
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    env.push((TOOK_OVER_ENV.into(), why.into()));
    let err = crate::sys::reexec(Ok(std::path::Path::new("/proc/self/exe")), &argv, &env);
    say(&format!(
        "the upgrade's guardian cannot start dream again: {err}"
    ));
    1
}

fn say(msg: &str) {
    crate::logtext::say_as(
        crate::logtext::Level::Warn,
        super::Note::Upgrade.as_str(),
        "guardian",
        msg,
        &[],
    );
}
