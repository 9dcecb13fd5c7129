//! `dream`: atomic, zero-downtime deploys for any server on plain Unix hosts.
//!
//! This binary only parses arguments and composes the libraries:
//! `dream-core` (sockets, processes, locks), `dream-static` (the static file
//! worker) and `dream-check` (the referee).

mod cli;
mod config;
mod demo;
mod deploy;
mod exit;
mod fleet;
mod privs;
mod report;
mod serve;
mod tools;
mod values;

use std::ffi::OsString;
use std::io::Write;

use clap::Parser;
use cli::*;
use exit::{Failure, Result};

fn main() {
    // A supervisor that has just upgraded itself: its state, not its
    // command line, says what to do.
    if dream_core::supervise::resuming() {
        let code = match dream_core::supervise::resume() {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{} dream serve: {e}", dream_core::log_time());
                exit::FAILED
            }
        };
        std::process::exit(code);
    }
    // The guardian an upgrading supervisor starts (`supervise::guard`).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "--upgrade-guard")
    {
        let args: Vec<OsString> = std::env::args_os().skip(2).collect();
        std::process::exit(dream_core::supervise::guard(&args));
    }
    // The pre-flight a running supervisor asks of a new program.
    let args: Vec<OsString> = std::env::args_os().take(3).collect();
    if args.get(1).is_some_and(|a| a == "--upgrade-check") {
        let v = args.get(2).map(|v| v.to_string_lossy()).unwrap_or_default();
        std::process::exit(dream_core::supervise::upgrade_check(&v));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            // A bad value is refused by clap before a command runs; one
            // that was asked for --json still gets its answer on stdout.
            let json = std::env::args_os()
                .skip(1)
                .take_while(|a| a != "--")
                .any(|a| a == "--json");
            if code == exit::USAGE && json {
                let rendered = e.render().to_string();
                let first = rendered.lines().next().unwrap_or_default();
                let message = first.strip_prefix("error: ").unwrap_or(first);
                print_line(
                    &serde_json::json!({"ok": false, "error": message, "exit": code}).to_string(),
                );
            }
            std::process::exit(code);
        }
    };
    let name = match &cli.command {
        Cmd::Serve(_) => "serve",
        Cmd::Status(_) => "status",
        Cmd::Completions { .. } => "completions",
        Cmd::Man(_) => "man",
        Cmd::Demo(_) => "demo",
        Cmd::Deploy(_) => "deploy",
        Cmd::Rollback(_) => "rollback",
        Cmd::Releases(_) => "releases",
        Cmd::Reload(_) => "reload",
        Cmd::Pause(_) => "pause",
        Cmd::Resume(_) => "resume",
        Cmd::Confirm(_) => "confirm",
        Cmd::Upgrade(_) => "upgrade",
        Cmd::Fleet(_) => "fleet",
        Cmd::Agent(_) => "agent",
        Cmd::Pool(_) => "pool",
        Cmd::Listen(_) => "listen",
        Cmd::Loop(_) => "loop",
        Cmd::Lock(_) => "lock",
        Cmd::Static(_) => "static",
        Cmd::Check(_) => "check",
    };
    // Every command that takes --json answers on stdout whether it
    // succeeds or fails: `{"ok":false,"error":…,"exit":N}`.
    let json = outputs(&cli.command).json;

    let code = match run(cli.command) {
        Ok(()) => exit::OK,
        Err(f) => {
            report(name, json, &f);
            f.code
        }
    };
    std::process::exit(code);
}

/// A command's failure: one line on stderr (JSON with `--log-format
/// json`), and with `--json` the answer on stdout too.
fn report(name: &str, json: bool, f: &Failure) {
    if f.message.is_empty() {
        return;
    }
    if dream_core::logtext::json() {
        eprint!(
            "{}",
            dream_core::logtext::json_line(
                dream_core::logtext::Level::Error,
                "failed",
                &f.message,
                &[("from", name.into()), ("exit", f.code.into())],
            )
        );
    } else {
        eprintln!("dream {name}: {}", f.message);
    }
    if json {
        print_json(f.code, serde_json::json!({"error": f.message}));
    }
}

/// How a command answers: `--json` (a JSON answer on stdout, failures
/// included) and `--log-format`. Every command is named here, with no
/// catch-all, so a new one cannot forget either.
struct Outputs {
    json: bool,
    log_format: LogFormat,
}

fn outputs(cmd: &Cmd) -> Outputs {
    let (json, log_format) = match cmd {
        Cmd::Serve(a) => (false, a.pool.log_format),
        Cmd::Pool(a) => (false, a.pool.log_format),
        Cmd::Deploy(a) => (a.json, a.log_format),
        Cmd::Rollback(a) => (a.json, LogFormat::Text),
        Cmd::Releases(a) => (a.json, LogFormat::Text),
        Cmd::Status(a) => (a.json, LogFormat::Text),
        Cmd::Reload(a) => (a.json, LogFormat::Text),
        Cmd::Pause(a) => (a.json, LogFormat::Text),
        Cmd::Resume(a) => (a.json, LogFormat::Text),
        Cmd::Confirm(a) => (a.json, LogFormat::Text),
        Cmd::Upgrade(a) => (a.json, LogFormat::Text),
        Cmd::Check(a) => (a.json, LogFormat::Text),
        Cmd::Fleet(
            FleetCmd::Deploy(FleetDeployArgs { fleet, .. })
            | FleetCmd::Rollback(FleetRollbackArgs { fleet, .. })
            | FleetCmd::Lock(FleetLockArgs { fleet, .. })
            | FleetCmd::Status(fleet)
            | FleetCmd::Unlock(fleet),
        ) => (fleet.json, fleet.log_format),
        // Commands whose output is their product (a man page, a shell's
        // completions, a worker's or a tool's own lines), or a protocol.
        Cmd::Completions { .. }
        | Cmd::Man(_)
        | Cmd::Demo(_)
        | Cmd::Agent(_)
        | Cmd::Listen(_)
        | Cmd::Loop(_)
        | Cmd::Lock(_)
        | Cmd::Static(_) => (false, LogFormat::Text),
    };
    Outputs { json, log_format }
}

fn run(cmd: Cmd) -> Result {
    let json_logs = outputs(&cmd).log_format == LogFormat::Json;
    dream_core::logtext::set_json(json_logs);
    match cmd {
        Cmd::Serve(a) => serve::run_command(a),
        Cmd::Status(a) => serve::status(a.root.as_deref(), a.json),
        Cmd::Completions { shell } => run_completions(shell),
        Cmd::Man(a) => run_man(&a),
        Cmd::Demo(a) => demo::run(demo::DemoArgs {
            root: a.root,
            listen: a.listen,
            auto_deploy: a.auto_deploy,
            duration: a.duration,
            workers: a.workers,
            connections: a.connections,
        }),
        Cmd::Deploy(a) => deploy::run(a),
        Cmd::Rollback(a) => deploy::rollback(deploy::RollbackArgs {
            root: a.root.as_deref(),
            id: a.id.as_deref(),
            no_reload: a.no_reload,
            verify: &a.verify,
            settle: a.settle.unwrap_or(dream_core::deploy::DEFAULT_SETTLE),
            wait_lock: a.wait_lock,
            dry_run: a.dry_run,
            json: a.json,
            quiet: a.quiet,
        }),
        Cmd::Releases(a) if a.verify => deploy::verify(a.root.as_deref(), a.id.as_deref(), a.json),
        Cmd::Releases(a) => deploy::releases(a.root.as_deref(), a.json),
        Cmd::Reload(a) if a.canary.canary.is_none() && a.canary.judge.any() => Err(
            exit::Failure::usage("--judge-* set how a canary is judged: add --canary SHARE"),
        ),
        Cmd::Reload(a) => serve::reload(
            a.root.as_deref(),
            a.confirm_within,
            a.canary.spec(),
            a.settle.unwrap_or(dream_core::deploy::DEFAULT_SETTLE),
            a.json,
        ),
        Cmd::Confirm(a) => serve::confirm(a.root.as_deref(), a.generation, a.json),
        Cmd::Pause(a) => serve::pause(a.root.as_deref(), a.max, a.json),
        Cmd::Resume(a) => serve::resume(a.root.as_deref(), a.json),
        Cmd::Upgrade(a) => serve::upgrade(a.root.as_deref(), a.binary, a.json),
        Cmd::Fleet(cmd) => fleet::run(cmd),
        Cmd::Agent(a) => {
            let root = std::path::absolute(&a.root)
                .map_err(|e| Failure::usage(format!("{}: {e}", a.root.display())))?;
            dream_core::fleet::Agent::new(&root)
                .serve()
                .map_err(|e| Failure::failed(format!("the session: {e}")))
        }
        Cmd::Pool(a) => serve::pool(
            a.workers,
            a.relay_hup,
            serve::pool_options(&a.pool, &config::Serve::default(), Some(a.workers)),
            a.pool.verbosity(),
            &a.program,
        ),
        Cmd::Listen(a) => {
            let line = tools::split_specs(&a.args)?;
            tools::listen(
                &line.specs,
                line.backlog.unwrap_or(a.backlog),
                line.user.as_deref().or(a.user.as_deref()),
                a.verbose || line.verbose,
                &line.program,
            )
        }
        Cmd::Loop(a) => tools::run_loop(a.delay, &a.program),
        Cmd::Lock(a) => tools::lock(&a.file, a.no_wait, &a.program),
        Cmd::Static(a) => tools::run_static(a),
        Cmd::Check(a) => tools::run_check(a),
    }
}

fn run_completions(shell: clap_complete::Shell) -> Result {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "dream", &mut out);
    print_line(String::from_utf8_lossy(&out).trim_end());
    Ok(())
}

fn run_man(a: &ManArgs) -> Result {
    use clap::CommandFactory;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    if let Some(dir) = &a.dir {
        return clap_mangen::generate_to(cmd, dir)
            .map_err(|e| Failure::failed(format!("{}: {e}", dir.display())));
    }
    // Each word goes one level down (the page is titled by the path,
    // `dream-fleet-deploy`, as `--dir` names its file).
    let mut page = cmd;
    let mut path = vec!["dream".to_string()];
    for name in &a.subcommand {
        let sub = page
            .get_subcommands()
            .find(|s| s.get_name() == name)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = page.get_subcommands().map(|s| s.get_name()).collect();
                Failure::usage(format!(
                    "no subcommand {name:?} under `{}` (it has: {})",
                    path.join(" "),
                    known.join(", ")
                ))
            })?;
        path.push(name.clone());
        page = sub;
    }
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .map_err(Failure::failed)?;
    print_line(String::from_utf8_lossy(&out).trim_end());
    Ok(())
}

/// A command's `--json` answer on stdout: its own fields, and beside them
/// `ok` and `exit` (the exit status the command ends with), so that a
/// success and a failure have one shape (doc/DESIGN.md, "--json").
pub fn print_json(exit: i32, fields: impl serde::Serialize) {
    let mut v = serde_json::to_value(fields).expect("an answer serializes");
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("ok".into(), (exit == exit::OK).into());
        m.insert("exit".into(), exit.into());
    }
    print_line(&v.to_string());
}

/// Prints a line on stdout; a closed pipe is not an error.
pub fn print_line(s: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{s}");
}
