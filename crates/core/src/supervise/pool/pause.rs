//! A pause: no generation accepts, and new connections wait in the
//! listening sockets' backlog (the supervisor holds the sockets, so the
//! kernel keeps completing handshakes and queueing them) until a
//! generation serves again.
//!
//! ```text
//!   Live ──Pause──▶ Draining (paused; waiters answered once it is gone)
//!                      │ a reload (`resume`, `deploy --pause`), or `max` passes
//!                      ▼
//!                   Starting (a reload's generation, not live at once)
//!                      │ ready: Live, on probation against the paused release
//!                      │ fails: the paused release starts again, live at once
//! ```
//!
//! What a pause is for: a migration that old and new code cannot both run
//! against. Clients wait instead of failing; `max` bounds how long.

use super::*;

/// A pause in progress, or one that a reload is ending.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Paused {
    #[serde(with = "crate::supervise::clock::mono")]
    since: Instant,
    /// Resumed by itself then, on what `current` names.
    #[serde(with = "crate::supervise::clock::mono")]
    until: Instant,
    /// The release that served when it paused: what a failed resume goes
    /// back to.
    release: Release,
    /// Clients waiting for every worker to be gone.
    waiters: Vec<Waiter>,
    /// A reload is resuming it: set once its generation started.
    resuming: bool,
}

impl Pool {
    /// [`Event::Pause`].
    pub(super) fn pause(
        &mut self,
        max: Duration,
        waiter: Option<Waiter>,
        now: Instant,
    ) -> Vec<Action> {
        let waiters: Vec<Waiter> = waiter.into_iter().collect();
        let refuse = |why: &str| {
            vec![Action::ReloadDone {
                waiters: waiters.clone(),
                outcome: Err(format!("cannot pause: {why}")),
            }]
        };
        if self.stopping.is_some() {
            return refuse("the supervisor is stopping");
        }
        if let Some(p) = &mut self.paused {
            if p.resuming {
                return refuse("a resume is in progress");
            }
            // Paused already: the deadline stays, the waiter joins.
            p.waiters.extend(waiters);
            return self.pause_drained();
        }
        if self.reloading() || self.reload_pending() {
            return refuse("a reload is in progress");
        }
        if self.canary().is_some() {
            return refuse("a canary is being judged");
        }
        let Some((id, release)) = self.live().map(|l| (l.id, l.release.clone())) else {
            return refuse("no generation is live");
        };
        self.paused = Some(Paused {
            since: now,
            until: now + max,
            release,
            waiters,
            resuming: false,
        });
        let mut actions = vec![Action::Warn(
            Note::Paused,
            format!(
                "paused: generation {id} drains and nothing accepts; new connections wait in the backlog until a reload resumes (at most {})",
                crate::fmt_duration(max)
            ),
        )];
        actions.extend(self.drain(id, now));
        actions.extend(self.pause_drained());
        actions
    }

    /// Whether a pause holds connections now (and since when).
    pub fn paused(&self) -> Option<(Instant, Instant)> {
        self.paused
            .as_ref()
            .filter(|p| !p.resuming)
            .map(|p| (p.since, p.until))
    }

    /// A reload while paused resumes: its generation is not live at once.
    pub(super) fn resuming(&mut self) {
        if let Some(p) = &mut self.paused {
            p.resuming = true;
        }
    }

    /// The release a failed resume goes back to.
    pub(super) fn paused_release(&self) -> Option<&Release> {
        self.paused.as_ref().map(|p| &p.release)
    }

    /// Answers the pause's waiters once no worker is left.
    pub(super) fn pause_drained(&mut self) -> Vec<Action> {
        let empty = self.gens.iter().all(|g| {
            g.workers
                .iter()
                .all(|w| matches!(w.state, WorkerState::Gone))
        });
        match &mut self.paused {
            Some(p) if empty && !p.waiters.is_empty() && !p.resuming => {
                let release = p.release.id.clone();
                vec![Action::ReloadDone {
                    waiters: std::mem::take(&mut p.waiters),
                    outcome: Ok((0, release)),
                }]
            }
            _ => Vec::new(),
        }
    }

    /// The pause's `max` passed: resume on what `current` names.
    pub(super) fn pause_over(&mut self, now: Instant) -> Vec<Action> {
        let Some(p) = self
            .paused
            .as_ref()
            .filter(|p| !p.resuming && p.until <= now)
        else {
            return Vec::new();
        };
        let took = now.duration_since(p.since);
        let mut actions = vec![Action::Warn(
            Note::Paused,
            format!(
                "the pause reached its limit after {}: resuming on the release current names",
                crate::fmt_duration(took)
            ),
        )];
        actions.extend(self.on(
            Event::ReloadRequested {
                waiter: None,
                confirm_within: None,
                canary: None,
            },
            now,
        ));
        actions
    }

    /// The resumed generation is live (or the supervisor stops): the pause
    /// is over.
    pub(super) fn unpause(&mut self, now: Instant) -> Vec<Action> {
        let Some(p) = self.paused.take() else {
            return Vec::new();
        };
        let mut actions = vec![Action::Log(
            Note::Paused,
            format!(
                "resumed after {}",
                crate::fmt_duration(now.duration_since(p.since))
            ),
        )];
        if !p.waiters.is_empty() {
            actions.push(Action::ReloadDone {
                waiters: p.waiters,
                outcome: Err("the pause ended before every worker was gone".into()),
            });
        }
        actions
    }

    /// The resumed generation failed: the paused release serves again,
    /// live at once (nothing older to protect, clients waiting).
    pub(super) fn resume_failed(&mut self, now: Instant) -> Vec<Action> {
        if self.live().is_some() || self.starting().is_some() || self.stopping.is_some() {
            return Vec::new();
        }
        let Some(p) = self.paused.take() else {
            return Vec::new();
        };
        let mut actions = vec![Action::Warn(
            Note::Paused,
            format!(
                "the resumed release did not come up: back to release {}",
                p.release.id
            ),
        )];
        // Nothing else is live or starting, and no pause waits: it goes
        // live at once, like a first generation.
        actions.extend(self.start_generation(p.release, Vec::new(), None, true, now));
        actions
    }
}
