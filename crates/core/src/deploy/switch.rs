//! Phase two: going live. `current` is switched, the supervisor reloads
//! (provisionally when the deploy must confirm), the release is verified
//! and the generation settles; any failure switches back. Also what a
//! fleet agent asks for one phase at a time: go live, confirm, extend,
//! revert.

use super::releases::prune;
use super::*;

impl Pipeline<'_, '_> {
    /// Switches `current` to the release, asks the supervisor to reload
    /// (switching back if that fails), and prunes.
    pub(super) fn go_live(&mut self, id: &str) -> Result<(), DeployError> {
        let (opts, store) = (self.opts, self.store);
        // The last moment to stop: after the switch the deploy finishes.
        self.interrupted().inspect_err(|_| {
            let _ = release::remove_tree(&store.release_dir(id));
            let _ = std::fs::remove_file(store.manifest_path(id));
        })?;
        switch_reload_verify(
            store,
            id,
            self.previous.as_deref(),
            EventKind::Switched,
            &ReloadHow {
                reload: opts.reload,
                provisional: opts.confirm_within.map(|within| Provisional {
                    within,
                    confirm_now: true,
                }),
                verify: opts.verify.clone(),
                hooks: opts.hooks,
                quiet: opts.quiet,
                settle: opts.settle,
                canary: opts.canary.clone(),
                pause: opts.pause,
            },
            self.signals.as_mut(),
            &mut self.p,
        )?;
        let pruned = prune(store, opts.keep, id, self.previous.as_deref());
        if !pruned.is_empty() {
            self.p.report.pruned = pruned.clone();
            self.p.step("pruned", pruned.join(", "));
        }
        Ok(())
    }
}

/// The `pre-switch` hook, if there is one: its failure marks `id` bad and
/// nothing is switched.
fn pre_switch_hook(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    quiet: bool,
    p: &mut Progress<'_>,
) -> Result<(), DeployError> {
    let event = hooks::HookEvent::new("pre-switch", &store.root, id, previous);
    if hooks::path(&store.root, "pre-switch").is_some() {
        hooks::run(&event, quiet).map_err(|e| {
            let mut bad = Event::new(EventKind::Failed, id);
            bad.reason = Some(e.clone());
            let _ = store.append(&bad);
            err(Kind::Failed, format!("{e}; nothing was switched"))
        })?;
        p.step("pre-switch", "hook passed".into());
    }
    Ok(())
}

/// `current` to `id`, and the history's record of it; a switch the
/// history cannot record is undone.
fn switch_and_record(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    event: EventKind,
    p: &mut Progress<'_>,
) -> Result<(), DeployError> {
    let took = store
        .switch(id)
        .map_err(|e| io_failure("switching current", e))?;
    p.report.switch_ms = took.as_secs_f64() * 1000.0;
    let mut ev = Event::new(event, id);
    ev.previous = previous.map(str::to_string);
    if let Err(e) = store.append(&ev) {
        // current must never name a release that the history does not
        // record and no supervisor was asked to serve: switch it back.
        let back = match previous {
            Some(prev) => match store.switch(prev) {
                Ok(_) => format!("current switched back to {prev}"),
                Err(e) => format!("could not switch current back to {prev}: {e}"),
            },
            None => "there is no previous release to switch back to".into(),
        };
        return Err(io_failure(
            &format!("recording the switch to {id} in the history ({back})"),
            e,
        ));
    }
    Ok(())
}

/// Switches `current` to `id`, asks a running supervisor to reload, and
/// switches back (marking `id` bad) if the reload fails.
pub(super) fn switch_reload_verify(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    event: EventKind,
    how: &ReloadHow,
    signals: Option<&mut Signals>,
    p: &mut Progress<'_>,
) -> Result<(), DeployError> {
    let (reload, provisional) = (how.reload, how.provisional);
    let mut signals = signals;
    let paused = match how.pause {
        Some(max) => pause(store, max, signals.as_deref_mut(), p)?,
        None => false,
    };
    if how.hooks
        && let Err(e) = pre_switch_hook(store, id, previous, how.quiet, p)
    {
        return Err(if paused { resume_after(store, e) } else { e });
    }
    if let Err(e) = switch_and_record(store, id, previous, event, p) {
        return Err(if paused { resume_after(store, e) } else { e });
    }
    p.step("switched", format!("current -> releases/{id}"));
    if !reload {
        p.step("reload", "skipped (--no-reload)".into());
        return Ok(());
    }
    let mut deadline = reload_deadline(store);
    if let Some(c) = &how.canary {
        // Its start, its window, then its promotion's reload.
        deadline = 2 * deadline + Duration::from_millis(c.judge_ms);
        p.step(
            "canary",
            format!(
                "release {id} starts beside the live one with {} of new connections; judged for {}{}",
                c.share,
                crate::fmt_duration(Duration::from_millis(c.judge_ms)),
                c.judge_path
                    .as_deref()
                    .map_or(" on its workers' exits".into(), |path| format!(" on GET {path}"))
            ),
        );
    }
    let request = control::Request::Reload {
        confirm_within_ms: provisional.map(|p| p.within.as_millis() as u64),
        canary: how.canary.clone(),
    };
    let answer = control::ask_or_interrupt(
        &store.root,
        &request,
        Some(deadline),
        signals.as_deref().map(|s| s.as_fd()),
    );
    let failure = match answer {
        Ok(a) if a.ok => {
            let generation = a.live().map(|(g, _)| g);
            return after_reload(store, id, previous, how, generation, signals, p);
        }
        Err(control::ControlError::Refused {
            unsupported: true,
            message: why,
            ..
        }) => {
            // Nothing was started: the release is not at fault.
            let restored = switch_back(store, id, previous, format!("{id}: {why}"));
            return Err(err(
                Kind::Failed,
                format!("the supervisor refused: {why}\n{restored}; {id} is not marked bad"),
            ));
        }
        Ok(a) => a.error.unwrap_or_else(|| "unknown error".into()),
        Err(control::ControlError::NotRunning { .. }) if !how.verify.is_empty() => {
            // A check the user asked for is never skipped in silence.
            let restored = switch_back(
                store,
                id,
                previous,
                format!("{id} could not be verified: no supervisor"),
            );
            return Err(err(
                Kind::Failed,
                format!(
                    "--verify needs a running supervisor, and none is running for this root: release {id} was not verified\n{restored}; {id} is not marked bad"
                ),
            ));
        }
        Err(control::ControlError::NotRunning { .. }) => {
            p.step(
                "reload",
                "no supervisor is running for this root; current is switched".into(),
            );
            post_switch(store, id, previous, how, p);
            return Ok(());
        }
        Err(control::ControlError::Interrupted) => {
            return Err(interrupted_after_switch(store, id, previous, signals));
        }
        Err(e) => return Err(could_not_ask(store, id, previous, e, deadline)),
    };
    p.report.supervisor = true;
    let mut bad = Event::new(EventKind::Failed, id);
    bad.reason = Some(failure.clone());
    let _ = store.append(&bad);
    let restored = switch_back(store, id, previous, format!("{id} failed to start"));
    Err(err(
        Kind::Failed,
        format!("reload failed: {failure}\n{restored}; release {id} is marked bad"),
    ))
}

/// `--pause`: the supervisor stops accepting and drains the live
/// generation; true once nothing serves (false: no supervisor runs, so
/// nothing is served anyway). An interrupt resumes at once.
fn pause(
    store: &Store,
    max: Duration,
    signals: Option<&mut Signals>,
    p: &mut Progress<'_>,
) -> Result<bool, DeployError> {
    let request = control::Request::Pause {
        max_ms: Some(max.as_millis() as u64),
    };
    let answer = control::ask_or_interrupt(
        &store.root,
        &request,
        Some(reload_deadline(store)),
        signals.as_deref().map(|s| s.as_fd()),
    );
    match answer {
        Ok(a) if a.ok => {
            p.step(
                "paused",
                format!(
                    "nothing accepts; connections wait in the backlog (at most {})",
                    crate::fmt_duration(max)
                ),
            );
            Ok(true)
        }
        Ok(a) => Err(err(
            Kind::Failed,
            format!(
                "could not pause: {}; nothing was switched",
                a.error.unwrap_or_else(|| "unknown error".into())
            ),
        )),
        Err(control::ControlError::NotRunning { .. }) => {
            p.step("pause", "no supervisor is running for this root".into());
            Ok(false)
        }
        Err(control::ControlError::Interrupted) => {
            let sig = received(signals);
            let _ = control::tell(&store.root, &control::Request::Resume);
            Err(err(
                Kind::Interrupted(sig as i32),
                format!(
                    "interrupted by {sig:?} while pausing: the supervisor was asked to resume; nothing was switched"
                ),
            ))
        }
        Err(e) => Err(err(
            Kind::Temporary,
            format!("could not pause ({e}); nothing was switched"),
        )),
    }
}

/// A paused deploy that stops before its switch: the release that was
/// paused serves again.
fn resume_after(store: &Store, mut e: DeployError) -> DeployError {
    let how = match control::ask(
        &store.root,
        &control::Request::Resume,
        Some(reload_deadline(store)),
    ) {
        Ok(a) if a.ok => "the paused release serves again".to_string(),
        Ok(a) => format!(
            "resuming failed: {}",
            a.error.unwrap_or_else(|| "unknown error".into())
        ),
        Err(x) => format!("could not ask the supervisor to resume: {x}"),
    };
    e.message = format!("{}; {how}", e.message);
    e
}

/// The new generation is live: verify, settle, confirm as asked, then the
/// post-switch hook.
fn after_reload(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    how: &ReloadHow,
    generation: Option<u64>,
    signals: Option<&mut Signals>,
    p: &mut Progress<'_>,
) -> Result<(), DeployError> {
    p.report.supervisor = true;
    p.report.generation = generation;
    if how.canary.is_some() {
        p.step(
            "promoted",
            store
                .promotion(id)
                .unwrap_or_else(|| "the judge promoted the canary".into()),
        );
    }
    p.step(
        "reloaded",
        format!(
            "generation {} is live{}",
            generation.map_or("?".into(), |g| g.to_string()),
            if how.provisional.is_some() {
                ", provisionally"
            } else {
                ""
            }
        ),
    );
    if !how.verify.is_empty() {
        verify_or_go_back(store, id, previous, &how.verify, p)?;
    }
    if let Some(generation) = generation
        && !how.settle.is_zero()
    {
        settle(store, id, previous, generation, how.settle, signals, p)?;
    }
    if how.provisional.is_some_and(|p| p.confirm_now) {
        confirm(store, id, generation, p)?;
    }
    post_switch(store, id, previous, how, p);
    Ok(())
}

/// Waits for the supervisor to say that `generation` stayed up for
/// `within` after it went live (`--settle`): a revert, a failure or a crash
/// loop inside the window fails the deploy (the supervisor has already put
/// the previous release back when it reverted), so that success is only
/// ever reported for a release that serves.
#[allow(clippy::too_many_arguments)]
pub(super) fn settle(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    generation: u64,
    within: Duration,
    signals: Option<&mut Signals>,
    p: &mut Progress<'_>,
) -> Result<(), DeployError> {
    let request = control::Request::Settle {
        generation,
        within_ms: within.as_millis() as u64,
    };
    let answer = control::ask_or_interrupt(
        &store.root,
        &request,
        Some(within + Duration::from_secs(30)),
        signals.as_deref().map(|s| s.as_fd()),
    );
    match answer {
        Ok(a) if a.ok => {
            p.step(
                "settled",
                format!(
                    "generation {generation} stayed up for {}",
                    crate::fmt_duration(within)
                ),
            );
            Ok(())
        }
        Ok(a) => Err(err(
            Kind::Failed,
            format!(
                "release {id} did not settle within {}: {}; current names {}",
                crate::fmt_duration(within),
                a.error.unwrap_or_else(|| "unknown error".into()),
                store.current().as_deref().unwrap_or("nothing")
            ),
        )),
        Err(control::ControlError::Interrupted) => {
            Err(interrupted_after_switch(store, id, previous, signals))
        }
        Err(e) => Err(err(
            Kind::Temporary,
            format!(
                "could not learn whether release {id} settled ({e}); it is live (see dream status)"
            ),
        )),
    }
}

/// An INT, TERM or HUP after the switch, while waiting for the supervisor:
/// `current` goes back to the previous release and the supervisor is asked
/// to load it (it finishes the reload it took, then goes back); nothing is
/// marked bad. Exit 128 + the signal.
pub(super) fn interrupted_after_switch(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    signals: Option<&mut Signals>,
) -> DeployError {
    let sig = received(signals);
    let restored = match previous {
        Some(_) => {
            let r = switch_back(
                store,
                id,
                previous,
                format!("the deploy of {id} was interrupted"),
            );
            let asked = control::tell(
                &store.root,
                &control::Request::Reload {
                    confirm_within_ms: None,
                    canary: None,
                },
            );
            match asked {
                Ok(()) => format!("{r}; the supervisor was asked to go back to it"),
                Err(e) => format!("{r}; could not ask the supervisor to go back to it: {e}"),
            }
        }
        None => format!("current stays on {id} (there is no previous release)"),
    };
    err(
        Kind::Interrupted(sig as i32),
        format!("interrupted by {sig:?} after the switch: {restored}; {id} is not marked bad"),
    )
}

/// `post-switch`: the release is live; a failing hook is reported, and
/// changes nothing.
pub(super) fn post_switch(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    how: &ReloadHow,
    p: &mut Progress<'_>,
) {
    if !how.hooks || hooks::path(&store.root, "post-switch").is_none() {
        return;
    }
    let event = hooks::HookEvent::new("post-switch", &store.root, id, previous);
    match hooks::run(&event, how.quiet) {
        Ok(()) => p.step("post-switch", "hook passed".into()),
        Err(e) => p.step("post-switch", format!("{e} (the release stays live)")),
    }
}

/// How a switch asks the supervisor: whether to reload at all, whether
/// provisionally, and what to request through it afterwards.
#[derive(Debug, Clone, Default)]
pub struct ReloadHow {
    pub reload: bool,
    pub provisional: Option<Provisional>,
    pub verify: Vec<String>,
    /// Run `pre-switch` and `post-switch` from `ROOT/.dream/hooks`.
    pub hooks: bool,
    /// Hooks' output is not shown.
    pub quiet: bool,
    /// How long the new generation must stay up after going live before
    /// the switch counts as done (`--settle`; zero: not waited for).
    pub settle: Duration,
    /// A canary reload (`--canary`): answered once the judge promoted it
    /// and its full generation is live, or it was reverted.
    pub canary: Option<crate::supervise::canary::judge::Spec>,
    /// `--pause`: before the `pre-switch` hook, the supervisor stops
    /// accepting (for at most this long) and the live generation drains;
    /// the reload after the switch resumes.
    pub pause: Option<Duration>,
}

/// `--settle`'s default: long enough to catch a release that crashes as it
/// boots or on its first requests (the common failure), short enough to
/// leave a deploy's time nearly as it was; the supervisor's probation
/// (10 s) still watches after it.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(1);

/// Requests each of `paths` through the supervisor's first listening
/// socket; on a failure the release is marked bad, `current` switched
/// back and the supervisor reloaded onto the previous release.
pub(super) fn verify_or_go_back(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    paths: &[String],
    p: &mut Progress<'_>,
) -> Result<(), DeployError> {
    let why = match verify_release(store, id, paths) {
        Ok(()) => {
            p.step("verified", paths.join(" "));
            return Ok(());
        }
        Err(why) => why,
    };
    let mut bad = Event::new(EventKind::Failed, id);
    bad.reason = Some(format!("verification failed: {why}"));
    let _ = store.append(&bad);
    let restored = switch_back(store, id, previous, format!("{id} failed verification"));
    let reloaded = if previous.is_some() {
        let request = control::Request::Reload {
            confirm_within_ms: None,
            canary: None,
        };
        match control::ask(&store.root, &request, Some(reload_deadline(store))) {
            Ok(a) if a.ok => ", and reloaded".to_string(),
            Ok(a) => format!(
                ", but its reload failed: {}",
                a.error.unwrap_or_else(|| "unknown error".into())
            ),
            Err(e) => format!(", but the supervisor could not be asked to reload: {e}"),
        }
    } else {
        String::new()
    };
    Err(err(
        Kind::Failed,
        format!("verification failed: {why}\n{restored}{reloaded}; release {id} is marked bad"),
    ))
}

/// `GET path` for each path, through the supervisor's first listening
/// socket (an unspecified address is reached on loopback): each must
/// answer 2xx or 3xx, and an `X-Dream-Release` header must name `id`.
pub fn verify_release(store: &Store, id: &str, paths: &[String]) -> Result<(), String> {
    let status = control::status(&store.root, Some(Duration::from_secs(10)))
        .map_err(|e| format!("cannot find the supervisor's socket: {e}"))?;
    let address = status
        .sockets
        .first()
        .map(|s| s.address.clone())
        .ok_or("the supervisor has no listening socket")?;
    for path in paths {
        // Right after the reload a worker of the previous generation may
        // still take a connection or two while it drains: an answer from
        // another release is asked again, for a few seconds.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let crate::probe::Answer { code, release, .. } =
                crate::probe::http_get(&address, path, Duration::from_secs(10))?;
            match release {
                Some(r) if r != id => {
                    if std::time::Instant::now() >= deadline {
                        return Err(format!("GET {path} was answered by release {r}, not {id}"));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ if !(200..400).contains(&code) => {
                    return Err(format!("GET {path} answered {code}"));
                }
                _ => break,
            }
        }
    }
    Ok(())
}

/// A provisional reload: the supervisor reverts it unless confirmed
/// within `within`; `confirm_now`: this deploy confirms it as soon as the
/// reload succeeded (a fleet host waits for the fleet's decision).
#[derive(Debug, Clone, Copy)]
pub struct Provisional {
    pub within: Duration,
    pub confirm_now: bool,
}

/// Confirms a provisional generation. If the supervisor reverted it
/// meanwhile (it crashed on probation, or the confirmation came too late),
/// the deploy fails: the supervisor has already switched `current` back
/// and marked the release bad.
pub(super) fn confirm(
    store: &Store,
    id: &str,
    generation: Option<u64>,
    p: &mut Progress<'_>,
) -> Result<(), DeployError> {
    let request = control::Request::Confirm { generation };
    match control::ask(&store.root, &request, Some(Duration::from_secs(30))) {
        Ok(a) if a.ok => {
            p.step("confirmed", format!("release {id} stays"));
            Ok(())
        }
        Ok(a) => Err(err(
            Kind::Failed,
            format!(
                "the supervisor reverted release {id}: {}",
                a.error.unwrap_or_else(|| "unknown error".into())
            ),
        )),
        Err(e) => Err(err(
            Kind::Temporary,
            format!(
                "could not confirm release {id} ({e}); the supervisor reverts it when its confirmation deadline passes"
            ),
        )),
    }
}

/// Switches `current` back to `previous` after `id` did not go live, and
/// records it (a `switched` event with the reason, which does not count as
/// going live); returns what happened, for the error message.
pub(super) fn switch_back(store: &Store, id: &str, previous: Option<&str>, why: String) -> String {
    let Some(prev) = previous else {
        return "there is no previous release to switch back to".into();
    };
    match store.switch_back(id, prev, why) {
        Ok(_) => format!("current switched back to {prev}, which is still serving"),
        Err(e) => format!("could not switch current back to {prev}: {e}"),
    }
}

/// How long a deploy waits for the supervisor's answer to a reload: the
/// new generation's ready timeout, once more for a reload queued ahead of
/// it, its drain timeout, and a margin; without a status, 150 s.
pub(super) fn reload_deadline(store: &Store) -> Duration {
    match control::status(&store.root, Some(Duration::from_secs(10))) {
        Ok(s) => {
            let ms = Duration::from_millis;
            2 * ms(s.pool.ready_timeout_ms) + ms(s.pool.drain_timeout_ms) + Duration::from_secs(30)
        }
        Err(_) => Duration::from_secs(150),
    }
}

/// The deploy could not get an answer from the supervisor: that says
/// nothing about the release, so nothing is marked bad, and the exit is
/// 111 (try again). When the request was never taken (refused, or the
/// connection failed), `current` is switched back, so that it names what
/// is served; when it was taken but not answered in time, the supervisor
/// will carry it out, so `current` stays.
pub(super) fn could_not_ask(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    e: control::ControlError,
    deadline: Duration,
) -> DeployError {
    let timed_out = matches!(&e, control::ControlError::Io { source, .. }
        if matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
    if timed_out {
        return err(
            Kind::Temporary,
            format!(
                "the supervisor took the reload but did not answer within {}; current names {id}, which it loads when it can (see dream status); nothing is marked bad",
                crate::fmt_duration(deadline)
            ),
        );
    }
    let restored = switch_back(
        store,
        id,
        previous,
        format!("could not ask the supervisor to reload {id}"),
    );
    let code = if e.is_temporary() {
        Kind::Temporary
    } else {
        Kind::Failed
    };
    err(
        code,
        format!(
            "could not ask the supervisor to reload: {e}\n{restored}; release {id} is not marked bad (deploy again)"
        ),
    )
}

/// The signal that interrupted a wait on the supervisor (SIGINT if it
/// cannot be read back).
fn received(signals: Option<&mut Signals>) -> nix::sys::signal::Signal {
    signals
        .and_then(|s| s.try_next().ok().flatten())
        .unwrap_or(nix::sys::signal::Signal::SIGINT)
}

/// An INT, TERM or HUP received since the deploy began ends it here,
/// before anything was switched (staging is removed by the caller).
pub(super) fn interrupted(signals: Option<&mut Signals>) -> Result<(), DeployError> {
    match signals.and_then(|s| s.try_next().ok().flatten()) {
        Some(sig) => Err(err(
            Kind::Interrupted(sig as i32),
            format!("interrupted by {sig:?}; nothing was switched"),
        )),
        None => Ok(()),
    }
}

/// Switches `current` to a release prepared earlier (`go_live: false`)
/// and asks the supervisor for a reload, provisional if `provisional`;
/// the caller holds the deploy lock. Returns the live generation.
pub fn go_live_prepared(
    root: &Path,
    id: &str,
    provisional: Option<Provisional>,
    verify: &[String],
    settle: Duration,
    canary: Option<crate::supervise::canary::judge::Spec>,
    out: &mut dyn FnMut(&Step),
) -> Result<Report, DeployError> {
    let store = Store::new(root);
    release::check_id(id).map_err(|e| err(Kind::Usage, e))?;
    if !store.release_dir(id).is_dir() {
        return Err(err(Kind::Failed, format!("no prepared release {id}")));
    }
    let previous = store.current();
    let mut report = Report {
        release: id.to_string(),
        previous: previous.clone(),
        ..Report::default()
    };
    if previous.as_deref() == Some(id) {
        // Already live (a repeated fleet deploy converging): nothing to do.
        return Ok(report);
    }
    let mut p = Progress {
        started: Instant::now(),
        report: &mut report,
        out,
    };
    switch_reload_verify(
        &store,
        id,
        previous.as_deref(),
        EventKind::Switched,
        &ReloadHow {
            reload: true,
            provisional,
            verify: verify.to_vec(),
            hooks: true,
            quiet: true,
            settle,
            canary,
            pause: None,
        },
        None,
        &mut p,
    )?;
    Ok(report)
}

/// Asks the supervisor to keep provisional generation `generation`;
/// without a supervisor there is nothing to confirm.
pub fn confirm_generation(root: &Path, generation: Option<u64>) -> Result<(), DeployError> {
    let request = control::Request::Confirm { generation };
    match control::ask(root, &request, Some(Duration::from_secs(30))) {
        Ok(a) if a.ok => Ok(()),
        Ok(a) => Err(err(
            Kind::Failed,
            a.error.unwrap_or_else(|| "unknown error".into()),
        )),
        Err(control::ControlError::NotRunning { .. }) => Ok(()),
        Err(e) => Err(err(Kind::Temporary, e.to_string())),
    }
}

/// Keeps provisional generation `generation` provisional for `within`
/// from now (see [`control::Request::Extend`]).
pub fn extend_generation(
    root: &Path,
    generation: u64,
    within: Duration,
) -> Result<(), DeployError> {
    let request = control::Request::Extend {
        generation,
        within_ms: within.as_millis() as u64,
    };
    match control::ask(root, &request, Some(Duration::from_secs(5))) {
        Ok(a) if a.ok => Ok(()),
        Ok(a) => Err(err(
            Kind::Failed,
            a.error.unwrap_or_else(|| "unknown error".into()),
        )),
        Err(e) => Err(err(Kind::Temporary, e.to_string())),
    }
}

/// Puts a host back on `to` after a fleet decided against `from`: `current`
/// switched back (if it names `from`), `from` marked bad with `reason`, and
/// a reload. The caller holds the deploy lock.
pub fn revert_to(root: &Path, from: &str, to: &str, reason: &str) -> Result<(), DeployError> {
    let store = Store::new(root);
    let mut bad = Event::new(EventKind::Failed, from);
    bad.reason = Some(reason.to_string());
    let _ = store.append(&bad);
    store
        .switch_back(from, to, reason.to_string())
        .map_err(|e| io_failure("switching current back", e))?;
    let request = control::Request::Reload {
        confirm_within_ms: None,
        canary: None,
    };
    match control::ask(&store.root, &request, Some(reload_deadline(&store))) {
        Ok(a) if a.ok => Ok(()),
        Ok(a) => Err(err(
            Kind::Failed,
            format!(
                "reload of {to} failed: {}",
                a.error.unwrap_or_else(|| "unknown error".into())
            ),
        )),
        Err(control::ControlError::NotRunning { .. }) => Ok(()),
        Err(e) => Err(err(Kind::Temporary, e.to_string())),
    }
}
