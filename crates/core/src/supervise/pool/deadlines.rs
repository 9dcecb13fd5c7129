//! Every deadline the pool keeps, in one list: what wakes the driver
//! ([`Pool::next_deadline`]) and what is carried out when it does.

use super::*;

/// What a deadline of the pool is for. `tick` handles what is due in this
/// order (the variants' order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// A settle window ends (handled by `settle_due`, first).
    Settle,
    /// A worker's timed readiness (`delay:DUR`, `auto:DUR`).
    Ready(GenId, usize),
    /// A crashed worker's backoff is over: start it again.
    Respawn(GenId, usize),
    /// A background start took [`BACKGROUND_MAX`]: normal priority.
    Foreground(GenId, usize),
    /// A starting generation's ready timeout.
    ReadyTimeout(GenId),
    /// A draining generation's drain timeout.
    DrainTimeout(GenId),
    /// A generation's probation ends, or its confirmation is late.
    Trial(GenId),
    /// The first generation's ready timeout: the supervisor gives up.
    FirstReady,
    /// A pause reached its `max`: it resumes.
    PauseOver,
}

impl Pool {
    /// Every deadline the pool keeps, with what it is for: the one source
    /// of both [`Pool::next_deadline`] (when to wake) and `tick` (what is
    /// due), so the two can never disagree.
    fn deadlines(&self) -> Vec<(Instant, Due)> {
        let readiness = self.settings.readiness.timed();
        let mut all = Vec::new();
        if let Some(by) = self.first_ready_by
            && !self.announced_ready
            && self.stopping.is_none()
        {
            all.push((by, Due::FirstReady));
        }
        if let Some((_, until)) = self.paused() {
            all.push((until, Due::PauseOver));
        }
        for g in &self.gens {
            all.extend(g.settling.iter().map(|s| (s.by, Due::Settle)));
            if let Trial::Pending {
                until, confirm_by, ..
            } = g.trial
            {
                for t in until.into_iter().chain(confirm_by) {
                    all.push((t, Due::Trial(g.id)));
                }
            }
            match g.state {
                GenState::Starting { deadline } => all.push((deadline, Due::ReadyTimeout(g.id))),
                GenState::Draining { deadline } => all.push((deadline, Due::DrainTimeout(g.id))),
                _ => {}
            }
            for w in &g.workers {
                match w.state {
                    WorkerState::Starting { since, waited, .. } => {
                        if let Some(d) = readiness {
                            all.push((since + d + waited, Due::Ready(g.id, w.index)));
                        }
                        if w.background {
                            all.push((since + BACKGROUND_MAX, Due::Foreground(g.id, w.index)));
                        }
                    }
                    WorkerState::Waiting { at }
                        if g.state == GenState::Live && self.stopping.is_none() =>
                    {
                        all.push((at, Due::Respawn(g.id, w.index)));
                    }
                    _ => {}
                }
            }
        }
        all
    }

    /// Carries out what is due by `now`, in [`Due`]'s order. Each handler
    /// checks its condition again: an earlier one may have changed it.
    pub(super) fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = self.settle_due(now);
        let mut due: Vec<Due> = self
            .deadlines()
            .into_iter()
            .filter(|(t, _)| *t <= now)
            .map(|(_, d)| d)
            .collect();
        due.sort();
        due.dedup();
        for d in due {
            actions.extend(self.on_due(d, now));
        }
        // A generation at its drain deadline no longer holds a reload back.
        actions.extend(self.start_queued());
        actions
    }

    fn on_due(&mut self, due: Due, now: Instant) -> Vec<Action> {
        let readiness = self.settings.readiness.timed();
        match due {
            // Handled first, by `settle_due`, at every tick.
            Due::Settle => Vec::new(),
            Due::Ready(generation, index) => {
                let ready = self.worker(generation, index).is_some_and(|w| {
                    matches!(w.state, WorkerState::Starting { since, waited, .. }
                        if readiness.is_some_and(|d| since + d + waited <= now))
                });
                if ready {
                    self.mark_ready(generation, index, now)
                } else {
                    Vec::new()
                }
            }
            Due::Respawn(generation, index) => {
                let background = self.background_now();
                let Some((g, i)) = self.worker_mut(generation, index) else {
                    return Vec::new();
                };
                match g.workers[i].state {
                    WorkerState::Waiting { at } if at <= now && g.state == GenState::Live => {
                        let release = g.release.clone();
                        vec![g.workers[i].spawn(generation, release, background, Lane::Main)]
                    }
                    _ => Vec::new(),
                }
            }
            Due::Foreground(generation, index) => {
                let Some((g, i)) = self.worker_mut(generation, index) else {
                    return Vec::new();
                };
                let w = &mut g.workers[i];
                match w.state {
                    WorkerState::Starting { pid, since, .. }
                        if w.background && since + BACKGROUND_MAX <= now =>
                    {
                        w.background = false;
                        vec![
                            Action::Log(
                                Note::Worker,
                                format!(
                                    "worker {generation}.{index} not ready after {} in the background: now at normal priority",
                                    crate::fmt_duration(BACKGROUND_MAX)
                                ),
                            ),
                            Action::Foreground { pid },
                        ]
                    }
                    _ => Vec::new(),
                }
            }
            Due::ReadyTimeout(generation) => self.ready_timeout(generation, now),
            Due::DrainTimeout(generation) => self.drain_timeout(generation, now),
            Due::Trial(generation) => self.trial_due(generation, now),
            Due::PauseOver => self.pause_over(now),
            Due::FirstReady => {
                if self.announced_ready
                    || self.stopping.is_some()
                    || self.first_ready_by.is_none_or(|by| by > now)
                {
                    return Vec::new();
                }
                self.first_ready_by = None;
                let why = match &self.last_death {
                    Some(d) => format!("its last worker to exit: {d}"),
                    None => "its workers are running but did not say READY=1".into(),
                };
                vec![Action::GiveUp(format!(
                    "the first generation was not ready within {} ({why})",
                    crate::fmt_duration(self.settings.ready_timeout)
                ))]
            }
        }
    }

    /// A starting generation whose workers were not all ready in time.
    fn ready_timeout(&mut self, generation: GenId, now: Instant) -> Vec<Action> {
        let Some(g) = self.gens.iter().find(|g| g.id == generation) else {
            return Vec::new();
        };
        if !matches!(g.state, GenState::Starting { deadline } if deadline <= now) {
            return Vec::new();
        }
        let not_ready: Vec<String> = g
            .workers
            .iter()
            .filter(|w| !matches!(w.state, WorkerState::Ready { .. }))
            .map(|w| format!("{generation}.{}", w.index))
            .collect();
        let reason = format!(
            "not ready within {} (workers {} never reported ready)",
            crate::fmt_duration(self.settings.ready_timeout),
            not_ready.join(", ")
        );
        let mut actions = vec![Action::Warn(
            Note::ReloadFailed,
            format!("reload: generation {generation} {reason}"),
        )];
        actions.extend(self.fail(generation, reason, now));
        actions
    }

    /// A draining generation past its drain timeout: killed.
    fn drain_timeout(&mut self, generation: GenId, now: Instant) -> Vec<Action> {
        let drain_timeout = self.settings.drain_timeout;
        let Some(g) = self.gens.iter_mut().find(|g| g.id == generation) else {
            return Vec::new();
        };
        if !matches!(g.state, GenState::Draining { deadline } if deadline <= now) {
            return Vec::new();
        }
        g.state = GenState::Killed;
        let mut actions: Vec<Action> = g
            .workers
            .iter()
            .filter_map(|w| w.pid())
            .map(|pid| Action::KillGroup { pid })
            .collect();
        if !actions.is_empty() {
            actions.push(Action::Warn(
                Note::Generation,
                format!(
                    "generation {generation} did not drain within {}: killed",
                    crate::fmt_duration(drain_timeout)
                ),
            ));
        }
        actions.push(Action::Sweep(generation));
        actions
    }

    /// A generation on trial: its probation ended, or it was not confirmed
    /// in time (reverted).
    fn trial_due(&mut self, generation: GenId, now: Instant) -> Vec<Action> {
        let Some(g) = self.gens.iter_mut().find(|g| g.id == generation) else {
            return Vec::new();
        };
        let Trial::Pending {
            until, confirm_by, ..
        } = &mut g.trial
        else {
            return Vec::new();
        };
        if until.is_some_and(|u| u <= now) {
            *until = None;
        }
        if confirm_by.is_some_and(|c| c <= now) {
            let within = g.confirm_within.unwrap_or_default();
            return self.revert(
                generation,
                format!("not confirmed within {}", crate::fmt_duration(within)),
                now,
            );
        }
        if until.is_none() && confirm_by.is_none() {
            g.trial = Trial::Settled;
        }
        Vec::new()
    }

    /// The starting workers whose timed readiness is due by `now` on the
    /// CPU waits known so far: the driver measures their waits again
    /// ([`Event::CpuWaited`]) before the tick that would declare them ready.
    pub fn timed_readiness_due(&self, now: Instant) -> Vec<i32> {
        let Some(d) = self.settings.readiness.timed() else {
            return Vec::new();
        };
        self.gens
            .iter()
            .flat_map(|g| &g.workers)
            .filter_map(|w| match w.state {
                WorkerState::Starting {
                    pid, since, waited, ..
                } if since + d + waited <= now => Some(pid),
                _ => None,
            })
            .collect()
    }

    /// The next time [`Pool::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines().into_iter().map(|(t, _)| t).min()
    }
}
