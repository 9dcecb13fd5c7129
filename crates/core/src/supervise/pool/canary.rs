//! A canary: a reload's generation that serves a share of new connections
//! beside the live one, which keeps serving, until the judge decides.
//!
//! ```text
//!   Starting ──all ready──▶ Canary ──Judged(Ok)──▶ promoted: a reload of its
//!      │  (with its twin)     │                    release starts; once live,
//!      │ fails as a reload    │ Judged(Err), or     the old generation, the
//!      ▼ does                 │ a worker exits      canary and its twin drain
//!   Failed                    ▼
//!                  reverted: drained with its twin, current back,
//!                  the live generation untouched
//! ```
//!
//! Judged on requests, a canary has a **twin**: a generation of the live
//! release with as many workers, started at the same moment, taking an
//! equal share on listeners of its own (`Lane::Twin`). The judge compares
//! the canary with it, like with like. Both start, go live, end and fail
//! together.
//!
//! The judging itself (requests, figures, verdict) is the driver's
//! (`crate::supervise::canary`); the pool keeps the states, so that every
//! rule here is unit-tested like the rest of it.

use super::*;

impl Pool {
    /// A canary reload of `release`: it needs a live generation of another
    /// release to be judged against. With `confirm_within`, its promotion
    /// is a provisional reload (a fleet host's canary).
    pub(super) fn start_canary(
        &mut self,
        release: Release,
        waiters: Vec<Waiter>,
        plan: Plan,
        confirm_within: Option<Duration>,
        now: Instant,
    ) -> Vec<Action> {
        let live = match self.live() {
            None => Err("a canary needs a live generation to be judged against".to_string()),
            Some(l) if l.release.id == release.id => Err(format!(
                "release {} is already live: a canary of it would be judged against itself",
                release.id
            )),
            Some(l) => Ok(l.release.clone()),
        };
        let baseline = match live {
            Ok(b) => b,
            Err(why) => {
                return vec![
                    Action::Warn(Note::ReloadFailed, format!("canary refused: {why}")),
                    Action::ReloadDone {
                        waiters,
                        outcome: Err(why),
                    },
                ];
            }
        };
        let twin = plan.twin;
        let mut actions = self.start(
            release,
            waiters,
            confirm_within,
            false,
            Some((Lane::Canary, plan.clone())),
            now,
        );
        if twin {
            actions.extend(self.start(
                baseline,
                Vec::new(),
                None,
                false,
                Some((Lane::Twin, plan)),
                now,
            ));
        }
        actions
    }

    /// The canary (not its twin) being started or judged, not yet promoted.
    fn unjudged_canary(&self) -> Option<&Generation> {
        self.gens.iter().find(|g| {
            g.lane == Lane::Canary
                && !g.promoted
                && matches!(g.state, GenState::Starting { .. } | GenState::Canary)
        })
    }

    /// The twin started with the canary, if any.
    fn twin(&self) -> Option<&Generation> {
        self.gens.iter().find(|g| {
            g.lane == Lane::Twin && matches!(g.state, GenState::Starting { .. } | GenState::Canary)
        })
    }

    /// The canary starting, judged, or promoted and serving until its
    /// release's full generation is live.
    pub fn canary(&self) -> Option<GenId> {
        self.gens
            .iter()
            .find(|g| {
                g.lane == Lane::Canary
                    && matches!(g.state, GenState::Starting { .. } | GenState::Canary)
            })
            .map(|g| g.id)
    }

    /// A generation of the canary, or of its twin, is all ready: once both
    /// are, they take their shares.
    pub(super) fn canary_live(&mut self, now: Instant) -> Vec<Action> {
        let Some(c) = self.unjudged_canary() else {
            return Vec::new();
        };
        let (id, plan, release) = (c.id, c.canary.clone(), c.release.id.clone());
        let Some(plan) = plan else {
            return Vec::new();
        };
        if !matches!(c.state, GenState::Starting { .. }) || !c.all_ready() {
            return Vec::new();
        }
        let twin = self.twin().map(|t| (t.id, t.all_ready()));
        if plan.twin && !matches!(twin, Some((_, true))) {
            return Vec::new();
        }
        let Some((base_id, baseline)) = self.live().map(|l| (l.id, l.release.id.clone())) else {
            return self.fail(
                id,
                "no generation is live to judge the canary against".into(),
                now,
            );
        };
        let twin = twin.map(|(t, _)| t);
        for g in self.gens.iter_mut() {
            if g.id == id || Some(g.id) == twin {
                g.state = GenState::Canary;
                g.live_since = Some(now);
            }
        }
        vec![
            Action::Log(
                Note::Canary,
                format!(
                    "canary: generation {id} (release {release}) takes {} beside generation {base_id} (release {baseline}){}; judged for {}",
                    plan.describe(),
                    match twin {
                        Some(t) => format!(
                            ", compared with generation {t}, as many fresh workers of release {baseline} taking as much"
                        ),
                        None => String::new(),
                    },
                    crate::fmt_duration(plan.window())
                ),
            ),
            Action::CanaryLive {
                generation: id,
                release,
                baseline,
                plan,
                twin,
            },
        ]
    }

    /// The judge's verdict on canary `generation`.
    pub(super) fn judged(
        &mut self,
        generation: GenId,
        verdict: Result<String, String>,
        now: Instant,
    ) -> Vec<Action> {
        let Some(to) = self.live().map(|l| l.release.clone()) else {
            return Vec::new();
        };
        let twin = self.twin().map(|t| t.id);
        let Some(g) = self.gens.iter_mut().find(|g| {
            g.id == generation
                && g.lane == Lane::Canary
                && g.state == GenState::Canary
                && !g.promoted
        }) else {
            return Vec::new();
        };
        let release = g.release.id.clone();
        let waiters = std::mem::take(&mut g.waiters);
        match verdict {
            Ok(figures) => {
                g.promoted = true;
                let confirm = g.confirm_within;
                if let Some(d) = confirm {
                    self.queued_confirm = Some(self.queued_confirm.map_or(d, |q| q.min(d)));
                }
                // Its twin has served its purpose: its share goes back to
                // the live generation while the promotion starts.
                let mut actions = Vec::new();
                if let Some(t) = twin {
                    actions.extend(self.drain(t, now));
                }
                actions.push(Action::Log(
                    Note::Canary,
                    format!(
                        "canary generation {generation} (release {release}) promoted: {figures}; reloading onto it"
                    ),
                ));
                actions.push(Action::Promoted {
                    generation,
                    release,
                    baseline: to.id,
                    figures,
                });
                // Its promotion is a reload of its release: whoever waits
                // for the canary learns how that ends.
                self.queued.get_or_insert_with(Vec::new).extend(waiters);
                actions.extend(self.start_queued());
                actions
            }
            Err(reason) => {
                self.note_revert(
                    generation,
                    format!(
                        "canary generation {generation} (release {release}) was reverted: {reason}"
                    ),
                );
                let mut actions = vec![
                    Action::Warn(
                        Note::Reverted,
                        format!(
                            "canary generation {generation} (release {release}) reverted: {reason}; release {} keeps serving",
                            to.id
                        ),
                    ),
                    Action::Revert {
                        generation,
                        release: release.clone(),
                        to,
                        reason: reason.clone(),
                    },
                ];
                actions.extend(self.drain(generation, now));
                if let Some(t) = twin {
                    actions.extend(self.drain(t, now));
                }
                actions.push(Action::ReloadDone {
                    waiters,
                    outcome: Err(format!("canary of release {release} reverted: {reason}")),
                });
                actions
            }
        }
    }

    /// A worker of the twin exited while the canary was judged: nothing
    /// fair is left to compare with, and "inconclusive" reverts.
    pub(super) fn twin_died(&mut self, reason: &str, now: Instant) -> Vec<Action> {
        let Some(c) = self.unjudged_canary().map(|g| g.id) else {
            return Vec::new();
        };
        self.judged(
            c,
            Err(format!(
                "inconclusive: a worker of the baseline's twin exited ({reason}), so nothing was left to compare the canary with"
            )),
            now,
        )
    }

    /// A canary or its twin failed to start: the other goes too.
    pub(super) fn fail_partner(
        &mut self,
        failed: GenId,
        reason: &str,
        now: Instant,
    ) -> Vec<Action> {
        let partner = self
            .gens
            .iter()
            .find(|g| {
                g.id != failed
                    && g.lane != Lane::Main
                    && !g.promoted
                    && matches!(g.state, GenState::Starting { .. } | GenState::Canary)
            })
            .map(|g| (g.id, g.lane));
        match partner {
            Some((id, Lane::Canary)) => self.fail(
                id,
                format!("the baseline's twin it is compared with did not start: {reason}"),
                now,
            ),
            Some((id, _)) => self.kill(id, GenState::Failed),
            None => Vec::new(),
        }
    }

    /// A reload asked for while a canary is starting or judged ends the
    /// canary first, without a verdict: nothing is marked bad.
    pub(super) fn withdraw_canary(&mut self, now: Instant) -> Vec<Action> {
        let Some((id, state, release)) = self
            .unjudged_canary()
            .map(|g| (g.id, g.state, g.release.id.clone()))
        else {
            return Vec::new();
        };
        let why = "withdrawn: another reload was asked for before its verdict".to_string();
        if let GenState::Starting { .. } = state {
            return self.fail(id, why, now);
        }
        let twin = self.twin().map(|t| t.id);
        let waiters = self
            .gens
            .iter_mut()
            .find(|g| g.id == id)
            .map(|g| std::mem::take(&mut g.waiters))
            .unwrap_or_default();
        let mut actions = vec![Action::Warn(
            Note::Canary,
            format!("canary generation {id} (release {release}) {why}"),
        )];
        actions.extend(self.drain(id, now));
        if let Some(t) = twin {
            actions.extend(self.drain(t, now));
        }
        actions.push(Action::ReloadDone {
            waiters,
            outcome: Err(format!("canary of release {release} {why}")),
        });
        actions
    }

    /// The reload that was to promote a canary failed: the canary goes
    /// too (its release cannot serve whole), and `current` goes back.
    pub(super) fn promotion_failed(&mut self, reason: &str, now: Instant) -> Vec<Action> {
        let Some(to) = self.live().map(|l| l.release.clone()) else {
            return Vec::new();
        };
        let promoted: Vec<(GenId, String)> = self
            .gens
            .iter()
            .filter(|g| g.promoted && g.state == GenState::Canary)
            .map(|g| (g.id, g.release.id.clone()))
            .collect();
        let mut actions = Vec::new();
        for (id, release) in promoted {
            let why = format!("its promotion failed: {reason}");
            actions.push(Action::Warn(
                Note::Reverted,
                format!("canary generation {id} (release {release}) reverted: {why}"),
            ));
            actions.push(Action::Revert {
                generation: id,
                release,
                to: to.clone(),
                reason: why,
            });
            actions.extend(self.drain(id, now));
        }
        actions
    }
}
