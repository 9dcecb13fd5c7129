//! `deploy` and `rollback`: stage, build, share, sync, switch, reload,
//! verify, prune — one lock held throughout.
//!
//! This file is the pipeline's frame (options, report, errors, the lock,
//! [`Pipeline::run`] in order); each phase lives beside it: `prepare`
//! (source to sealed release), `switch` (going live, verifying, settling,
//! switching back), `rollback`, `releases` (listing, verifying and
//! pruning the store) and `plan` (`--dry-run`).
//!
//! The order is what makes a deploy safe to kill at any point: the release
//! is complete and durable (files synced, renamed into `releases/`) before
//! `current` is switched, and the switch is one rename followed by a
//! directory fsync. A killed deploy leaves at most a directory under
//! `.dream/staging/`, which the next deploy removes; the kernel drops the
//! lock with the process.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::signals::Signals;
use crate::store::hooks;
use crate::store::lock::{Holder, Lock, LockError, Wait};
use crate::store::manifest::{self, Manifest};
use crate::store::release::{self, Event, EventKind, Store};
use crate::store::stage::{self, Source, StageError, Stats};
use crate::supervise::control;

mod plan;
mod prepare;
mod releases;
mod rollback;
mod switch;

pub use plan::{Plan, plan};
use prepare::refuse_source_in_root;
pub use releases::{ReleaseInfo, Verified, human_bytes, list, prune_beyond, verify};
pub use rollback::{rollback, rollback_target};
use switch::interrupted;
pub use switch::{
    DEFAULT_SETTLE, Provisional, ReloadHow, confirm_generation, extend_generation,
    go_live_prepared, revert_to, verify_release,
};

/// How a deploy failed, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The command line or source is wrong (exit 100).
    Usage,
    /// The deploy failed and nothing changed (exit 1).
    Failed,
    /// Try again later: lock held, disk full (exit 111).
    Temporary,
    /// Ended by this signal (exit 128 + the signal's number); nothing changed.
    Interrupted(i32),
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DeployError {
    pub kind: Kind,
    pub message: String,
    /// The release the deploy was making, once it had an id.
    pub release: Option<String>,
}

fn err(kind: Kind, message: impl Into<String>) -> DeployError {
    DeployError {
        kind,
        message: message.into(),
        release: None,
    }
}

fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull
}

fn io_failure(what: &str, e: std::io::Error) -> DeployError {
    let kind = if is_disk_full(&e) {
        Kind::Temporary
    } else {
        Kind::Failed
    };
    err(kind, format!("{what}: {e}"))
}

impl From<StageError> for DeployError {
    fn from(e: StageError) -> DeployError {
        if let StageError::Interrupted(sig) = e {
            return err(Kind::Interrupted(sig as i32), e.to_string());
        }
        let kind = match e.io_error() {
            Some(io) if is_disk_full(io) => Kind::Temporary,
            _ => Kind::Failed,
        };
        err(kind, format!("staging: {e}"))
    }
}

/// One finished phase, for progress output.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub phase: &'static str,
    pub seconds: f64,
    pub detail: String,
}

/// What a deploy or rollback did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub release: String,
    pub previous: Option<String>,
    pub files: u64,
    pub bytes: u64,
    pub shared_files: u64,
    pub shared_bytes: u64,
    /// Shared as copy-on-write clones (reflinks) rather than hard links.
    pub reflinked_files: u64,
    pub generation: Option<u64>,
    pub supervisor: bool,
    pub pruned: Vec<String>,
    pub steps: Vec<Step>,
    pub switch_ms: f64,
    /// What a directory source left out (`.git/`, `.dreamignore`,
    /// `--exclude`), relative to the source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<String>,
    /// Files bridged from the previous release (`--bridge`).
    pub bridged: u64,
}

pub struct DeployOptions {
    pub root: PathBuf,
    pub source: Source,
    pub id: Option<String>,
    pub build: Option<String>,
    pub keep: usize,
    pub reload: bool,
    /// Switch and reload once the release is built (the default); without,
    /// the deploy ends with the release in `releases/`, ready for
    /// [`go_live_prepared`] (what a fleet host does between its phases).
    pub go_live: bool,
    /// A provisional reload: the supervisor reverts the new generation
    /// unless this deploy confirms it within this long (it does, once the
    /// reload succeeded), so a deploy killed or cut off in between still
    /// leaves a consistent host.
    pub confirm_within: Option<Duration>,
    /// Paths requested through the supervisor's first listening socket
    /// once the new generation is live: a status outside 2xx/3xx, or an
    /// `X-Dream-Release` naming another release, fails the deploy and
    /// puts the previous release back.
    pub verify: Vec<String>,
    /// Left out of a directory source (gitignore syntax), besides its own
    /// `.dreamignore` and, unless `keep_git`, `.git/`.
    pub exclude: Vec<String>,
    /// Run the hooks in `ROOT/.dream/hooks` (`--no-hooks` turns them off).
    pub hooks: bool,
    /// `--bridge DIR`: files under these directories (relative to the
    /// release) in the previous release that the new one lacks are linked
    /// into it.
    pub bridge: Vec<PathBuf>,
    pub keep_git: bool,
    pub wait_lock: Wait,
    /// For the lock's holder record.
    pub command: String,
    /// Most bytes of file content a release may hold; `None`: the free
    /// space of ROOT's filesystem (so a huge source is refused before it
    /// fills the disk).
    pub max_size: Option<u64>,
    /// Do not stream the build's output (a failure still shows its tail).
    pub quiet: bool,
    /// End the deploy on INT, TERM or HUP: the build's process group is
    /// killed, staging removed, exit 128 + the signal. Only for a deploy
    /// that owns its process (the command line, not the demo's thread).
    /// After the switch, an interrupt puts `current` back on the previous
    /// release.
    pub interruptible: bool,
    /// `--settle`: see [`ReloadHow::settle`].
    pub settle: Duration,
    /// `--canary`: see [`ReloadHow::canary`].
    pub canary: Option<crate::supervise::canary::judge::Spec>,
    /// `--pause`: see [`ReloadHow::pause`].
    pub pause: Option<Duration>,
}

impl DeployOptions {
    /// A deploy of `source` into `root` with every default of `dream
    /// deploy`: keep 5, reload, go live, hooks on, fail at once on a held
    /// lock, no size limit but the disk's.
    pub fn new(root: &Path, source: Source, command: &str) -> DeployOptions {
        DeployOptions {
            root: root.to_path_buf(),
            source,
            id: None,
            build: None,
            keep: 5,
            reload: true,
            go_live: true,
            confirm_within: None,
            verify: Vec::new(),
            exclude: Vec::new(),
            hooks: true,
            bridge: Vec::new(),
            keep_git: false,
            wait_lock: Wait::No,
            command: command.to_string(),
            max_size: None,
            quiet: false,
            interruptible: false,
            settle: DEFAULT_SETTLE,
            canary: None,
            pause: None,
        }
    }
}

struct Progress<'a> {
    started: Instant,
    report: &'a mut Report,
    out: &'a mut dyn FnMut(&Step),
}

impl Progress<'_> {
    fn step(&mut self, phase: &'static str, detail: String) {
        let now = Instant::now();
        let step = Step {
            phase,
            seconds: now.duration_since(self.started).as_secs_f64(),
            detail,
        };
        self.started = now;
        (self.out)(&step);
        self.report.steps.push(step);
        crate::test_point(phase);
    }
}

fn take_lock(store: &Store, command: &str, wait: Wait) -> Result<Lock, DeployError> {
    Lock::acquire(&store.lock_path(), &Holder::me(command), wait).map_err(|e| match e {
        LockError::Held { .. } => err(
            Kind::Temporary,
            format!("{e}; another deploy is running (retry, or use --wait-lock DUR)"),
        ),
        LockError::Io { .. } => err(Kind::Failed, e.to_string()),
    })
}

/// Removes what a killed deploy left behind.
fn clean_leftovers(store: &Store) -> Vec<String> {
    // First what an interrupted deploy's children left running (a build
    // still writing into its staging, a hook's migration), then its files.
    let mut removed = crate::child::end_leftovers(&children_dir(store));
    if let Ok(rd) = std::fs::read_dir(store.staging()) {
        for e in rd.flatten() {
            if release::remove_tree(&e.path()).is_ok() || std::fs::remove_file(e.path()).is_ok() {
                removed.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(&store.root) {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(".current.dream-")
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    removed
}

/// Where a deploy records its children's process groups.
fn children_dir(store: &Store) -> PathBuf {
    store.state().join("children")
}

fn timestamp() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(['-', ':'], "")
}

/// A new release's id: the UTC time and the manifest's digest (the same
/// content always gets the same suffix). A fleet's coordinator picks it,
/// so every host names the release alike.
pub fn new_release_id(m: &Manifest) -> String {
    format!("{}-{}", timestamp(), &m.digest()[..8])
}

/// The id a deploy makes: the UTC time, then `suffix` (the content's
/// digest, or the git revision), so the same content always gets the
/// same suffix; `-2`, `-3`… when that id was used before.
fn unused_id(store: &Store, suffix: &str) -> String {
    let base = format!("{}-{suffix}", timestamp());
    let used = store.used_ids();
    let mut id = base.clone();
    let mut n = 2;
    while used.contains(&id) {
        id = format!("{base}-{n}");
        n += 1;
    }
    id
}

/// Deploys `opts.source`.
pub fn deploy(opts: &DeployOptions, out: &mut dyn FnMut(&Step)) -> Result<Report, DeployError> {
    refuse_source_in_root(&opts.source, &opts.root)?;
    let store = Store::new(&opts.root);
    store.prepare().map_err(|e| {
        if e.raw_os_error().is_none()
            && matches!(
                e.kind(),
                std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::PermissionDenied
            )
        {
            err(Kind::Usage, e.to_string())
        } else {
            io_failure(&format!("cannot prepare {}", opts.root.display()), e)
        }
    })?;
    if let Some(id) = &opts.id {
        release::check_id(id).map_err(|e| err(Kind::Usage, e))?;
    }
    let mut lock = take_lock(&store, &opts.command, opts.wait_lock)?;
    let before = store.current();
    let result = deploy_locked(opts, &mut lock, out);
    // The lock is still held: a waiting deploy cannot interleave with
    // what these hooks do (Kamal #1517).
    if opts.hooks {
        let previous = match &result {
            Ok(r) => r.previous.clone(),
            Err(_) => before,
        };
        let release = match &result {
            Ok(r) => r.release.clone(),
            Err(e) => e
                .release
                .clone()
                .or_else(|| opts.id.clone())
                .unwrap_or_default(),
        };
        let (name, error) = match &result {
            Ok(_) => ("post-deploy", None),
            Err(e) => ("deploy-failed", Some(e.message.clone())),
        };
        let mut event = hooks::HookEvent::new(name, &opts.root, &release, previous.as_deref());
        event.error = error.as_deref();
        if let Err(e) = hooks::run(&event, opts.quiet) {
            crate::logtext::say(crate::logtext::Level::Warn, "hook_failed", &e, &[]);
        }
    }
    result
}

/// [`deploy`] for a caller that already holds the root's deploy lock (a
/// fleet host's agent holds it for the whole fleet run).
pub fn deploy_locked(
    opts: &DeployOptions,
    lock: &mut Lock,
    out: &mut dyn FnMut(&Step),
) -> Result<Report, DeployError> {
    let store = Store::new(&opts.root);
    let mut report = Report::default();
    let mut p = Progress {
        started: Instant::now(),
        report: &mut report,
        out,
    };
    let leftovers = clean_leftovers(&store);
    let _recording = crate::child::Recording::start(children_dir(&store));
    p.step(
        "locked",
        if leftovers.is_empty() {
            String::new()
        } else {
            format!(
                "removed leftovers of an interrupted deploy: {}",
                leftovers.join(", ")
            )
        },
    );
    if let Some(id) = &opts.id
        && store.used_ids().contains(id)
    {
        return Err(err(
            Kind::Usage,
            format!("release id {id} was used before; ids are never reused"),
        ));
    }
    let previous = store.current();
    let staged = store
        .staging()
        .join(format!("{}-{}", std::process::id(), timestamp()));
    // INT, TERM and HUP are read, not fatal, so that an interrupted build
    // is ended with its whole process group and its staging removed.
    let signals = if opts.interruptible {
        Some(
            Signals::new(&[
                nix::sys::signal::Signal::SIGINT,
                nix::sys::signal::Signal::SIGTERM,
                nix::sys::signal::Signal::SIGHUP,
            ])
            .map_err(|e| io_failure("signals", e))?,
        )
    } else {
        None
    };
    let mut pipeline = Pipeline {
        opts,
        store: &store,
        prev_dir: previous.as_ref().map(|id| store.release_dir(id)),
        previous,
        staged,
        signals,
        p,
    };
    let result = pipeline.run(lock);
    if result.is_err() {
        let _ = release::remove_tree(&pipeline.staged);
    }
    drop(pipeline);
    result.map_err(|mut e| {
        if e.release.is_none() && !report.release.is_empty() {
            e.release = Some(report.release.clone());
        }
        e
    })?;
    Ok(report)
}

/// One deploy in progress, after the lock: what it knows so far, and a
/// method per phase. `run` is the whole pipeline in order.
struct Pipeline<'a, 'o> {
    opts: &'a DeployOptions,
    store: &'a Store,
    previous: Option<String>,
    prev_dir: Option<PathBuf>,
    /// Where the release is built (`.dream/staging/<pid>-<time>`).
    staged: PathBuf,
    /// INT/TERM/HUP, when the deploy owns its process.
    signals: Option<Signals>,
    p: Progress<'o>,
}

/// What staging produced.
struct Staged {
    id: String,
    stats: Stats,
    manifest: Manifest,
}

impl Pipeline<'_, '_> {
    fn run(&mut self, lock: &mut Lock) -> Result<(), DeployError> {
        // The previous release's manifest: what sharing compares with. A
        // release from before manifests gets one now, from its files.
        let prev_manifest = match (&self.previous, &self.prev_dir) {
            (Some(id), Some(dir)) => Some(
                Manifest::load(&self.store.manifest_path(id))
                    .or_else(|_| Manifest::of_tree(dir))
                    .map_err(|e| io_failure("reading the previous release's manifest", e))?,
            ),
            _ => None,
        };
        let staged = self.stage(lock, prev_manifest.as_ref())?;
        self.interrupted()?;
        self.build(&staged.id)?;
        let id = self.seal(staged, prev_manifest.as_ref())?;
        if !self.opts.go_live {
            self.p
                .step("prepared", format!("releases/{id}, not switched"));
            return Ok(());
        }
        self.go_live(&id)
    }

    /// Without a build step nothing writes to the staged tree, so a
    /// directory's unchanged files are linked straight from the previous
    /// release as they are copied; otherwise sharing comes after the build.
    fn direct(&self) -> bool {
        // (Bridging adds files after staging, so the tree stays writable.)
        self.opts.build.is_none()
            && self.opts.bridge.is_empty()
            && matches!(self.opts.source, Source::Dir(_) | Source::Objects { .. })
    }

    /// An INT, TERM or HUP received since the deploy began ends it here.
    fn interrupted(&mut self) -> Result<(), DeployError> {
        interrupted(self.signals.as_mut())
    }
}
