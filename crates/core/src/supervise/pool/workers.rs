//! A worker's events: spawned, ready (by `READY=1` or by time), exited;
//! what its death means for its generation.

use super::*;

impl Pool {
    /// The driver started a worker.
    pub(super) fn spawned(
        &mut self,
        generation: GenId,
        index: usize,
        pid: i32,
        now: Instant,
    ) -> Vec<Action> {
        let signal = self.settings.drain_signal;
        let Some((g, i)) = self.worker_mut(generation, index) else {
            // A generation that failed meanwhile: nothing wants this worker.
            return vec![Action::KillGroup { pid }];
        };
        let w = &mut g.workers[i];
        w.pgid = Some(pid);
        let started = Action::Log(
            Note::WorkerStarted,
            format!("worker {generation}.{index} started: pid {pid}"),
        );
        match w.state {
            WorkerState::Spawning => {
                w.state = WorkerState::Starting {
                    pid,
                    since: now,
                    waited: Duration::ZERO,
                };
                vec![started]
            }
            // Scaled down while its spawn was in flight.
            WorkerState::Retiring { pid: None } => {
                w.state = WorkerState::Retiring { pid: Some(pid) };
                vec![started, Action::Signal { pid, signal }]
            }
            _ => {
                w.state = WorkerState::Stopping { pid };
                vec![started, Action::KillGroup { pid }]
            }
        }
    }

    /// The driver could not start a worker (exec failed).
    pub(super) fn spawn_failed(
        &mut self,
        generation: GenId,
        index: usize,
        error: String,
        now: Instant,
    ) -> Vec<Action> {
        self.worker_died(
            generation,
            index,
            format!("could not start: {error}"),
            "",
            false,
            now,
        )
    }

    /// A worker sent `READY=1`.
    pub(super) fn ready(&mut self, generation: GenId, index: usize, now: Instant) -> Vec<Action> {
        if matches!(self.settings.readiness, Readiness::Delay(_)) {
            return Vec::new();
        }
        self.mark_ready(generation, index, now)
    }

    pub(super) fn mark_ready(
        &mut self,
        generation: GenId,
        index: usize,
        now: Instant,
    ) -> Vec<Action> {
        let Some((g, i)) = self.worker_mut(generation, index) else {
            return Vec::new();
        };
        let WorkerState::Starting { pid, .. } = g.workers[i].state else {
            return Vec::new();
        };
        g.workers[i].state = WorkerState::Ready { pid, since: now };
        let mut actions = vec![Action::Log(
            Note::WorkerReady,
            format!("worker {generation}.{index} ready: pid {pid}"),
        )];
        if std::mem::take(&mut g.workers[i].background) {
            actions.push(Action::Foreground { pid });
        }
        actions.extend(self.promote(generation, now));
        actions
    }

    /// A child exited. `how` is its exit status; `tail` is the end of its
    /// stderr.
    pub(super) fn exited(&mut self, pid: i32, how: Exit, tail: &str, now: Instant) -> Vec<Action> {
        let Some((generation, index)) = self.find_pid(pid) else {
            return Vec::new();
        };
        // A worker that was asked to drain and exited 0 did as asked: its
        // last words are not news (they were printed as it wrote them).
        let drained = self
            .worker_mut(generation, index)
            .is_some_and(|(g, i)| matches!(g.workers[i].state, WorkerState::Stopping { .. }))
            && how.success();
        let reason = format!("pid {pid} {how}");
        let tail = if drained { "" } else { tail.trim() };
        self.last_death = Some(with_tail(&reason, tail));
        self.worker_died(generation, index, reason, tail, how.success(), now)
    }

    /// A worker is gone: `clean` when it exited with status 0. `reason` is
    /// for the log, where its stderr was copied as it wrote it; `tail`,
    /// the end of that stderr, goes only to the answers of those who did
    /// not see the log (a failed reload's).
    pub(super) fn worker_died(
        &mut self,
        generation: GenId,
        index: usize,
        reason: String,
        tail: &str,
        clean: bool,
        now: Instant,
    ) -> Vec<Action> {
        let stopping = self.stopping.is_some();
        let on_trial = self.counts_against_trial(generation, now);
        let Some((g, i)) = self.worker_mut(generation, index) else {
            return Vec::new();
        };
        let state = g.state;
        let w = &mut g.workers[i];
        let was = std::mem::replace(&mut w.state, WorkerState::Gone);
        let mut actions = Vec::new();
        if let WorkerState::Retiring { .. } = was {
            // Scaled down and gone: it leaves the generation, and whatever
            // it forked into its group is drained as it was.
            let pgid = w.pgid;
            g.workers.remove(i);
            actions.extend(pgid.map(|pid| Action::DrainGroup { pid, generation }));
            actions.push(Action::Log(
                Note::WorkerRetired,
                format!("worker {generation}.{index} retired: {reason}"),
            ));
            actions.extend(self.reap_generations());
            return actions;
        }
        match state {
            GenState::Starting { .. } => {
                actions.push(Action::Warn(
                    Note::WorkerFailed,
                    format!("worker {generation}.{index} failed during reload: {reason}"),
                ));
                actions.extend(self.fail(
                    generation,
                    with_tail(&format!("worker {generation}.{index} {reason}"), tail),
                    now,
                ));
            }
            GenState::Canary if !stopping => {
                // A canary's worker that exits is judged at once: the
                // canary is reverted (promoted, it is being replaced and
                // is only drained).
                actions.push(Action::Warn(
                    Note::WorkerExited,
                    format!(
                        "{} worker {generation}.{index} exited: {reason}",
                        if g.lane == Lane::Twin {
                            "twin"
                        } else {
                            "canary"
                        }
                    ),
                ));
                if let Some(pgid) = w.pgid.take() {
                    actions.push(Action::KillGroup { pid: pgid });
                }
                if g.lane == Lane::Twin {
                    actions.extend(self.twin_died(&reason, now));
                } else if !g.promoted {
                    actions.extend(self.judged(
                        generation,
                        Err(with_tail(
                            &format!("canary worker {generation}.{index} exited ({reason})"),
                            tail,
                        )),
                        now,
                    ));
                }
            }
            GenState::Live if !stopping && on_trial => {
                actions.push(Action::Warn(
                    Note::WorkerExited,
                    format!("worker {generation}.{index} exited: {reason}"),
                ));
                actions.extend(self.crashed_on_trial(generation, index, now));
            }
            GenState::Live if !stopping => {
                // Only a minute of health forgives earlier deaths; a worker
                // that dies soon after becoming ready backs off like one
                // that never became ready.
                let healthy = matches!(was, WorkerState::Ready { since, .. }
                    if now.duration_since(since) >= HEALTHY_AFTER);
                if healthy {
                    w.failures = 0;
                } else {
                    w.failures += 1;
                }
                let delay = backoff(w.failures);
                // Whatever the dead worker forked dies with it.
                if let Some(pgid) = w.pgid.take() {
                    actions.push(Action::KillGroup { pid: pgid });
                }
                w.restarts += 1;
                w.state = WorkerState::Waiting { at: now + delay };
                self.restarts += 1;
                actions.push(Action::Warn(
                    Note::WorkerExited,
                    format!(
                        "worker {generation}.{index} exited: {reason}; restarting in {}",
                        crate::fmt_duration(delay)
                    ),
                ));
                if delay.is_zero() {
                    actions.extend(self.tick(now));
                }
            }
            _ => {
                // A drained worker exiting 0 is news; any other exit a warning.
                let line = format!("worker {generation}.{index} exited: {reason}");
                actions.push(if clean {
                    Action::Log(Note::WorkerExited, line)
                } else {
                    Action::Warn(Note::WorkerExited, line)
                });
                actions.extend(self.reap_generations());
            }
        }
        actions
    }
}

/// `reason`, and the end of the worker's stderr if it left any.
fn with_tail(reason: &str, tail: &str) -> String {
    if tail.is_empty() {
        reason.to_string()
    } else {
        format!("{reason}; its stderr ended with:\n{tail}")
    }
}
