//! How a process ended, as a value: the reaper produces it, the pool and
//! the deploy decide by it, and only the log turns it into words.

use std::fmt;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

/// A process's end: its exit code, or the signal that killed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `_exit(code)`.
    Code(i32),
    /// Killed by signal number `signal`; `core` when it dumped core.
    Signal { signal: i32, core: bool },
}

impl Exit {
    /// A `waitpid` result that is an end (not a stop or a continue).
    pub fn from_wait(status: WaitStatus) -> Option<Exit> {
        match status {
            WaitStatus::Exited(_, code) => Some(Exit::Code(code)),
            WaitStatus::Signaled(_, sig, core) => Some(Exit::Signal {
                signal: sig as i32,
                core,
            }),
            _ => None,
        }
    }

    /// A std child's status.
    pub fn from_std(status: std::process::ExitStatus) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (_, Some(signal)) => Exit::Signal {
                signal,
                core: status.core_dumped(),
            },
            // Neither a code nor a signal is what a stopped child reports;
            // wait(2) gives neither for an end.
            _ => Exit::Code(-1),
        }
    }

    /// Exited with status 0.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

/// `exited with status 3`, `was killed by SIGKILL`,
/// `was killed by SIGSEGV (core dumped)`.
impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Exit::Code(code) => write!(f, "exited with status {code}"),
            Exit::Signal { signal, core } => {
                match Signal::try_from(signal) {
                    Ok(sig) => write!(f, "was killed by {}", sig.as_str())?,
                    Err(_) => write!(f, "was killed by signal {signal}")?,
                }
                if core {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn an_end_reads_the_same_from_waitpid_and_from_std() {
        let pid = nix::unistd::Pid::from_raw(1);
        for (wait, raw, text) in [
            (WaitStatus::Exited(pid, 0), 0, "exited with status 0"),
            (WaitStatus::Exited(pid, 3), 3 << 8, "exited with status 3"),
            (
                WaitStatus::Signaled(pid, Signal::SIGKILL, false),
                9,
                "was killed by SIGKILL",
            ),
            (
                WaitStatus::Signaled(pid, Signal::SIGSEGV, true),
                11 | 0x80,
                "was killed by SIGSEGV (core dumped)",
            ),
        ] {
            let a = Exit::from_wait(wait).expect("an end");
            let b = Exit::from_std(std::process::ExitStatus::from_raw(raw));
            assert_eq!(a, b, "{text}");
            assert_eq!(a.to_string(), text);
        }
        assert!(Exit::Code(0).success());
        assert!(!Exit::Code(1).success());
        assert!(
            !Exit::Signal {
                signal: 15,
                core: false
            }
            .success()
        );
        assert_eq!(Exit::from_wait(WaitStatus::StillAlive), None, "not an end");
    }
}
