//! `dream check --report FILE.html` (and the demo's report): the page, with
//! the deploys, rollbacks and reverts of a root's history marked on it.

use std::path::Path;

use dream_core::store::release::{EventKind, Store};

use crate::exit::{Failure, Result};

/// What happened to `root` during the run (its history's switches), as
/// marks at seconds since the run began.
pub fn marks(root: &Path, report: &dream_check::Report) -> Vec<dream_check::Mark> {
    let end = report.started_unix_s + report.duration_s;
    Store::new(root)
        .history()
        .into_iter()
        .filter_map(|e| {
            let kind = match e.event {
                // A switch back after a failure is not a deploy.
                EventKind::Switched if e.reason.is_none() => "deploy",
                EventKind::RolledBack | EventKind::RolledBackNamed => "rollback",
                EventKind::Reverted => "revert",
                _ => return None,
            };
            let at = humantime::parse_rfc3339(&e.time)
                .ok()?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_secs_f64();
            (report.started_unix_s..=end)
                .contains(&at)
                .then(|| dream_check::Mark {
                    t_s: at - report.started_unix_s,
                    kind: kind.into(),
                    release: e.release,
                })
        })
        .collect()
}

/// Writes the page for `report` to `path` (whole or not at all), with
/// `root`'s marks if given.
pub fn write(path: &Path, report: &dream_check::Report, root: Option<&Path>) -> Result {
    let marks = root.map(|r| marks(r, report)).unwrap_or_default();
    let page = dream_check::html(report, &marks, &format!("dream check {}", report.url));
    let tmp = path.with_extension("html.tmp");
    std::fs::write(&tmp, page)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Failure::failed(format!("--report {}: {e}", path.display()))
        })
}
