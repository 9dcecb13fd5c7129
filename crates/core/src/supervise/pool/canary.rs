//! A canary: a reload's generation that serves a share of new connections
//! beside the live one, which keeps serving, until the judge decides.
//!
//! ```text
//!   Starting ──all ready──▶ Canary ──Judged(Ok)──▶ promoted: a reload of its
//!      │                      │                    release starts; once live,
//!      │ fails as a reload    │ Judged(Err), or     the old generation and the
//!      ▼ does                 │ a worker exits      canary drain together
//!   Failed                    ▼
//!                  reverted: drained, current back,
//!                  the live generation untouched
//! ```
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
        let refused = match self.live() {
            None => Some("a canary needs a live generation to be judged against".to_string()),
            Some(l) if l.release.id == release.id => Some(format!(
                "release {} is already live: a canary of it would be judged against itself",
                release.id
            )),
            Some(_) => None,
        };
        if let Some(why) = refused {
            return vec![
                Action::Warn(Note::ReloadFailed, format!("canary refused: {why}")),
                Action::ReloadDone {
                    waiters,
                    outcome: Err(why),
                },
            ];
        }
        self.start(release, waiters, confirm_within, false, Some(plan), now)
    }

    /// The canary being started or judged, not yet promoted.
    fn unjudged_canary(&self) -> Option<&Generation> {
        self.gens.iter().find(|g| {
            g.canary.is_some()
                && !g.promoted
                && matches!(g.state, GenState::Starting { .. } | GenState::Canary)
        })
    }

    /// What status shows of the canary: its generation, and whether the
    /// judge promoted it.
    pub fn canary(&self) -> Option<(GenId, &Plan, bool)> {
        self.gens
            .iter()
            .filter(|g| matches!(g.state, GenState::Starting { .. } | GenState::Canary))
            .find_map(|g| g.canary.as_ref().map(|p| (g.id, p, g.promoted)))
    }

    /// Every worker of canary `generation` is ready: it takes its share.
    pub(super) fn canary_live(&mut self, generation: GenId, now: Instant) -> Vec<Action> {
        let Some((base_id, baseline)) = self.live().map(|l| (l.id, l.release.id.clone())) else {
            return self.fail(
                generation,
                "no generation is live to judge the canary against".into(),
                now,
            );
        };
        let Some(g) = self.gens.iter_mut().find(|g| g.id == generation) else {
            return Vec::new();
        };
        let Some(plan) = g.canary.clone() else {
            return Vec::new();
        };
        g.state = GenState::Canary;
        g.live_since = Some(now);
        let release = g.release.id.clone();
        vec![
            Action::Log(
                Note::Canary,
                format!(
                    "canary: generation {generation} (release {release}) takes {} beside generation {base_id} (release {baseline}); judged for {}",
                    plan.describe(),
                    crate::fmt_duration(plan.window())
                ),
            ),
            Action::CanaryLive {
                generation,
                release,
                baseline,
                plan,
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
        let Some(g) = self
            .gens
            .iter_mut()
            .find(|g| g.id == generation && g.state == GenState::Canary && !g.promoted)
        else {
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
                let mut actions = vec![
                    Action::Log(
                        Note::Canary,
                        format!(
                            "canary generation {generation} (release {release}) promoted: {figures}; reloading onto it"
                        ),
                    ),
                    Action::Promoted {
                        generation,
                        release,
                        baseline: to.id,
                        figures,
                    },
                ];
                // Its promotion is a reload of its release: whoever waits
                // for the canary learns how that ends.
                self.queued.get_or_insert_with(Vec::new).extend(waiters);
                actions.extend(self.start_queued());
                actions
            }
            Err(reason) => {
                self.reverts += 1;
                self.reverted.push((
                    generation,
                    format!(
                        "canary generation {generation} (release {release}) was reverted: {reason}"
                    ),
                ));
                if self.reverted.len() > 16 {
                    self.reverted.remove(0);
                }
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
                actions.push(Action::ReloadDone {
                    waiters,
                    outcome: Err(format!("canary of release {release} reverted: {reason}")),
                });
                actions
            }
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
