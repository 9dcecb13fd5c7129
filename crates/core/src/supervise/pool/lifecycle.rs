//! A generation's life: started, promoted to live, drained, killed,
//! failed, reaped; reloads queued behind each other; stopping and
//! scaling.

use super::*;

impl Pool {
    /// Starts a generation in `release`. The first one is live at once.
    pub(super) fn begin_generation(&mut self, release: Release, now: Instant) -> Vec<Action> {
        self.start_pending = false;
        let waiters = self.queued.take().unwrap_or_default();
        let confirm_within = self.queued_confirm.take();
        let canary = self.queued_canary.take();
        if self.stopping.is_some() {
            return vec![ReloadFailed::stopping(waiters)];
        }
        if let Some(plan) = canary {
            self.withdrew = false;
            return self.start_canary(release, waiters, plan, confirm_within, now);
        }
        // The reload that withdrew a canary (a deploy interrupted in its
        // judge window, which switched `current` back): the live release is
        // what `current` names, and its generation is not restarted.
        if std::mem::take(&mut self.withdrew)
            && confirm_within.is_none()
            && let Some(live) = self.live().filter(|l| l.release.id == release.id)
        {
            let (id, release) = (live.id, live.release.id.clone());
            return vec![
                Action::Log(
                    Note::Canary,
                    format!(
                        "release {release} (generation {id}) is live and stays: nothing to reload"
                    ),
                ),
                Action::ReloadDone {
                    waiters,
                    outcome: Ok((id, release)),
                },
            ];
        }
        self.start_generation(release, waiters, confirm_within, false, now)
    }

    pub(super) fn start_generation(
        &mut self,
        release: Release,
        waiters: Vec<Waiter>,
        confirm_within: Option<Duration>,
        revert: bool,
        now: Instant,
    ) -> Vec<Action> {
        self.start(release, waiters, confirm_within, revert, None, now)
    }

    /// Starts a generation; with `judged`, a canary's or its twin's, of its
    /// plan's size, on that lane's listeners.
    pub(super) fn start(
        &mut self,
        release: Release,
        waiters: Vec<Waiter>,
        confirm_within: Option<Duration>,
        revert: bool,
        judged: Option<(Lane, Plan)>,
        now: Instant,
    ) -> Vec<Action> {
        let (lane, canary) = match judged {
            Some((lane, plan)) => (lane, Some(plan)),
            None => (Lane::Main, None),
        };
        let id = self.next_gen;
        self.next_gen += 1;
        // Live at once when nothing else is live or starting and no pause
        // waits for a reload to resume it: the first generation, and the
        // paused release going back after a resume that failed.
        let first = self.live().is_none()
            && self.paused.is_none()
            && self.gens.iter().all(|g| g.state.ending());
        let state = if first {
            self.first_ready_by = Some(now + self.settings.ready_timeout);
            GenState::Live
        } else {
            GenState::Starting {
                deadline: now + self.settings.ready_timeout,
            }
        };
        let count = canary.as_ref().map_or(self.settings.workers, |p| p.workers);
        let mut actions = vec![Action::Log(
            Note::GenerationStarting,
            format!(
                "{} generation {id}: release {} ({})",
                if first {
                    "starting"
                } else if revert {
                    "revert: starting"
                } else if lane == Lane::Twin {
                    "canary: starting its baseline's twin,"
                } else if canary.is_some() {
                    "canary: starting"
                } else {
                    "reload: starting"
                },
                release.id,
                crate::plural(count, "worker")
            ),
        )];
        if !first {
            actions.push(Action::Systemd(Systemd::Reloading));
        }
        let background = self.background_now();
        let workers = (0..count)
            .map(|index| {
                let mut w = Worker::new(index, WorkerState::Spawning);
                actions.push(w.spawn(id, release.clone(), background, lane));
                w
            })
            .collect();
        self.gens.push(Generation {
            id,
            release,
            state,
            workers,
            started: now,
            waiters,
            previous: None,
            trial: Trial::Settled,
            live_since: first.then_some(now),
            settling: Vec::new(),
            confirm_within,
            revert,
            canary,
            lane,
            promoted: false,
        });
        actions
    }

    /// Resolving `current` failed: the queued reload fails with `reason`.
    pub(super) fn reload_unavailable(&mut self, reason: String) -> Vec<Action> {
        self.start_pending = false;
        let waiters = self.queued.take().unwrap_or_default();
        vec![
            Action::Warn(Note::ReloadFailed, format!("reload failed: {reason}")),
            Action::ReloadDone {
                waiters,
                outcome: Err(reason),
            },
        ]
    }

    /// If every worker of `generation` is ready, make it live and drain the old one.
    pub(super) fn promote(&mut self, generation: GenId, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(g) = self.gens.iter().find(|g| g.id == generation) else {
            return actions;
        };
        if !g.all_ready() {
            return actions;
        }
        match g.state {
            GenState::Live => {
                if !self.announced_ready {
                    self.announced_ready = true;
                    actions.push(Action::Log(
                        Note::GenerationReady,
                        format!("generation {generation} ready"),
                    ));
                    actions.push(Action::Systemd(Systemd::Ready));
                }
            }
            GenState::Starting { .. } if g.lane != Lane::Main => {
                actions.extend(self.canary_live(now));
            }
            GenState::Starting { .. } => {
                let release = g.release.id.clone();
                let elapsed = now.duration_since(g.started);
                // The generation it replaces, and a canary it promotes.
                let old: Vec<GenId> = self
                    .gens
                    .iter()
                    .filter(|o| o.state == GenState::Live || o.state == GenState::Canary)
                    .map(|o| o.id)
                    .collect();
                // What it goes back to: the live release, unless that one
                // is provisional and still unconfirmed, when it is what that
                // one would have gone back to (an unconfirmed release never
                // becomes a revert's target by being replaced).
                let previous = self
                    .gens
                    .iter()
                    .find(|o| o.state == GenState::Live)
                    .map(|o| match (&o.trial, &o.previous) {
                        (
                            Trial::Pending {
                                confirm_by: Some(_),
                                ..
                            },
                            Some(before),
                        ) => before.clone(),
                        _ => o.release.clone(),
                    })
                    .or_else(|| self.paused_release().cloned());
                let probation = self.settings.probation;
                let g = self
                    .gens
                    .iter_mut()
                    .find(|g| g.id == generation)
                    .expect("found above");
                g.state = GenState::Live;
                g.live_since = Some(now);
                let waiters = std::mem::take(&mut g.waiters);
                actions.push(Action::Log(Note::ReloadFinished, format!(
                    "reload finished: generation {generation} (release {release}) live after {}",
                    crate::fmt_duration(elapsed)
                )));
                self.reloads.went_live(elapsed);
                if !g.revert && previous.is_some() {
                    let until = (!probation.is_zero()).then_some(now + probation);
                    let confirm_by = g.confirm_within.map(|d| now + d);
                    if let Some(d) = g.confirm_within {
                        actions.push(Action::Log(Note::GenerationProvisional, format!(
                            "generation {generation} is provisional: it reverts unless confirmed within {}",
                            crate::fmt_duration(d)
                        )));
                    }
                    if until.is_some() || confirm_by.is_some() {
                        g.trial = Trial::Pending {
                            until,
                            confirm_by,
                            crashes: 0,
                        };
                    }
                    g.previous = previous;
                }
                for o in old {
                    actions.extend(self.drain(o, now));
                }
                actions.extend(self.unpause(now));
                self.announced_ready = true;
                actions.push(Action::Systemd(Systemd::Ready));
                actions.push(Action::ReloadDone {
                    waiters,
                    outcome: Ok((generation, release)),
                });
                actions.extend(self.start_queued());
            }
            GenState::Draining { .. } | GenState::Killed | GenState::Failed | GenState::Canary => {}
        }
        actions
    }

    /// Hands a queued reload to the driver once nothing is starting and
    /// there is room to drain; at most once until it is taken up.
    pub(super) fn start_queued(&mut self) -> Vec<Action> {
        if self.queued.is_some()
            && self.stopping.is_none()
            && !self.start_pending
            && !self.reloading()
            && self.room_to_drain()
        {
            self.start_pending = true;
            vec![Action::StartReload]
        } else {
            Vec::new()
        }
    }

    /// Sends the drain signal to every worker of `generation`.
    pub(super) fn drain(&mut self, generation: GenId, now: Instant) -> Vec<Action> {
        let signal = self.settings.drain_signal;
        let deadline = now + self.settings.drain_timeout;
        let Some(g) = self.gens.iter_mut().find(|g| g.id == generation) else {
            return Vec::new();
        };
        // A canary's share goes back to the others before its workers stop
        // accepting.
        let mut actions = Vec::new();
        if g.state == GenState::Canary {
            actions.push(Action::CanaryEnded { generation });
        }
        g.state = GenState::Draining { deadline };
        actions.push(Action::Log(
            Note::GenerationDraining,
            format!(
                "draining generation {generation} (release {})",
                g.release.id
            ),
        ));
        for w in &mut g.workers {
            match w.state {
                WorkerState::Starting { pid, .. } | WorkerState::Ready { pid, .. } => {
                    actions.push(Action::Signal { pid, signal });
                    w.state = WorkerState::Stopping { pid };
                }
                WorkerState::Waiting { .. } | WorkerState::Spawning => w.state = WorkerState::Gone,
                _ => {}
            }
        }
        actions.extend(self.reap_generations());
        actions
    }

    /// Kills a generation's workers now: `Failed` for a failed start,
    /// `Killed` for a fast stop.
    pub(super) fn kill(&mut self, generation: GenId, state: GenState) -> Vec<Action> {
        let Some(g) = self.gens.iter_mut().find(|g| g.id == generation) else {
            return Vec::new();
        };
        g.state = state;
        let mut actions = Vec::new();
        for w in &mut g.workers {
            match w.pid() {
                Some(pid) => {
                    actions.push(Action::KillGroup { pid });
                    w.state = WorkerState::Stopping { pid };
                }
                None => w.state = WorkerState::Gone,
            }
        }
        actions.extend(self.reap_generations());
        actions
    }

    /// A starting generation failed: kill it, keep the live one.
    pub(super) fn fail(&mut self, generation: GenId, reason: String, now: Instant) -> Vec<Action> {
        self.reloads.failed += 1;
        let Some(g) = self.gens.iter_mut().find(|g| g.id == generation) else {
            return Vec::new();
        };
        let lane = g.lane;
        let waiters = std::mem::take(&mut g.waiters);
        let release = g.release.id.clone();
        let mut actions = self.kill(generation, GenState::Failed);
        let serving = match self.live() {
            Some(l) => format!(
                "generation {} (release {}) still serving",
                l.id, l.release.id
            ),
            None => "nothing is serving".to_string(),
        };
        actions.push(Action::Warn(
            Note::ReloadFailed,
            format!("reload failed: generation {generation} (release {release}) killed; {serving}"),
        ));
        actions.push(Action::Systemd(Systemd::Ready));
        match lane {
            Lane::Main => actions.extend(self.promotion_failed(&reason, now)),
            // A canary and its twin start together and fail together.
            Lane::Canary | Lane::Twin => {
                actions.extend(self.fail_partner(generation, &reason, now));
            }
        }
        actions.extend(self.resume_failed(now));
        actions.push(Action::ReloadDone {
            waiters,
            outcome: Err(format!("release {release}: {reason}")),
        });
        actions.extend(self.start_queued());
        actions
    }

    /// Removes draining generations whose workers are all gone; the
    /// process groups are killed then, so no straggler outlives its worker.
    pub(super) fn reap_generations(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        let before = self.gens.len();
        self.gens.retain(|g| {
            let done = g.state.ending() && g.workers.iter().all(|w| w.state == WorkerState::Gone);
            if done && !g.settling.is_empty() {
                actions.push(Action::ReloadDone {
                    waiters: g.settling.iter().map(|s| s.waiter).collect(),
                    outcome: Err(format!(
                        "generation {} (release {}) is gone",
                        g.id, g.release.id
                    )),
                });
            }
            if done {
                // What the workers forked into their groups: drained like
                // them when the generation drained (a server a wrapper
                // started may still hold clients), killed when it was
                // killed or failed.
                let drained = matches!(g.state, GenState::Draining { .. });
                actions.extend(g.workers.iter().filter_map(|w| w.pgid).map(|pid| {
                    if drained {
                        Action::DrainGroup {
                            pid,
                            generation: g.id,
                        }
                    } else {
                        Action::KillGroup { pid }
                    }
                }));
                if g.state != GenState::Failed {
                    actions.push(Action::Log(
                        Note::GenerationDrained,
                        format!("generation {} drained", g.id),
                    ));
                }
                actions.push(Action::Sweep(g.id));
            }
            !done
        });
        // A generation gone makes room for a reload held back for it.
        if self.gens.len() < before {
            actions.extend(self.start_queued());
        }
        actions.extend(self.pause_drained());
        actions
    }

    /// Stop the pool.
    pub(super) fn stop(&mut self, how: Stop, now: Instant) -> Vec<Action> {
        let escalate = self.stopping == Some(Stop::Graceful) && how == Stop::Fast;
        if self.stopping.is_some() && !escalate {
            return Vec::new();
        }
        self.stopping = Some(how);
        let mut actions = vec![Action::Log(
            Note::Stopping,
            match how {
                Stop::Graceful => "stopping: draining every generation".to_string(),
                Stop::Fast => "stopping now: killing every worker".to_string(),
            },
        )];
        actions.push(Action::Systemd(Systemd::Stopping));
        actions.extend(self.unpause(now));
        if let Some(waiters) = self.queued.take() {
            actions.push(ReloadFailed::stopping(waiters));
        }
        let ids: Vec<(GenId, GenState)> = self.gens.iter().map(|g| (g.id, g.state)).collect();
        for (id, state) in ids {
            match (how, state) {
                (Stop::Fast, _) | (Stop::Graceful, GenState::Starting { .. }) => {
                    if let Some(g) = self.gens.iter_mut().find(|g| g.id == id) {
                        let waiters = std::mem::take(&mut g.waiters);
                        if !waiters.is_empty() {
                            actions.push(ReloadFailed::stopping(waiters));
                        }
                    }
                    actions.extend(self.kill(id, GenState::Killed));
                }
                (Stop::Graceful, GenState::Live | GenState::Canary) => {
                    if let Some(g) = self.gens.iter_mut().find(|g| g.id == id) {
                        let waiters = std::mem::take(&mut g.waiters);
                        if !waiters.is_empty() {
                            actions.push(ReloadFailed::stopping(waiters));
                        }
                    }
                    actions.extend(self.drain(id, now))
                }
                (Stop::Graceful, _) => {}
            }
        }
        actions.extend(self.reap_generations());
        actions
    }

    /// Changes the number of workers of the live generation (and of those
    /// started later).
    pub(super) fn scale(&mut self, workers: usize, now: Instant) -> Vec<Action> {
        let workers = workers.clamp(1, MAX_WORKERS);
        self.settings.workers = workers;
        let signal = self.settings.drain_signal;
        let mut actions = vec![Action::Log(
            Note::Scaled,
            format!("scaling to {workers} workers"),
        )];
        let Some(g) = self.gens.iter_mut().find(|g| g.state == GenState::Live) else {
            return actions;
        };
        let active: Vec<usize> = g
            .workers
            .iter()
            .filter(|w| !w.retiring())
            .map(|w| w.index)
            .collect();
        if workers > active.len() {
            let first = g.workers.iter().map(|w| w.index + 1).max().unwrap_or(0);
            for index in first..first + (workers - active.len()) {
                g.workers
                    .push(Worker::new(index, WorkerState::Waiting { at: now }));
            }
        } else {
            for index in active.iter().rev().take(active.len() - workers) {
                let i = g
                    .workers
                    .iter()
                    .position(|w| w.index == *index)
                    .expect("active worker");
                let w = &mut g.workers[i];
                match w.state {
                    WorkerState::Starting { pid, .. } | WorkerState::Ready { pid, .. } => {
                        actions.push(Action::Signal { pid, signal });
                        w.state = WorkerState::Retiring { pid: Some(pid) };
                    }
                    WorkerState::Spawning => w.state = WorkerState::Retiring { pid: None },
                    // Waiting out a backoff: nothing to stop.
                    _ => {
                        g.workers.remove(i);
                    }
                }
            }
        }
        actions.extend(self.reap_generations());
        actions.extend(self.tick(now));
        actions
    }
}
