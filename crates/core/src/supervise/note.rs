//! What each of the supervisor's log lines is about, as a value.
//!
//! The pool and the driver say what happened as a [`Note`] beside the
//! words; the log renders it once: as the `event` of a
//! `--log-format json` line, or not at all for people. Rewording a message
//! never changes its event.

/// The `event` of a log line. The names are part of the JSON log's
/// contract (`jq 'select(.event == "reload_finished")'`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Note {
    /// `listening on …`
    Listening,
    /// The supervisor started: its pid, its version.
    Started,
    /// A generation's workers are being started (first start, reload or
    /// revert).
    GenerationStarting,
    GenerationReady,
    /// Live, but reverts unless confirmed in time.
    GenerationProvisional,
    GenerationConfirmed,
    GenerationDraining,
    GenerationDrained,
    /// Any other news of a generation (killed at its drain deadline).
    Generation,
    WorkerStarted,
    WorkerReady,
    WorkerExited,
    /// Left a generation that no longer needs it (scaled down, drained).
    WorkerRetired,
    /// Died while its generation was starting.
    WorkerFailed,
    /// Any other news of a worker (moved out of the background, left its
    /// process group, changed the shared sockets).
    Worker,
    ReloadQueued,
    ReloadHeld,
    ReloadFinished,
    ReloadFailed,
    /// A generation was reverted, or `current` switched back.
    Reverted,
    /// A canary: started, its share, the judge's figures, promoted.
    Canary,
    /// Paused (nothing accepts), resumed.
    Paused,
    Scaled,
    Stopping,
    Upgrade,
    GaveUp,
    ControlRequest,
    Exiting,
    /// Everything else the supervisor itself says.
    Supervisor,
}

impl Note {
    /// The name in the JSON log.
    pub fn as_str(self) -> &'static str {
        match self {
            Note::Listening => "listening",
            Note::Started => "started",
            Note::GenerationStarting => "generation_starting",
            Note::GenerationReady => "generation_ready",
            Note::GenerationProvisional => "generation_provisional",
            Note::GenerationConfirmed => "generation_confirmed",
            Note::GenerationDraining => "generation_draining",
            Note::GenerationDrained => "generation_drained",
            Note::Generation => "generation",
            Note::WorkerStarted => "worker_started",
            Note::WorkerReady => "worker_ready",
            Note::WorkerExited => "worker_exited",
            Note::WorkerRetired => "worker_retired",
            Note::WorkerFailed => "worker_failed",
            Note::Worker => "worker",
            Note::Canary => "canary",
            Note::Paused => "paused",
            Note::ReloadQueued => "reload_queued",
            Note::ReloadHeld => "reload_held",
            Note::ReloadFinished => "reload_finished",
            Note::ReloadFailed => "reload_failed",
            Note::Reverted => "reverted",
            Note::Scaled => "scaled",
            Note::Stopping => "stopping",
            Note::Upgrade => "upgrade",
            Note::GaveUp => "gave_up",
            Note::ControlRequest => "control_request",
            Note::Exiting => "exiting",
            Note::Supervisor => "supervisor",
        }
    }
}
