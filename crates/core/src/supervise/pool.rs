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
//! These are `GenState`'s variants, and every input is one [`Event`] given
//! to [`Pool::on`].
//!
//! The first generation is live from the start (there is nothing older to
//! protect): its workers are respawned with backoff until they come up. A
//! reload requested while one is starting is queued, and all queued requests
//! are coalesced into the next one: a burst of HUPs converges to one live
//! generation, and no request is lost.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::exit::Exit;
use crate::supervise::Note;

pub type GenId = u64;
/// A control client waiting for the outcome of a reload.
pub type Waiter = u64;

/// When a worker counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Readiness {
    /// Only when it sends `READY=1`.
    Notify,
    /// Only when it writes a line to this inherited descriptor (s6's
    /// notification-fd).
    Fd(i32),
    /// When it has stayed alive this long (`READY=1` is ignored), counting
    /// only time in which it could run: time its tasks spent waiting for
    /// a CPU does not count.
    Delay(Duration),
    /// `READY=1`, or alive this long (counted as for `Delay`), whichever
    /// comes first.
    Auto(Duration),
}

impl Readiness {
    /// The time a worker must stay alive to count as ready, if any.
    pub fn timed(self) -> Option<Duration> {
        match self {
            Readiness::Notify | Readiness::Fd(_) => None,
            Readiness::Delay(d) | Readiness::Auto(d) => Some(d),
        }
    }
}

/// As typed on the command line: `notify`, `fd:3`, `delay:1s`, `auto:1s`.
impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Readiness::Notify => write!(f, "notify"),
            Readiness::Fd(n) => write!(f, "fd:{n}"),
            Readiness::Delay(d) => write!(f, "delay:{}", crate::fmt_duration(*d)),
            Readiness::Auto(d) => write!(f, "auto:{}", crate::fmt_duration(*d)),
        }
    }
}

impl std::str::FromStr for Readiness {
    type Err = String;

    fn from_str(s: &str) -> Result<Readiness, String> {
        let dur = |d: &str| crate::supervise::signals::parse_duration(d);
        match s.split_once(':') {
            None if s == "notify" => Ok(Readiness::Notify),
            Some(("fd", n)) => match n.parse::<i32>() {
                Ok(n) if (3..1024).contains(&n) => Ok(Readiness::Fd(n)),
                _ => Err(format!(
                    "invalid readiness {s:?}: fd:N needs a descriptor from 3 to 1023"
                )),
            },
            None if s == "auto" => Ok(Readiness::Auto(Duration::from_secs(1))),
            Some(("delay", d)) => Ok(Readiness::Delay(dur(d)?)),
            Some(("auto", d)) => Ok(Readiness::Auto(dur(d)?)),
            _ => Err(format!(
                "invalid readiness {s:?}: use notify, fd:N, delay:DUR or auto:DUR (e.g. auto:1s)"
            )),
        }
    }
}

/// Tunables of a pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub workers: usize,
    pub readiness: Readiness,
    pub ready_timeout: Duration,
    #[serde(with = "crate::supervise::signals::by_number")]
    pub drain_signal: Signal,
    pub drain_timeout: Duration,
    /// Generations allowed to drain at once; a reload that would make one
    /// more waits until one has drained or reached its drain deadline.
    pub max_draining: usize,
    /// For this long after a reload goes live, crashes count against it:
    /// three, or all its workers down at once, and it is reverted to the
    /// release it replaced. Zero turns probation off.
    #[serde(default)]
    pub probation: Duration,
    /// Start workers under `SCHED_IDLE` while others serve, and put them
    /// back at normal priority once ready (or after [`BACKGROUND_MAX`]):
    /// the serving workers keep the CPU while the new ones start.
    #[serde(default)]
    pub background_start: bool,
}

/// The longest a worker runs in the background before it is put back at
/// normal priority even though not ready: on a machine busy to the last
/// cycle a `SCHED_IDLE` start would otherwise wait for the ready timeout.
pub const BACKGROUND_MAX: Duration = Duration::from_millis(500);

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            workers: 1,
            readiness: Readiness::Auto(Duration::from_secs(1)),
            ready_timeout: Duration::from_secs(60),
            drain_signal: Signal::SIGTERM,
            drain_timeout: Duration::from_secs(30),
            max_draining: 4,
            probation: Duration::from_secs(10),
            background_start: false,
        }
    }
}

/// The release a generation runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub id: String,
    pub dir: PathBuf,
}

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
    },
    /// Put a worker started in the background back at normal priority.
    Foreground { pid: i32 },
    /// Send a signal to a worker process.
    Signal { pid: i32, signal: Signal },
    /// SIGKILL a worker's whole process group.
    KillGroup { pid: i32 },
    /// Resolve `current` and call [`Pool::begin_generation`] (a queued
    /// reload is due).
    StartReload,
    /// Tell these waiters how the reload ended.
    ReloadDone {
        waiters: Vec<Waiter>,
        outcome: Outcome,
    },
    /// An sd_notify message for systemd (`READY=1`, `RELOADING=1`).
    Systemd(String),
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
    fn spawn(&mut self, generation: GenId, release: Release, background: bool) -> Action {
        self.state = WorkerState::Spawning;
        self.background = background;
        Action::Spawn {
            generation,
            index: self.index,
            release,
            background,
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
            } => {
                if self.stopping.is_none()
                    && let Some(d) = confirm_within
                {
                    self.queued_confirm = Some(self.queued_confirm.map_or(d, |q| q.min(d)));
                }
                if self.request_reload(waiter) {
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
                }
            }
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

    /// Starts a generation in `release`. The first one is live at once.
    fn begin_generation(&mut self, release: Release, now: Instant) -> Vec<Action> {
        self.start_pending = false;
        let waiters = self.queued.take().unwrap_or_default();
        let confirm_within = self.queued_confirm.take();
        if self.stopping.is_some() {
            return vec![ReloadFailed::stopping(waiters)];
        }
        self.start_generation(release, waiters, confirm_within, false, now)
    }

    fn start_generation(
        &mut self,
        release: Release,
        waiters: Vec<Waiter>,
        confirm_within: Option<Duration>,
        revert: bool,
        now: Instant,
    ) -> Vec<Action> {
        let id = self.next_gen;
        self.next_gen += 1;
        let first = self.live().is_none() && self.gens.is_empty();
        let state = if first {
            self.first_ready_by = Some(now + self.settings.ready_timeout);
            GenState::Live
        } else {
            GenState::Starting {
                deadline: now + self.settings.ready_timeout,
            }
        };
        let mut actions = vec![Action::Log(
            Note::GenerationStarting,
            format!(
                "{} generation {id}: release {} ({})",
                if first {
                    "starting"
                } else if revert {
                    "revert: starting"
                } else {
                    "reload: starting"
                },
                release.id,
                crate::plural(self.settings.workers, "worker")
            ),
        )];
        if !first {
            actions.push(Action::Systemd("RELOADING=1".into()));
        }
        let background = self.background_now();
        let workers = (0..self.settings.workers)
            .map(|index| {
                let mut w = Worker::new(index, WorkerState::Spawning);
                actions.push(w.spawn(id, release.clone(), background));
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
        });
        actions
    }

    /// [`Event::Settle`].
    fn settle(
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
    fn settle_due(&mut self, now: Instant) -> Vec<Action> {
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
            let all_up = g
                .workers
                .iter()
                .filter(|w| !w.retiring())
                .all(|w| matches!(w.state, WorkerState::Ready { .. }));
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

    /// Resolving `current` failed: the queued reload fails with `reason`.
    fn reload_unavailable(&mut self, reason: String) -> Vec<Action> {
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

    fn worker_mut(&mut self, generation: GenId, index: usize) -> Option<(&mut Generation, usize)> {
        let g = self.gens.iter_mut().find(|g| g.id == generation)?;
        let i = g.workers.iter().position(|w| w.index == index)?;
        Some((g, i))
    }

    /// The driver started a worker.
    fn spawned(&mut self, generation: GenId, index: usize, pid: i32, now: Instant) -> Vec<Action> {
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
    fn spawn_failed(
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
            false,
            now,
        )
    }

    /// A worker sent `READY=1`.
    fn ready(&mut self, generation: GenId, index: usize, now: Instant) -> Vec<Action> {
        if matches!(self.settings.readiness, Readiness::Delay(_)) {
            return Vec::new();
        }
        self.mark_ready(generation, index, now)
    }

    fn mark_ready(&mut self, generation: GenId, index: usize, now: Instant) -> Vec<Action> {
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

    /// If every worker of `generation` is ready, make it live and drain the old one.
    fn promote(&mut self, generation: GenId, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(g) = self.gens.iter().find(|g| g.id == generation) else {
            return actions;
        };
        let all_ready = g
            .workers
            .iter()
            .filter(|w| !w.retiring())
            .all(|w| matches!(w.state, WorkerState::Ready { .. }));
        if !all_ready {
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
                    actions.push(Action::Systemd("READY=1".into()));
                }
            }
            GenState::Starting { .. } => {
                let release = g.release.id.clone();
                let elapsed = now.duration_since(g.started);
                let old: Vec<GenId> = self
                    .gens
                    .iter()
                    .filter(|o| o.state == GenState::Live)
                    .map(|o| o.id)
                    .collect();
                let previous = self
                    .gens
                    .iter()
                    .find(|o| o.state == GenState::Live)
                    .map(|o| o.release.clone());
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
                self.announced_ready = true;
                actions.push(Action::Systemd("READY=1".into()));
                actions.push(Action::ReloadDone {
                    waiters,
                    outcome: Ok((generation, release)),
                });
                actions.extend(self.start_queued());
            }
            GenState::Draining { .. } | GenState::Killed | GenState::Failed => {}
        }
        actions
    }

    /// Hands a queued reload to the driver once nothing is starting and
    /// there is room to drain; at most once until it is taken up.
    fn start_queued(&mut self) -> Vec<Action> {
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
    fn drain(&mut self, generation: GenId, now: Instant) -> Vec<Action> {
        let signal = self.settings.drain_signal;
        let deadline = now + self.settings.drain_timeout;
        let Some(g) = self.gens.iter_mut().find(|g| g.id == generation) else {
            return Vec::new();
        };
        g.state = GenState::Draining { deadline };
        let mut actions = vec![Action::Log(
            Note::GenerationDraining,
            format!(
                "draining generation {generation} (release {})",
                g.release.id
            ),
        )];
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
    fn kill(&mut self, generation: GenId, state: GenState) -> Vec<Action> {
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

    /// A child exited. `how` is its exit status; `tail` is the end of its
    /// stderr.
    fn exited(&mut self, pid: i32, how: Exit, tail: &str, now: Instant) -> Vec<Action> {
        let Some((generation, index)) = self.find_pid(pid) else {
            return Vec::new();
        };
        // A worker that was asked to drain and exited 0 did as asked: its
        // last words are not news (they were printed as it wrote them).
        let drained = self
            .worker_mut(generation, index)
            .is_some_and(|(g, i)| matches!(g.workers[i].state, WorkerState::Stopping { .. }))
            && how.success();
        let mut reason = format!("pid {pid} {how}");
        let tail = tail.trim();
        if !tail.is_empty() && !drained {
            reason.push_str(&format!("; its stderr ended with:\n{tail}"));
        }
        self.last_death = Some(reason.clone());
        self.worker_died(generation, index, reason, how.success(), now)
    }

    fn find_pid(&self, pid: i32) -> Option<(GenId, usize)> {
        self.gens.iter().find_map(|g| {
            g.workers
                .iter()
                .find(|w| w.pid() == Some(pid))
                .map(|w| (g.id, w.index))
        })
    }

    /// A worker is gone: `clean` when it exited with status 0.
    fn worker_died(
        &mut self,
        generation: GenId,
        index: usize,
        reason: String,
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
            // it forked goes with it.
            let pgid = w.pgid;
            g.workers.remove(i);
            actions.extend(pgid.map(|pid| Action::KillGroup { pid }));
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
                actions
                    .extend(self.fail(generation, format!("worker {generation}.{index} {reason}")));
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

    /// Whether a worker of `generation` dying now counts against its
    /// probation.
    fn counts_against_trial(&self, generation: GenId, now: Instant) -> bool {
        self.gens.iter().any(|g| {
            g.id == generation
                && matches!(g.trial, Trial::Pending { until: Some(u), .. } if now < u)
        })
    }

    /// A worker of a generation on probation died: three crashes, or no
    /// worker left ready, and the generation is reverted; otherwise the
    /// worker is respawned as usual.
    fn crashed_on_trial(&mut self, generation: GenId, index: usize, now: Instant) -> Vec<Action> {
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
    fn revert(&mut self, generation: GenId, reason: String, now: Instant) -> Vec<Action> {
        let Some(g) = self.gens.iter_mut().find(|g| g.id == generation) else {
            return Vec::new();
        };
        let Some(to) = g.previous.clone() else {
            return Vec::new();
        };
        if g.trial == Trial::Reverted {
            return Vec::new();
        }
        g.trial = Trial::Reverted;
        let release = g.release.id.clone();
        self.reverts += 1;
        self.reverted.push((
            generation,
            format!("generation {generation} (release {release}) was reverted: {reason}"),
        ));
        if self.reverted.len() > 16 {
            self.reverted.remove(0);
        }
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

    /// `confirm`: a provisional generation stays; with `extend`, it stays
    /// provisional, its deadline no sooner than `extend` from now.
    fn confirm(
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

    /// A starting generation failed: kill it, keep the live one.
    fn fail(&mut self, generation: GenId, reason: String) -> Vec<Action> {
        self.reloads.failed += 1;
        let Some(g) = self.gens.iter_mut().find(|g| g.id == generation) else {
            return Vec::new();
        };
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
        actions.push(Action::Systemd("READY=1".into()));
        actions.push(Action::ReloadDone {
            waiters,
            outcome: Err(format!("release {release}: {reason}")),
        });
        actions.extend(self.start_queued());
        actions
    }

    /// Removes draining generations whose workers are all gone; the
    /// process groups are killed then, so no straggler outlives its worker.
    fn reap_generations(&mut self) -> Vec<Action> {
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
                // Helpers the workers forked (and that ignored the drain
                // signal) die with their groups.
                actions.extend(
                    g.workers
                        .iter()
                        .filter_map(|w| w.pgid)
                        .map(|pid| Action::KillGroup { pid }),
                );
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
        actions
    }

    /// Deadlines: readiness by time, ready timeouts, respawns, drain ends,
    /// settle windows.
    fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = self.settle_due(now);
        let readiness = self.settings.readiness;
        // Workers that became ready by time.
        let mut due_ready = Vec::new();
        let mut due_spawn = Vec::new();
        for g in &self.gens {
            for w in &g.workers {
                match w.state {
                    WorkerState::Starting { since, waited, .. } => {
                        let after = readiness.timed().map(|d| since + d + waited);
                        if after.is_some_and(|t| t <= now) {
                            due_ready.push((g.id, w.index));
                        }
                    }
                    WorkerState::Waiting { at } if at <= now && g.state == GenState::Live => {
                        due_spawn.push((g.id, w.index, g.release.clone()));
                    }
                    _ => {}
                }
            }
        }
        for (generation, index) in due_ready {
            actions.extend(self.mark_ready(generation, index, now));
        }
        if self.stopping.is_none() {
            for (generation, index, release) in due_spawn {
                let background = self.background_now();
                if let Some((g, i)) = self.worker_mut(generation, index) {
                    actions.push(g.workers[i].spawn(generation, release, background));
                }
            }
        }
        // Background starts that took too long go on at normal priority.
        for g in &mut self.gens {
            for w in &mut g.workers {
                if let WorkerState::Starting { pid, since, .. } = w.state
                    && w.background
                    && since + BACKGROUND_MAX <= now
                {
                    w.background = false;
                    actions.push(Action::Log(Note::Worker, format!(
                        "worker {}.{} not ready after {} in the background: now at normal priority",
                        g.id,
                        w.index,
                        crate::fmt_duration(BACKGROUND_MAX)
                    )));
                    actions.push(Action::Foreground { pid });
                }
            }
        }
        // Ready timeouts.
        let timed_out: Vec<GenId> = self
            .gens
            .iter()
            .filter(|g| matches!(g.state, GenState::Starting { deadline } if deadline <= now))
            .map(|g| g.id)
            .collect();
        for generation in timed_out {
            let not_ready: Vec<String> = self
                .gens
                .iter()
                .find(|g| g.id == generation)
                .map(|g| {
                    g.workers
                        .iter()
                        .filter(|w| !matches!(w.state, WorkerState::Ready { .. }))
                        .map(|w| format!("{generation}.{}", w.index))
                        .collect()
                })
                .unwrap_or_default();
            let reason = format!(
                "not ready within {} (workers {} never reported ready)",
                crate::fmt_duration(self.settings.ready_timeout),
                not_ready.join(", ")
            );
            actions.push(Action::Warn(
                Note::ReloadFailed,
                format!("reload: generation {generation} {reason}"),
            ));
            actions.extend(self.fail(generation, reason));
        }
        // Drain deadlines.
        for g in &mut self.gens {
            if let GenState::Draining { deadline } = g.state
                && deadline <= now
            {
                g.state = GenState::Killed;
                let mut any = false;
                for w in &g.workers {
                    if let Some(pid) = w.pid() {
                        any = true;
                        actions.push(Action::KillGroup { pid });
                    }
                }
                if any {
                    actions.push(Action::Warn(
                        Note::Generation,
                        format!(
                            "generation {} did not drain within {}: killed",
                            g.id,
                            crate::fmt_duration(self.settings.drain_timeout)
                        ),
                    ));
                }
                actions.push(Action::Sweep(g.id));
            }
        }
        // Probations that ended, provisional generations not confirmed.
        let mut unconfirmed = Vec::new();
        for g in &mut self.gens {
            if let Trial::Pending {
                until, confirm_by, ..
            } = &mut g.trial
            {
                if until.is_some_and(|u| u <= now) {
                    *until = None;
                }
                if confirm_by.is_some_and(|c| c <= now) {
                    unconfirmed.push((g.id, g.confirm_within.unwrap_or_default()));
                } else if until.is_none() && confirm_by.is_none() {
                    g.trial = Trial::Settled;
                }
            }
        }
        for (generation, within) in unconfirmed {
            actions.extend(self.revert(
                generation,
                format!("not confirmed within {}", crate::fmt_duration(within)),
                now,
            ));
        }
        // A generation at its drain deadline no longer holds a reload back.
        actions.extend(self.start_queued());
        if let Some(by) = self.first_ready_by
            && !self.announced_ready
            && self.stopping.is_none()
            && now >= by
        {
            self.first_ready_by = None;
            let why = match &self.last_death {
                Some(d) => format!("its last worker to exit: {d}"),
                None => "its workers are running but did not say READY=1".into(),
            };
            actions.push(Action::GiveUp(format!(
                "the first generation was not ready within {} ({why})",
                crate::fmt_duration(self.settings.ready_timeout)
            )));
        }
        actions
    }

    /// The ids of the generations the pool still holds.
    pub fn generation_ids(&self) -> Vec<GenId> {
        self.gens.iter().map(|g| g.id).collect()
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
        let readiness = self.settings.readiness.timed();
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(by) = self.first_ready_by
            && !self.announced_ready
        {
            consider(by);
        }
        for g in &self.gens {
            g.settling.iter().for_each(|s| consider(s.by));
            if let Trial::Pending {
                until, confirm_by, ..
            } = g.trial
            {
                until.into_iter().chain(confirm_by).for_each(&mut consider);
            }
            match g.state {
                GenState::Starting { deadline } => consider(deadline),
                GenState::Draining { deadline } => consider(deadline),
                _ => {}
            }
            for w in &g.workers {
                match w.state {
                    WorkerState::Starting { since, waited, .. } => {
                        if let Some(d) = readiness {
                            consider(since + d + waited);
                        }
                        if w.background {
                            consider(since + BACKGROUND_MAX);
                        }
                    }
                    WorkerState::Waiting { at } if g.state == GenState::Live => consider(at),
                    _ => {}
                }
            }
        }
        next
    }

    /// Stop the pool.
    fn stop(&mut self, how: Stop, now: Instant) -> Vec<Action> {
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
        actions.push(Action::Systemd("STOPPING=1".into()));
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
                (Stop::Graceful, GenState::Live) => actions.extend(self.drain(id, now)),
                (Stop::Graceful, _) => {}
            }
        }
        actions.extend(self.reap_generations());
        actions
    }

    /// Changes the number of workers of the live generation (and of those
    /// started later).
    fn scale(&mut self, workers: usize, now: Instant) -> Vec<Action> {
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

    /// A snapshot for `dream status`.
    pub fn status(&self, now: Instant) -> PoolStatus {
        PoolStatus {
            workers_target: self.settings.workers,
            ready_timeout_ms: self.settings.ready_timeout.as_millis() as u64,
            drain_timeout_ms: self.settings.drain_timeout.as_millis() as u64,
            reloading: self.reloading(),
            reload_queued: self.queued.is_some() && !self.start_pending,
            reload_held: self.reload_held(),
            stopping: self.stopping.is_some(),
            restarts: self.restarts,
            reverts: self.reverts,
            reloads: self.reloads.clone(),
            settings: Some(self.settings.clone()),
            generations: self
                .gens
                .iter()
                .map(|g| GenerationStatus {
                    id: g.id,
                    state: match g.state {
                        GenState::Starting { .. } => GenerationState::Starting,
                        GenState::Live => GenerationState::Live,
                        GenState::Draining { .. } => GenerationState::Draining,
                        GenState::Killed => GenerationState::Killed,
                        GenState::Failed => GenerationState::Failed,
                    },
                    release: g.release.id.clone(),
                    release_dir: g.release.dir.clone(),
                    age_s: now.duration_since(g.started).as_secs_f64(),
                    confirm_in_s: match g.trial {
                        Trial::Pending {
                            confirm_by: Some(c),
                            ..
                        } => Some(c.saturating_duration_since(now).as_secs_f64()),
                        _ => None,
                    },
                    probation_s: match g.trial {
                        Trial::Pending { until: Some(u), .. } => {
                            Some(u.saturating_duration_since(now).as_secs_f64())
                        }
                        _ => None,
                    },
                    reverted: g.trial == Trial::Reverted,
                    workers: g
                        .workers
                        .iter()
                        .map(|w| WorkerStatus {
                            index: w.index,
                            pid: w.pid(),
                            state: match w.state {
                                WorkerState::Waiting { .. } => WorkerPhase::Waiting,
                                WorkerState::Spawning => WorkerPhase::Spawning,
                                WorkerState::Starting { .. } => WorkerPhase::Starting,
                                WorkerState::Ready { .. } => WorkerPhase::Ready,
                                WorkerState::Stopping { .. } => WorkerPhase::Stopping,
                                WorkerState::Retiring { .. } => WorkerPhase::Retiring,
                                WorkerState::Gone => WorkerPhase::Gone,
                            },
                            restarts: w.restarts,
                            uptime_s: match w.state {
                                WorkerState::Starting { since, .. }
                                | WorkerState::Ready { since, .. } => {
                                    Some(now.duration_since(since).as_secs_f64())
                                }
                                _ => None,
                            },
                        })
                        .collect(),
                })
                .collect(),
        }
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

/// The pool's part of `dream status` (`control::Status::pool`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolStatus {
    pub workers_target: usize,
    /// How long a new generation may take to become ready, and an old one
    /// to drain: a client waiting for a reload bounds its wait with them.
    pub ready_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub reloading: bool,
    pub reload_queued: bool,
    /// A reload waits for a draining generation to finish (backpressure).
    pub reload_held: bool,
    pub stopping: bool,
    pub restarts: u64,
    /// Generations the supervisor reverted on its own.
    #[serde(default)]
    pub reverts: u64,
    #[serde(default)]
    pub reloads: ReloadStats,
    /// Every tunable, as the pool runs with it (an upgrade keeps them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<Settings>,
    pub generations: Vec<GenerationStatus>,
}

/// A generation's state as status shows it: `GenState` without its
/// deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GenerationState {
    Starting,
    Live,
    Draining,
    Killed,
    Failed,
}

/// A worker's state as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerPhase {
    Waiting,
    Spawning,
    Starting,
    Ready,
    Stopping,
    Retiring,
    Gone,
}

impl GenerationState {
    /// Every state, in the order metrics list them.
    pub const ALL: [GenerationState; 5] = [
        GenerationState::Starting,
        GenerationState::Live,
        GenerationState::Draining,
        GenerationState::Killed,
        GenerationState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GenerationState::Starting => "starting",
            GenerationState::Live => "live",
            GenerationState::Draining => "draining",
            GenerationState::Killed => "killed",
            GenerationState::Failed => "failed",
        }
    }
}

impl WorkerPhase {
    /// Every phase, in the order metrics list them.
    pub const ALL: [WorkerPhase; 7] = [
        WorkerPhase::Waiting,
        WorkerPhase::Spawning,
        WorkerPhase::Starting,
        WorkerPhase::Ready,
        WorkerPhase::Stopping,
        WorkerPhase::Retiring,
        WorkerPhase::Gone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerPhase::Waiting => "waiting",
            WorkerPhase::Spawning => "spawning",
            WorkerPhase::Starting => "starting",
            WorkerPhase::Ready => "ready",
            WorkerPhase::Stopping => "stopping",
            WorkerPhase::Retiring => "retiring",
            WorkerPhase::Gone => "gone",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationStatus {
    pub id: GenId,
    pub state: GenerationState,
    pub release: String,
    pub release_dir: PathBuf,
    pub age_s: f64,
    /// Provisional: seconds left to confirm it before it reverts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_in_s: Option<f64>,
    /// On probation: seconds of it left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probation_s: Option<f64>,
    /// Reverted; a generation of the release it replaced takes over.
    #[serde(default)]
    pub reverted: bool,
    pub workers: Vec<WorkerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub index: usize,
    pub pid: Option<i32>,
    pub state: WorkerPhase,
    pub restarts: u32,
    pub uptime_s: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn settings(workers: usize, readiness: Readiness) -> Settings {
        Settings {
            workers,
            readiness,
            ready_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(3),
            ..Settings::default()
        }
    }

    fn rel(id: &str) -> Release {
        Release {
            id: id.into(),
            dir: PathBuf::from(format!("/r/{id}")),
        }
    }

    /// Plays the driver: gives each spawned worker a pid from `next_pid`.
    fn run(pool: &mut Pool, actions: Vec<Action>, next_pid: &mut i32, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            if let Action::Spawn {
                generation, index, ..
            } = &a
            {
                *next_pid += 1;
                queue.extend(pool.on(
                    Event::Spawned {
                        generation: *generation,
                        index: *index,
                        pid: *next_pid,
                    },
                    now,
                ));
            }
            out.push(a);
        }
        out
    }

    /// Whether the pool asked the driver to start a reload now.
    fn starts(a: &[Action]) -> bool {
        a.iter().any(|a| matches!(a, Action::StartReload))
    }

    fn spawns(a: &[Action]) -> usize {
        a.iter()
            .filter(|a| matches!(a, Action::Spawn { .. }))
            .count()
    }

    /// What `f` picks out of each action it matches.
    fn pick<T>(a: &[Action], f: impl Fn(&Action) -> Option<T>) -> Vec<T> {
        a.iter().filter_map(f).collect()
    }

    fn signals(a: &[Action]) -> Vec<i32> {
        pick(a, |a| match a {
            Action::Signal { pid, .. } => Some(*pid),
            _ => None,
        })
    }

    fn kills(a: &[Action]) -> Vec<i32> {
        pick(a, |a| match a {
            Action::KillGroup { pid } => Some(*pid),
            _ => None,
        })
    }

    fn outcome(a: &[Action]) -> Option<(Vec<Waiter>, Outcome)> {
        a.iter().find_map(|a| match a {
            Action::ReloadDone { waiters, outcome } => Some((waiters.clone(), outcome.clone())),
            _ => None,
        })
    }

    /// A pool with a live, ready first generation of `n` workers (pids 1..=n).
    fn live_pool(n: usize) -> (Pool, i32, Instant) {
        let t0 = Instant::now();
        let mut pool = Pool::new(settings(n, Readiness::Notify));
        let mut pid = 0;
        let a = pool.on(Event::ReleaseResolved(Ok(rel("a"))), t0);
        let a = run(&mut pool, a, &mut pid, t0);
        assert_eq!(spawns(&a), n);
        let mut all = Vec::new();
        for i in 0..n {
            all.extend(pool.on(
                Event::Ready {
                    generation: 1,
                    index: i,
                },
                t0,
            ));
        }
        assert_eq!(
            all.iter()
                .filter(|a| **a == Action::Systemd("READY=1".into()))
                .count(),
            1,
            "READY=1 once, when the last worker is ready"
        );
        (pool, pid, t0)
    }

    fn backgrounds(a: &[Action]) -> Vec<bool> {
        pick(a, |a| match a {
            Action::Spawn { background, .. } => Some(*background),
            _ => None,
        })
    }

    fn foregrounds(a: &[Action]) -> Vec<i32> {
        pick(a, |a| match a {
            Action::Foreground { pid } => Some(*pid),
            _ => None,
        })
    }

    #[test]
    fn workers_start_in_the_background_only_while_others_serve() {
        let t0 = Instant::now();
        let mut pool = Pool::new(Settings {
            background_start: true,
            ..settings(2, Readiness::Notify)
        });
        let mut pid = 0;
        // The first generation: no one serves, full speed.
        let a = pool.on(Event::ReleaseResolved(Ok(rel("a"))), t0);
        let a = run(&mut pool, a, &mut pid, t0);
        assert_eq!(backgrounds(&a), vec![false, false]);
        for index in 0..2 {
            let a = pool.on(
                Event::Ready {
                    generation: 1,
                    index,
                },
                t0,
            );
            assert_eq!(foregrounds(&a), Vec::<i32>::new());
        }
        // A reload: in the background, each back in front when ready.
        assert!(starts(&pool.on(
            Event::ReloadRequested {
                waiter: None,
                confirm_within: None
            },
            t0
        )));
        let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
        let a = run(&mut pool, a, &mut pid, t0);
        assert_eq!(backgrounds(&a), vec![true, true]);
        let a = pool.on(
            Event::Ready {
                generation: 2,
                index: 0,
            },
            t0 + 5 * MS,
        );
        assert_eq!(foregrounds(&a), vec![3]);
        // One slow to get ready goes on at normal priority after
        // BACKGROUND_MAX, once; the tick is due then.
        assert_eq!(pool.next_deadline(), Some(t0 + BACKGROUND_MAX));
        let a = pool.on(Event::Tick, t0 + BACKGROUND_MAX - MS);
        assert_eq!(foregrounds(&a), Vec::<i32>::new());
        let a = pool.on(Event::Tick, t0 + BACKGROUND_MAX);
        assert_eq!(foregrounds(&a), vec![4]);
        let a = pool.on(
            Event::Ready {
                generation: 2,
                index: 1,
            },
            t0 + BACKGROUND_MAX + MS,
        );
        assert_eq!(foregrounds(&a), Vec::<i32>::new());
        // A crashed worker of the live generation is respawned in the
        // background while its sibling serves.
        let mut a = pool.on(
            Event::Exited {
                pid: 3,
                how: Exit::Signal {
                    signal: 9,
                    core: false,
                },
                tail: String::new(),
            },
            t0 + 2 * BACKGROUND_MAX,
        );
        let due = pool.next_deadline().expect("a respawn is due");
        a.extend(pool.on(Event::Tick, due));
        let a = run(&mut pool, a, &mut pid, due);
        assert_eq!(backgrounds(&a), vec![true]);
    }

    #[test]
    fn without_background_start_every_worker_starts_in_front() {
        let (mut pool, mut pid, t0) = live_pool(2);
        assert!(starts(&pool.on(
            Event::ReloadRequested {
                waiter: None,
                confirm_within: None
            },
            t0
        )));
        let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
        let a = run(&mut pool, a, &mut pid, t0);
        assert_eq!(backgrounds(&a), vec![false, false]);
        let a = pool.on(
            Event::Ready {
                generation: 2,
                index: 0,
            },
            t0,
        );
        assert_eq!(foregrounds(&a), Vec::<i32>::new());
    }

    #[test]
    fn first_generation_is_live_and_ready_by_time_in_auto_mode() {
        let t0 = Instant::now();
        let mut pool = Pool::new(settings(2, Readiness::Auto(Duration::from_secs(1))));
        let mut pid = 0;
        let a = pool.on(Event::ReleaseResolved(Ok(rel("a"))), t0);
        run(&mut pool, a, &mut pid, t0);
        assert_eq!(pool.live_pids(), vec![1, 2]);
        assert_eq!(pool.next_deadline(), Some(t0 + Duration::from_secs(1)));
        assert!(pool.on(Event::Tick, t0 + 999 * MS).is_empty());
        let a = pool.on(Event::Tick, t0 + Duration::from_secs(1));
        assert!(a.contains(&Action::Systemd("READY=1".into())));
        assert_eq!(pool.next_deadline(), None, "idle: nothing to wake up for");
    }

    #[test]
    fn a_timed_readiness_does_not_count_time_spent_waiting_for_a_cpu() {
        let t0 = Instant::now();
        let mut pool = Pool::new(settings(2, Readiness::Delay(Duration::from_secs(1))));
        let mut pid = 0;
        let a = pool.on(Event::ReleaseResolved(Ok(rel("a"))), t0);
        run(&mut pool, a, &mut pid, t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(pool.timed_readiness_due(t1), vec![1, 2]);
        // Worker 1 waited 700 ms for a CPU, worker 2 did not: only worker
        // 2 has had its second.
        assert!(
            pool.on(
                Event::CpuWaited {
                    pid: 1,
                    waited: 700 * MS
                },
                t1
            )
            .is_empty()
        );
        assert_eq!(pool.timed_readiness_due(t1), vec![2]);
        pool.on(Event::Tick, t1);
        assert_eq!(pool.next_deadline(), Some(t1 + 700 * MS));
        assert!(
            !pool
                .on(Event::Tick, t1 + 699 * MS)
                .contains(&Action::Systemd("READY=1".into()))
        );
        // A smaller figure never shrinks what was measured.
        pool.on(
            Event::CpuWaited {
                pid: 1,
                waited: 100 * MS,
            },
            t1 + 699 * MS,
        );
        assert_eq!(pool.timed_readiness_due(t1 + 699 * MS), Vec::<i32>::new());
        let a = pool.on(Event::Tick, t1 + 700 * MS);
        assert!(a.contains(&Action::Systemd("READY=1".into())), "{a:?}");
    }

    #[test]
    fn reload_swaps_only_when_every_new_worker_is_ready() {
        let (mut pool, mut pid, t0) = live_pool(2);
        assert!(starts(&pool.on(
            Event::ReloadRequested {
                waiter: Some(7),
                confirm_within: None
            },
            t0
        )));
        let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
        assert!(a.contains(&Action::Systemd("RELOADING=1".into())));
        run(&mut pool, a, &mut pid, t0);
        assert!(pool.reloading());
        let a = pool.on(
            Event::Ready {
                generation: 2,
                index: 0,
            },
            t0,
        );
        assert!(
            signals(&a).is_empty(),
            "old generation untouched until all are ready"
        );
        let a = pool.on(
            Event::Ready {
                generation: 2,
                index: 1,
            },
            t0,
        );
        assert_eq!(signals(&a), vec![1, 2], "old generation drained");
        assert_eq!(outcome(&a), Some((vec![7], Ok((2, "b".to_string())))));
        assert_eq!(pool.live_pids(), vec![3, 4]);
        // The old workers exit: the generation is gone.
        pool.on(
            Event::Exited {
                pid: 1,
                how: Exit::Code(0),
                tail: ("").to_string(),
            },
            t0,
        );
        let a = pool.on(
            Event::Exited {
                pid: 2,
                how: Exit::Code(0),
                tail: ("").to_string(),
            },
            t0,
        );
        assert!(
            a.contains(&Action::Log(
                Note::GenerationDrained,
                "generation 1 drained".into()
            )),
            "{a:?}"
        );
        assert_eq!(pool.status(t0).generations.len(), 1);
    }

    #[test]
    fn a_crashing_new_generation_is_killed_and_the_old_keeps_serving() {
        let (mut pool, mut pid, t0) = live_pool(2);
        assert!(starts(&pool.on(
            Event::ReloadRequested {
                waiter: Some(1),
                confirm_within: None
            },
            t0
        )));
        let a = pool.on(Event::ReleaseResolved(Ok(rel("bad"))), t0);
        run(&mut pool, a, &mut pid, t0);
        let a = pool.on(
            Event::Exited {
                pid: 3,
                how: Exit::Code(3),
                tail: ("boom: config missing").to_string(),
            },
            t0,
        );
        assert_eq!(kills(&a), vec![4], "its sibling is killed");
        let (w, o) = outcome(&a).unwrap();
        assert_eq!(w, vec![1]);
        let err = o.unwrap_err();
        assert!(
            err.contains("exited with status 3") && err.contains("boom: config missing"),
            "{err}"
        );
        assert_eq!(pool.live_pids(), vec![1, 2]);
        assert!(
            signals(&a).is_empty(),
            "the old generation is never signalled"
        );
        assert_eq!(pool.live_release().unwrap().id, "a");
    }

    #[test]
    fn a_never_ready_generation_times_out() {
        let (mut pool, mut pid, t0) = live_pool(1);
        pool.on(
            Event::ReloadRequested {
                waiter: None,
                confirm_within: None,
            },
            t0,
        );
        let a = pool.on(Event::ReleaseResolved(Ok(rel("slow"))), t0);
        run(&mut pool, a, &mut pid, t0);
        assert_eq!(pool.next_deadline(), Some(t0 + Duration::from_secs(5)));
        let a = pool.on(Event::Tick, t0 + Duration::from_secs(5));
        assert_eq!(kills(&a), vec![2]);
        let err = outcome(&a).unwrap().1.unwrap_err();
        assert!(err.contains("not ready within 5s"), "{err}");
        assert_eq!(pool.live_pids(), vec![1]);
    }

    #[test]
    fn reloads_during_a_reload_are_queued_and_coalesced() {
        let (mut pool, mut pid, t0) = live_pool(1);
        assert!(starts(&pool.on(
            Event::ReloadRequested {
                waiter: Some(1),
                confirm_within: None
            },
            t0
        )));
        let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
        run(&mut pool, a, &mut pid, t0);
        for w in 2..52 {
            assert!(
                !starts(&pool.on(
                    Event::ReloadRequested {
                        waiter: Some(w),
                        confirm_within: None
                    },
                    t0
                )),
                "queued, not started"
            );
        }
        let a = pool.on(
            Event::Ready {
                generation: 2,
                index: 0,
            },
            t0,
        );
        assert_eq!(outcome(&a).unwrap().0, vec![1]);
        assert_eq!(a.iter().filter(|a| **a == Action::StartReload).count(), 1);
        let a = pool.on(Event::ReleaseResolved(Ok(rel("c"))), t0);
        run(&mut pool, a, &mut pid, t0);
        let a = pool.on(
            Event::Ready {
                generation: 3,
                index: 0,
            },
            t0,
        );
        let (waiters, o) = outcome(&a).unwrap();
        assert_eq!(
            waiters,
            (2..52).collect::<Vec<_>>(),
            "every queued request answered once"
        );
        assert_eq!(o, Ok((3, "c".into())));
        assert!(!a.contains(&Action::StartReload), "the burst converged");
    }

    #[test]
    fn crash_before_ready_backs_off_exponentially() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), 100 * MS);
        assert_eq!(backoff(2), 200 * MS);
        assert_eq!(backoff(9), Duration::from_millis(25_600));
        assert_eq!(backoff(10), Duration::from_secs(30));
        assert_eq!(backoff(1000), Duration::from_secs(30));

        let t0 = Instant::now();
        let mut pool = Pool::new(settings(1, Readiness::Notify));
        let mut pid = 0;
        let a = pool.on(Event::ReleaseResolved(Ok(rel("a"))), t0);
        run(&mut pool, a, &mut pid, t0);
        let mut now = t0;
        for expected in [100, 200, 400, 800] {
            let a = pool.on(
                Event::Exited {
                    pid,
                    how: Exit::Code(1),
                    tail: ("").to_string(),
                },
                now,
            );
            assert_eq!(spawns(&a), 0);
            assert_eq!(pool.next_deadline(), Some(now + expected * MS));
            now += expected * MS;
            let a = pool.on(Event::Tick, now);
            run(&mut pool, a, &mut pid, now);
        }
        // Ready, healthy for a minute, then a crash: restarted at once.
        pool.on(
            Event::Ready {
                generation: 1,
                index: 0,
            },
            now,
        );
        now += HEALTHY_AFTER;
        let a = pool.on(
            Event::Exited {
                pid,
                how: Exit::Signal {
                    signal: 9,
                    core: false,
                },
                tail: ("").to_string(),
            },
            now,
        );
        assert_eq!(spawns(&a), 1, "{a:?}");
        assert_eq!(pool.restarts, 5);
    }

    /// `sleep 0.5; exit 3` after READY=1 restarted "in 0ms" every time.
    #[test]
    fn crashes_soon_after_ready_back_off_too() {
        let (mut pool, mut pid, t0) = live_pool(1);
        let mut now = t0;
        for expected in [100, 200, 400, 800, 1600] {
            now += 500 * MS;
            let a = pool.on(
                Event::Exited {
                    pid,
                    how: Exit::Code(3),
                    tail: ("").to_string(),
                },
                now,
            );
            assert_eq!(spawns(&a), 0, "restarted at once: {a:?}");
            assert_eq!(pool.next_deadline(), Some(now + expected * MS));
            now += expected * MS;
            let a = pool.on(Event::Tick, now);
            run(&mut pool, a, &mut pid, now);
            pool.on(
                Event::Ready {
                    generation: 1,
                    index: 0,
                },
                now,
            );
        }
    }

    #[test]
    fn drain_deadline_kills_the_process_groups() {
        let (mut pool, mut pid, t0) = live_pool(1);
        pool.on(
            Event::ReloadRequested {
                waiter: None,
                confirm_within: None,
            },
            t0,
        );
        let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
        run(&mut pool, a, &mut pid, t0);
        pool.on(
            Event::Ready {
                generation: 2,
                index: 0,
            },
            t0,
        );
        assert_eq!(pool.next_deadline(), Some(t0 + Duration::from_secs(3)));
        assert!(kills(&pool.on(Event::Tick, t0 + 2999 * MS)).is_empty());
        assert_eq!(
            kills(&pool.on(Event::Tick, t0 + Duration::from_secs(3))),
            vec![1]
        );
        assert!(
            kills(&pool.on(Event::Tick, t0 + Duration::from_secs(4))).is_empty(),
            "once"
        );
    }

    /// Rapid deploys killed generations still draining (a 10 MB download
    /// cut at 8.6 MB). Now a reload waits until a draining generation has
    /// drained or reached its own drain deadline.
    #[test]
    fn a_reload_waits_for_room_to_drain_instead_of_killing() {
        let (mut pool, mut pid, t0) = live_pool(1);
        pool.settings.max_draining = 2;
        // Two reloads leave generations 1 and 2 draining (pids 1 and 2).
        for (i, id) in ["b", "c"].iter().enumerate() {
            assert!(starts(&pool.on(
                Event::ReloadRequested {
                    waiter: None,
                    confirm_within: None
                },
                t0
            )));
            let a = pool.on(Event::ReleaseResolved(Ok(rel(id))), t0);
            run(&mut pool, a, &mut pid, t0);
            let a = pool.on(
                Event::Ready {
                    generation: i as u64 + 2,
                    index: 0,
                },
                t0,
            );
            assert!(kills(&a).is_empty(), "{a:?}");
        }
        // A third is held back: nothing starts, nothing is killed.
        assert!(!starts(&pool.on(
            Event::ReloadRequested {
                waiter: Some(7),
                confirm_within: None
            },
            t0
        )));
        assert!(pool.reload_held());
        assert!(
            pool.on(Event::Tick, t0 + MS)
                .iter()
                .all(|a| !matches!(a, Action::StartReload))
        );
        // Generation 1's worker finishes its requests and exits: room.
        let a = pool.on(
            Event::Exited {
                pid: 1,
                how: Exit::Code(0),
                tail: ("").to_string(),
            },
            t0 + 2 * MS,
        );
        assert_eq!(
            a.iter()
                .filter(|a| matches!(a, Action::StartReload))
                .count(),
            1,
            "{a:?}"
        );
        assert!(
            kills(&a).iter().all(|p| *p == 1),
            "only its own group: {a:?}"
        );
        let a = pool.on(Event::ReleaseResolved(Ok(rel("d"))), t0 + 2 * MS);
        run(&mut pool, a, &mut pid, t0);
        assert!(!pool.reload_held());
        // Held again behind generation 2, until its drain deadline.
        let a = pool.on(
            Event::Ready {
                generation: 4,
                index: 0,
            },
            t0 + 3 * MS,
        );
        assert!(kills(&a).is_empty(), "{a:?}");
        assert!(!starts(&pool.on(
            Event::ReloadRequested {
                waiter: None,
                confirm_within: None
            },
            t0
        )));
        let a = pool.on(Event::Tick, t0 + Duration::from_secs(3));
        assert!(a.iter().any(|a| matches!(a, Action::StartReload)), "{a:?}");
    }

    #[test]
    fn graceful_stop_drains_then_finishes() {
        let (mut pool, _, t0) = live_pool(2);
        let a = pool.on(Event::Stop(Stop::Graceful), t0);
        assert_eq!(signals(&a), vec![1, 2]);
        assert!(!pool.finished());
        assert!(
            !starts(&pool.on(
                Event::ReloadRequested {
                    waiter: Some(1),
                    confirm_within: None
                },
                t0
            )),
            "no reloads while stopping"
        );
        pool.on(
            Event::Exited {
                pid: 1,
                how: Exit::Code(0),
                tail: ("").to_string(),
            },
            t0,
        );
        let a = pool.on(
            Event::Exited {
                pid: 2,
                how: Exit::Code(0),
                tail: ("").to_string(),
            },
            t0,
        );
        assert_eq!(spawns(&a), 0, "not respawned while stopping");
        assert!(pool.finished());
        // Fast stop kills at once.
        let (mut pool, _, t0) = live_pool(2);
        assert_eq!(kills(&pool.on(Event::Stop(Stop::Fast), t0)), vec![1, 2]);
    }

    #[test]
    fn scale_up_and_down() {
        let (mut pool, mut pid, t0) = live_pool(2);
        let a = pool.on(Event::Scale(3), t0);
        let a = run(&mut pool, a, &mut pid, t0);
        assert_eq!(spawns(&a), 1);
        assert_eq!(pool.live_pids(), vec![1, 2, 3]);
        let a = pool.on(Event::Scale(1), t0);
        assert_eq!(signals(&a), vec![3, 2]);
        pool.on(
            Event::Exited {
                pid: 3,
                how: Exit::Code(0),
                tail: ("").to_string(),
            },
            t0,
        );
        let a = pool.on(
            Event::Exited {
                pid: 2,
                how: Exit::Code(0),
                tail: ("").to_string(),
            },
            t0,
        );
        assert_eq!(spawns(&a), 0, "retired workers are not respawned");
        assert_eq!(pool.live_pids(), vec![1]);
        assert_eq!(pool.status(t0).generations[0].workers.len(), 1);
    }

    #[test]
    fn a_worker_scaled_down_while_its_spawn_is_in_flight_is_retired_not_kept() {
        let (mut pool, _, t0) = live_pool(2);
        let a = pool.on(Event::Scale(3), t0);
        assert_eq!(spawns(&a), 1, "{a:?}");
        // Scaled back down before the driver reported the pid.
        let a = pool.on(Event::Scale(2), t0);
        assert!(signals(&a).is_empty(), "{a:?}");
        let a = pool.on(
            Event::Spawned {
                generation: 1,
                index: 2,
                pid: 99,
            },
            t0,
        );
        assert_eq!(
            signals(&a),
            vec![99],
            "told to drain as soon as it has a pid"
        );
        let a = pool.on(
            Event::Exited {
                pid: 99,
                how: Exit::Code(0),
                tail: String::new(),
            },
            t0 + MS,
        );
        assert_eq!(spawns(&a), 0, "a retired worker is not respawned: {a:?}");
        assert_eq!(kills(&a), vec![99], "its group goes with it");
        let st = pool.status(t0 + MS);
        assert_eq!(st.generations[0].workers.len(), 2);
        // And a retiring worker does not hold a reload's promotion back.
        let a = pool.on(Event::Tick, t0 + 2 * MS);
        assert_eq!(spawns(&a), 0, "{a:?}");
    }

    /// Reloads a live pool of `n` (pids 1..=n, release a) to release b,
    /// with `confirm_within`, and makes it live (pids n+1..=2n); the old
    /// workers exit. Returns the time it went live.
    fn reloaded_to_b(
        pool: &mut Pool,
        pid: &mut i32,
        t0: Instant,
        n: usize,
        confirm_within: Option<Duration>,
    ) -> Instant {
        let a = pool.on(
            Event::ReloadRequested {
                waiter: None,
                confirm_within,
            },
            t0,
        );
        assert!(starts(&a));
        let a = pool.on(Event::ReleaseResolved(Ok(rel("b"))), t0);
        run(pool, a, pid, t0);
        for index in 0..n {
            pool.on(
                Event::Ready {
                    generation: 2,
                    index,
                },
                t0,
            );
        }
        for old in 1..=n as i32 {
            pool.on(exit(old, Exit::Code(0)), t0);
        }
        assert_eq!(pool.live_release().map(|r| r.id.as_str()), Some("b"));
        t0
    }

    fn exit(pid: i32, how: Exit) -> Event {
        Event::Exited {
            pid,
            how,
            tail: String::new(),
        }
    }

    fn reverted_to(a: &[Action]) -> Option<(String, String)> {
        a.iter().find_map(|a| match a {
            Action::Revert { release, to, .. } => Some((release.clone(), to.id.clone())),
            _ => None,
        })
    }

    #[test]
    fn three_crashes_on_probation_revert_to_the_release_replaced() {
        let (mut pool, mut pid, t0) = live_pool(2);
        let live = reloaded_to_b(&mut pool, &mut pid, t0, 2, None);
        assert!(pool.status(live).generations[0].probation_s.is_some());
        // Worker 2.0 (pid 3) crashes a second after going live, again and
        // again; worker 2.1 stays up.
        let mut t = live + Duration::from_secs(1);
        let mut victim = 3;
        for crash in 1..=2 {
            let a = pool.on(exit(victim, Exit::Code(1)), t);
            assert_eq!(reverted_to(&a), None, "crash {crash}: {a:?}");
            t += Duration::from_millis(500);
            let a = pool.on(Event::Tick, t);
            let a = run(&mut pool, a, &mut pid, t);
            assert_eq!(spawns(&a), 1, "crash {crash}: respawned: {a:?}");
            victim = pid;
        }
        let a = pool.on(exit(victim, Exit::Code(1)), t);
        assert_eq!(reverted_to(&a), Some(("b".into(), "a".into())), "{a:?}");
        let a = run(&mut pool, a, &mut pid, t);
        assert_eq!(spawns(&a), 2, "a generation of a starts: {a:?}");
        assert_eq!(pool.status(t).reverts, 1);
        // Once it is ready, b drains and a is live, settled (a later
        // crash of a is respawned, never reverted back to b).
        let mut last = Vec::new();
        for index in 0..2 {
            last = pool.on(
                Event::Ready {
                    generation: 3,
                    index,
                },
                t,
            );
        }
        assert!(!signals(&last).is_empty(), "b drains: {last:?}");
        assert_eq!(pool.live_release().map(|r| r.id.as_str()), Some("a"));
        let s = pool.status(t);
        let g3 = s.generations.iter().find(|g| g.id == 3).unwrap();
        assert_eq!(g3.probation_s, None);
        let a = pool.on(exit(pid, Exit::Code(1)), t);
        assert_eq!(reverted_to(&a), None, "{a:?}");
    }

    fn settled(a: &[Action]) -> Vec<(Vec<Waiter>, Outcome)> {
        pick(a, |a| match a {
            Action::ReloadDone { waiters, outcome } => Some((waiters.clone(), outcome.clone())),
            _ => None,
        })
    }

    #[test]
    fn settle_answers_at_the_end_of_its_window_or_at_a_revert() {
        let (mut pool, mut pid, t0) = live_pool(2);
        let live = reloaded_to_b(&mut pool, &mut pid, t0, 2, None);
        let within = Duration::from_secs(2);
        // Asked a little after it went live: the window counts from then.
        let a = pool.on(
            Event::Settle {
                generation: 2,
                within,
                waiter: 7,
            },
            live + 100 * MS,
        );
        assert!(settled(&a).is_empty(), "{a:?}");
        assert_eq!(pool.next_deadline(), Some(live + within));
        assert!(settled(&pool.on(Event::Tick, live + within - MS)).is_empty());
        let a = pool.on(Event::Tick, live + within);
        assert_eq!(settled(&a), vec![(vec![7], Ok((2, "b".to_string())))]);
        // A window already over is answered at once.
        let a = pool.on(
            Event::Settle {
                generation: 2,
                within,
                waiter: 8,
            },
            live + within,
        );
        assert_eq!(settled(&a), vec![(vec![8], Ok((2, "b".to_string())))]);
        // Three crashes in the window: reverted, and the waiter told so at
        // the next tick, not at the end of its window.
        let mut t = live + within;
        pool.on(
            Event::Settle {
                generation: 2,
                within: Duration::from_secs(30),
                waiter: 9,
            },
            t,
        );
        let mut victim = 3;
        let mut seen = Vec::new();
        for crash in 0..3 {
            let a = pool.on(exit(victim, Exit::Code(1)), t);
            assert_eq!(reverted_to(&a).is_some(), crash == 2, "{a:?}");
            seen.extend(settled(&a));
            t += Duration::from_millis(500);
            let a = pool.on(Event::Tick, t);
            seen.extend(settled(&a));
            run(&mut pool, a, &mut pid, t);
            victim = pid;
        }
        let got = seen;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, vec![9]);
        let why = got[0].1.clone().unwrap_err();
        assert!(why.contains("reverted"), "{why}");
    }

    #[test]
    fn one_crash_on_probation_is_forgiven_and_probation_ends() {
        let (mut pool, mut pid, t0) = live_pool(2);
        let live = reloaded_to_b(&mut pool, &mut pid, t0, 2, None);
        let t = live + Duration::from_secs(1);
        let a = pool.on(exit(3, Exit::Code(1)), t);
        assert_eq!(reverted_to(&a), None);
        // Probation (10 s by default) ends by time: later crashes are
        // ordinary respawns.
        let after = live + Duration::from_secs(11);
        assert!(
            pool.next_deadline()
                .is_some_and(|d| d <= live + Duration::from_secs(10))
        );
        let a = pool.on(Event::Tick, after);
        run(&mut pool, a, &mut pid, after);
        assert_eq!(pool.status(after).generations[0].probation_s, None);
        for _ in 0..5 {
            let a = pool.on(exit(4, Exit::Code(1)), after);
            assert_eq!(reverted_to(&a), None, "{a:?}");
            let a = pool.on(Event::Tick, after + Duration::from_secs(60));
            run(&mut pool, a, &mut pid, after);
        }
        assert_eq!(pool.live_release().map(|r| r.id.as_str()), Some("b"));
    }

    #[test]
    fn all_workers_down_at_once_on_probation_reverts() {
        let (mut pool, mut pid, t0) = live_pool(2);
        let live = reloaded_to_b(&mut pool, &mut pid, t0, 2, None);
        let t = live + Duration::from_secs(1);
        assert_eq!(
            reverted_to(&pool.on(
                exit(
                    3,
                    Exit::Signal {
                        signal: 11,
                        core: false
                    }
                ),
                t
            )),
            None
        );
        let a = pool.on(
            exit(
                4,
                Exit::Signal {
                    signal: 11,
                    core: false,
                },
            ),
            t,
        );
        assert_eq!(reverted_to(&a), Some(("b".into(), "a".into())), "{a:?}");
    }

    #[test]
    fn a_provisional_generation_reverts_unless_confirmed_in_time() {
        let within = Duration::from_secs(5);
        // Not confirmed: reverted at its deadline, and confirming it later
        // says why.
        let (mut pool, mut pid, t0) = live_pool(1);
        let live = reloaded_to_b(&mut pool, &mut pid, t0, 1, Some(within));
        assert!(pool.status(live).generations[0].confirm_in_s.is_some());
        assert!(pool.next_deadline().is_some_and(|d| d <= live + within));
        let a = pool.on(Event::Tick, live + within);
        assert_eq!(reverted_to(&a), Some(("b".into(), "a".into())), "{a:?}");
        let a = pool.on(
            Event::Confirm {
                generation: Some(2),
                waiter: Some(9),
            },
            live + within,
        );
        let (waiters, answer) = outcome(&a).expect("answered");
        assert_eq!(waiters, vec![9]);
        assert!(
            answer
                .as_ref()
                .is_err_and(|e| e.contains("not confirmed within 5s")),
            "{answer:?}"
        );
        // Confirmed in time: it stays, past the deadline too.
        let (mut pool, mut pid, t0) = live_pool(1);
        let live = reloaded_to_b(&mut pool, &mut pid, t0, 1, Some(within));
        let a = pool.on(
            Event::Confirm {
                generation: None,
                waiter: Some(9),
            },
            live + Duration::from_secs(1),
        );
        assert_eq!(outcome(&a), Some((vec![9], Ok((2, "b".to_string())))));
        let a = pool.on(Event::Tick, live + within + Duration::from_secs(60));
        assert_eq!(reverted_to(&a), None, "{a:?}");
        assert_eq!(pool.live_release().map(|r| r.id.as_str()), Some("b"));
    }

    #[test]
    fn an_extended_generation_reverts_that_long_after_its_last_extension() {
        let within = Duration::from_secs(5);
        let (mut pool, mut pid, t0) = live_pool(1);
        let live = reloaded_to_b(&mut pool, &mut pid, t0, 1, Some(within));
        let extend = |pool: &mut Pool, by: u64, at: Instant| {
            pool.on(
                Event::Extend {
                    generation: 2,
                    within: Duration::from_secs(by),
                    waiter: Some(9),
                },
                at,
            )
        };
        // Renewed twice: alive at 12 s, past the first deadline.
        let mut at = live;
        for _ in 0..2 {
            at += Duration::from_secs(4);
            let a = extend(&mut pool, 5, at);
            assert_eq!(outcome(&a), Some((vec![9], Ok((2, "b".to_string())))));
        }
        let a = pool.on(Event::Tick, at + Duration::from_secs(4));
        assert_eq!(reverted_to(&a), None, "{a:?}");
        // A shorter extension never brings the deadline closer.
        extend(&mut pool, 1, at + Duration::from_secs(4));
        let a = pool.on(Event::Tick, at + Duration::from_millis(4900));
        assert_eq!(reverted_to(&a), None, "{a:?}");
        // Not renewed: reverted at the last deadline.
        let a = pool.on(Event::Tick, at + within);
        assert_eq!(reverted_to(&a), Some(("b".into(), "a".into())), "{a:?}");
        // Renewing a reverted generation answers why.
        let a = extend(&mut pool, 5, at + within);
        let (_, answer) = outcome(&a).expect("answered");
        assert!(answer.is_err(), "{answer:?}");
    }

    #[test]
    fn the_first_generation_has_nothing_to_revert_to() {
        let (mut pool, mut pid, t0) = live_pool(1);
        for i in 0..5 {
            let t = t0 + Duration::from_secs(i);
            let a = pool.on(exit(pid, Exit::Code(1)), t);
            assert_eq!(reverted_to(&a), None);
            let a = pool.on(Event::Tick, t + Duration::from_secs(31));
            run(&mut pool, a, &mut pid, t);
        }
    }

    #[test]
    fn readiness_parses() {
        assert_eq!("notify".parse(), Ok(Readiness::Notify));
        assert_eq!("fd:5".parse(), Ok(Readiness::Fd(5)));
        assert!("fd:1".parse::<Readiness>().is_err());
        assert!("fd:x".parse::<Readiness>().is_err());
        assert_eq!(
            "delay:2s".parse(),
            Ok(Readiness::Delay(Duration::from_secs(2)))
        );
        assert_eq!("auto:500ms".parse(), Ok(Readiness::Auto(500 * MS)));
        assert!("sometimes".parse::<Readiness>().is_err());
        assert!("delay:x".parse::<Readiness>().is_err());
    }
}
