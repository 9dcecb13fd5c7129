//! An exclusive lock on a file, with a record of who holds it.
//!
//! `flock(2)` is released by the kernel when the last descriptor closes, so
//! a killed holder never leaves a stale lock. The file's contents say who
//! holds it (pid, user, host, since when, what for) so that the loser of a
//! race can name the winner. The contents are informational only: the
//! kernel lock is the truth, and stale contents of a free lock are ignored.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// Who holds a lock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub user: String,
    pub host: String,
    /// RFC 3339 UTC time the lock was taken.
    pub since: String,
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
}

impl Holder {
    /// A record for this process, taken now.
    pub fn me(command: impl Into<String>) -> Holder {
        let uid = nix::unistd::getuid();
        let user = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        Holder {
            pid: std::process::id(),
            user,
            host: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            since: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            command: command.into(),
            release: None,
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} ({}@{}, since {}",
            self.pid, self.user, self.host, self.since
        )?;
        if !self.command.is_empty() {
            write!(f, ", {}", self.command)?;
        }
        if let Some(r) = &self.release {
            write!(f, ", release {r}")?;
        }
        write!(f, ")")
    }
}

/// How long to wait for a held lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    No,
    For(Duration),
    Forever,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot lock {}: held by {}", .path.display(), holder_text(.holder))]
    Held {
        path: PathBuf,
        holder: Option<Box<Holder>>,
        waited: Option<Duration>,
    },
    #[error("cannot lock {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn holder_text(h: &Option<Box<Holder>>) -> String {
    h.as_ref()
        .map(|h| h.to_string())
        .unwrap_or_else(|| "another process (no holder record)".into())
}

/// A held lock; released on drop (or when the process ends).
#[derive(Debug)]
pub struct Lock {
    file: Flock<File>,
    path: PathBuf,
}

impl std::os::fd::AsFd for Lock {
    /// The locked file, e.g. for [`crate::sockets::spawn::Command::keep_fd`], so that
    /// a program dream execs keeps holding the lock (setlock's way).
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Lock {
    /// Takes the lock on `path` (created if missing) and records `holder`.
    pub fn acquire(path: &Path, holder: &Holder, wait: Wait) -> Result<Lock, LockError> {
        let io_err = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io_err)?;
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        let locked = loop {
            let arg = if wait == Wait::Forever {
                FlockArg::LockExclusive
            } else {
                FlockArg::LockExclusiveNonblock
            };
            match Flock::lock(file, arg) {
                Ok(l) => break l,
                Err((f, nix::errno::Errno::EINTR)) => file = f,
                Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
                    let deadline = match wait {
                        Wait::For(d) => d,
                        _ => Duration::ZERO,
                    };
                    let elapsed = start.elapsed();
                    if elapsed >= deadline {
                        return Err(LockError::Held {
                            path: path.to_path_buf(),
                            holder: read_holder(&mut f).map(Box::new),
                            waited: (wait != Wait::No).then_some(elapsed),
                        });
                    }
                    // flock has no timed wait; poll with a growing pause.
                    std::thread::sleep(pause.min(deadline - elapsed));
                    pause = (pause * 2).min(Duration::from_millis(200));
                    file = f;
                }
                Err((_, e)) => return Err(io_err(e.into())),
            }
        };
        let mut lock = Lock {
            file: locked,
            path: path.to_path_buf(),
        };
        lock.record(holder).map_err(io_err)?;
        Ok(lock)
    }

    /// Rewrites the holder record (e.g. once the release id is known).
    pub fn record(&mut self, holder: &Holder) -> io::Result<()> {
        let mut line = serde_json::to_string(holder).map_err(io::Error::other)?;
        line.push('\n');
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(line.as_bytes())?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The holder record of a lock file, if it parses.
pub fn read_holder(file: &mut File) -> Option<Holder> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.take(64 * 1024).read_to_string(&mut s).ok()?;
    serde_json::from_str(s.lines().next()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_sees_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let mut me = Holder::me("test one");
        me.release = Some("r1".into());
        let held = Lock::acquire(&path, &me, Wait::No).unwrap();
        // A second open file description contends even within one process.
        let err = Lock::acquire(&path, &Holder::me("test two"), Wait::No).unwrap_err();
        match &err {
            LockError::Held { holder, .. } => assert_eq!(holder.as_deref(), Some(&me)),
            other => panic!("{other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("release r1"), "{msg}");
        drop(held);
        Lock::acquire(&path, &Holder::me("test three"), Wait::No).unwrap();
    }

    #[test]
    fn bounded_wait_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let _held = Lock::acquire(&path, &Holder::me("a"), Wait::No).unwrap();
        let err = Lock::acquire(
            &path,
            &Holder::me("b"),
            Wait::For(Duration::from_millis(50)),
        );
        assert!(matches!(
            err,
            Err(LockError::Held {
                waited: Some(_),
                ..
            })
        ));
    }
}
