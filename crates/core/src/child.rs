//! The one way dream runs a program it does not own during a deploy: a
//! build, a hook, git. Each child gets its own process group, an empty
//! signal mask and default dispositions, and the parent-death signal
//! ([`crate::sys::child_defaults`]); its output is read as lines (shown
//! and the tail kept) or captured; its end is the exit of the program
//! itself (a pidfd), not the end of its output, so a background process
//! that keeps the pipe open never stalls the deploy; and once it has
//! exited, whatever it left running in its group is killed. An INT, TERM
//! or HUP read from the deploy's signalfd, or the deadline, ends the whole
//! group.

use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::signals::Signals;

/// Where the process groups of running children are recorded, while a
/// [`Recording`] lives.
static RECORD: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

/// While this lives, every child's process group is recorded in a
/// directory (a file per group: the deploy's pid and the group leader's
/// start time), removed when the child has ended. A deploy killed with
/// `-9` leaves its records, and the next deploy ends those groups
/// ([`end_leftovers`]) before it touches anything.
pub struct Recording;

impl Recording {
    pub fn start(dir: std::path::PathBuf) -> Recording {
        let _ = std::fs::create_dir_all(&dir);
        *RECORD.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir);
        Recording
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        *RECORD.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// A process's process group and start time (clock ticks since boot),
/// from `/proc/PID/stat`.
fn group_and_start(pid: i32) -> Option<(i32, u64)> {
    let fields = crate::proc_stat(pid)?;
    // After the name: state, ppid, pgrp (3rd) … starttime (20th).
    Some((fields.get(2)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// Ends what children of earlier deploys left running: every process of a
/// recorded group that started no earlier than the group's leader (so a
/// reused id is never mistaken for it). Call with the deploy lock held
/// (the deploys that recorded them are then gone). Returns the groups.
pub fn end_leftovers(dir: &std::path::Path) -> Vec<String> {
    let mut ended = Vec::new();
    let Ok(records) = std::fs::read_dir(dir) else {
        return ended;
    };
    let procs: Vec<(i32, i32, u64)> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|pid| group_and_start(pid).map(|(g, t)| (pid, g, t)))
                .collect()
        })
        .unwrap_or_default();
    for r in records.flatten() {
        let name = r.file_name().to_string_lossy().into_owned();
        let since = std::fs::read_to_string(r.path())
            .ok()
            .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok());
        if let (Ok(group), Some(since)) = (name.parse::<i32>(), since) {
            let members: Vec<i32> = procs
                .iter()
                .filter(|(_, g, t)| *g == group && *t >= since)
                .map(|(pid, _, _)| *pid)
                .collect();
            for pid in &members {
                let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            if !members.is_empty() {
                ended.push(format!("group {group} ({} processes)", members.len()));
            }
        }
        let _ = std::fs::remove_file(r.path());
    }
    ended
}

/// The record of one child's group, removed when dropped.
struct Recorded(Option<std::path::PathBuf>);

impl Recorded {
    fn new(leader: i32) -> Recorded {
        let dir = RECORD.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Recorded(dir.and_then(|d| {
            let (_, start) = group_and_start(leader)?;
            let path = d.join(leader.to_string());
            std::fs::write(&path, format!("{} {start}\n", std::process::id())).ok()?;
            Some(path)
        }))
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What to do with the child's output.
pub enum Output<'a> {
    /// stdout and stderr together, line by line: each line to `show`, the
    /// last `tail` lines kept.
    Lines {
        show: &'a mut dyn FnMut(&str),
        tail: usize,
    },
    /// stdout captured (at most `limit` bytes), stderr's last lines kept.
    Capture { limit: usize },
}

/// How the child ended.
#[derive(Debug)]
pub enum Ended {
    Exited {
        status: crate::exit::Exit,
        /// What it printed last (stderr, when stdout was captured).
        tail: Vec<String>,
        /// stdout, when captured.
        stdout: Vec<u8>,
    },
    /// Killed at the deadline.
    TimedOut { tail: Vec<String> },
    /// The deploy was told to stop: the group was ended.
    Interrupted(Signal),
}

/// One line of output, escaped and bounded as every logged value.
fn line_text(bytes: &[u8]) -> String {
    crate::logtext::bounded(&String::from_utf8_lossy(bytes), 4096)
}

/// Runs `cmd` to its end (see the module). `stdin` is written to the
/// child's input, which is then closed (none: `/dev/null`).
pub fn run(
    cmd: Command,
    stdin: Option<&[u8]>,
    mut output: Output<'_>,
    deadline: Option<Instant>,
    mut signals: Option<&mut Signals>,
) -> io::Result<Ended> {
    let Started {
        mut child,
        group,
        exited,
        mut lines,
        mut captured,
        _recorded,
    } = start(cmd, stdin, matches!(output, Output::Capture { .. }))?;
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut partial = Vec::new();
    let mut stdout = Vec::new();
    let (mut lines_open, mut captured_open) = (true, captured.is_some());
    let (keep, limit) = match &output {
        Output::Lines { tail, .. } => (*tail, 0),
        Output::Capture { limit } => (10, *limit),
    };
    let mut line = |bytes: &[u8], tail: &mut std::collections::VecDeque<String>| {
        let text = line_text(bytes);
        if let Output::Lines { show, .. } = &mut output {
            show(&text);
        }
        if tail.len() == keep {
            tail.pop_front();
        }
        tail.push_back(text);
    };
    let ended = loop {
        let Some(Woken {
            child_done,
            lines_ready,
            captured_ready,
            signalled,
            nothing,
        }) = wait(
            exited.as_fd(),
            lines_open.then(|| lines.as_fd()),
            captured
                .as_ref()
                .filter(|_| captured_open)
                .map(|c| c.as_fd()),
            signals.as_deref().map(|s| s.as_fd()),
            deadline,
        )?
        else {
            continue;
        };
        if nothing && deadline.is_some_and(|d| Instant::now() >= d) {
            end_group(group, &exited, Duration::ZERO);
            let _ = child.wait();
            break Ended::TimedOut {
                tail: tail.into_iter().collect(),
            };
        }
        if signalled
            && let Some(sig) = signals
                .as_deref_mut()
                .and_then(|s| s.try_next().ok().flatten())
        {
            end_group(group, &exited, Duration::from_secs(2));
            let _ = child.wait();
            break Ended::Interrupted(sig);
        }
        if lines_ready {
            lines_open = read_lines(&mut lines, &mut partial, &mut tail, &mut line)?;
        }
        if captured_ready && let Some(c) = &mut captured {
            captured_open = read_some(c, &mut stdout, limit)?;
        }
        if child_done {
            // What it wrote before it exited; then whatever it left
            // running in its group goes.
            if lines_open {
                set_nonblocking(&lines);
                while let Ok(true) = read_lines(&mut lines, &mut partial, &mut tail, &mut line) {}
            }
            if let Some(c) = captured.as_mut().filter(|_| captured_open) {
                set_nonblocking(c);
                while let Ok(true) = read_some(c, &mut stdout, limit) {}
            }
            let _ = killpg(group, Signal::SIGKILL);
            let status = child.wait()?;
            if !partial.is_empty() {
                let rest = std::mem::take(&mut partial);
                line(&rest, &mut tail);
            }
            break Ended::Exited {
                status: crate::exit::Exit::from_std(status),
                tail: tail.into_iter().collect(),
                stdout,
            };
        }
    };
    Ok(ended)
}

/// What ended one wait of [`run`]'s: the child's exit, output on its
/// pipes, a signal to the deploy, or `nothing` (the deadline, perhaps).
struct Woken {
    child_done: bool,
    lines_ready: bool,
    captured_ready: bool,
    signalled: bool,
    nothing: bool,
}

/// Waits until the child exits, a pipe that is still open has something,
/// a signal comes or the deadline passes; `None` when interrupted (EINTR).
fn wait(
    exited: std::os::fd::BorrowedFd<'_>,
    lines: Option<std::os::fd::BorrowedFd<'_>>,
    captured: Option<std::os::fd::BorrowedFd<'_>>,
    signals: Option<std::os::fd::BorrowedFd<'_>>,
    deadline: Option<Instant>,
) -> io::Result<Option<Woken>> {
    fn at<'a>(fd: Option<std::os::fd::BorrowedFd<'a>>, fds: &mut Vec<PollFd<'a>>) -> Option<usize> {
        fd.map(|fd| {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
            fds.len() - 1
        })
    }
    let mut fds = vec![PollFd::new(exited, PollFlags::POLLIN)];
    let lines_at = at(lines, &mut fds);
    let captured_at = at(captured, &mut fds);
    let signals_at = at(signals, &mut fds);
    let n = match poll(&mut fds, crate::signals::timeout_until(deadline)) {
        Ok(n) => n,
        Err(nix::errno::Errno::EINTR) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let ready = |i: Option<usize>| {
        i.and_then(|i| fds[i].revents())
            .is_some_and(|r| !r.is_empty())
    };
    Ok(Some(Woken {
        child_done: ready(Some(0)),
        lines_ready: ready(lines_at),
        captured_ready: ready(captured_at),
        signalled: ready(signals_at),
        nothing: n == 0,
    }))
}

/// A child just started: its pipes' read ends (stderr, and stdout with it
/// unless captured apart), a pidfd that says when it exits, and its group
/// recorded in `.dream/children/` while it runs.
struct Started {
    child: std::process::Child,
    group: Pid,
    exited: OwnedFd,
    lines: std::fs::File,
    captured: Option<std::fs::File>,
    _recorded: Recorded,
}

/// Starts `cmd` in its own process group with default signal handling,
/// and hands it `stdin` (not waited for if it does not read).
fn start(mut cmd: Command, stdin: Option<&[u8]>, capture: bool) -> io::Result<Started> {
    use std::os::unix::process::CommandExt;
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (out_rd, out_wr) = if capture {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        (Some(r), Stdio::from(w))
    } else {
        (None, Stdio::from(wr.try_clone()?))
    };
    cmd.stdout(out_wr)
        .stderr(wr)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .process_group(0);
    crate::sys::child_defaults(&mut cmd);
    let mut child = cmd.spawn()?;
    // The pipes' write ends live only in the child (and what it starts).
    drop(cmd);
    let group = Pid::from_raw(child.id() as i32);
    let recorded = Recorded::new(child.id() as i32);
    let exited = crate::sys::pidfd_open(child.id() as i32)?;
    if let (Some(mut input), Some(bytes)) = (child.stdin.take(), stdin) {
        use std::io::Write;
        // A child that does not read its input is not waited for.
        let _ = input.write_all(bytes);
    }
    Ok(Started {
        child,
        group,
        exited,
        lines: std::fs::File::from(rd),
        captured: out_rd.map(std::fs::File::from),
        _recorded: recorded,
    })
}

/// TERM to the whole group, up to `grace` for the leader to exit, then
/// KILL to the group.
fn end_group(group: Pid, exited: &OwnedFd, grace: Duration) {
    if !grace.is_zero() {
        let _ = killpg(group, Signal::SIGTERM);
        let mut fds = [PollFd::new(exited.as_fd(), PollFlags::POLLIN)];
        let _ = poll(
            &mut fds,
            crate::signals::timeout_until(Some(Instant::now() + grace)),
        );
    }
    let _ = killpg(group, Signal::SIGKILL);
}

fn set_nonblocking(f: &std::fs::File) {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let _ = fcntl(f, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
}

/// Reads what is there, handing out whole lines; false at EOF (or, when
/// non-blocking, when nothing more is there).
fn read_lines(
    f: &mut std::fs::File,
    partial: &mut Vec<u8>,
    tail: &mut std::collections::VecDeque<String>,
    line: &mut impl FnMut(&[u8], &mut std::collections::VecDeque<String>),
) -> io::Result<bool> {
    let mut buf = [0u8; 8192];
    match f.read(&mut buf) {
        Ok(0) => Ok(false),
        Ok(n) => {
            partial.extend_from_slice(&buf[..n]);
            while let Some(i) = partial.iter().position(|b| *b == b'\n') {
                let l: Vec<u8> = partial.drain(..=i).collect();
                line(&l[..l.len() - 1], tail);
            }
            // A line without an end, longer than any sensible line.
            if partial.len() > 64 << 10 {
                let l = std::mem::take(partial);
                line(&l, tail);
            }
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Appends what is there to `out`, up to `limit` (the rest is read and
/// dropped); false at EOF or when nothing more is there.
fn read_some(f: &mut std::fs::File, out: &mut Vec<u8>, limit: usize) -> io::Result<bool> {
    let mut buf = [0u8; 8192];
    match f.read(&mut buf) {
        Ok(0) => Ok(false),
        Ok(n) => {
            let room = limit.saturating_sub(out.len()).min(n);
            out.extend_from_slice(&buf[..room]);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}
