//! `dream deploy`, `dream rollback`, `dream releases`.

use std::path::Path;

use dream_core::deploy::{self, Report, Step};
use dream_core::store::lock::Wait;
use dream_core::store::stage::Source;

use crate::cli::DeployCmd;
use crate::exit::{self, Failure, Result};
use crate::print_line;
use crate::{config, serve};

fn wait(flag: Option<std::time::Duration>) -> Wait {
    flag.map_or(Wait::No, Wait::For)
}

/// Progress on stderr, one line per phase with its time.
fn progress(quiet: bool) -> impl FnMut(&Step) {
    move |s: &Step| {
        if !quiet {
            let detail = if s.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", s.detail)
            };
            dream_core::logtext::say(
                dream_core::logtext::Level::Info,
                "deploy_step",
                &format!("{:<9} {:>8}{detail}", s.phase, format!("{:.3}s", s.seconds)),
                &[
                    ("phase", s.phase.into()),
                    ("seconds", s.seconds.into()),
                    ("detail", s.detail.clone().into()),
                ],
            );
        }
    }
}

fn finish(report: &Report, json: bool, what: &str) {
    let total: f64 = report.steps.iter().map(|s| s.seconds).sum();
    let line = format!("{what} {} in {total:.2}s", report.release);
    if json {
        crate::print_json(crate::exit::OK, report);
    } else if dream_core::logtext::json() {
        // --log-format json: every line is JSON, the outcome's too.
        print_line(
            dream_core::logtext::json_line(
                dream_core::logtext::Level::Info,
                what,
                &line,
                &[
                    ("release", report.release.clone().into()),
                    ("seconds", total.into()),
                ],
            )
            .trim_end(),
        );
    } else {
        print_line(&line);
    }
}

pub struct DeployArgs<'a> {
    pub root: Option<&'a Path>,
    pub source: &'a str,
    pub id: Option<String>,
    pub build: Option<String>,
    pub keep: usize,
    pub no_reload: bool,
    pub wait_lock: Option<std::time::Duration>,
    pub max_size: Option<u64>,
    pub confirm_within: Option<std::time::Duration>,
    pub verify: Vec<String>,
    pub settle: std::time::Duration,
    pub canary: Option<dream_core::supervise::canary::judge::Spec>,
    pub pause: Option<std::time::Duration>,
    pub exclude: Vec<String>,
    pub keep_git: bool,
    pub no_hooks: bool,
    pub bridge: Vec<std::path::PathBuf>,
    pub dry_run: bool,
    pub json: bool,
    pub quiet: bool,
}

pub fn deploy(a: DeployArgs<'_>) -> Result {
    let root = crate::serve::root_dir(a.root)?;
    let source = Source::parse(a.source).map_err(Failure::usage)?;
    if a.keep == 0 {
        return Err(Failure::usage("--keep must be at least 1"));
    }
    if a.pause.is_some() && a.canary.is_some() {
        return Err(Failure::usage(
            "--pause stops the old release before the new one starts; a canary runs both: use one",
        ));
    }
    if a.pause.is_some() && a.no_reload {
        return Err(Failure::usage(
            "--pause needs a reload to resume: it cannot go with --no-reload",
        ));
    }
    if a.canary.is_some() && a.no_reload {
        return Err(Failure::usage(
            "--canary needs a reload: it cannot go with --no-reload",
        ));
    }
    let opts = deploy::DeployOptions {
        root,
        source,
        id: a.id,
        build: a.build,
        keep: a.keep,
        reload: !a.no_reload,
        confirm_within: a.confirm_within,
        verify: a.verify,
        exclude: a.exclude,
        keep_git: a.keep_git,
        hooks: !a.no_hooks,
        bridge: a.bridge,
        go_live: true,
        wait_lock: wait(a.wait_lock),
        command: format!("dream deploy {}", a.source),
        max_size: a.max_size,
        quiet: a.quiet || a.json,
        interruptible: true,
        settle: a.settle,
        canary: a.canary,
        pause: a.pause,
    };
    if a.dry_run {
        let plan = deploy::plan(&opts)?;
        if a.json {
            crate::print_json(crate::exit::OK, &plan);
        } else {
            print_line(&format!("plan for {} (nothing is written):", plan.release));
            print_line(&format!(
                "  {} files, {}: {} shared with {}, {} copied ({})",
                plan.files,
                deploy::human_bytes(plan.bytes),
                plan.shared_files,
                plan.previous.as_deref().unwrap_or("nothing"),
                plan.copied_files,
                deploy::human_bytes(plan.copied_bytes)
            ));
            if !plan.excluded.is_empty() {
                print_line(&format!("  left out: {}", plan.excluded.join(", ")));
            }
            if let Some(b) = &plan.build {
                print_line(&format!("  build: {b}"));
            }
            print_line(&format!("  {}", plan.switch));
        }
        return Ok(());
    }
    let report = deploy::deploy(&opts, &mut progress(a.quiet || a.json))?;
    finish(&report, a.json, "deployed");
    Ok(())
}

pub struct RollbackArgs<'a> {
    pub root: Option<&'a Path>,
    pub id: Option<&'a str>,
    pub no_reload: bool,
    pub verify: &'a [String],
    pub settle: std::time::Duration,
    pub wait_lock: Option<std::time::Duration>,
    pub dry_run: bool,
    pub json: bool,
    pub quiet: bool,
}

pub fn rollback(a: RollbackArgs<'_>) -> Result {
    let RollbackArgs {
        root,
        id,
        no_reload,
        verify,
        settle,
        wait_lock,
        dry_run,
        json,
        quiet,
    } = a;
    let root = crate::serve::root_dir(root)?;
    if dry_run {
        let store = dream_core::store::release::Store::new(&root);
        let target = deploy::rollback_target(&store, id)?;
        let current = store.current();
        if json {
            crate::print_json(
                crate::exit::OK,
                serde_json::json!({"dry_run": true, "previous": current, "release": target}),
            );
        } else {
            print_line(&format!(
                "would roll back: current: {} -> {target}, then reload (nothing is written)",
                current.as_deref().unwrap_or("nothing")
            ));
        }
        return Ok(());
    }
    let report = deploy::rollback(
        &root,
        id,
        !no_reload,
        verify,
        settle,
        wait(wait_lock),
        "dream rollback",
        &mut progress(quiet || json),
    )?;
    finish(&report, json, "rolled back to");
    Ok(())
}

pub fn releases(root: Option<&Path>, json: bool) -> Result {
    let root = crate::serve::root_dir(root)?;
    let list = deploy::list(&root);
    if json {
        crate::print_json(crate::exit::OK, serde_json::json!({"releases": list}));
        return Ok(());
    }
    if list.is_empty() {
        print_line(&format!("no releases in {}/releases", root.display()));
        return Ok(());
    }
    print_line(&format!(
        "  {:<40} {:<11} {:>12}  {:>9}  {}",
        "RELEASE", "STATE", "AGE", "SIZE", "FILES"
    ));
    for r in list {
        let age = r
            .age_s
            .map(|s| {
                format!(
                    "{} ago",
                    dream_core::fmt_duration(std::time::Duration::from_secs_f64(s))
                )
            })
            .unwrap_or_else(|| "age unknown".into());
        print_line(&format!(
            "{} {:<40} {:<11} {:>12}  {:>9}  {} files",
            if r.current { "*" } else { " " },
            r.id,
            r.state,
            age,
            deploy::human_bytes(r.bytes),
            r.files
        ));
    }
    Ok(())
}

/// `dream releases --verify [ID]`: every release's files (or ID's) against
/// its manifest; exit 1 naming each difference.
pub fn verify(root: Option<&Path>, id: Option<&str>, json: bool) -> Result {
    let root = crate::serve::root_dir(root)?;
    if let Some(id) = id {
        dream_core::store::release::check_id(id).map_err(Failure::usage)?;
    }
    let results = deploy::verify(&root, id)?;
    let bad: usize = results.iter().filter(|r| !r.ok).count();
    if json {
        crate::print_json(
            if bad == 0 { exit::OK } else { exit::FAILED },
            serde_json::json!({ "releases": results }),
        );
    } else {
        for r in &results {
            if r.ok {
                print_line(&format!("ok       {} ({} entries)", r.id, r.entries));
            } else {
                print_line(&format!("DIFFERS  {}:", r.id));
                if let Some(e) = &r.error {
                    print_line(&format!("  {e}"));
                }
                for d in &r.differences {
                    print_line(&format!("  {d}"));
                }
            }
        }
    }
    if bad == 0 {
        Ok(())
    } else if json {
        Err(Failure::silent(exit::FAILED))
    } else {
        Err(Failure::failed(format!(
            "{bad} of {} release(s) differ from their manifests",
            results.len()
        )))
    }
}

/// `dream deploy`: flags, then `[deploy]` in dream.toml, then the defaults.
pub(crate) fn run(a: DeployCmd) -> Result {
    let root = serve::root_dir(a.root.as_deref())?;
    let file = config::load(&root, a.config.as_deref())?.deploy;
    let canary = file.canary(&a.canary, a.no_canary)?;
    if canary.is_none() && a.canary.judge.any() {
        return Err(Failure::usage(
            "--judge-* set how a canary is judged: add --canary SHARE (or [deploy] canary in dream.toml)",
        ));
    }
    deploy(DeployArgs {
        root: Some(&root),
        source: &a.source,
        id: a.id,
        build: a.build.or(file.build),
        keep: a.keep.or(file.keep).unwrap_or(5),
        no_reload: a.no_reload,
        wait_lock: a.wait_lock.or(file.wait_lock),
        max_size: a.max_size.or(file.max_size),
        confirm_within: a.confirm_within.or(file.confirm_within),
        verify: a.verify,
        settle: a
            .settle
            .or(file.settle)
            .unwrap_or(dream_core::deploy::DEFAULT_SETTLE),
        canary,
        pause: match (a.pause, a.pause_max) {
            (true, max) => Some(max.unwrap_or(dream_core::supervise::pool::DEFAULT_PAUSE)),
            (false, _) => None,
        },
        exclude: if a.exclude.is_empty() {
            file.exclude.clone().unwrap_or_default()
        } else {
            a.exclude.clone()
        },
        keep_git: a.keep_git,
        no_hooks: a.no_hooks,
        bridge: a.bridge,
        dry_run: a.dry_run,
        json: a.json,
        quiet: a.quiet,
    })
}
