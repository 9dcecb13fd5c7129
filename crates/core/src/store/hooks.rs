//! Hooks: executables in `ROOT/.dream/hooks/` run around a deploy's
//! switch, with the deploy lock held.
//!
//! `pre-switch` runs once the release is built and before `current`
//! changes: if it fails, nothing is switched and the deploy fails.
//! `post-switch` runs once the new release is live (after the reload),
//! `post-deploy` when the deploy has finished, `deploy-failed` when it
//! failed (with the reason). Each gets one JSON object on stdin (the hook,
//! the release, the previous one, the root, the host, the user, and the
//! error for `deploy-failed`), runs in its own process group in the
//! release's directory (`ROOT/releases/ID`, so `./bin/migrate` is the
//! release's; the root when the release was never made), with
//! `DREAM_ROOT`, `DREAM_RELEASE` and `DREAM_RELEASE_DIR` set, has
//! [`DEADLINE`] to finish (then its group is killed), and has its output
//! shown line by line.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

/// How long a hook may run.
pub const DEADLINE: Duration = Duration::from_secs(300);

/// The hooks dream knows.
pub const NAMES: [&str; 4] = ["pre-switch", "post-switch", "post-deploy", "deploy-failed"];

/// What a hook reads on stdin.
#[derive(Debug, Clone, Serialize)]
pub struct HookEvent<'a> {
    pub hook: &'a str,
    pub release: &'a str,
    pub previous: Option<&'a str>,
    pub root: &'a Path,
    /// `ROOT/releases/ID`, where the hook runs; absent when the release
    /// was never made (a `deploy-failed` before staging ended).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_dir: Option<PathBuf>,
    pub host: String,
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

impl<'a> HookEvent<'a> {
    pub fn new(hook: &'a str, root: &'a Path, release: &'a str, previous: Option<&'a str>) -> Self {
        let me = crate::store::lock::Holder::me("");
        let release_dir = (!release.is_empty())
            .then(|| crate::store::release::Store::new(root).release_dir(release))
            .filter(|d| d.is_dir());
        HookEvent {
            hook,
            release,
            previous,
            root,
            release_dir,
            host: me.host,
            user: me.user,
            error: None,
        }
    }
}

/// `ROOT/.dream/hooks/NAME`, if it exists.
pub fn path(root: &Path, name: &str) -> Option<PathBuf> {
    let p = crate::store::release::Store::new(root)
        .state()
        .join("hooks")
        .join(name);
    p.is_file().then_some(p)
}

/// Runs hook `event.hook` if the root has it; `Ok` when it has none.
/// `quiet`: its output is kept for the error only.
pub fn run(event: &HookEvent<'_>, quiet: bool) -> Result<(), String> {
    let Some(exe) = path(event.root, event.hook) else {
        return Ok(());
    };
    let name = event.hook;
    let mut cmd = std::process::Command::new(&exe);
    cmd.current_dir(event.release_dir.as_deref().unwrap_or(event.root))
        .env("DREAM_ROOT", event.root)
        .env("DREAM_RELEASE", event.release)
        .env(
            "DREAM_RELEASE_DIR",
            event.release_dir.as_deref().unwrap_or(Path::new("")),
        );
    let json = serde_json::to_vec(event).expect("an event serializes");
    let mut show = |text: &str| {
        if !quiet {
            crate::logtext::say(
                crate::logtext::Level::Info,
                "hook_output",
                &format!("hook {name} | {text}"),
                &[("hook", name.into()), ("line", text.into())],
            );
        }
    };
    // Its end is its exit: a background process it left holding the
    // output never stalls the deploy (and is killed with its group).
    let ended = crate::child::run(
        cmd,
        Some(&json),
        crate::child::Output::Lines {
            show: &mut show,
            tail: 10,
        },
        Some(Instant::now() + DEADLINE),
        None,
    )
    .map_err(|e| format!("hook {name} ({}): {e}", exe.display()))?;
    match ended {
        crate::child::Ended::Exited { status, .. } if status.success() => Ok(()),
        crate::child::Ended::Exited { status, tail, .. } => {
            let said = tail.last().cloned().unwrap_or_default();
            Err(format!(
                "hook {name} {}{}",
                status,
                if said.is_empty() {
                    String::new()
                } else {
                    format!(": {said}")
                }
            ))
        }
        crate::child::Ended::TimedOut { .. } => Err(format!(
            "hook {name} did not finish within {}: killed",
            crate::fmt_duration(DEADLINE)
        )),
        crate::child::Ended::Interrupted(sig) => {
            Err(format!("hook {name}: interrupted by {sig:?}"))
        }
    }
}
