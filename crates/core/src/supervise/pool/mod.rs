//! The worker pool as a state machine with pure transitions.
//!
//! [`Pool`] knows generations and workers, deadlines and backoff; it does no
//! I/O. Each method takes the current time and returns the [`Action`]s for a
//! driver to carry out (`crate::supervise`), so every lifecycle rule here is
//! unit-tested without a single process.
//!
//! A **generation** is a set of N workers started together in one release
//! directory:
//!
//! ```text
//!             all ready                 drain signal sent          deadline: groups SIGKILLed
//!  Starting ─────────────▶ Live ───────────────────▶ Draining ──────────────▶ Killed
//!     │ a worker exits,       │ a worker exits:          │ all exited            │ all exited
//!     │ or not ready in time  │ respawn with backoff     ▼                       ▼
//!     ▼                       │                       (gone)                  (gone)
//!  Failed: killed at once;    │ scaled down: the worker is Retiring
//!  the live one keeps serving │ (drained, never respawned, removed once it exits)
//! ```
//!
//! A canary reload's generation goes from `Starting` to `Canary` instead:
//! it serves its share beside the live one, which keeps serving, until the
//! judge's verdict ([`Event::Judged`]). Reverted, it drains and nothing
//! else moves; promoted, a reload of its release starts, and once that is
//! live the old generation and the canary drain together (`canary`).
//!
//! These are `GenState`'s variants, and every input is one [`Event`] given
//! to [`Pool::on`].
//!
//! The first generation is live from the start (there is nothing older to
//! protect): its workers are respawned with backoff until they come up. A
//! reload requested while one is starting is queued, and all queued requests
//! are coalesced into the next one: a burst of HUPs converges to one live
//! generation, and no request is lost.
//!
//! This file holds the types and [`Pool::on`], which dispatches each event;
//! the transitions live beside it by subject: `workers` (a worker spawned,
//! ready, exited), `lifecycle` (a generation started, promoted, drained,
//! killed, failed; stop and scale), `canary` (a canary's start, verdict
//! and end), `trial` (settle, probation,
//! confirmation, revert), `deadlines` (the one list of deadlines, and
//! what each does when due) and `status`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::exit::Exit;
use crate::supervise::Note;
use crate::supervise::canary::judge::Plan;

mod canary;
mod deadlines;
mod lifecycle;
mod pause;
mod settings;
mod status;
mod trial;
mod workers;

pub use settings::{BACKGROUND_MAX, NotifySocket, Readiness, Settings};
pub use status::{
    CanaryStatus, GenerationState, GenerationStatus, PauseStatus, PoolStatus, WorkerPhase,
    WorkerStatus,
};

pub type GenId = u64;
/// A control client waiting for the outcome of a reload.
pub type Waiter = u64;

/// The release a generation runs.
pub use crate::store::release::Release;

/// How a reload ended: the generation and release now live, or why not.
pub type Outcome = Result<(GenId, String), String>;

/// What the driver must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Start worker `index` of generation `generation` in `release.dir`; report
    /// back with [`Pool::spawned`] or [`Pool::spawn_failed`].
    Spawn {
        generation: GenId,
        index: usize,
        release: Release,
        /// Under `SCHED_IDLE`, until an [`Action::Foreground`].
        background: bool,
        /// Which listeners it accepts on.
        lane: Lane,
    },
    /// Every worker of canary `generation` is ready: steer its share of
    /// new connections to it and start judging it against `baseline`.
    CanaryLive {
        generation: GenId,
        release: String,
        baseline: String,
        plan: Plan,
        /// The baseline's twin: as many fresh workers of the live release,
        /// taking as large a share, that the canary is compared with.
        twin: Option<GenId>,
    },
    /// Canary `generation` is ending (reverted, withdrawn, or replaced by
    /// its promotion): no new connection goes to it from now; sent before
    /// its workers are told to drain.
    CanaryEnded { generation: GenId },
    /// The judge promoted canary `generation`: record it in the history.
    Promoted {
        generation: GenId,
        release: String,
        baseline: String,
        figures: String,
    },
    /// Put a worker started in the background back at normal priority.
    Foreground { pid: i32 },
    /// Send a signal to a worker process.
    Signal { pid: i32, signal: Signal },
    /// SIGKILL a worker's whole process group.
    KillGroup { pid: i32 },
    /// A worker that drained is gone, and what is left in its process
    /// group may still hold clients (a server its shell started): send the
    /// group the drain signal, and SIGKILL it at the drain deadline if it
    /// is still there.
    DrainGroup { pid: i32, generation: GenId },
    /// Resolve `current` and call [`Pool::begin_generation`] (a queued
    /// reload is due).
    StartReload,
    /// Tell these waiters how the reload ended.
    ReloadDone {
        waiters: Vec<Waiter>,
        outcome: Outcome,
    },
    /// An sd_notify message for systemd (`READY=1`, `RELOADING=1`).
    Systemd(Systemd),
    /// A line for the log (shown unless `-q`), and what it is about.
    Log(Note, String),
    /// A warning or failure for the log (shown even with `-q`).
    Warn(Note, String),
    /// Generation `GenId` is over (drained, or killed at its deadline):
    /// kill whatever it started that left its process group (`setsid`).
    Sweep(GenId),
    /// A generation on trial failed it: switch `current` back from
    /// `release` to `to` (if it still names `release`), and record the
    /// revert (`release` is bad). The pool itself starts the generation of
    /// `to`.
    Revert {
        generation: GenId,
        release: String,
        to: Release,
        reason: String,
    },
    /// The first generation never became ready within the ready timeout:
    /// there is nothing to serve and nothing older to fall back on, so the
    /// supervisor stops with this reason and exit status 1.
    GiveUp(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum WorkerState {
    /// To be started at this time (after a backoff).
    Waiting {
        #[serde(with = "crate::supervise::clock::mono")]
        at: Instant,
    },
    /// A `Spawn` action was issued; the pid comes with `spawned`.
    Spawning,
    Starting {
        pid: i32,
        #[serde(with = "crate::supervise::clock::mono")]
        since: Instant,
        /// Of the time since, how long the worker's busiest task waited
        /// for a CPU ([`Event::CpuWaited`]): a timed readiness does not
        /// count it.
        #[serde(default)]
        waited: Duration,
    },
    Ready {
        pid: i32,
        #[serde(with = "crate::supervise::clock::mono")]
        since: Instant,
    },
    /// Told to drain (or killed) with its generation; waiting for it to exit.
    Stopping {
        pid: i32,
    },
    /// Scaled down out of a live generation: told to drain, never
    /// respawned, removed once it exits. `None` while its spawn is still
    /// in flight (it is told to drain as soon as it has a pid).
    Retiring {
        pid: Option<i32>,
    },
    Gone,
}

#[derive(Debug, Serialize, Deserialize)]
struct Worker {
    index: usize,
    state: WorkerState,
    /// Consecutive deaths before ready; drives the backoff.
    failures: u32,
    restarts: u32,
    /// The process group of its latest process (its pid), killed once that
    /// process is gone so that nothing it forked outlives it.
    pgid: Option<i32>,
    /// Its latest process was started in the background and has not been
    /// put back at normal priority yet.
    #[serde(default)]
    background: bool,
}

impl Worker {
    fn pid(&self) -> Option<i32> {
        match self.state {
            WorkerState::Starting { pid, .. }
            | WorkerState::Ready { pid, .. }
            | WorkerState::Stopping { pid }
            | WorkerState::Retiring { pid: Some(pid) } => Some(pid),
            _ => None,
        }
    }

    /// Marks it as being started; the driver's [`Action::Spawn`] for it.
    fn spawn(
        &mut self,
        generation: GenId,
        release: Release,
        background: bool,
        lane: Lane,
    ) -> Action {
        self.state = WorkerState::Spawning;
        self.background = background;
        Action::Spawn {
            generation,
            index: self.index,
            release,
            background,
            lane,
        }
    }

    fn retiring(&self) -> bool {
        matches!(self.state, WorkerState::Retiring { .. })
    }

    fn new(index: usize, state: WorkerState) -> Worker {
        Worker {
            index,
            state,
            failures: 0,
            restarts: 0,
            pgid: None,
            background: false,
        }
    }
}

/// The lifecycle of a generation (the diagram at the top of the module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum GenState {
    /// Workers starting; all must be ready by `deadline`.
    Starting {
        #[serde(with = "crate::supervise::clock::mono")]
        deadline: Instant,
    },
    /// Serving; its dead workers are respawned with backoff.
    Live,
    /// Told to drain; its process groups are killed at `deadline`.
    Draining {
        #[serde(with = "crate::supervise::clock::mono")]
        deadline: Instant,
    },
    /// Past its drain deadline, or stopped fast: killed, exits awaited.
    Killed,
    /// Did not come up (a worker died, or not ready in time): killed at
    /// once, kept until its workers are reaped so status can show it.
    Failed,
    /// A canary: ready, serving its share beside the live generation
    /// until the judge's verdict.
    Canary,
}

impl GenState {
    /// On its way out: drained, killed or failed.
    fn ending(self) -> bool {
        matches!(
            self,
            GenState::Draining { .. } | GenState::Killed | GenState::Failed
        )
    }
}

/// What is still undecided about a generation that went live by a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
enum Trial {
    /// Nothing: the first generation, a revert, or one that passed.
    #[default]
    Settled,
    /// Crashes count until `until` (probation); it reverts at `confirm_by`
    /// unless confirmed first (a provisional reload).
    Pending {
        #[serde(with = "crate::supervise::clock::mono_opt")]
        until: Option<Instant>,
        #[serde(with = "crate::supervise::clock::mono_opt")]
        confirm_by: Option<Instant>,
        crashes: u32,
    },
    /// Reverted: a generation of the release it replaced takes over.
    Reverted,
}

/// A client waiting for a generation to settle.
#[derive(Debug, Serialize, Deserialize)]
struct Settling {
    waiter: Waiter,
    /// The end of its window.
    #[serde(with = "crate::supervise::clock::mono")]
    by: Instant,
}

#[derive(Debug, Serialize, Deserialize)]
struct Generation {
    id: GenId,
    release: Release,
    state: GenState,
    workers: Vec<Worker>,
    #[serde(with = "crate::supervise::clock::mono")]
    started: Instant,
    waiters: Vec<Waiter>,
    /// The release of the generation it replaced, to revert to.
    #[serde(default)]
    previous: Option<Release>,
    #[serde(default)]
    trial: Trial,
    /// When it went live: a settle window counts from here.
    #[serde(default, with = "crate::supervise::clock::mono_opt")]
    live_since: Option<Instant>,
    /// Clients waiting for it to settle ([`Event::Settle`]).
    #[serde(default)]
    settling: Vec<Settling>,
    /// Started by a reload that must be confirmed within this long once
    /// live (`None`: not provisional).
    #[serde(default)]
    confirm_within: Option<Duration>,
    /// A revert: it goes live settled, never on trial (no ping-pong).
    #[serde(default)]
    revert: bool,
    /// A canary reload's generation (or its baseline's twin), and how it
    /// is judged.
    #[serde(default)]
    canary: Option<Plan>,
    /// Which listeners its workers accept on.
    #[serde(default)]
    lane: Lane,
    /// A canary the judge promoted: it serves until its release's new
    /// generation is live.
    #[serde(default)]
    promoted: bool,
}

/// Which listeners a generation's workers accept on: the address's own,
/// a canary's, or the canary's baseline twin's (each in the address's
/// `SO_REUSEPORT` group, taking the share the driver steers to it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lane {
    #[default]
    Main,
    Canary,
    Twin,
}

impl Generation {
    /// Every worker it keeps (not one scaled down) is ready.
    fn all_ready(&self) -> bool {
        self.workers
            .iter()
            .filter(|w| !w.retiring())
            .all(|w| matches!(w.state, WorkerState::Ready { .. }))
    }
}

/// Everything that happens to the pool: the one input of [`Pool::on`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A reload was asked for (HUP, the control socket); `waiter` is the
    /// control client waiting for its outcome. With `confirm_within`, the
    /// new generation reverts unless confirmed within that long of going
    /// live.
    ReloadRequested {
        waiter: Option<Waiter>,
        confirm_within: Option<Duration>,
        /// A canary reload: the new generation serves beside the live one
        /// until judged.
        canary: Option<Plan>,
    },
    /// Stop accepting: the live generation drains and new connections wait
    /// in the backlog until a reload resumes, or `max` passes; `waiter` is
    /// answered once every worker is gone.
    Pause {
        max: Duration,
        waiter: Option<Waiter>,
    },
    /// The judge's verdict on canary `generation`: `Ok` promotes it,
    /// `Err` reverts it; each with the figures and reasons, for the log,
    /// the history and the client waiting.
    Judged {
        generation: GenId,
        verdict: Result<String, String>,
    },
    /// A provisional generation is confirmed (`None`: the live one).
    Confirm {
        generation: Option<GenId>,
        waiter: Option<Waiter>,
    },
    /// A provisional generation's deadline moves to `within` from now
    /// (never earlier): the lease a fleet agent renews while its
    /// coordinator is heard from. Answered like a confirm.
    Extend {
        generation: GenId,
        within: Duration,
        waiter: Option<Waiter>,
    },
    /// The driver resolved `current` for a [`Action::StartReload`] (or for
    /// the first generation): start a generation there, or fail the reload.
    ReleaseResolved(Result<Release, String>),
    /// The driver started a worker for an [`Action::Spawn`].
    Spawned {
        generation: GenId,
        index: usize,
        pid: i32,
    },
    /// The driver could not start it (exec failed).
    SpawnFailed {
        generation: GenId,
        index: usize,
        error: String,
    },
    /// A worker said `READY=1` (or wrote to its ready descriptor).
    Ready {
        generation: GenId,
        index: usize,
    },
    /// A child exited: `how` it ended, `tail` the end of its output.
    Exited {
        pid: i32,
        how: Exit,
        tail: String,
    },
    /// The worker count changed (control `scale`, TTIN, TTOU).
    Scale(usize),
    Stop(Stop),
    /// Answer `waiter` once generation `generation` has been live for
    /// `within` (counted from when it went live) and is still live, not
    /// reverted, with every worker up; at once with a failure when it is
    /// reverted, fails or is replaced first. What `deploy --settle` waits
    /// for before it reports success.
    Settle {
        generation: GenId,
        within: Duration,
        waiter: Waiter,
    },
    /// How long a starting worker's tasks have waited for a CPU since it
    /// was spawned (the most any one of them waited): a timed readiness
    /// (`delay:`, `auto:`) counts only the time it could run, so a worker
    /// starved on a saturated host is never declared alive for time it
    /// did not get. The driver reads it for [`Pool::timed_readiness_due`].
    CpuWaited {
        pid: i32,
        waited: Duration,
    },
    /// Time passed: whatever was due by now ([`Pool::next_deadline`]).
    Tick,
}

/// How the supervisor is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stop {
    /// Drain every generation, then exit.
    Graceful,
    /// Kill everything now, then exit.
    Fast,
}

/// What the pool tells systemd (`sd_notify`), when it runs under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Systemd {
    /// `READY=1`: serving (again).
    Ready,
    /// `RELOADING=1`, with the monotonic time systemd asks for.
    Reloading,
    /// `STOPPING=1`.
    Stopping,
}

impl Systemd {
    pub fn as_str(self) -> &'static str {
        match self {
            Systemd::Ready => "READY=1",
            Systemd::Reloading => "RELOADING=1",
            Systemd::Stopping => "STOPPING=1",
        }
    }
}

/// The pool. It serializes whole (deadlines as monotonic times), so
/// that a supervisor upgrading itself hands it to the new program as is.
#[derive(Debug, Serialize, Deserialize)]
pub struct Pool {
    settings: Settings,
    gens: Vec<Generation>,
    next_gen: GenId,
    /// A reload is due once the starting generation resolves and there is
    /// room to drain.
    queued: Option<Vec<Waiter>>,
    /// A `StartReload` was handed to the driver and not yet answered by
    /// `begin_generation` or `reload_unavailable`.
    start_pending: bool,
    stopping: Option<Stop>,
    announced_ready: bool,
    /// The first generation must be ready by then, or the supervisor gives up.
    #[serde(with = "crate::supervise::clock::mono_opt")]
    first_ready_by: Option<Instant>,
    /// Why the last worker died, for giving up.
    last_death: Option<String>,
    /// Restarts of workers outside reloads, for status.
    pub restarts: u64,
    /// The shortest confirmation window among the queued reloads.
    #[serde(default)]
    queued_confirm: Option<Duration>,
    /// The queued reload is a canary's (the latest asked for).
    #[serde(default)]
    queued_canary: Option<Plan>,
    /// Paused: nothing accepts until a reload resumes.
    #[serde(default)]
    paused: Option<pause::Paused>,
    /// The queued reload withdrew a canary: if it resolves to the release
    /// already live, there is nothing to start.
    #[serde(default)]
    withdrew: bool,
    /// Generations reverted lately, and why (for `confirm` to answer).
    #[serde(default)]
    reverted: Vec<(GenId, String)>,
    /// Reverts so far, for status.
    #[serde(default)]
    pub reverts: u64,
    /// Reloads by outcome, with how long the successful ones took.
    #[serde(default)]
    pub reloads: ReloadStats,
}

/// Upper bounds (seconds) of the reload duration histogram's buckets.
pub const RELOAD_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Reloads by outcome, and a histogram of how long the successful ones
/// took from start to live (for `--metrics`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadStats {
    pub ok: u64,
    pub failed: u64,
    /// Per bucket of [`RELOAD_BUCKETS`]: reloads that took at most that
    /// long (not cumulative; the exposition sums them).
    pub buckets: Vec<u64>,
    pub sum_s: f64,
}

impl ReloadStats {
    fn went_live(&mut self, took: Duration) {
        let s = took.as_secs_f64();
        self.ok += 1;
        self.sum_s += s;
        if self.buckets.len() != RELOAD_BUCKETS.len() + 1 {
            self.buckets = vec![0; RELOAD_BUCKETS.len() + 1];
        }
        let i = RELOAD_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(RELOAD_BUCKETS.len());
        self.buckets[i] += 1;
    }
}

/// How long a pause lasts at most unless told (`dream pause --max`):
/// under the 60 s that proxies (nginx's `proxy_read_timeout`, load
/// balancers' idle timeouts) and most clients wait for an answer, with
/// room for the resumed release to start.
pub const DEFAULT_PAUSE: Duration = Duration::from_secs(30);

/// The most workers a generation may have; every path that sets the count
/// (flag, `dream.toml`, control `scale`, SIGTTIN) is held to 1..=this.
pub const MAX_WORKERS: usize = 4096;

/// Checks a worker count against 1..=[`MAX_WORKERS`].
pub fn check_workers(n: usize) -> Result<usize, String> {
    if (1..=MAX_WORKERS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("workers must be from 1 to {MAX_WORKERS} (got {n})"))
    }
}

/// Backoff before respawning after `failures` consecutive early deaths:
/// 100 ms doubling to 30 s.
pub fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let ms = 100u64.saturating_mul(1u64 << (failures - 1).min(20));
    Duration::from_millis(ms.min(30_000))
}

/// How long a worker must stay up for its failure count to reset.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

impl Pool {
    pub fn new(settings: Settings) -> Pool {
        Pool {
            settings,
            gens: Vec::new(),
            next_gen: 1,
            queued: None,
            start_pending: false,
            stopping: None,
            announced_ready: false,
            first_ready_by: None,
            last_death: None,
            restarts: 0,
            queued_confirm: None,
            queued_canary: None,
            paused: None,
            withdrew: false,
            reverted: Vec::new(),
            reverts: 0,
            reloads: ReloadStats::default(),
        }
    }

    /// The pool's one transition: an event in, the actions to carry out.
    ///
    /// Every rule of the lifecycle (when a generation goes live, fails,
    /// drains; when a worker is respawned, and after what backoff; when a
    /// queued reload may start) is reached from here, so a change of
    /// policy is an edit behind this match.
    pub fn on(&mut self, event: Event, now: Instant) -> Vec<Action> {
        match event {
            Event::ReloadRequested {
                waiter,
                confirm_within,
                canary,
            } => {
                if self.stopping.is_none()
                    && let Some(d) = confirm_within
                {
                    self.queued_confirm = Some(self.queued_confirm.map_or(d, |q| q.min(d)));
                }
                // A reload asked for while a canary is judged ends it: what
                // `current` names now is what is wanted (a deploy that was
                // interrupted switched it back, say).
                let mut actions = self.withdraw_canary(now);
                self.withdrew |= !actions.is_empty();
                if self.stopping.is_none() {
                    self.queued_canary = canary;
                    // A reload while paused resumes.
                    self.resuming();
                }
                actions.extend(if self.request_reload(waiter) {
                    vec![Action::StartReload]
                } else if self.stopping.is_some() {
                    vec![ReloadFailed::stopping(waiter.into_iter().collect())]
                } else if self.reloading() {
                    vec![Action::Log(
                        Note::ReloadQueued,
                        "reload queued behind the one in progress".into(),
                    )]
                } else if self.reload_held() {
                    vec![Action::Log(
                        Note::ReloadHeld,
                        "reload held until a draining generation finishes or reaches its drain deadline"
                            .into(),
                    )]
                } else {
                    Vec::new()
                });
                actions
            }
            Event::Judged {
                generation,
                verdict,
            } => self.judged(generation, verdict, now),
            Event::Pause { max, waiter } => self.pause(max, waiter, now),
            Event::Confirm { generation, waiter } => self.confirm(generation, waiter, now, None),
            Event::Extend {
                generation,
                within,
                waiter,
            } => self.confirm(Some(generation), waiter, now, Some(within)),
            Event::Settle {
                generation,
                within,
                waiter,
            } => self.settle(generation, within, waiter, now),
            Event::CpuWaited { pid, waited } => {
                for w in self.gens.iter_mut().flat_map(|g| g.workers.iter_mut()) {
                    if let WorkerState::Starting {
                        pid: p,
                        waited: ref mut was,
                        ..
                    } = w.state
                        && p == pid
                    {
                        *was = (*was).max(waited);
                    }
                }
                Vec::new()
            }
            Event::ReleaseResolved(Ok(release)) => self.begin_generation(release, now),
            Event::ReleaseResolved(Err(reason)) => self.reload_unavailable(reason),
            Event::Spawned {
                generation,
                index,
                pid,
            } => self.spawned(generation, index, pid, now),
            Event::SpawnFailed {
                generation,
                index,
                error,
            } => self.spawn_failed(generation, index, error, now),
            Event::Ready { generation, index } => self.ready(generation, index, now),
            Event::Exited { pid, how, tail } => self.exited(pid, how, &tail, now),
            Event::Scale(workers) => self.scale(workers, now),
            Event::Stop(how) => self.stop(how, now),
            Event::Tick => self.tick(now),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether a worker started now goes in the background: only while
    /// some other worker serves (the first generation, or a pool with
    /// every worker down, starts at full speed).
    fn background_now(&self) -> bool {
        self.settings.background_start
            && self.gens.iter().any(|g| {
                g.workers
                    .iter()
                    .any(|w| matches!(w.state, WorkerState::Ready { .. }))
            })
    }

    fn live(&self) -> Option<&Generation> {
        self.gens.iter().find(|g| g.state == GenState::Live)
    }

    fn starting(&self) -> Option<&Generation> {
        self.gens
            .iter()
            .find(|g| matches!(g.state, GenState::Starting { .. }))
    }

    /// True when stopping and every worker is gone.
    pub fn finished(&self) -> bool {
        self.stopping.is_some() && self.gens.is_empty()
    }

    pub fn stopping(&self) -> Option<Stop> {
        self.stopping
    }

    /// Asks for a reload. Returns true if the driver should resolve
    /// `current` and call [`Pool::begin_generation`] now; otherwise the
    /// request is queued behind the reload in progress.
    fn request_reload(&mut self, waiter: Option<Waiter>) -> bool {
        if self.stopping.is_some() {
            return false;
        }
        if self.starting().is_some() || self.queued.is_some() || !self.room_to_drain() {
            self.queued.get_or_insert_with(Vec::new).extend(waiter);
            return false;
        }
        self.queued = Some(waiter.into_iter().collect());
        self.start_pending = true;
        true
    }

    /// Generations draining (not yet killed at their deadline).
    fn draining(&self) -> usize {
        self.gens
            .iter()
            .filter(|g| matches!(g.state, GenState::Draining { .. }))
            .count()
    }

    /// Whether a new generation may start: once it is live, the one it
    /// replaces drains too, so fewer than `max_draining` may be draining.
    /// Otherwise the reload waits (backpressure) instead of cutting short
    /// a generation still finishing its clients' requests.
    fn room_to_drain(&self) -> bool {
        self.draining() < self.settings.max_draining.max(1)
    }

    /// Whether a reload is held back until a draining generation finishes.
    pub fn reload_held(&self) -> bool {
        self.queued.is_some() && !self.reloading() && !self.room_to_drain()
    }

    /// Whether a reload is queued or handed to the driver and not started.
    pub fn reload_pending(&self) -> bool {
        self.queued.is_some() || self.start_pending
    }

    /// Whether a generation is starting (a reload is in progress).
    pub fn reloading(&self) -> bool {
        self.starting().is_some()
    }

    fn worker(&self, generation: GenId, index: usize) -> Option<&Worker> {
        let g = self.gens.iter().find(|g| g.id == generation)?;
        g.workers.iter().find(|w| w.index == index)
    }

    fn worker_mut(&mut self, generation: GenId, index: usize) -> Option<(&mut Generation, usize)> {
        let g = self.gens.iter_mut().find(|g| g.id == generation)?;
        let i = g.workers.iter().position(|w| w.index == index)?;
        Some((g, i))
    }

    fn find_pid(&self, pid: i32) -> Option<(GenId, usize)> {
        self.gens.iter().find_map(|g| {
            g.workers
                .iter()
                .find(|w| w.pid() == Some(pid))
                .map(|w| (g.id, w.index))
        })
    }

    /// The ids of the generations the pool still holds.
    pub fn generation_ids(&self) -> Vec<GenId> {
        self.gens.iter().map(|g| g.id).collect()
    }

    /// Pids of every worker, for signal relays.
    pub fn pids(&self) -> Vec<i32> {
        self.gens
            .iter()
            .flat_map(|g| g.workers.iter().filter_map(|w| w.pid()))
            .collect()
    }

    /// Pids of the live generation's workers.
    pub fn live_pids(&self) -> Vec<i32> {
        self.live()
            .map(|g| g.workers.iter().filter_map(|w| w.pid()).collect())
            .unwrap_or_default()
    }

    /// The live release, if any.
    pub fn live_release(&self) -> Option<&Release> {
        self.live().map(|g| &g.release)
    }

    /// Releases that some worker still runs in (live, starting or draining).
    pub fn releases_in_use(&self) -> Vec<Release> {
        let mut out: Vec<Release> = Vec::new();
        for g in &self.gens {
            if !out.contains(&g.release) {
                out.push(g.release.clone());
            }
        }
        out
    }
}

struct ReloadFailed;

impl ReloadFailed {
    fn stopping(waiters: Vec<Waiter>) -> Action {
        Action::ReloadDone {
            waiters,
            outcome: Err("the supervisor is stopping".into()),
        }
    }
}

#[cfg(test)]
mod tests;
