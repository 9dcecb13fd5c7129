//! The upgrade's pre-flight: `NEW --upgrade-check STATE_VERSION`, with
//! the real state on its stdin, run beside the event loop (its exit is
//! reaped like a worker's, its limit is one more deadline), never inside
//! it; and the new program's side of it, [`upgrade_check`].

use std::os::fd::AsRawFd;

use super::upgrade::{Pending, STATE_VERSION, State, take_over_refusal, version};
use super::*;

/// The longest a pre-flight check may take.
const PREFLIGHT_LIMIT: Duration = Duration::from_secs(10);
/// The largest state a pre-flight reads.
const MAX_STATE: usize = 64 << 20;

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
        if let Some(c) = &self.canary {
            return refuse(
                self,
                format!(
                    "canary generation {} is being judged or drained; upgrade once it is gone",
                    c.generation
                ),
            );
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
}
