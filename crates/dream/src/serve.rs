//! `dream serve`, `dream pool`, and the control clients `dream status` and
//! `dream reload`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dream_core::protocol;
use dream_core::sockets::spec::ListenSpec;
use dream_core::supervise::control::{self, ControlError, Request};
use dream_core::supervise::pool::{Readiness, Settings};
use dream_core::supervise::{self, Config, Mode};
use nix::sys::signal::Signal;

use crate::cli::{PoolFlags, ServeArgs};
use crate::config;
use crate::exit::{Failure, Result};

/// `--root DIR`, else `$DREAM_ROOT`, else the current directory; absolute.
/// The deploy root: `--root DIR`, else `$DREAM_ROOT`, else the current
/// directory if it already is a deploy root (it has `.dream/` or
/// `dream.toml`); never a silently adopted current directory.
pub fn root_dir(flag: Option<&Path>) -> Result<PathBuf> {
    let root = match flag {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("DREAM_ROOT") {
            Some(r) if !r.is_empty() => PathBuf::from(r),
            _ => {
                let cwd = PathBuf::from(".");
                if !(cwd.join(".dream").is_dir() || cwd.join("dream.toml").is_file()) {
                    return Err(Failure::usage(
                        "no deploy root: give --root DIR or set DREAM_ROOT (the current directory has no .dream/ or dream.toml, so it is not one)",
                    ));
                }
                cwd
            }
        },
    };
    std::fs::canonicalize(&root)
        .map_err(|e| Failure::usage(format!("root {}: {e}", root.display())))
}

pub use crate::values::{NotifySocket, StartPriority};

/// The pool's settings, typed (flags and `dream.toml` merged).
pub struct PoolOptions {
    pub workers: Option<usize>,
    pub ready: Readiness,
    pub ready_timeout: Duration,
    pub drain_signal: Signal,
    pub drain_timeout: Duration,
    pub probation: Duration,
    pub start_priority: StartPriority,
    pub notify_socket: NotifySocket,
}

pub fn settings(o: &PoolOptions) -> Result<Settings> {
    let workers = o
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    dream_core::supervise::pool::check_workers(workers)
        .map_err(|e| Failure::usage(format!("--{e}")))?;
    let may = dream_core::may_foreground();
    let background_start = match o.start_priority {
        StartPriority::Auto => may,
        StartPriority::Normal => false,
        StartPriority::Idle if may => true,
        StartPriority::Idle => {
            return Err(Failure::usage(
                "--start-priority idle: dream could not put workers back at normal priority (it needs root or CAP_SYS_NICE); use auto or normal",
            ));
        }
    };
    Ok(Settings {
        background_start,
        workers,
        readiness: o.ready,
        ready_timeout: o.ready_timeout,
        drain_signal: o.drain_signal,
        drain_timeout: o.drain_timeout,
        probation: o.probation,
        notify_socket: match o.notify_socket {
            NotifySocket::Path => dream_core::supervise::pool::NotifySocket::Path,
            NotifySocket::Abstract => dream_core::supervise::pool::NotifySocket::Abstract,
        },
        ..Settings::default()
    })
}

/// Looks up `USER[:GROUP]` for workers; needs root to be useful.
fn worker_ids(spec: &str) -> Result<(u32, u32)> {
    let (u, g) = crate::privs::lookup(spec)?;
    if !nix::unistd::geteuid().is_root() && nix::unistd::geteuid().as_raw() != u {
        return Err(Failure::usage(format!(
            "--user {spec}: dream must start as root to run workers as another user"
        )));
    }
    Ok((u, g))
}

pub struct ServeOptions<'a> {
    pub root: Option<&'a Path>,
    pub listen: &'a [ListenSpec],
    pub metrics: Option<ListenSpec>,
    pub backlog: u32,
    pub user: Option<&'a str>,
    pub pool: PoolOptions,
    pub verbosity: i8,
    pub command: &'a [OsString],
}

pub fn serve(o: ServeOptions<'_>) -> Result {
    let root = root_dir(o.root)?;
    let settings = settings(&o.pool)?;
    // Before anything is bound or said: one supervisor per root.
    supervise::refuse_if_running(&root)?;
    let metrics = o.metrics.as_ref().map(bind_metrics).transpose()?;
    let (sockets, unix_paths) = if o.listen.is_empty() {
        let inherited = protocol::listeners_from_env()
            .map_err(|e| Failure::usage(format!("sockets from systemd: {e}")))?
            .ok_or_else(|| {
                Failure::usage(
                    "no --listen given and no sockets inherited from systemd (LISTEN_FDS/LISTEN_PID): give --listen SPEC, e.g. --listen 127.0.0.1:8080",
                )
            })?;
        (inherited, Vec::new())
    } else {
        // Sockets systemd kept for us (its fd store, after a restart or a
        // crash) are taken again by name; only the others are bound.
        let mut kept = protocol::listeners_from_env()
            .map_err(|e| Failure::usage(format!("sockets from systemd: {e}")))?
            .unwrap_or_default();
        let mut taken: Vec<Option<protocol::Listener>> = Vec::new();
        let mut to_bind = Vec::new();
        for spec in o.listen {
            let name = dream_core::sockets::listen::socket_name(spec);
            match kept.iter().position(|l| l.name == name) {
                Some(i) => {
                    let l = kept.remove(i);
                    let shown = l.local_addr();
                    dream_core::logtext::say_as(
                        dream_core::logtext::Level::Info,
                        "listening",
                        "serve",
                        &format!(
                            "listening on {shown} (the socket {} kept)",
                            if dream_core::supervise::taking_over() {
                                "the upgrade's guardian"
                            } else {
                                "systemd"
                            }
                        ),
                        &[("address", shown.clone().into())],
                    );
                    taken.push(Some(l));
                }
                None => {
                    taken.push(None);
                    to_bind.push(spec.clone());
                }
            }
        }
        if !to_bind.is_empty() {
            end_strays();
        }
        let mut fresh = crate::tools::bind_all(&to_bind, o.backlog, "serve", true)?.into_iter();
        let bound: Vec<protocol::Listener> = taken
            .into_iter()
            .map(|t| t.or_else(|| fresh.next()).expect("one bound per spec"))
            .collect();
        let unix_paths = o
            .listen
            .iter()
            .filter_map(|s| match s {
                ListenSpec::Unix(p) => Some(if p.is_absolute() {
                    p.clone()
                } else {
                    std::env::current_dir().unwrap_or_default().join(p)
                }),
                _ => None,
            })
            .collect();
        (bound, unix_paths)
    };
    let user = o.user.map(worker_ids).transpose()?;
    let cfg = Config {
        metrics,
        mode: Mode::Serve { root },
        program: o.command[0].clone(),
        args: o.command[1..].to_vec(),
        sockets,
        unix_paths,
        user,
        verbosity: o.verbosity,
        name: "serve",
    };
    run(cfg, settings)
}

/// A supervisor that died left its workers draining (their parent-death
/// signal is the drain signal); they may still hold the addresses this one
/// binds afresh, so they end now. (One that takes its sockets over, from
/// the upgrade's guardian or systemd, lets them finish and kills them at
/// its drain deadline.)
fn end_strays() {
    for (sup, pids) in dream_core::supervise::cgroup::end_strays_now() {
        dream_core::logtext::say_as(
            dream_core::logtext::Level::Warn,
            "strays",
            "serve",
            &format!(
                "killed {} process(es) that supervisor pid {sup} (gone) left running, which may hold the addresses to bind: pid {}",
                pids.len(),
                dream_core::supervise::pid_list(&pids)
            ),
            &[],
        );
    }
}

/// `--metrics SPEC`: bound and announced as the metrics endpoint, and
/// named as such when it cannot be bound.
fn bind_metrics(spec: &ListenSpec) -> Result<protocol::Listener> {
    let l = dream_core::sockets::listen::bind(spec, 64).map_err(|e| {
        let mut f = Failure::from(e);
        f.message = format!("--metrics: {}", f.message);
        f
    })?;
    let shown = match spec {
        ListenSpec::Unix(_) => spec.to_string(),
        _ => format!("http://{}/metrics", l.local_addr()),
    };
    dream_core::logtext::say_as(
        dream_core::logtext::Level::Info,
        "listening",
        "serve",
        &format!("metrics on {shown}"),
        &[("address", shown.clone().into())],
    );
    Ok(l)
}

fn run(cfg: Config, settings: Settings) -> Result {
    match supervise::run(cfg, settings)? {
        0 => Ok(()),
        code => Err(Failure::silent(code)),
    }
}

/// `dream pool -n N [--relay-hup] PROGRAM...`: N copies of PROGRAM in the
/// current directory, on the sockets this process inherited.
pub fn pool(
    workers: usize,
    relay_hup: bool,
    pool: PoolOptions,
    verbosity: i8,
    command: &[OsString],
) -> Result {
    let mut settings = settings(&pool)?;
    settings.workers = workers.max(1);
    let sockets = protocol::listeners_from_env()
        .map_err(|e| Failure::usage(format!("inherited sockets: {e}")))?
        .unwrap_or_default();
    let dir = std::env::current_dir().map_err(Failure::failed)?;
    run(
        Config {
            metrics: None,
            mode: Mode::Pool { dir, relay_hup },
            program: command[0].clone(),
            args: command[1..].to_vec(),
            sockets,
            unix_paths: Vec::new(),
            user: None,
            verbosity,
            name: "pool",
        },
        settings,
    )
}

/// A failure to ask the supervisor is exit 111 only when asking again may
/// work (busy, timed out), else 1 (nothing running, not allowed). (With
/// --json, `main` answers a failure as `{"ok":false,…}`.)
fn control_failure(e: ControlError) -> Failure {
    let mut message = e.to_string();
    if let ControlError::Io { source, .. } = &e
        && source.kind() == std::io::ErrorKind::PermissionDenied
    {
        message.push_str(" (run as the supervisor's user or root)");
    }
    if e.is_temporary() {
        Failure::temporary(message)
    } else {
        Failure::failed(message)
    }
}

pub fn status(root: Option<&Path>, json_out: bool) -> Result {
    let root = root_dir(root)?;
    let s = control::status(&root, Some(Duration::from_secs(10))).map_err(|e| match e {
        ControlError::Failed(reason) => Failure::failed(format!("status failed: {reason}")),
        e => control_failure(e),
    })?;
    if json_out {
        crate::print_json(crate::exit::OK, &s);
    } else {
        crate::print_line(&s.human());
    }
    Ok(())
}

pub fn reload(
    root: Option<&Path>,
    confirm_within: Option<Duration>,
    canary: Option<dream_core::supervise::canary::judge::Spec>,
    settle: Duration,
    json_out: bool,
) -> Result {
    let root = root_dir(root)?;
    let judged = canary.is_some();
    let request = Request::Reload {
        confirm_within_ms: confirm_within.map(|d| d.as_millis() as u64),
        canary,
    };
    let mut a = control::ask(&root, &request, None).map_err(control_failure)?;
    // Success only for a generation that stayed up through the window.
    if let (true, Some((generation, _)), false) = (a.ok, a.live(), settle.is_zero()) {
        let settled = control::ask(
            &root,
            &Request::Settle {
                generation,
                within_ms: settle.as_millis() as u64,
            },
            Some(settle + Duration::from_secs(30)),
        )
        .map_err(control_failure)?;
        if !settled.ok {
            a = control::Answer {
                error: settled
                    .error
                    .map(|e| format!("generation {generation} went live but did not settle: {e}")),
                ..settled
            };
        }
    }
    answered(a, json_out, "reload failed: ", |a| match a.live() {
        Some((generation, release)) if judged => format!(
            "canary promoted ({}): generation {generation} (release {release}) is live",
            dream_core::store::release::Store::new(&root)
                .promotion(release)
                .unwrap_or_default()
        ),
        Some((generation, release)) => {
            format!("reloaded: generation {generation} (release {release}) is live")
        }
        None => "reloaded".into(),
    })
}

/// Prints a control answer (JSON with `--json`, else `done(answer)` when it
/// succeeded) and maps a failure to its exit code: 111 when the supervisor
/// was too busy to take the request, else 1 with `what` and the reason.
fn answered(
    a: control::Answer,
    json_out: bool,
    what: &str,
    done: impl FnOnce(&control::Answer) -> String,
) -> Result {
    // Refused as busy: nothing was done, and asking again may work.
    let code = if a.ok {
        crate::exit::OK
    } else if a.refused == Some(control::Refusal::Busy) {
        crate::exit::TEMPORARY
    } else {
        crate::exit::FAILED
    };
    if json_out {
        crate::print_json(code, &a);
    }
    if a.ok {
        if !json_out {
            crate::print_line(&done(&a));
        }
        return Ok(());
    }
    if json_out {
        return Err(Failure::silent(code));
    }
    Err(Failure {
        code,
        message: format!(
            "{what}{}",
            a.error.unwrap_or_else(|| "unknown error".into())
        ),
    })
}

/// `dream upgrade`: asks the supervisor to exec a new program in place and
/// waits for the answer, which the new program sends (or the old one,
/// saying why it still runs).
pub fn upgrade(root: Option<&Path>, binary: Option<PathBuf>, json_out: bool) -> Result {
    let root = root_dir(root)?;
    let binary = binary
        .map(|b| {
            std::path::absolute(&b).map_err(|e| Failure::usage(format!("{}: {e}", b.display())))
        })
        .transpose()?;
    let a = control::ask(
        &root,
        &Request::Upgrade { binary },
        Some(Duration::from_secs(120)),
    )
    .map_err(control_failure)?;
    answered(a, json_out, "", |a| match &a.done {
        control::Done::Upgraded {
            version,
            previous_version,
        } => format!("upgraded: dream {previous_version} -> {version}"),
        _ => "upgraded".into(),
    })
}

/// `dream confirm`: keeps a provisional generation.
pub fn confirm(root: Option<&Path>, generation: Option<u64>, json_out: bool) -> Result {
    let root = root_dir(root)?;
    let a = control::ask(
        &root,
        &Request::Confirm { generation },
        Some(Duration::from_secs(30)),
    )
    .map_err(control_failure)?;
    answered(a, json_out, "", |a| match a.live() {
        Some((generation, release)) => {
            format!("confirmed: generation {generation} (release {release}) stays")
        }
        None => "confirmed".into(),
    })
}

/// `dream pause`: answered once every worker is gone.
pub fn pause(root: Option<&Path>, max: Option<Duration>, json_out: bool) -> Result {
    let root = root_dir(root)?;
    if max.is_some_and(|d| d.is_zero()) {
        return Err(Failure::usage("--max must be longer than 0s"));
    }
    let a = control::ask(
        &root,
        &Request::Pause {
            max_ms: max.map(|d| d.as_millis() as u64),
        },
        None,
    )
    .map_err(control_failure)?;
    let max = max.unwrap_or(dream_core::supervise::pool::DEFAULT_PAUSE);
    answered(a, json_out, "", |_| {
        format!(
            "paused: nothing accepts, new connections wait in the backlog; dream resume (or a reload) ends it, and it ends by itself after {}",
            dream_core::fmt_duration(max)
        )
    })
}

/// `dream resume`: answered once the resumed generation is live.
pub fn resume(root: Option<&Path>, json_out: bool) -> Result {
    let root = root_dir(root)?;
    let a = control::ask(&root, &Request::Resume, None).map_err(control_failure)?;
    answered(a, json_out, "resume failed: ", |a| match a.live() {
        Some((generation, release)) => {
            format!("resumed: generation {generation} (release {release}) is live")
        }
        None => "resumed".into(),
    })
}

/// `dream serve`: flags, then `[serve]` in dream.toml, then the defaults.
pub(crate) fn run_command(a: ServeArgs) -> Result {
    let root = root_dir(a.root.as_deref())?;
    let file = config::load(&root, a.config.as_deref())?.serve;
    let listen = if a.listen.is_empty() {
        file.listen.clone().unwrap_or_default()
    } else {
        a.listen.clone()
    };
    let command: Vec<OsString> = if a.command.is_empty() {
        file.command.iter().flatten().map(OsString::from).collect()
    } else {
        a.command.clone()
    };
    if command.is_empty() {
        return Err(Failure::usage(
            "no COMMAND: give it after `--` (dream serve --listen :8080 -- ./server) or as `command` in dream.toml",
        ));
    }
    serve(ServeOptions {
        root: Some(&root),
        listen: &listen,
        metrics: a.metrics.clone().or(file.metrics.clone()),
        backlog: a
            .backlog
            .or(file.backlog)
            .unwrap_or(dream_core::sockets::listen::DEFAULT_BACKLOG),
        user: a.user.as_deref().or(file.user.as_deref()),
        pool: PoolOptions {
            probation: a
                .probation
                .or(file.probation)
                .unwrap_or(dream_core::supervise::pool::Settings::default().probation),
            ..pool_options(&a.pool, &file, a.workers)
        },
        verbosity: a.pool.verbosity(),
        command: &command,
    })
}

/// The pool's settings: each flag, else the config file's value, else the
/// built-in default.
pub(crate) fn pool_options(
    f: &PoolFlags,
    file: &config::Serve,
    workers: Option<usize>,
) -> PoolOptions {
    // The defaults are the pool's own, written once (pool::Settings).
    let d = dream_core::supervise::pool::Settings::default();
    PoolOptions {
        workers: workers.or(file.workers),
        ready: f.ready.or(file.ready).unwrap_or(d.readiness),
        ready_timeout: f
            .ready_timeout
            .or(file.ready_timeout)
            .unwrap_or(d.ready_timeout),
        drain_signal: f
            .drain_signal
            .or(file.drain_signal)
            .unwrap_or(d.drain_signal),
        drain_timeout: f
            .drain_timeout
            .or(file.drain_timeout)
            .unwrap_or(d.drain_timeout),
        // `dream pool` runs one directory: nothing to revert to.
        probation: Duration::ZERO,
        start_priority: f
            .start_priority
            .or(file.start_priority)
            .unwrap_or(StartPriority::Auto),
        notify_socket: f
            .notify_socket
            .or(file.notify_socket)
            .unwrap_or(NotifySocket::Path),
    }
}
