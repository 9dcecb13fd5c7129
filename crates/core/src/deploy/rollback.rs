//! `rollback`, and which releases a deploy keeps when it prunes.

use super::switch::switch_reload_verify;
use super::*;

/// Releases some live process runs in: a supervisor's generations, or any
/// process whose cwd is inside one.
pub(super) fn in_use(store: &Store) -> Vec<String> {
    let mut used = Vec::new();
    if let Ok(s) = control::status(&store.root, Some(Duration::from_secs(10))) {
        used.extend(s.pool.generations.into_iter().map(|g| g.release));
    }
    let releases = store
        .releases()
        .canonicalize()
        .unwrap_or_else(|_| store.releases());
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cwd) = std::fs::read_link(e.path().join("cwd"))
            && let Ok(rest) = cwd.strip_prefix(&releases)
            && let Some(first) = rest.components().next()
        {
            used.push(first.as_os_str().to_string_lossy().into_owned());
        }
    }
    used
}

/// Removes releases beyond `--keep`: the newest `keep` *good* releases
/// stay (bad ones never push a rollback target out), and of the bad ones
/// at most `keep`, the newest, for a look at what failed. `current`,
/// `previous` and any release a process runs in always stay.
pub(super) fn prune(
    store: &Store,
    keep: usize,
    current: &str,
    previous: Option<&str>,
) -> Vec<String> {
    let bad = store.bad();
    let used = in_use(store);
    let (mut good_kept, mut bad_kept) = (0, 0);
    let mut doomed = Vec::new();
    for id in store.ordered().into_iter().rev() {
        let protected = id == current || Some(id.as_str()) == previous || used.contains(&id);
        let seen = if bad.contains(&id) {
            &mut bad_kept
        } else {
            &mut good_kept
        };
        *seen += 1;
        if *seen > keep && !protected {
            doomed.push(id);
        }
    }
    let mut removed = Vec::new();
    for id in doomed {
        if release::remove_tree(&store.release_dir(&id)).is_ok() {
            let _ = std::fs::remove_file(store.manifest_path(&id));
            let _ = store.append(&Event::new(EventKind::Pruned, &id));
            removed.push(id);
        }
    }
    removed.reverse();
    removed
}

/// `dream rollback [ID]`. INT, TERM and HUP are read, not fatal: an
/// interrupt after the switch puts `current` back (as for a deploy).
#[allow(clippy::too_many_arguments)]
pub fn rollback(
    root: &Path,
    id: Option<&str>,
    reload: bool,
    verify: &[String],
    settle: Duration,
    wait_lock: Wait,
    command: &str,
    out: &mut dyn FnMut(&Step),
) -> Result<Report, DeployError> {
    let mut signals = Signals::new(&[
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ])
    .map_err(|e| io_failure("signals", e))?;
    let store = Store::new(root);
    store
        .prepare()
        .map_err(|e| err(Kind::Usage, e.to_string()))?;
    let _lock = take_lock(&store, command, wait_lock)?;
    let current = store.current();
    let target = rollback_target(&store, id)?;
    let mut report = Report {
        release: target.clone(),
        previous: current.clone(),
        ..Report::default()
    };
    let mut p = Progress {
        started: Instant::now(),
        report: &mut report,
        out,
    };
    p.step(
        "locked",
        format!(
            "rolling back from {} to {target}",
            current.as_deref().unwrap_or("nothing")
        ),
    );
    switch_reload_verify(
        &store,
        &target,
        current.as_deref(),
        if id.is_some() {
            EventKind::RolledBackNamed
        } else {
            EventKind::RolledBack
        },
        &ReloadHow {
            reload,
            provisional: None,
            verify: verify.to_vec(),
            hooks: true,
            quiet: false,
            settle,
        },
        Some(&mut signals),
        &mut p,
    )?;
    Ok(report)
}

/// The release a rollback goes to: `id`, or the previous good one.
pub fn rollback_target(store: &Store, id: Option<&str>) -> Result<String, DeployError> {
    match id {
        Some(id) => {
            release::check_id(id).map_err(|e| err(Kind::Usage, e))?;
            if !store.release_dir(id).is_dir() {
                return Err(err(
                    Kind::Usage,
                    format!("no release {id} in {}", store.releases().display()),
                ));
            }
            Ok(id.to_string())
        }
        None => store.previous_good().ok_or_else(|| {
            err(
                Kind::Failed,
                "no previous good release to roll back to (see dream releases)",
            )
        }),
    }
}
