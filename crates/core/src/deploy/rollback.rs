//! `rollback`: back to the previous good release (or a named one), through
//! the same switch, reload and settle as a deploy.

use super::switch::switch_reload_verify;
use super::*;

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
            canary: None,
            pause: None,
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
