//! `dream loop`: run a program again each time it exits.
//!
//! The seed's `loop-forever`, made safe to stop: HUP and TERM/INT are
//! forwarded to the running child; after a HUP the next child starts as soon
//! as the old one has exited (its listening socket is held here meanwhile,
//! so clients wait in the backlog); after TERM/INT the loop waits for the
//! child and exits 0. A child that fails is restarted after `delay`, so a
//! crashing program does not spin.
//!
//! Listening sockets pass straight through: fd 0 is inherited as is, and
//! sockets given by the systemd protocol are handed to each child with
//! `LISTEN_PID` set to that child's pid.

use std::ffi::OsString;
use std::io;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::protocol::{self, Listener};
use crate::signals::Signals;
use crate::sockets::spawn::{Command, SpawnError};

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Runs `program` forever; returns when stopped by TERM or INT.
pub fn run(delay: Duration, program: &OsString, args: &[OsString]) -> Result<(), LoopError> {
    let mut signals = Signals::new(&[
        Signal::SIGCHLD,
        Signal::SIGHUP,
        Signal::SIGTERM,
        Signal::SIGINT,
    ])?;
    let sockets: Vec<Listener> = protocol::listeners_from_env()?.unwrap_or_default();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .sockets(&sockets)
        .parent_death_signal(Signal::SIGTERM);

    let mut stopping = false;
    let mut child: Option<Pid> = None;
    let mut restart_at: Option<Instant> = Some(Instant::now());
    loop {
        if child.is_none() {
            if stopping {
                return Ok(());
            }
            if restart_at.is_some_and(|t| t <= Instant::now()) {
                match cmd.spawn() {
                    Ok(pid) => {
                        child = Some(pid);
                        restart_at = None;
                    }
                    Err(e) => {
                        eprintln!("dream loop: cannot start {}; retrying in {delay:?}", e);
                        restart_at = Some(Instant::now() + delay);
                    }
                }
                continue;
            }
        }
        let Some(sig) = signals.wait(restart_at)? else {
            continue; // the restart delay passed
        };
        match sig {
            Signal::SIGCHLD => {
                while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    let pid = match status {
                        WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _) => pid,
                        _ => break,
                    };
                    if Some(pid) != child {
                        continue;
                    }
                    child = None;
                    let clean = matches!(status, WaitStatus::Exited(_, 0));
                    restart_at = Some(if clean {
                        Instant::now()
                    } else {
                        eprintln!(
                            "dream loop: {} {}; restarting in {delay:?}",
                            program.to_string_lossy(),
                            crate::exit::Exit::from_wait(status).expect("an end")
                        );
                        Instant::now() + delay
                    });
                }
            }
            Signal::SIGHUP => {
                if let Some(pid) = child {
                    let _ = kill(pid, Signal::SIGHUP);
                } else {
                    restart_at = Some(Instant::now());
                }
            }
            other => {
                stopping = true;
                if let Some(pid) = child {
                    let _ = kill(pid, other);
                }
            }
        }
    }
}
