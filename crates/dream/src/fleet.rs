//! `dream fleet`: the command line of `dream_core::fleet`'s coordinator.
//!
//! This file turns flags into a [`Fleet`], stages the source here (and
//! builds it here with `--build-on local`), runs the coordinator over the
//! system's OpenSSH client ([`dream_core::fleet::Ssh`]), and turns its
//! typed outcome into text, `--json` and the exit code of the contract:
//! 0 live everywhere, 1 failed with every host on its previous release,
//! 2 the hosts may differ, 111 nothing changed (try again).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dream_core::fleet::coordinator::{self, Connected, Coordinator, Outcome, Release, Verdict};
use dream_core::fleet::{Host, Ssh};
use dream_core::store::manifest::{self, Manifest};

use crate::cli::{BuildOn, FleetArgs, FleetCmd, RolloutArgs};
use crate::config;
use crate::exit::{self, Failure, Result};

pub use dream_core::fleet::Rollout;

/// Where and how to reach the hosts, and how the run goes.
pub struct Fleet {
    pub run: dream_core::fleet::Fleet,
    /// The ssh command and its own options (`--ssh`).
    pub ssh: Vec<String>,
    pub remote_dream: String,
    pub json: bool,
}

/// What `dream fleet deploy` is asked to do.
pub struct DeployPlan {
    pub source: String,
    pub id: Option<String>,
    pub build: Option<String>,
    pub dry_run: bool,
    pub exclude: Vec<String>,
    pub keep_git: bool,
    pub bridge: Vec<PathBuf>,
    /// Run `build` once here rather than on every host.
    pub build_on_local: bool,
    pub confirm_within: Duration,
    /// Releases each host keeps once the run committed.
    pub keep: usize,
}

/// Prints a progress line (stderr), unless `--json`.
fn say(json: bool, line: &str) {
    if dream_core::logtext::json() {
        dream_core::logtext::say(
            dream_core::logtext::Level::Info,
            "fleet",
            line,
            &[("from", "fleet".into())],
        );
    } else if !json {
        eprintln!("dream fleet: {line}");
    }
}

impl Fleet {
    /// Runs `f` with a coordinator over ssh.
    fn with<T>(&self, hosts: &[Host], f: impl FnOnce(&Coordinator<'_>) -> T) -> Result<T> {
        let ssh = Ssh::new(self.ssh.clone(), self.remote_dream.clone(), hosts)
            .map_err(|e| Failure::failed(format!("a directory for ssh's control sockets: {e}")))?;
        let json = self.json;
        let progress = move |line: &str| say(json, line);
        Ok(f(&Coordinator {
            fleet: &self.run,
            transport: &ssh,
            say: &progress,
        }))
    }
}

/// The exit code of a verdict.
fn code(v: &Verdict) -> i32 {
    match v {
        Verdict::Done => 0,
        Verdict::Unchanged(_) => exit::TEMPORARY,
        Verdict::NotSwitched(_) | Verdict::Reverted(_) => exit::FAILED,
        Verdict::Inconsistent(_) => 2,
    }
}

#[derive(serde::Serialize)]
struct FleetReport<'a> {
    ok: bool,
    release: &'a str,
    hosts: &'a [coordinator::HostOutcome],
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    exit: i32,
    duration_s: f64,
}

/// Ends the run: a report on stdout with `--json`, the exit code.
fn finish(f: &Fleet, started: Instant, outcome: Outcome) -> Result {
    let exit = code(&outcome.verdict);
    if outcome.verdict == Verdict::Done {
        say(
            f.json,
            &format!(
                "{} is live on every host ({} in all)",
                outcome.release,
                dream_core::fmt_duration(started.elapsed())
            ),
        );
    }
    if f.json {
        let report = FleetReport {
            ok: exit == 0,
            release: &outcome.release,
            hosts: &outcome.hosts,
            error: outcome.verdict.error(),
            exit,
            duration_s: started.elapsed().as_secs_f64(),
        };
        crate::print_line(&serde_json::to_string(&report).expect("a report serializes"));
    } else {
        for h in &outcome.hosts {
            eprintln!(
                "  {:<24} now {:<36} was {}",
                h.host,
                h.current.as_deref().unwrap_or("-"),
                h.previous.as_deref().unwrap_or("-")
            );
        }
    }
    match outcome.verdict.error() {
        None => Ok(()),
        Some(_) if f.json => Err(Failure::silent(exit)),
        Some(e) => Err(Failure {
            code: exit,
            message: e.to_string(),
        }),
    }
}

/// Stages the source locally (a directory as it is; a tarball or git
/// revision into a temporary directory) and hashes it.
fn stage_source(
    source: &str,
    exclude: &[String],
    keep_git: bool,
) -> Result<(PathBuf, Manifest, Option<tempfile::TempDir>)> {
    use dream_core::store::stage::Source;
    let src = Source::parse(source).map_err(Failure::usage)?;
    let (dir, tmp) = match src {
        Source::Dir(d) => {
            if !d.is_dir() {
                return Err(Failure::usage(format!("{}: not a directory", d.display())));
            }
            (d, None)
        }
        Source::Tar(t) => {
            let tmp = tempfile::tempdir().map_err(Failure::failed)?;
            let dir = tmp.path().join("src");
            dream_core::store::stage::extract_tar(&t, &dir, u64::MAX)
                .map_err(|e| Failure::failed(format!("{}: {e}", t.display())))?;
            (dir, Some(tmp))
        }
        Source::Git { url, rev } => {
            let tmp = tempfile::tempdir().map_err(Failure::failed)?;
            let dir = tmp.path().join("src");
            dream_core::store::stage::git_checkout(&url, rev.as_deref(), &dir, u64::MAX, None)
                .map_err(|e| Failure::failed(e.to_string()))?;
            (dir, Some(tmp))
        }
        Source::Objects { .. } => return Err(Failure::usage("not a source")),
    };
    // What a directory source leaves out, as for dream deploy.
    let left_out = dream_core::store::stage::Exclude::new(&dir, exclude, keep_git || tmp.is_some())
        .map_err(Failure::usage)?;
    let m = Manifest::of_tree_but(&dir, &|rel, is_dir| left_out.leaves_out(rel, is_dir))
        .map_err(|e| Failure::failed(format!("hashing {}: {e}", dir.display())))?;
    Ok((dir, m, tmp))
}

/// `--build-on local`: copies the source (as hashed: its exclusions
/// applied) into a temporary directory, runs the build there with the
/// release's id in `DREAM_RELEASE`, and hashes the result.
fn build_locally(
    src: &Path,
    manifest: &Manifest,
    id: &str,
    cmd: &str,
    json: bool,
) -> Result<(PathBuf, Manifest, tempfile::TempDir)> {
    let tmp = tempfile::tempdir().map_err(Failure::failed)?;
    let dir = tmp.path().join("build");
    for e in manifest.entries() {
        let (from, to) = (src.join(&e.path), dir.join(&e.path));
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(Failure::failed)?;
        }
        match &e.kind {
            manifest::Kind::Dir { .. } => std::fs::create_dir_all(&to).map_err(Failure::failed)?,
            manifest::Kind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &to).map_err(Failure::failed)?
            }
            manifest::Kind::File { .. } => {
                std::fs::copy(&from, &to)
                    .map_err(|e| Failure::failed(format!("{}: {e}", from.display())))?;
            }
        }
    }
    say(json, &format!("building here: {cmd}"));
    let mut sh = Command::new("/bin/sh");
    sh.args(["-c", cmd])
        .current_dir(&dir)
        .env("DREAM_RELEASE", id)
        .env("DREAM_BUILD_DIR", &dir);
    // The one way dream runs a program it does not own: its own process
    // group, ended whole; INT/TERM/HUP end it too.
    let mut signals = dream_core::signals::Signals::new(&[
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ])
    .map_err(Failure::failed)?;
    let mut show = |line: &str| {
        if !json {
            eprintln!("build | {line}");
        }
    };
    let ended = dream_core::child::run(
        sh,
        None,
        dream_core::child::Output::Lines {
            show: &mut show,
            tail: 20,
        },
        None,
        Some(&mut signals),
    )
    .map_err(|e| Failure::failed(format!("cannot run the build: {e}")))?;
    match ended {
        dream_core::child::Ended::Exited { status, .. } if status.success() => {}
        dream_core::child::Ended::Exited { status, tail, .. } => {
            return Err(Failure::failed(format!(
                "the build {status} here; nothing was sent anywhere{}",
                tail.last().map(|l| format!(": {l}")).unwrap_or_default()
            )));
        }
        dream_core::child::Ended::Interrupted(sig) => {
            return Err(Failure {
                code: 128 + sig as i32,
                message: format!(
                    "interrupted by {sig:?} during the build: its process group was ended and nothing was sent anywhere"
                ),
            });
        }
        dream_core::child::Ended::TimedOut { .. } => {
            return Err(Failure::failed("the build ran out of time here"));
        }
    }
    let built =
        Manifest::of_tree(&dir).map_err(|e| Failure::failed(format!("hashing the build: {e}")))?;
    Ok((dir, built, tmp))
}

/// `dream fleet deploy SOURCE`.
pub fn deploy(f: &Fleet, plan: &DeployPlan) -> Result {
    let started = Instant::now();
    f.with(&f.run.hosts, |c| {
        // The source is hashed here while the sessions start.
        let (staged, connected) = std::thread::scope(|s| {
            let connecting = s.spawn(|| c.connect_to_deploy());
            let staged = stage_source(&plan.source, &plan.exclude, plan.keep_git);
            (staged, connecting.join().expect("connect thread"))
        });
        let release = match staged.and_then(|s| release_of(f, plan, s)) {
            Ok(r) => r,
            Err(e) => {
                coordinator::hang_up(connected);
                return Err(e);
            }
        };
        let (release, _tmp) = release;
        say(
            f.json,
            &format!(
                "release {}: {} entries, {} hosts",
                release.id,
                release.manifest.entries().len(),
                f.run.hosts.len()
            ),
        );
        if plan.dry_run {
            return dry_run(f, c, connected, &release.id, &release.manifest);
        }
        finish(f, started, c.deploy(connected, &release))
    })?
}

/// The release to send: its id checked or made, built here with
/// `--build-on local` (the hosts then build nothing).
fn release_of(
    f: &Fleet,
    plan: &DeployPlan,
    (dir, manifest, tmp): (PathBuf, Manifest, Option<tempfile::TempDir>),
) -> Result<(Release, Vec<tempfile::TempDir>)> {
    let id = match &plan.id {
        Some(id) => {
            dream_core::store::release::check_id(id).map_err(Failure::usage)?;
            id.clone()
        }
        None => dream_core::deploy::new_release_id(&manifest),
    };
    let mut keep: Vec<tempfile::TempDir> = tmp.into_iter().collect();
    let (dir, manifest, build) = match (&plan.build, plan.build_on_local) {
        (Some(cmd), true) => {
            let (d, m, t) = build_locally(&dir, &manifest, &id, cmd, f.json)?;
            keep.push(t);
            (d, m, None)
        }
        _ => (dir, manifest, plan.build.clone()),
    };
    Ok((
        Release {
            id,
            manifest,
            dir,
            build,
            bridge: plan.bridge.clone(),
            confirm_within: plan.confirm_within,
            keep: plan.keep,
        },
        keep,
    ))
}

/// `--dry-run`: the plan, from each host's answer to what it lacks; no
/// lock taken, nothing written anywhere.
fn dry_run(
    f: &Fleet,
    c: &Coordinator<'_>,
    connected: Connected,
    id: &str,
    manifest: &Manifest,
) -> Result {
    let plan = c
        .plan(connected, manifest)
        .map_err(|errors| Failure::temporary(format!("unreachable: {}", errors.join("; "))))?;
    let failed = plan.hosts.iter().any(|r| r.error.is_some());
    if f.json {
        crate::print_json(
            if failed {
                crate::exit::TEMPORARY
            } else {
                crate::exit::OK
            },
            serde_json::json!({"dry_run": true, "release": id, "groups": plan.waves, "hosts": plan.hosts}),
        );
    } else {
        crate::print_line(&format!(
            "plan for {id} ({} entries); nothing is changed",
            manifest.entries().len()
        ));
        for (n, w) in plan.waves.iter().enumerate() {
            crate::print_line(&format!(
                "  {} {}: {}",
                if n == 0 && f.run.rollout.canary > 0 {
                    "canary"
                } else {
                    "group "
                },
                n + 1,
                w.join(", ")
            ));
        }
        for r in &plan.hosts {
            crate::print_line(&format!(
                "  {:<24} on {:<36} lacks {} files, {}{}",
                r.host,
                r.current.as_deref().unwrap_or("nothing"),
                r.lacks_files,
                dream_core::deploy::human_bytes(r.lacks_bytes),
                r.error
                    .as_deref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            ));
        }
    }
    if failed {
        Err(Failure::silent(exit::TEMPORARY))
    } else {
        Ok(())
    }
}

/// `dream fleet rollback [ID]`.
pub fn rollback(f: &Fleet, id: Option<&str>, confirm_within: Duration) -> Result {
    let started = Instant::now();
    let outcome = f.with(&f.run.hosts, |c| c.rollback(id, confirm_within))?;
    finish(f, started, outcome)
}

/// `dream fleet status`: what each host runs, and the manual hold.
pub fn status(f: &Fleet) -> Result {
    let rows = f
        .with(&f.run.hosts, |c| c.status())?
        .map_err(|errors| Failure::temporary(format!("unreachable: {}", errors.join("; "))))?;
    let unanswered: Vec<&str> = rows.iter().filter_map(|r| r.error.as_deref()).collect();
    let currents: std::collections::BTreeSet<&str> = rows
        .iter()
        .map(|r| r.current.as_deref().unwrap_or("-"))
        .collect();
    let none_anywhere = rows.iter().all(|r| r.current.is_none());
    // What is known decides the verdict: a host that did not answer, or a
    // root with no release on any host (a wrong --root, say), is never
    // "consistent".
    let (code, why) = if !unanswered.is_empty() {
        (
            crate::exit::TEMPORARY,
            format!("no answer: {}", unanswered.join("; ")),
        )
    } else if none_anywhere {
        (
            crate::exit::FAILED,
            format!(
                "no host has a release under {} (is --root right?)",
                f.run
                    .hosts
                    .iter()
                    .map(|h| h.root.as_str())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    } else if currents.len() == 1 {
        (crate::exit::OK, String::new())
    } else {
        (2, "the hosts run different releases".to_string())
    };
    if f.json {
        let mut v = serde_json::json!({
            "consistent": code == crate::exit::OK,
            "hosts": rows,
        });
        if !why.is_empty() {
            v["error"] = why.clone().into();
        }
        crate::print_json(code, v);
    } else {
        for r in &rows {
            crate::print_line(&format!(
                "{:<24} {:<36} dream {}{}",
                r.host,
                r.current.as_deref().unwrap_or("-"),
                r.version.as_deref().unwrap_or("?"),
                r.hold
                    .as_deref()
                    .map(|h| format!("  held: {}", h.trim()))
                    .unwrap_or_default()
            ));
        }
    }
    match code {
        crate::exit::OK => Ok(()),
        // The JSON above already says why.
        _ if f.json => Err(Failure::silent(code)),
        _ => Err(Failure { code, message: why }),
    }
}

/// `dream fleet lock -m MSG` / `dream fleet unlock`: a manual hold on the
/// primary that automatic deploys refuse at once (never wait on).
pub fn hold(f: &Fleet, message: Option<String>) -> Result {
    let set = message.is_some();
    f.with(&f.run.hosts[..1], |c| c.hold(message))?
        .map_err(Failure::failed)?;
    if f.json {
        crate::print_json(crate::exit::OK, serde_json::json!({"held": set}));
    } else {
        crate::print_line(if set {
            "the fleet is held: deploys refuse until dream fleet unlock"
        } else {
            "the fleet is no longer held"
        });
    }
    Ok(())
}

/// The fleet from flags, then `[fleet]` in the config file.
fn fleet_of(a: &FleetArgs, r: &RolloutArgs) -> Result<(Fleet, config::FleetConfig)> {
    let path = a.config.clone().or_else(|| {
        let p = PathBuf::from("dream.toml");
        p.is_file().then_some(p)
    });
    let file = match path {
        Some(p) => config::load(Path::new("."), Some(&p))?.fleet,
        None => config::FleetConfig::default(),
    };
    let root = a.root.clone().or(file.root.clone());
    let names: Vec<(String, Option<String>)> = if let Some(cmd) = &a.hosts_from {
        let out = std::process::Command::new("sh")
            .args(["-c", cmd])
            .output()
            .map_err(|e| Failure::usage(format!("--hosts-from: {e}")))?;
        if !out.status.success() {
            return Err(Failure::usage(format!(
                "--hosts-from {cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| (l.to_string(), None))
            .collect()
    } else if !a.hosts.is_empty() {
        a.hosts.iter().map(|h| (h.clone(), None)).collect()
    } else {
        file.hosts
            .iter()
            .flatten()
            .map(|h| match h {
                config::FleetHost::Name(n) => (n.clone(), None),
                config::FleetHost::Table { host, root } => (host.clone(), root.clone()),
            })
            .collect()
    };
    if names.is_empty() {
        return Err(Failure::usage(
            "no hosts: give --hosts H1,H2, --hosts-from CMD, or [fleet] hosts in dream.toml",
        ));
    }
    let hosts = names
        .iter()
        .map(|(n, r)| {
            let root = r.clone().or(root.clone()).ok_or_else(|| {
                Failure::usage(format!(
                    "no deploy root for {n}: give --root DIR or [fleet] root"
                ))
            })?;
            dream_core::fleet::Host::parse(n, &root).map_err(Failure::usage)
        })
        .collect::<Result<Vec<_>>>()?;
    let ssh: Vec<String> = match (&a.ssh, &file.ssh) {
        (Some(s), _) | (None, Some(config::SshCommand::Line(s))) => {
            s.split_whitespace().map(str::to_string).collect()
        }
        (None, Some(config::SshCommand::List(l))) => l.clone(),
        (None, None) => vec!["ssh".into()],
    };
    if ssh.is_empty() {
        return Err(Failure::usage("--ssh: an empty command"));
    }
    let f = Fleet {
        ssh,
        remote_dream: a
            .remote_dream
            .clone()
            .or(file.remote_dream.clone())
            .unwrap_or_else(|| "dream".into()),
        json: a.json,
        run: dream_core::fleet::Fleet {
            hosts,
            parallel: a.parallel.or(file.parallel).unwrap_or(8).max(1),
            install: a.install || file.install.unwrap_or(false),
            wait_lock: a.wait_lock.or(file.wait_lock),
            settle: r
                .settle
                .or(file.settle)
                .unwrap_or(dream_core::deploy::DEFAULT_SETTLE),
            verify: r.verify.clone(),
            judge: None,
            rollout: Rollout {
                canary: r.canary.or(file.canary).unwrap_or(1),
                group: match (r.group, &file.group) {
                    (Some(g), _) => Some(g),
                    (None, Some(g)) => Some(
                        g.parse()
                            .map_err(|e| Failure::usage(format!("[fleet] group: {e}")))?,
                    ),
                    (None, None) => None,
                },
                wait: r.wait.or(file.wait).unwrap_or_default(),
                max_fail: r.max_fail.or(file.max_fail).unwrap_or(0),
            },
        },
    };
    Ok((f, file))
}

/// A fleet host's provisional window (default 30s): the lease its agent
/// renews while the coordinator is heard from. It must outlast the host's
/// settle window, which runs inside it before any renewal.
fn lease(f: &Fleet, given: Option<Duration>) -> std::result::Result<Duration, Failure> {
    let within = given.unwrap_or(Duration::from_secs(30));
    let least = f.run.settle + Duration::from_secs(2);
    if within < least {
        return Err(Failure::usage(format!(
            "--confirm-within {} is too short: each host's settle window ({}) runs inside it, and it needs 2s more (at least {})",
            dream_core::fmt_duration(within),
            dream_core::fmt_duration(f.run.settle),
            dream_core::fmt_duration(least)
        )));
    }
    Ok(within)
}

/// `dream fleet …`: the fleet from flags and `[fleet]`, then the subcommand.
pub(crate) fn run(cmd: FleetCmd) -> Result {
    match cmd {
        FleetCmd::Deploy(a) => {
            let (mut f, file) = fleet_of(&a.fleet, &a.rollout)?;
            if a.judge_share.is_some() || a.judge.any() {
                f.run.judge = Some(
                    a.judge.spec(
                        a.judge_share
                            .unwrap_or(dream_core::supervise::canary::judge::Share::Basis(2500)),
                    ),
                );
            }
            deploy(
                &f,
                &DeployPlan {
                    source: a.source,
                    id: a.id,
                    build: a.build,
                    dry_run: a.dry_run,
                    exclude: a.exclude,
                    keep_git: a.keep_git,
                    bridge: a.bridge,
                    build_on_local: a.build_on == BuildOn::Local,
                    confirm_within: lease(&f, a.confirm_within.or(file.confirm_within))?,
                    keep: match a.keep.or(file.keep).unwrap_or(5) {
                        0 => return Err(Failure::usage("--keep must be at least 1")),
                        n => n,
                    },
                },
            )
        }
        FleetCmd::Rollback(a) => {
            let (f, file) = fleet_of(&a.fleet, &a.rollout)?;
            rollback(
                &f,
                a.id.as_deref(),
                lease(&f, a.confirm_within.or(file.confirm_within))?,
            )
        }
        FleetCmd::Status(a) => status(&fleet_of(&a, &RolloutArgs::default())?.0),
        FleetCmd::Lock(a) => hold(
            &fleet_of(&a.fleet, &RolloutArgs::default())?.0,
            Some(a.message),
        ),
        FleetCmd::Unlock(a) => hold(&fleet_of(&a, &RolloutArgs::default())?.0, None),
    }
}
