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
    judging: Option<Judging>,
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

impl Driver {
    /// The listening sockets a worker of `generation` gets: a canary's
    /// own, made on its first worker's spawn.
    pub(super) fn canary_sockets(&mut self, generation: GenId) -> Result<&[Listener], String> {
        if let Some(c) = &self.canary
            && c.generation != generation
        {
            return Err(format!(
                "the listeners of canary generation {} are still open (its workers are draining); try again once it is gone",
                c.generation
            ));
        }
        if self.canary.is_none() {
            let mut sockets = Vec::new();
            for l in &self.cfg.sockets {
                let beside = crate::sockets::listen::beside(l)
                    .map_err(|e| format!("cannot listen beside {}: {e}", l.name))?;
                sockets.push(beside);
            }
            self.route(0);
            self.allow_migration();
            self.canary = Some(Canary {
                generation,
                sockets,
                judging: None,
            });
        }
        Ok(&self.canary.as_ref().expect("made above").sockets)
    }

    /// Steers `share` of every 10,000 new connections to the canary.
    fn route(&self, share: u32) {
        for l in &self.cfg.sockets {
            if let Err(e) = crate::sys::route_reuseport(l.fd.as_fd(), share) {
                self.log(
                    -1,
                    Note::Canary,
                    &format!("cannot steer connections on {}: {e}", l.name),
                );
            }
        }
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

    /// Every canary worker is ready: its share, and its judge.
    pub(super) fn canary_live(
        &mut self,
        generation: GenId,
        release: &str,
        baseline: &str,
        plan: Plan,
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
                release.to_string(),
                baseline.to_string(),
            )),
            _ => None,
        };
        self.route(plan.share);
        self.record(
            crate::store::release::EventKind::Canary,
            release,
            Some(baseline),
            Some(format!("generation {generation}: {}", plan.describe())),
        );
        let now = Instant::now();
        if let Some(c) = self.canary.as_mut().filter(|c| c.generation == generation) {
            c.judging = Some(Judging {
                check_at: now + CHECK_EVERY.min(plan.window()),
                since: now,
                plan,
                prober,
            });
        }
    }

    /// The canary ends: no new connection goes to it; its judge stops.
    pub(super) fn canary_ended(&mut self, generation: GenId) {
        if let Some(c) = self.canary.as_mut().filter(|c| c.generation == generation) {
            c.judging = None;
            self.route(0);
        }
    }

    /// Its generation is gone: its listeners close.
    pub(super) fn canary_gone(&mut self, generation: GenId) {
        if self
            .canary
            .as_ref()
            .is_some_and(|c| c.generation == generation)
        {
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

    /// Appends to the history (a canary's start, its promotion).
    pub(super) fn record(
        &self,
        kind: crate::store::release::EventKind,
        release: &str,
        previous: Option<&str>,
        reason: Option<String>,
    ) {
        let Mode::Serve { root } = &self.cfg.mode else {
            return;
        };
        let store = crate::store::release::Store::new(root);
        let mut ev = crate::store::release::Event::new(kind, release);
        ev.previous = previous.map(str::to_string);
        ev.reason = reason;
        if let Err(e) = store.append(&ev) {
            self.log(
                -1,
                Note::Supervisor,
                &format!("cannot record {kind:?} of {release} in the history: {e}"),
            );
        }
    }
}
