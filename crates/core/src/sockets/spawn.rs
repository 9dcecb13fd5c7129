//! Starting programs with an exact descriptor layout.
//!
//! [`Command`] is the one way dream starts a worker, a build or a chained
//! program. It hands listening sockets down both ways at once:
//!
//! * the first socket as fd 0 (inetd, daemontools, the seed's `tcplisten`);
//! * all sockets at fds 3.. with `LISTEN_FDS`, `LISTEN_FDNAMES` and
//!   `LISTEN_PID` set to the new process's own pid (systemd's protocol).
//!
//! Besides those, the new process gets fds 1 and 2 (inherited, or
//! redirected) and nothing else: every descriptor dream opens is
//! close-on-exec from birth, and any others dream itself inherited are
//! marked close-on-exec in the child just before `execve`.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

use crate::protocol::{LISTEN_FDNAMES, LISTEN_FDS, LISTEN_PID, Listener, SD_LISTEN_FDS_START};
use crate::sys::ExecImage;

/// A program to start, and the exact process state it starts in.
pub struct Command<'a> {
    program: OsString,
    args: Vec<OsString>,
    cwd: Option<PathBuf>,
    env: Vec<(OsString, Option<OsString>)>,
    sockets: Vec<&'a Listener>,
    stdin: Option<BorrowedFd<'a>>,
    stdout: Option<BorrowedFd<'a>>,
    stderr: Option<BorrowedFd<'a>>,
    keep: Vec<BorrowedFd<'a>>,
    extra: Vec<(BorrowedFd<'a>, RawFd)>,
    process_group: bool,
    parent_death_signal: Option<Signal>,
    ids: Option<(u32, u32)>,
    background: bool,
    cgroup: Option<PathBuf>,
}

/// What went wrong starting a program.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{program}: command not found (searched PATH)")]
    NotFound { program: String },
    #[error("{program}: {source}")]
    Exec {
        program: String,
        #[source]
        source: io::Error,
    },
}

impl SpawnError {
    /// The underlying OS error, if any.
    pub fn io(&self) -> Option<&io::Error> {
        match self {
            SpawnError::NotFound { .. } => None,
            SpawnError::Exec { source, .. } => Some(source),
        }
    }
}

impl<'a> Command<'a> {
    /// `program` is looked up in `PATH` unless it contains a `/`; a relative
    /// path with a `/` (`./bin/server`) is resolved in the new cwd.
    pub fn new(program: impl Into<OsString>) -> Command<'a> {
        Command {
            program: program.into(),
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
            sockets: Vec::new(),
            stdin: None,
            stdout: None,
            stderr: None,
            keep: Vec::new(),
            extra: Vec::new(),
            process_group: false,
            parent_death_signal: None,
            ids: None,
            background: false,
            cgroup: None,
        }
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn cwd(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.cwd = Some(dir.into());
        self
    }

    pub fn env(&mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> &mut Self {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    pub fn env_remove(&mut self, key: impl Into<OsString>) -> &mut Self {
        self.env.push((key.into(), None));
        self
    }

    /// Hands these listening sockets down (fd 0 and fds 3..). With none,
    /// any `LISTEN_*` variables in dream's own environment are removed from
    /// the child's, so a stale protocol never leaks into it.
    pub fn sockets(&mut self, sockets: impl IntoIterator<Item = &'a Listener>) -> &mut Self {
        self.sockets = sockets.into_iter().collect();
        self
    }

    /// fd 0 for a child that gets no sockets (default: dream's own fd 0).
    pub fn stdin(&mut self, fd: BorrowedFd<'a>) -> &mut Self {
        self.stdin = Some(fd);
        self
    }

    /// Keep this descriptor open across exec, at the same number (e.g. a
    /// lock that the program must hold). Everything not named is closed.
    pub fn keep_fd(&mut self, fd: BorrowedFd<'a>) -> &mut Self {
        self.keep.push(fd);
        self
    }

    /// The program gets `fd` as descriptor `target` (above the sockets).
    pub fn map_fd(&mut self, fd: BorrowedFd<'a>, target: RawFd) -> &mut Self {
        self.extra.push((fd, target));
        self
    }

    pub fn stdout(&mut self, fd: BorrowedFd<'a>) -> &mut Self {
        self.stdout = Some(fd);
        self
    }

    pub fn stderr(&mut self, fd: BorrowedFd<'a>) -> &mut Self {
        self.stderr = Some(fd);
        self
    }

    /// Put the child in a process group of its own (its pid), so that a
    /// signal to the group reaches everything it forks.
    pub fn process_group(&mut self, yes: bool) -> &mut Self {
        self.process_group = yes;
        self
    }

    /// Signal the child receives when dream dies (`PR_SET_PDEATHSIG`).
    pub fn parent_death_signal(&mut self, signal: Signal) -> &mut Self {
        self.parent_death_signal = Some(signal);
        self
    }

    /// Start the program under `SCHED_IDLE`: it runs only on CPU time no
    /// one else wants, until `sys::foreground` puts it back.
    pub fn background(&mut self, yes: bool) -> &mut Self {
        self.background = yes;
        self
    }

    /// Join the cgroup whose `cgroup.procs` this is before the exec.
    pub fn cgroup(&mut self, procs: &Path) -> &mut Self {
        self.cgroup = Some(procs.to_path_buf());
        self
    }

    /// Run the program as this uid and gid, with no supplementary groups.
    pub fn user(&mut self, uid: u32, gid: u32) -> &mut Self {
        self.ids = Some((uid, gid));
        self
    }

    /// Starts the program; returns its pid once it has exec'd.
    pub fn spawn(&self) -> Result<nix::unistd::Pid, SpawnError> {
        let mut image = self.image()?;
        image
            .spawn()
            .map(nix::unistd::Pid::from_raw)
            .map_err(|source| self.exec_error(source))
    }

    /// Replaces dream with the program. Returns only on failure.
    pub fn exec(&self) -> SpawnError {
        match self.image() {
            Ok(mut image) => {
                let source = image.exec();
                self.exec_error(source)
            }
            Err(e) => e,
        }
    }

    fn exec_error(&self, source: io::Error) -> SpawnError {
        let program = self.program.to_string_lossy().into_owned();
        if source.kind() == io::ErrorKind::NotFound {
            if let Some(dir) = &self.cwd {
                return SpawnError::Exec {
                    program,
                    source: io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no such file (looked in {})", dir.display()),
                    ),
                };
            }
        }
        SpawnError::Exec { program, source }
    }

    fn image(&self) -> Result<ExecImage, SpawnError> {
        let path = self.resolve_program()?;
        let mut argv: Vec<&OsStr> = vec![self.program.as_os_str()];
        argv.extend(self.args.iter().map(|a| a.as_os_str()));

        let env = self.environment();
        let mut image = ExecImage::new(path.as_os_str(), &argv, &env, !self.sockets.is_empty())
            .map_err(|source| SpawnError::Exec {
                program: self.program.to_string_lossy().into_owned(),
                source,
            })?;
        if let Some(dir) = &self.cwd {
            image
                .set_cwd(dir.as_os_str())
                .map_err(|source| SpawnError::Exec {
                    program: self.program.to_string_lossy().into_owned(),
                    source,
                })?;
        }
        if let Some(first) = self.sockets.first() {
            image.map_fd(first.fd.as_fd(), 0);
        } else if let Some(fd) = self.stdin {
            image.map_fd(fd, 0);
        }
        if let Some(fd) = self.stdout {
            image.map_fd(fd, 1);
        }
        if let Some(fd) = self.stderr {
            image.map_fd(fd, 2);
        }
        for (i, s) in self.sockets.iter().enumerate() {
            image.map_fd(s.fd.as_fd(), SD_LISTEN_FDS_START + i as RawFd);
        }
        for fd in &self.keep {
            use std::os::fd::AsRawFd;
            image.map_fd(*fd, fd.as_raw_fd());
        }
        for (fd, target) in &self.extra {
            image.map_fd(*fd, *target);
        }
        image.set_new_process_group(self.process_group);
        image.set_parent_death_signal(self.parent_death_signal);
        image.set_background(self.background);
        if let Some(procs) = &self.cgroup {
            image.set_cgroup(procs).map_err(|source| SpawnError::Exec {
                program: self.program.to_string_lossy().into_owned(),
                source,
            })?;
        }
        if let Some((uid, gid)) = self.ids {
            image.set_ids(uid, gid);
        }
        Ok(image)
    }

    fn environment(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let protocol = [LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES];
        let mut env: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os()
            .filter(|(k, _)| !protocol.iter().any(|p| k == OsStr::new(p)))
            .map(|(k, v)| (k.into_vec(), v.into_vec()))
            .collect();
        for (k, v) in &self.env {
            env.retain(|(ek, _)| ek.as_slice() != k.as_bytes());
            if let Some(v) = v {
                env.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
            }
        }
        if !self.sockets.is_empty() {
            let names: Vec<&str> = self.sockets.iter().map(|s| s.name.as_str()).collect();
            env.push((
                LISTEN_FDS.into(),
                self.sockets.len().to_string().into_bytes(),
            ));
            env.push((LISTEN_FDNAMES.into(), names.join(":").into_bytes()));
            // LISTEN_PID is added by the exec image with the child's own pid.
        }
        env
    }

    fn resolve_program(&self) -> Result<PathBuf, SpawnError> {
        let program = Path::new(&self.program);
        if self.program.as_bytes().contains(&b'/') {
            return Ok(program.to_path_buf());
        }
        let path =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(program);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
        Err(SpawnError::NotFound {
            program: self.program.to_string_lossy().into_owned(),
        })
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
