//! A generation on trial after a reload: the settle window a deploy
//! waits for, probation (crashes revert it), provisional generations that
//! revert unless confirmed, and the revert itself.

use super::*;

impl Pool {
    /// [`Event::Settle`].
    pub(super) fn settle(
        &mut self,
        generation: GenId,
        within: Duration,
        waiter: Waiter,
        now: Instant,
    ) -> Vec<Action> {
        let Some(g) = self.gens.iter_mut().find(|g| g.id == generation) else {
            let why = match self.reverted.iter().find(|(g, _)| *g == generation) {
                Some((_, why)) => why.clone(),
                None => format!("no generation {generation}"),
            };
            return vec![Action::ReloadDone {
                waiters: vec![waiter],
                outcome: Err(why),
            }];
        };
        let by = g.live_since.unwrap_or(now) + within;
        g.settling.push(Settling { waiter, by });
        self.settle_due(now)
    }

    /// Answers the settle waiters whose answer is known by `now`.
    pub(super) fn settle_due(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        for g in &mut self.gens {
            if g.settling.is_empty() {
                continue;
            }
            let id = g.id;
            let release = g.release.id.clone();
            let failed = if g.trial == Trial::Reverted {
                Some(
                    self.reverted
                        .iter()
                        .find(|(r, _)| *r == id)
                        .map(|(_, why)| why.clone())
                        .unwrap_or_else(|| {
                            format!("generation {id} (release {release}) was reverted")
                        }),
                )
            } else if g.state != GenState::Live {
                Some(format!(
                    "generation {id} (release {release}) is no longer live: {}",
                    match g.state {
                        GenState::Draining { .. } | GenState::Killed =>
                            "a later reload replaced it",
                        _ => "it failed",
                    }
                ))
            } else {
                None
            };
            let all_up = g.all_ready();
            let (due, waiting): (Vec<Settling>, Vec<Settling>) = std::mem::take(&mut g.settling)
                .into_iter()
                .partition(|s| failed.is_some() || s.by <= now);
            g.settling = waiting;
            if due.is_empty() {
                continue;
            }
            let outcome = match &failed {
                Some(why) => Err(why.clone()),
                None if all_up => Ok((id, release)),
                None => Err(format!(
                    "generation {id} (release {release}): not every worker was up at the end of its settle window (crashing?)"
                )),
            };
            actions.push(Action::ReloadDone {
                waiters: due.into_iter().map(|s| s.waiter).collect(),
                outcome,
            });
        }
        actions
    }

    /// Whether a worker of `generation` dying now counts against its
    /// probation.
    pub(super) fn counts_against_trial(&self, generation: GenId, now: Instant) -> bool {
        self.gens.iter().any(|g| {
            g.id == generation
                && matches!(g.trial, Trial::Pending { until: Some(u), .. } if now < u)
        })
    }

    /// A worker of a generation on probation died: three crashes, or no
    /// worker left ready, and the generation is reverted; otherwise the
    /// worker is respawned as usual.
    pub(super) fn crashed_on_trial(
        &mut self,
        generation: GenId,
        index: usize,
        now: Instant,
    ) -> Vec<Action> {
        let Some(g) = self.gens.iter_mut().find(|g| g.id == generation) else {
            return Vec::new();
        };
        let Trial::Pending { crashes, .. } = &mut g.trial else {
            return Vec::new();
        };
        *crashes += 1;
        let crashes = *crashes;
        let none_ready = !g
            .workers
            .iter()
            .any(|w| matches!(w.state, WorkerState::Ready { .. }));
        if crashes >= 3 || none_ready {
            let why = if crashes >= 3 {
                format!("{crashes} crashes within its probation")
            } else {
                "no worker left running within its probation".to_string()
            };
            return self.revert(generation, why, now);
        }
        // Not yet: respawn it at once, like a first failure.
        let w = g
            .workers
            .iter_mut()
            .find(|w| w.index == index)
            .expect("the worker that died");
        let mut actions = Vec::new();
        if let Some(pgid) = w.pgid.take() {
            actions.push(Action::KillGroup { pid: pgid });
        }
        w.failures += 1;
        w.restarts += 1;
        w.state = WorkerState::Waiting {
            at: now + backoff(w.failures),
        };
        self.restarts += 1;
        actions.extend(self.tick(now));
        actions
    }

    /// Reverts a live generation to the release it replaced: its
    /// replacement starts now and drains it once ready.
    pub(super) fn revert(
        &mut self,
        generation: GenId,
        reason: String,
        now: Instant,
    ) -> Vec<Action> {
        let Some(g) = self.gens.iter_mut().find(|g| g.id == generation) else {
            return Vec::new();
        };
        // A generation a later reload replaced is no longer on trial: its
        // deadline or a crash while it drains must not put back the
        // release before it over the one now live (a fleet deploy after a
        // killed one undid itself this way).
        if g.state != GenState::Live {
            if matches!(g.trial, Trial::Pending { .. }) {
                g.trial = Trial::Settled;
            }
            return Vec::new();
        }
        let Some(to) = g.previous.clone() else {
            return Vec::new();
        };
        if g.trial == Trial::Reverted {
            return Vec::new();
        }
        g.trial = Trial::Reverted;
        let release = g.release.id.clone();
        self.note_revert(
            generation,
            format!("generation {generation} (release {release}) was reverted: {reason}"),
        );
        let mut actions = vec![
            Action::Warn(
                Note::Reverted,
                format!(
                    "reverting generation {generation} (release {release}): {reason}; back to release {}",
                    to.id
                ),
            ),
            Action::Revert {
                generation,
                release,
                to: to.clone(),
                reason,
            },
        ];
        // A reload already starting replaces it anyway once ready.
        if self.starting().is_none() && self.stopping.is_none() {
            actions.extend(self.start_generation(to, Vec::new(), None, true, now));
        }
        actions
    }

    /// Counts a revert and keeps why, for `confirm` and `settle` to
    /// answer (the last 16).
    pub(super) fn note_revert(&mut self, generation: GenId, why: String) {
        self.reverts += 1;
        self.reverted.push((generation, why));
        if self.reverted.len() > 16 {
            self.reverted.remove(0);
        }
    }

    /// `confirm`: a provisional generation stays; with `extend`, it stays
    /// provisional, its deadline no sooner than `extend` from now.
    pub(super) fn confirm(
        &mut self,
        generation: Option<GenId>,
        waiter: Option<Waiter>,
        now: Instant,
        extend: Option<Duration>,
    ) -> Vec<Action> {
        let waiters: Vec<Waiter> = waiter.into_iter().collect();
        let target = match generation {
            Some(id) => self.gens.iter_mut().find(|g| g.id == id),
            None => self.gens.iter_mut().find(|g| g.state == GenState::Live),
        };
        let Some(g) = target else {
            let why = match generation.and_then(|id| self.reverted.iter().find(|(g, _)| *g == id)) {
                Some((_, why)) => why.clone(),
                None => match generation {
                    Some(id) => format!("no generation {id}"),
                    None => "no generation is live".to_string(),
                },
            };
            return vec![Action::ReloadDone {
                waiters,
                outcome: Err(why),
            }];
        };
        let id = g.id;
        if g.trial == Trial::Reverted {
            let why = self
                .reverted
                .iter()
                .find(|(r, _)| *r == id)
                .map(|(_, w)| w.clone())
                .unwrap_or_else(|| format!("generation {id} was reverted"));
            return vec![Action::ReloadDone {
                waiters,
                outcome: Err(why),
            }];
        }
        if g.state != GenState::Live {
            return vec![Action::ReloadDone {
                waiters,
                outcome: Err(format!("generation {id} is not live")),
            }];
        }
        let mut actions = Vec::new();
        if let Some(within) = extend {
            if let Trial::Pending {
                confirm_by: Some(c),
                ..
            } = &mut g.trial
            {
                *c = (*c).max(now + within);
            }
        } else if let Trial::Pending {
            until, confirm_by, ..
        } = &mut g.trial
            && confirm_by.take().is_some()
        {
            actions.push(Action::Log(
                Note::GenerationConfirmed,
                format!("generation {id} confirmed"),
            ));
            if until.is_none_or(|u| u <= now) {
                g.trial = Trial::Settled;
            }
        }
        actions.push(Action::ReloadDone {
            waiters,
            outcome: Ok((id, g.release.id.clone())),
        });
        actions
    }
}
