//! The seed's small programs, each doing one job and then exec'ing the rest
//! of its command line: `listen`, `loop`, `lock`.

use std::ffi::OsString;
use std::path::Path;

use std::os::fd::AsFd;

use dream_core::sockets::listen::{self, Listener};
use dream_core::sockets::spawn::Command;
use dream_core::sockets::spec::ListenSpec;
use dream_core::store::lock::{Holder, Lock, Wait};

use crate::cli::{CheckArgs, StaticArgs};
use crate::exit::{self, Failure, Result};
use crate::report;
use crate::{print_json, print_line};
use std::sync::Arc;

/// What `dream listen` found on its command line.
pub struct ListenLine {
    pub specs: Vec<ListenSpec>,
    pub program: Vec<OsString>,
    /// `--backlog`, `--user`, `-v` written among the specs.
    pub backlog: Option<u32>,
    pub user: Option<String>,
    pub verbose: bool,
}

/// Splits `SPEC... [--backlog N] [--user U[:G]] [-v] [--] PROGRAM...`:
/// leading arguments that parse as listen specs (or are these options), up
/// to the first that does not, or an explicit `--`.
pub fn split_specs(args: &[OsString]) -> Result<ListenLine> {
    let mut line = ListenLine {
        specs: Vec::new(),
        program: Vec::new(),
        backlog: None,
        user: None,
        verbose: false,
    };
    let mut rest = args;
    while let Some((first, tail)) = rest.split_first() {
        if first == "--" {
            rest = tail;
            break;
        }
        let Some(s) = first.to_str() else { break };
        let value = |name: &str| -> Result<String> {
            tail.first()
                .and_then(|v| v.to_str())
                .map(str::to_string)
                .ok_or_else(|| Failure::usage(format!("listen: {name} needs a value")))
        };
        match s {
            "--backlog" => {
                let v = value("--backlog")?;
                line.backlog = Some(v.parse().map_err(|_| {
                    Failure::usage(format!("listen: --backlog {v:?} is not a number"))
                })?);
                rest = &tail[1..];
                continue;
            }
            "--user" => {
                line.user = Some(value("--user")?);
                rest = &tail[1..];
                continue;
            }
            "-v" | "--verbose" => {
                line.verbose = true;
                rest = tail;
                continue;
            }
            _ => {}
        }
        match s.parse::<ListenSpec>() {
            Ok(spec) => line.specs.push(spec),
            // The first thing that looks like neither a spec nor a program
            // path is a malformed spec: say so rather than trying to run it.
            Err(e) if line.specs.is_empty() && (s.contains(':') || s.parse::<u16>().is_ok()) => {
                return Err(Failure::usage(e));
            }
            Err(_) => break,
        }
        rest = tail;
    }
    if line.specs.is_empty() {
        return Err(Failure::usage(
            "listen: no listen spec (usage: dream listen SPEC... PROGRAM...)",
        ));
    }
    if rest.is_empty() {
        return Err(Failure::usage(
            "listen: no program to run after the listen specs",
        ));
    }
    line.program = rest.to_vec();
    Ok(line)
}

/// Binds every spec, saying when the kernel caps the backlog.
pub fn bind_all(
    specs: &[ListenSpec],
    backlog: u32,
    who: &str,
    verbose: bool,
) -> Result<Vec<Listener>> {
    let (effective, capped) = listen::effective_backlog(backlog);
    if let Some(max) = capped {
        eprintln!(
            "dream {who}: backlog {backlog} capped to {max} by net.core.somaxconn (raise it with sysctl to get the full backlog)"
        );
    }
    let mut out = Vec::new();
    for spec in specs {
        let bound = listen::bind(spec, effective)?;
        let port_zero = matches!(spec, ListenSpec::Tcp(a) if a.port() == 0)
            || matches!(spec, ListenSpec::AnyAddress(0) | ListenSpec::Host(_, 0));
        if verbose || port_zero {
            // A Unix socket is bound under a temporary name and renamed:
            // the spec names it, not getsockname(2).
            let shown = match spec {
                ListenSpec::Unix(_) => spec.to_string(),
                _ => bound.local_addr(),
            };
            dream_core::logtext::say_as(
                dream_core::logtext::Level::Info,
                "listening",
                who,
                &format!("listening on {shown} (backlog {effective})"),
                &[
                    ("address", shown.clone().into()),
                    ("backlog", effective.into()),
                ],
            );
        }
        out.push(bound);
    }
    Ok(out)
}

/// `dream listen`: bind, drop privileges, exec PROGRAM with the sockets at
/// fd 0 and fds 3.. (`LISTEN_FDS`, `LISTEN_PID` = its own pid, which is ours).
pub fn listen(
    specs: &[ListenSpec],
    backlog: u32,
    user: Option<&str>,
    verbose: bool,
    program: &[OsString],
) -> Result {
    let bound = bind_all(specs, backlog, "listen", verbose)?;
    if let Some(user) = user {
        crate::privs::drop_to(user)?;
    }
    let mut cmd = Command::new(&program[0]);
    cmd.args(&program[1..]).sockets(&bound);
    Err(cmd.exec().into())
}

/// `dream loop`.
pub fn run_loop(delay: std::time::Duration, program: &[OsString]) -> Result {
    dream_core::supervise::respawn::run(delay, &program[0], &program[1..]).map_err(|e| match e {
        dream_core::supervise::respawn::LoopError::Spawn(s) => s.into(),
        other => Failure::failed(other),
    })
}

/// `dream lock`: take the lock, keep it across exec, become PROGRAM.
pub fn lock(file: &Path, no_wait: bool, program: &[OsString]) -> Result {
    let command = program
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let wait = if no_wait { Wait::No } else { Wait::Forever };
    // Held (with -n) is worth retrying (111); a lock file that cannot be
    // opened (no such directory, no permission) is not (1).
    let lock = Lock::acquire(file, &Holder::me(command), wait).map_err(|e| match e {
        dream_core::store::lock::LockError::Held { .. } => Failure::temporary(e.to_string()),
        other => Failure::failed(other.to_string()),
    })?;
    let mut cmd = Command::new(&program[0]);
    cmd.args(&program[1..]).keep_fd(lock.as_fd());
    let err = cmd.exec();
    drop(lock);
    Err(err.into())
}

pub(crate) fn run_static(a: StaticArgs) -> Result {
    use dream_core::protocol;
    let listeners = match &a.listen {
        Some(spec) => {
            let bound = bind_all(
                std::slice::from_ref(spec),
                dream_core::sockets::listen::DEFAULT_BACKLOG,
                "static",
                true,
            )?;
            bound
                .into_iter()
                .map(|b| b.into_std())
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(Failure::failed)?
        }
        None => protocol::take_listeners()
            .map_err(|e| {
                Failure::usage(format!(
                    "{e}; run it under `dream serve` or `dream listen SPEC dream static`, or give --listen SPEC"
                ))
            })?
            .into_iter()
            .map(|i| i.into_std())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Failure::failed)?,
    };
    raise_fd_limit();
    let config = dream_static::Config {
        root: a.dir,
        release: std::env::var("DREAM_RELEASE")
            .ok()
            .filter(|s| !s.is_empty()),
        generation: std::env::var("DREAM_GENERATION")
            .ok()
            .filter(|s| !s.is_empty()),
        header_timeout: a.header_timeout,
        max_connections: a.max_connections,
        drain_grace: a.drain_grace,
        drain_spread: a.drain_spread,
        drain_timeout: a.drain_timeout,
        send_timeout: a.send_timeout,
    };
    dream_static::serve(listeners, config).map_err(Failure::failed)
}

/// Workers hold one descriptor per connection: lift the soft limit to the
/// hard one so that the connection cap, not EMFILE, is what binds.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

pub(crate) fn run_check(a: CheckArgs) -> Result {
    let target = dream_check::Target::parse(&a.url).map_err(Failure::usage)?;
    if a.connections == 0 {
        return Err(Failure::usage("--connections must be at least 1"));
    }
    let opts = dream_check::Options {
        target,
        connections: a.connections,
        duration: a.duration,
        keep_alive: a.keep_alive,
        body_pattern: a.body_pattern,
        timeout: a.timeout,
        max_requests: a.requests,
        rate: a.rate,
        timeline: a.report.is_some(),
    };
    let live = Arc::new(dream_check::Live::default());
    let report = dream_check::run(&opts, live).map_err(|e| match e {
        dream_check::CheckError::Runtime(io) => Failure::failed(io),
        other => Failure::usage(other),
    })?;
    if let Some(page) = &a.report {
        report::write(page, &report, a.root.as_deref())?;
    }
    let code = if report.ok { exit::OK } else { exit::FAILED };
    if a.json {
        print_json(code, &report);
    } else {
        print_line(&report.human());
    }
    if report.ok {
        Ok(())
    } else {
        Err(Failure::silent(exit::FAILED))
    }
}
