//! A canary as the driver runs it: its own listeners, its share of new
//! connections, and its judge.
//!
//! Each TCP address the supervisor listens on is a `SO_REUSEPORT` group
//! (`sockets::listen`). A canary gets a second listener in each group
//! (`listen::beside`), and its workers accept only there; a classic BPF
//! program on the group (`sys::route_reuseport`) draws, for each new
//! connection, whether it goes to the canary's listener or to the
//! address's own, which the live generation accepts on. Its share is
//! therefore what it is asked to be, whatever the workers' accept loops
//! do, and changes at once for the whole group: 0 while the canary starts,
//! its share once every worker is ready, 0 again before its workers are
//! told to drain (reverted, withdrawn, or replaced by its promotion).
//!
//! Connections already queued on the canary's listener when it closes
//! would be reset; the kernel moves them to the address's own listener
//! when `net.ipv4.tcp_migrate_req` is 1, which the supervisor sets where it
//! may (and says so where it may not).

pub mod judge;

use super::*;
use judge::{Plan, Prober};

pub(super) struct Canary {
    pub(super) generation: GenId,
    /// One per listening socket, in the same order.
    sockets: Vec<Listener>,
    /// The baseline's twin: its generation and listeners, once it has any.
    twin: Option<(GenId, Vec<Listener>)>,
    judging: Option<Judging>,
    /// The share steered to the canary, and to its twin.
    share: (u32, u32),
}

struct Judging {
    plan: Plan,
    since: Instant,
    check_at: Instant,
    prober: Option<Prober>,
}

/// How often the judge looks at its figures.
const CHECK_EVERY: Duration = Duration::from_secs(1);

const MIGRATE: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Why a new canary cannot start while `c`'s listeners are open.
fn still_open(c: &Canary) -> String {
    format!(
        "the listeners of canary generation {} are still open (its workers are draining); try again once it is gone",
        c.generation
    )
}

/// A second listener beside each of `sockets`, in its group.
fn beside_each(sockets: &[Listener]) -> Result<Vec<Listener>, String> {
    sockets
        .iter()
        .map(|l| {
            crate::sockets::listen::beside(l)
                .map_err(|e| format!("cannot listen beside {}: {e}", l.name))
        })
        .collect()
}

impl Driver {
    /// Makes the listening sockets a worker of `generation` gets in
    /// `lane` if they are not there yet: a canary's, on its first worker's
    /// spawn, then its twin's (each group holds the address's own listener
    /// first, then the canary's, then the twin's: the order the routing
    /// program counts).
    pub(super) fn make_lane_sockets(
        &mut self,
        generation: GenId,
        lane: crate::supervise::pool::Lane,
    ) -> Result<(), String> {
        use crate::supervise::pool::Lane;
        match lane {
            Lane::Main => Ok(()),
            Lane::Canary => {
                if let Some(c) = &self.canary
                    && c.generation != generation
                {
                    return Err(still_open(c));
                }
                if self.canary.is_none() {
                    let sockets = beside_each(&self.cfg.sockets)?;
                    self.allow_migration();
                    self.canary = Some(Canary {
                        generation,
                        sockets,
                        twin: None,
                        judging: None,
                        share: (0, 0),
                    });
                    self.route();
                }
                Ok(())
            }
            Lane::Twin => {
                let Some(c) = &self.canary else {
                    return Err("a twin starts after its canary's listeners exist".into());
                };
                match &c.twin {
                    Some((g, _)) if *g != generation => Err(still_open(c)),
                    Some(_) => Ok(()),
                    None => {
                        let sockets = beside_each(&self.cfg.sockets)?;
                        self.canary.as_mut().expect("checked").twin = Some((generation, sockets));
                        self.route();
                        Ok(())
                    }
                }
            }
        }
    }

    /// The listening sockets of `lane` (made by
    /// [`Driver::make_lane_sockets`]; the address's own if they are not).
    pub(super) fn lane_sockets(&self, lane: crate::supervise::pool::Lane) -> &[Listener] {
        use crate::supervise::pool::Lane;
        let canary = self.canary.as_ref();
        match lane {
            Lane::Canary => canary.map(|c| &c.sockets[..]),
            Lane::Twin => canary.and_then(|c| c.twin.as_ref()).map(|(_, t)| &t[..]),
            Lane::Main => None,
        }
        .unwrap_or(&self.cfg.sockets)
    }

    /// Whether a canary can be started now, or why not: every listener a
    /// TCP socket in a `SO_REUSEPORT` group, a live generation, and
    /// `current` naming another release than the live one.
    pub(super) fn canary_possible(&self) -> Result<(), String> {
        for l in &self.cfg.sockets {
            crate::sockets::listen::shared_port(l).map_err(|e| e.to_string())?;
        }
        if let Some(c) = &self.canary {
            return Err(still_open(c));
        }
        let Some(live) = self.pool.live_release() else {
            return Err("a canary needs a live generation to be judged against".into());
        };
        if let Ok(current) = release_of(&self.cfg.mode)
            && current.id == live.id
        {
            return Err(format!(
                "release {} is already live: a canary of it would be judged against itself",
                live.id
            ));
        }
        Ok(())
    }

    /// Steers the canary's and its twin's shares (per 10,000 new
    /// connections) to their listeners, the rest to the address's own.
    fn route(&self) {
        let (canary, twin) = self.canary.as_ref().map_or((0, 0), |c| c.share);
        for l in &self.cfg.sockets {
            if let Err(e) = crate::sys::route_reuseport(l.fd.as_fd(), canary, twin) {
                self.log(
                    -1,
                    Note::Canary,
                    &format!("cannot steer connections on {}: {e}", l.name),
                );
            }
        }
    }

    /// The address's own listener `i` left its group (a worker's
    /// shutdown(2)) and came back at the group's end: the canary's and the
    /// twin's listeners are put back after it, so that the routing
    /// program's indexes (own, canary, twin) hold again. What waits on them
    /// moves to the others meanwhile (`tcp_migrate_req`).
    pub(super) fn canary_reorder(&self, i: usize) {
        use nix::sys::socket::{Backlog, Shutdown, listen, shutdown};
        let Some(c) = &self.canary else {
            return;
        };
        let ours: Vec<&Listener> = c
            .sockets
            .get(i)
            .into_iter()
            .chain(c.twin.as_ref().and_then(|(_, t)| t.get(i)))
            .collect();
        for l in &ours {
            let _ = shutdown(std::os::fd::AsRawFd::as_raw_fd(&l.fd), Shutdown::Read);
        }
        for l in &ours {
            if let Err(e) = listen(&l.fd, Backlog::MAXCONN) {
                self.log(
                    -1,
                    Note::Canary,
                    &format!("cannot put a canary's listener back in its group: {e}"),
                );
            }
        }
        self.route();
    }

    /// `tcp_migrate_req`: what waits on a closing canary listener moves to
    /// the address's own instead of being reset.
    fn allow_migration(&self) {
        match std::fs::read_to_string(MIGRATE) {
            Ok(v) if v.trim() == "1" => {}
            Ok(_) => match std::fs::write(MIGRATE, "1") {
                Ok(()) => self.log(
                    0,
                    Note::Canary,
                    "set net.ipv4.tcp_migrate_req to 1: connections queued on a canary's listener when it closes move to the live one",
                ),
                Err(e) => self.log(
                    -1,
                    Note::Canary,
                    &format!(
                        "cannot set net.ipv4.tcp_migrate_req ({e}): connections still queued on the canary's listener when it closes are reset; set it to 1"
                    ),
                ),
            },
            Err(_) => self.log(
                -1,
                Note::Canary,
                "this kernel has no net.ipv4.tcp_migrate_req (Linux 5.14): connections still queued on the canary's listener when it closes are reset",
            ),
        }
    }

    /// Every canary worker (and its twin's) is ready: their shares, and
    /// the judge.
    pub(super) fn canary_live(
        &mut self,
        generation: GenId,
        release: &str,
        baseline: &str,
        plan: Plan,
        twin: Option<GenId>,
    ) {
        let address = self
            .cfg
            .sockets
            .iter()
            .find(|l| l.local_addr().parse::<std::net::SocketAddr>().is_ok())
            .map(|l| crate::sockets::listen::public_address(l.local_addr()));
        let prober = match (&plan.spec.judge_path, address) {
            (Some(path), Some(address)) => Some(Prober::start(
                address,
                path.clone(),
                judge::Sides {
                    canary: release.to_string(),
                    baseline: baseline.to_string(),
                    canary_generation: generation,
                    twin,
                },
            )),
            _ => None,
        };
        self.record(
            crate::store::release::EventKind::Canary,
            release,
            Some(baseline),
            Some(format!("generation {generation}: {}", plan.describe())),
        );
        let now = Instant::now();
        if let Some(c) = self.canary.as_mut().filter(|c| c.generation == generation) {
            c.share = (plan.share, if twin.is_some() { plan.share } else { 0 });
            c.judging = Some(Judging {
                check_at: now + CHECK_EVERY.min(plan.window()),
                since: now,
                plan,
                prober,
            });
        }
        self.route();
    }

    /// The canary or its twin ends: no new connection goes to it from
    /// now; with the canary, its judge stops.
    pub(super) fn canary_ended(&mut self, generation: GenId) {
        let Some(c) = self.canary.as_mut() else {
            return;
        };
        if c.generation == generation {
            c.judging = None;
            c.share.0 = 0;
        }
        if c.twin.as_ref().is_some_and(|(t, _)| *t == generation) {
            c.share.1 = 0;
        }
        self.route();
    }

    /// A generation is gone: its listeners close (the canary's record goes
    /// with the last of them).
    pub(super) fn canary_gone(&mut self, generation: GenId) {
        let Some(c) = self.canary.as_mut() else {
            return;
        };
        if c.twin.as_ref().is_some_and(|(t, _)| *t == generation) {
            c.twin = None;
        }
        if c.generation == generation {
            c.sockets.clear();
        }
        if c.sockets.is_empty() && c.twin.is_none() {
            self.canary = None;
        }
    }

    /// When the judge looks next.
    pub(super) fn judge_due(&self) -> Option<Instant> {
        self.canary
            .as_ref()
            .and_then(|c| c.judging.as_ref())
            .map(|j| j.check_at)
    }

    /// Looks at the figures if it is time: a verdict goes to the pool.
    pub(super) fn judge_if_due(&mut self) {
        let now = Instant::now();
        let Some(c) = self.canary.as_mut() else {
            return;
        };
        let generation = c.generation;
        let Some(j) = c.judging.as_mut().filter(|j| j.check_at <= now) else {
            return;
        };
        let end = j.since + j.plan.window();
        let figures = j.prober.as_ref().map(Prober::figures).unwrap_or_default();
        let verdict = judge::verdict(&j.plan.spec, &figures, now >= end);
        j.check_at = (now + CHECK_EVERY).min(end).max(now);
        if let Some(verdict) = verdict {
            c.judging = None;
            self.on(Event::Judged {
                generation,
                verdict,
            });
        }
    }

    /// The judge's figures and running verdict, for status.
    pub(super) fn canary_status(&self, status: &mut crate::supervise::pool::PoolStatus) {
        let Some(c) = &self.canary else {
            return;
        };
        let Some(j) = &c.judging else {
            return;
        };
        for g in &mut status.generations {
            if g.id != c.generation {
                continue;
            }
            if let Some(cs) = g.canary.as_mut() {
                let figures = j.prober.as_ref().map(Prober::figures).unwrap_or_default();
                cs.verdict = Some(match judge::verdict(&j.plan.spec, &figures, false) {
                    None => "undecided".into(),
                    Some(Ok(_)) => "promote".into(),
                    Some(Err(e)) => format!("revert: {e}"),
                });
                cs.figures = Some(figures.summarized());
            }
        }
    }
}
