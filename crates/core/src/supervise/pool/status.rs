//! The pool as `dream status` and metrics show it.

use super::*;

impl Pool {
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
            paused: self.paused().map(|(since, until)| PauseStatus {
                for_s: now.duration_since(since).as_secs_f64(),
                resumes_in_s: until.saturating_duration_since(now).as_secs_f64(),
            }),
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
                        GenState::Canary => GenerationState::Canary,
                    },
                    canary: g.canary.as_ref().map(|p| CanaryStatus {
                        workers: p.workers,
                        share_basis: p.share,
                        judge_s: p.window().as_secs_f64(),
                        judged_s: g
                            .live_since
                            .filter(|_| g.state == GenState::Canary)
                            .map(|t| now.duration_since(t).as_secs_f64()),
                        judge_path: p.spec.judge_path.clone(),
                        promoted: g.promoted,
                        figures: None,
                        verdict: None,
                    }),
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
    /// Paused: nothing accepts; connections wait in the backlog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<PauseStatus>,
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
    /// Serving a share beside the live generation until judged.
    Canary,
}

/// A pause as status shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PauseStatus {
    /// How long it has held connections.
    pub for_s: f64,
    /// When it resumes by itself.
    pub resumes_in_s: f64,
}

/// A canary generation as status shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CanaryStatus {
    pub workers: usize,
    /// Its share of new connections, per 10,000.
    pub share_basis: u32,
    /// The judge window, and how far into it (once every worker is ready).
    pub judge_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_path: Option<String>,
    /// The judge promoted it; its release's new generation is starting.
    pub promoted: bool,
    /// What the judge has seen so far, and what it would say now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub figures: Option<crate::supervise::canary::judge::Figures>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
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
    pub const ALL: [GenerationState; 6] = [
        GenerationState::Starting,
        GenerationState::Live,
        GenerationState::Canary,
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
            GenerationState::Canary => "canary",
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
    /// A canary reload's generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
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
