//! `deploy` and `rollback`: stage, build, share, sync, switch, reload,
//! verify, prune — one lock held throughout.
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

use crate::control;
use crate::hooks;
use crate::lock::{Holder, Lock, LockError, Wait};
use crate::manifest::{self, Manifest};
use crate::release::{self, Event, EventKind, Store};
use crate::signals::Signals;
use crate::stage::{self, Source, StageError, Stats};

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

    /// Copies, extracts or checks out the source into staging, hashing it;
    /// picks the id; records the holder and the `staged` event.
    fn stage(&mut self, lock: &mut Lock, prev: Option<&Manifest>) -> Result<Staged, DeployError> {
        let (opts, store, staged) = (self.opts, self.store, self.staged.as_path());
        let max_bytes = match opts.max_size {
            Some(n) => n,
            None => free_space(&store.root).map_err(|e| io_failure("free space", e))?,
        };
        let prev_pair = self.prev_dir.as_deref().zip(prev);
        // Over the limit: with --max-size a refusal (exit 1); with the
        // default, the free space, a full disk (exit 111: free space and
        // retry).
        let over_limit = |e: StageError| match e {
            StageError::TooBig { limit, needs } if opts.max_size.is_none() => err(
                Kind::Temporary,
                format!(
                    "staging: No space left on device: the release needs more than the {limit} bytes free on ROOT's filesystem{}; nothing was written past that. Free some space and retry, or set --max-size",
                    needs
                        .map(|n| format!(" ({n} bytes of files)"))
                        .unwrap_or_default()
                ),
            ),
            e => e.into(),
        };
        let mut git_hash = None;
        let (stats, manifest) = match &opts.source {
            Source::Dir(src) => {
                let exclude = stage::Exclude::new(src, &opts.exclude, opts.keep_git)
                    .map_err(|e| err(Kind::Usage, e))?;
                let copy = stage::CopyOptions {
                    exclude: Some(&exclude),
                    share_from: if self.direct() { prev_pair } else { None },
                    freeze: self.direct(),
                    max_bytes,
                };
                let staged = stage::copy_dir(src, staged, copy).map_err(over_limit)?;
                self.p.report.excluded = exclude
                    .left_out()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                staged
            }
            Source::Tar(t) => {
                let (stats, m) = stage::extract_tar(t, staged, max_bytes).map_err(over_limit)?;
                (stats, self.leave_out(m)?)
            }
            Source::Objects { manifest, objects } => {
                let m = Manifest::load(manifest)
                    .map_err(|e| io_failure("reading the fleet's manifest", e))?;
                // What the current release holds is not sent: taken from
                // it (shared, without a build; copied, with one).
                let local: std::collections::HashMap<crate::manifest::Hash, (PathBuf, u32)> =
                    prev_pair
                        .map(|(dir, pm)| {
                            pm.entries()
                                .iter()
                                .filter_map(|e| match &e.kind {
                                    crate::manifest::Kind::File { hash, mode, .. } => {
                                        Some((*hash, (dir.join(&e.path), *mode)))
                                    }
                                    _ => None,
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                let content = |h: &crate::manifest::Hash| {
                    let o = objects.join(crate::manifest::hex(h));
                    if o.is_file() {
                        Some(o)
                    } else {
                        local.get(h).map(|(p, _)| p.clone())
                    }
                };
                let share = |h: &crate::manifest::Hash, frozen: u32| {
                    local
                        .get(h)
                        .filter(|(_, m)| stage::frozen_mode(false, *m) == frozen)
                        .map(|(p, _)| p.clone())
                };
                let share: Option<&stage::ShareFrom<'_>> =
                    if self.direct() { Some(&share) } else { None };
                stage::from_manifest(&m, &content, share, staged, max_bytes).map_err(over_limit)?
            }
            Source::Git { url, rev } => {
                let h = stage::git_checkout(
                    url,
                    rev.as_deref(),
                    staged,
                    max_bytes,
                    self.signals.as_mut(),
                )
                .map_err(over_limit)?;
                git_hash = Some(h);
                let (bytes, files) = release::tree_size(staged);
                if bytes > max_bytes {
                    return Err(err(
                        Kind::Failed,
                        format!(
                            "refused: the checkout holds {bytes} bytes, more than {max_bytes} (--max-size)"
                        ),
                    ));
                }
                let m =
                    Manifest::of_tree(staged).map_err(|e| io_failure("hashing the checkout", e))?;
                let stats = Stats {
                    files,
                    bytes,
                    ..Stats::default()
                };
                (stats, self.leave_out(m)?)
            }
        };
        let id = match &opts.id {
            Some(id) => id.clone(),
            None => unused_id(
                store,
                &git_hash.unwrap_or_else(|| manifest.digest()[..8].to_string()),
            ),
        };
        let p = &mut self.p;
        p.report.release = id.clone();
        p.report.previous = self.previous.clone();
        let mut holder = Holder::me(&opts.command);
        holder.release = Some(id.clone());
        let _ = lock.record(&holder);
        store
            .append(&Event::new(EventKind::Staged, &id))
            .map_err(|e| io_failure("history", e))?;
        p.report.files = stats.files;
        p.report.bytes = stats.bytes;
        let left_out = match p.report.excluded.len() {
            0 => String::new(),
            n => format!(
                "; left out {}{}",
                p.report.excluded[..n.min(3)].join(", "),
                if n > 3 {
                    format!(" and {} more", n - 3)
                } else {
                    String::new()
                }
            ),
        };
        p.step(
            "staged",
            format!(
                "{} files, {}{left_out}",
                stats.files,
                human_bytes(stats.bytes)
            ),
        );
        Ok(Staged {
            id,
            stats,
            manifest,
        })
    }

    /// Runs `--build`, if any; a failure marks the release bad.
    fn build(&mut self, id: &str) -> Result<(), DeployError> {
        let Some(cmd) = &self.opts.build else {
            return Ok(());
        };
        let store = self.store;
        run_build(
            cmd,
            &self.staged,
            id,
            &store.release_dir(id),
            self.opts.quiet,
            self.signals.as_mut(),
        )
        .inspect_err(|e| {
            let mut ev = Event::new(EventKind::Failed, id);
            ev.reason = Some(e.message.clone());
            let _ = store.append(&ev);
        })?;
        self.p.step("built", format!("`{cmd}`"));
        Ok(())
    }

    /// Makes the staged tree a release: links checked, `ROOT/shared`
    /// linked, unchanged files shared, frozen, its manifest written, synced
    /// and renamed into `releases/`. Returns its id.
    fn seal(&mut self, staged: Staged, prev: Option<&Manifest>) -> Result<String, DeployError> {
        let (opts, store) = (self.opts, self.store);
        let dir = self.staged.clone();
        let Staged {
            id,
            stats,
            manifest: source_manifest,
        } = staged;
        refuse_escaping_links(&dir)?;
        let linked = link_shared(store, &dir).map_err(|e| io_failure("linking ROOT/shared", e))?;
        if !linked.is_empty() {
            self.p
                .step("linked", format!("shared/{{{}}}", linked.join(",")));
        }
        // The release's manifest: the source's, or after a build the tree's
        // (hashed anew: the build may have rewritten anything).
        let mut final_manifest = if opts.build.is_some() {
            Manifest::of_tree(&dir).map_err(|e| io_failure("hashing the release", e))?
        } else {
            source_manifest
        };
        if !linked.is_empty() {
            final_manifest = with_shared_links(&final_manifest, &linked);
        }
        if let (false, Some(prev_dir), Some(prev)) =
            (opts.bridge.is_empty(), self.prev_dir.as_deref(), prev)
        {
            let (added, bridged) =
                stage::bridge(&dir, &final_manifest, (prev_dir, prev), &opts.bridge)?;
            if !bridged.is_empty() {
                self.p.step(
                    "bridged",
                    format!(
                        "{} files from {}",
                        bridged.len(),
                        self.previous.as_deref().unwrap_or("?")
                    ),
                );
            }
            self.p.report.bridged = bridged.len() as u64;
            let mut entries = final_manifest.entries().to_vec();
            entries.extend(added);
            final_manifest = Manifest::new(entries).with_bridged(bridged);
        }
        let shared = if self.direct() {
            stats
        } else {
            stage::share(&dir, &final_manifest, self.prev_dir.as_deref().zip(prev))?
        };
        let p = &mut self.p;
        p.report.shared_files = shared.shared_files;
        p.report.shared_bytes = shared.shared_bytes;
        p.report.reflinked_files = shared.reflinked_files;
        p.step(
            "shared",
            match &self.previous {
                Some(prev) => format!(
                    "{} files, {} with {prev} ({})",
                    shared.shared_files,
                    human_bytes(shared.shared_bytes),
                    if shared.reflinked_files > 0 {
                        "copy-on-write clones"
                    } else {
                        "hard links"
                    }
                ),
                None => "nothing to share with (first release)".into(),
            },
        );

        self.interrupted()?;
        if !self.direct() {
            release::freeze_below(&dir).map_err(|e| io_failure("freezing the release", e))?;
        }
        // The manifest is stored before the release is moved into place, so
        // that no release exists without one.
        std::fs::create_dir_all(store.manifests())
            .and_then(|()| final_manifest.frozen().save(&store.manifest_path(&id)))
            .map_err(|e| io_failure("writing the manifest", e))?;
        sync_tree(&dir).map_err(|e| io_failure("syncing the release", e))?;
        let final_dir = store.release_dir(&id);
        std::fs::rename(&dir, &final_dir)
            .map_err(|e| io_failure("moving the release into place", e))?;
        release::fsync_dir(&store.releases()).map_err(|e| io_failure("syncing releases/", e))?;
        release::freeze_dir(&final_dir).map_err(|e| io_failure("freezing the release", e))?;
        self.p.step("synced", format!("releases/{id}"));
        Ok(id)
    }

    /// `--exclude` and the source's `.dreamignore` applied to a staged
    /// tarball or checkout, as to a directory source (a tarball's `.git/`
    /// is kept unless excluded: it is part of what the archive holds).
    fn leave_out(&mut self, m: Manifest) -> Result<Manifest, DeployError> {
        let staged = self.staged.as_path();
        let exclude = stage::Exclude::new(staged, &self.opts.exclude, true)
            .map_err(|e| err(Kind::Usage, e))?;
        let m = stage::leave_out(staged, m, &exclude)?;
        self.p.report.excluded = exclude
            .left_out()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        Ok(m)
    }

    /// Switches `current` to the release, asks the supervisor to reload
    /// (switching back if that fails), and prunes.
    fn go_live(&mut self, id: &str) -> Result<(), DeployError> {
        let (opts, store) = (self.opts, self.store);
        // The last moment to stop: after the switch the deploy finishes.
        self.interrupted().inspect_err(|_| {
            let _ = release::remove_tree(&store.release_dir(id));
            let _ = std::fs::remove_file(store.manifest_path(id));
        })?;
        switch_reload_verify(
            store,
            id,
            self.previous.as_deref(),
            EventKind::Switched,
            &ReloadHow {
                reload: opts.reload,
                provisional: opts.confirm_within.map(|within| Provisional {
                    within,
                    confirm_now: true,
                }),
                verify: opts.verify.clone(),
                hooks: opts.hooks,
                quiet: opts.quiet,
                settle: opts.settle,
            },
            self.signals.as_mut(),
            &mut self.p,
        )?;
        let pruned = prune(store, opts.keep, id, self.previous.as_deref());
        if !pruned.is_empty() {
            self.p.report.pruned = pruned.clone();
            self.p.step("pruned", pruned.join(", "));
        }
        Ok(())
    }
}

/// A directory source that is the deploy root, contains it, or lies
/// inside it would be copied into itself (staging is inside ROOT): refused
/// at once, exit 100.
fn refuse_source_in_root(source: &Source, root: &Path) -> Result<(), DeployError> {
    let Source::Dir(src) = source else {
        return Ok(());
    };
    let (Ok(src), Ok(root)) = (src.canonicalize(), root.canonicalize()) else {
        return Ok(());
    };
    let how = if src == root {
        "is"
    } else if root.starts_with(&src) {
        "contains"
    } else if src.starts_with(&root) {
        "lies inside"
    } else {
        return Ok(());
    };
    Err(err(
        Kind::Usage,
        format!(
            "refusing source {}: it {how} the deploy root {} (use a root outside the source, e.g. --root /srv/app)",
            src.display(),
            root.display()
        ),
    ))
}

/// `m` with each of `names` (top-level entries of `ROOT/shared/`) as the
/// symlink `link_shared` made, replacing whatever the source had there.
fn with_shared_links(m: &Manifest, names: &[String]) -> Manifest {
    let mut entries: Vec<manifest::Entry> = m
        .entries()
        .iter()
        .filter(|e| !names.iter().any(|n| e.path.starts_with(n)))
        .cloned()
        .collect();
    entries.extend(names.iter().map(|n| manifest::Entry {
        path: PathBuf::from(n),
        kind: manifest::Kind::Symlink {
            target: Path::new("../../shared").join(n),
        },
    }));
    Manifest::new(entries)
}

/// Refuses a release with a symlink that resolves outside it, judged on
/// the final tree (after the build), before anything can serve it.
fn refuse_escaping_links(staged: &Path) -> Result<(), DeployError> {
    let bad = crate::tree::links_escaping(staged)
        .map_err(|e| io_failure("checking the release's links", e))?;
    let Some((path, target)) = bad.first() else {
        return Ok(());
    };
    let more = match bad.len() {
        1 => String::new(),
        n => format!(" (and {} more)", n - 1),
    };
    Err(err(
        Kind::Failed,
        format!(
            "refused: link {} -> {} resolves outside the release{more}; nothing was switched",
            path.display(),
            target.display()
        ),
    ))
}

/// Links every top-level entry of `ROOT/shared/` (uploads, logs: data that
/// outlives releases) into the staged release as a relative symlink,
/// replacing whatever the source had at that path. Returns the names.
fn link_shared(store: &Store, staged: &Path) -> std::io::Result<Vec<String>> {
    let shared = store.root.join("shared");
    let Ok(entries) = std::fs::read_dir(&shared) else {
        return Ok(Vec::new());
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    for name in &names {
        let at = staged.join(name);
        if std::fs::symlink_metadata(&at).is_ok() {
            if at.is_dir() && !at.is_symlink() {
                release::remove_tree(&at)?;
            } else {
                std::fs::remove_file(&at)?;
            }
        }
        std::os::unix::fs::symlink(Path::new("../../shared").join(name), &at)?;
    }
    Ok(names)
}

/// Switches `current` to `id`, asks a running supervisor to reload, and
/// switches back (marking `id` bad) if the reload fails.
fn switch_reload_verify(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    event: EventKind,
    how: &ReloadHow,
    signals: Option<&mut Signals>,
    p: &mut Progress<'_>,
) -> Result<(), DeployError> {
    let (reload, provisional) = (how.reload, how.provisional);
    if how.hooks {
        let event = hooks::HookEvent::new("pre-switch", &store.root, id, previous);
        if hooks::path(&store.root, "pre-switch").is_some() {
            hooks::run(&event, how.quiet).map_err(|e| {
                let mut bad = Event::new(EventKind::Failed, id);
                bad.reason = Some(e.clone());
                let _ = store.append(&bad);
                err(Kind::Failed, format!("{e}; nothing was switched"))
            })?;
            p.step("pre-switch", "hook passed".into());
        }
    }
    let took = store
        .switch(id)
        .map_err(|e| io_failure("switching current", e))?;
    p.report.switch_ms = took.as_secs_f64() * 1000.0;
    let mut ev = Event::new(event, id);
    ev.previous = previous.map(str::to_string);
    if let Err(e) = store.append(&ev) {
        // current must never name a release that the history does not
        // record and no supervisor was asked to serve: switch it back.
        let back = match previous {
            Some(prev) => match store.switch(prev) {
                Ok(_) => format!("current switched back to {prev}"),
                Err(e) => format!("could not switch current back to {prev}: {e}"),
            },
            None => "there is no previous release to switch back to".into(),
        };
        return Err(io_failure(
            &format!("recording the switch to {id} in the history ({back})"),
            e,
        ));
    }
    p.step("switched", format!("current -> releases/{id}"));
    if !reload {
        p.step("reload", "skipped (--no-reload)".into());
        return Ok(());
    }
    let deadline = reload_deadline(store);
    let (confirm_within, confirm_now) = match provisional {
        Some(p) => (Some(p.within), p.confirm_now),
        None => (None, false),
    };
    let request = control::Request::Reload {
        confirm_within_ms: confirm_within.map(|d| d.as_millis() as u64),
    };
    let answer = control::ask_or_interrupt(
        &store.root,
        &request,
        Some(deadline),
        signals.as_deref().map(|s| s.as_fd()),
    );
    let failure = match answer {
        Ok(a) if a.ok => {
            p.report.supervisor = true;
            p.report.generation = a.generation;
            p.step(
                "reloaded",
                format!(
                    "generation {} is live{}",
                    a.generation.map_or("?".into(), |g| g.to_string()),
                    if confirm_within.is_some() {
                        ", provisionally"
                    } else {
                        ""
                    }
                ),
            );
            if !how.verify.is_empty() {
                verify_or_go_back(store, id, previous, &how.verify, p)?;
            }
            if let Some(generation) = a.generation
                && !how.settle.is_zero()
            {
                settle(store, id, previous, generation, how.settle, signals, p)?;
            }
            if confirm_within.is_some() && confirm_now {
                confirm(store, id, a.generation, p)?;
            }
            post_switch(store, id, previous, how, p);
            return Ok(());
        }
        Ok(a) => a.error.unwrap_or_else(|| "unknown error".into()),
        Err(control::ControlError::NotRunning { .. }) if !how.verify.is_empty() => {
            // A check the user asked for is never skipped in silence.
            let restored = switch_back(
                store,
                id,
                previous,
                format!("{id} could not be verified: no supervisor"),
            );
            return Err(err(
                Kind::Failed,
                format!(
                    "--verify needs a running supervisor, and none is running for this root: release {id} was not verified\n{restored}; {id} is not marked bad"
                ),
            ));
        }
        Err(control::ControlError::NotRunning { .. }) => {
            p.step(
                "reload",
                "no supervisor is running for this root; current is switched".into(),
            );
            post_switch(store, id, previous, how, p);
            return Ok(());
        }
        Err(control::ControlError::Interrupted) => {
            return Err(interrupted_after_switch(store, id, previous, signals));
        }
        Err(e) => return Err(could_not_ask(store, id, previous, e, deadline)),
    };
    p.report.supervisor = true;
    let mut bad = Event::new(EventKind::Failed, id);
    bad.reason = Some(failure.clone());
    let _ = store.append(&bad);
    let restored = switch_back(store, id, previous, format!("{id} failed to start"));
    Err(err(
        Kind::Failed,
        format!("reload failed: {failure}\n{restored}; release {id} is marked bad"),
    ))
}

/// Waits for the supervisor to say that `generation` stayed up for
/// `within` after it went live (`--settle`): a revert, a failure or a crash
/// loop inside the window fails the deploy (the supervisor has already put
/// the previous release back when it reverted), so that success is only
/// ever reported for a release that serves.
#[allow(clippy::too_many_arguments)]
fn settle(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    generation: u64,
    within: Duration,
    signals: Option<&mut Signals>,
    p: &mut Progress<'_>,
) -> Result<(), DeployError> {
    let request = control::Request::Settle {
        generation,
        within_ms: within.as_millis() as u64,
    };
    let answer = control::ask_or_interrupt(
        &store.root,
        &request,
        Some(within + Duration::from_secs(30)),
        signals.as_deref().map(|s| s.as_fd()),
    );
    match answer {
        Ok(a) if a.ok => {
            p.step(
                "settled",
                format!(
                    "generation {generation} stayed up for {}",
                    crate::fmt_duration(within)
                ),
            );
            Ok(())
        }
        Ok(a) => Err(err(
            Kind::Failed,
            format!(
                "release {id} did not settle within {}: {}; current names {}",
                crate::fmt_duration(within),
                a.error.unwrap_or_else(|| "unknown error".into()),
                store.current().as_deref().unwrap_or("nothing")
            ),
        )),
        Err(control::ControlError::Interrupted) => {
            Err(interrupted_after_switch(store, id, previous, signals))
        }
        Err(e) => Err(err(
            Kind::Temporary,
            format!(
                "could not learn whether release {id} settled ({e}); it is live (see dream status)"
            ),
        )),
    }
}

/// An INT, TERM or HUP after the switch, while waiting for the supervisor:
/// `current` goes back to the previous release and the supervisor is asked
/// to load it (it finishes the reload it took, then goes back); nothing is
/// marked bad. Exit 128 + the signal.
fn interrupted_after_switch(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    signals: Option<&mut Signals>,
) -> DeployError {
    let sig = signals
        .and_then(|s| s.try_next().ok().flatten())
        .unwrap_or(nix::sys::signal::Signal::SIGINT);
    let restored = match previous {
        Some(_) => {
            let r = switch_back(
                store,
                id,
                previous,
                format!("the deploy of {id} was interrupted"),
            );
            let asked = control::tell(
                &store.root,
                &control::Request::Reload {
                    confirm_within_ms: None,
                },
            );
            match asked {
                Ok(()) => format!("{r}; the supervisor was asked to go back to it"),
                Err(e) => format!("{r}; could not ask the supervisor to go back to it: {e}"),
            }
        }
        None => format!("current stays on {id} (there is no previous release)"),
    };
    err(
        Kind::Interrupted(sig as i32),
        format!("interrupted by {sig:?} after the switch: {restored}; {id} is not marked bad"),
    )
}

/// `post-switch`: the release is live; a failing hook is reported, and
/// changes nothing.
fn post_switch(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    how: &ReloadHow,
    p: &mut Progress<'_>,
) {
    if !how.hooks || hooks::path(&store.root, "post-switch").is_none() {
        return;
    }
    let event = hooks::HookEvent::new("post-switch", &store.root, id, previous);
    match hooks::run(&event, how.quiet) {
        Ok(()) => p.step("post-switch", "hook passed".into()),
        Err(e) => p.step("post-switch", format!("{e} (the release stays live)")),
    }
}

/// How a switch asks the supervisor: whether to reload at all, whether
/// provisionally, and what to request through it afterwards.
#[derive(Debug, Clone, Default)]
pub struct ReloadHow {
    pub reload: bool,
    pub provisional: Option<Provisional>,
    pub verify: Vec<String>,
    /// Run `pre-switch` and `post-switch` from `ROOT/.dream/hooks`.
    pub hooks: bool,
    /// Hooks' output is not shown.
    pub quiet: bool,
    /// How long the new generation must stay up after going live before
    /// the switch counts as done (`--settle`; zero: not waited for).
    pub settle: Duration,
}

/// `--settle`'s default: long enough to catch a release that crashes as it
/// boots or on its first requests (the common failure), short enough to
/// leave a deploy's time nearly as it was; the supervisor's probation
/// (10 s) still watches after it.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(1);

/// Requests each of `paths` through the supervisor's first listening
/// socket; on a failure the release is marked bad, `current` switched
/// back and the supervisor reloaded onto the previous release.
fn verify_or_go_back(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    paths: &[String],
    p: &mut Progress<'_>,
) -> Result<(), DeployError> {
    let why = match verify_release(store, id, paths) {
        Ok(()) => {
            p.step("verified", paths.join(" "));
            return Ok(());
        }
        Err(why) => why,
    };
    let mut bad = Event::new(EventKind::Failed, id);
    bad.reason = Some(format!("verification failed: {why}"));
    let _ = store.append(&bad);
    let restored = switch_back(store, id, previous, format!("{id} failed verification"));
    let reloaded = if previous.is_some() {
        let request = control::Request::Reload {
            confirm_within_ms: None,
        };
        match control::ask(&store.root, &request, Some(reload_deadline(store))) {
            Ok(a) if a.ok => ", and reloaded".to_string(),
            Ok(a) => format!(
                ", but its reload failed: {}",
                a.error.unwrap_or_else(|| "unknown error".into())
            ),
            Err(e) => format!(", but the supervisor could not be asked to reload: {e}"),
        }
    } else {
        String::new()
    };
    Err(err(
        Kind::Failed,
        format!("verification failed: {why}\n{restored}{reloaded}; release {id} is marked bad"),
    ))
}

/// `GET path` for each path, through the supervisor's first listening
/// socket (an unspecified address is reached on loopback): each must
/// answer 2xx or 3xx, and an `X-Dream-Release` header must name `id`.
pub fn verify_release(store: &Store, id: &str, paths: &[String]) -> Result<(), String> {
    let status = control::status(&store.root, Some(Duration::from_secs(10)))
        .map_err(|e| format!("cannot find the supervisor's socket: {e}"))?;
    let address = status
        .sockets
        .first()
        .map(|s| s.address.clone())
        .ok_or("the supervisor has no listening socket")?;
    for path in paths {
        // Right after the reload a worker of the previous generation may
        // still take a connection or two while it drains: an answer from
        // another release is asked again, for a few seconds.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (code, release) = http_get(&address, path)?;
            match release {
                Some(r) if r != id => {
                    if std::time::Instant::now() >= deadline {
                        return Err(format!("GET {path} was answered by release {r}, not {id}"));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ if !(200..400).contains(&code) => {
                    return Err(format!("GET {path} answered {code}"));
                }
                _ => break,
            }
        }
    }
    Ok(())
}

/// A plain HTTP/1.1 GET: the status code and the `X-Dream-Release` header.
fn http_get(address: &str, path: &str) -> Result<(u16, Option<String>), String> {
    use std::io::{Read, Write};
    let limit = Duration::from_secs(10);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: dream-verify\r\nConnection: close\r\n\r\n"
    );
    let fail = |e: std::io::Error| format!("GET {path} on {address}: {e}");
    let mut head = Vec::new();
    let mut read_head = |s: &mut dyn Read| -> Result<(), String> {
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(e) => return Err(fail(e)),
            }
        }
        Ok(())
    };
    if let Some(p) = address.strip_prefix("unix:") {
        let mut s = std::os::unix::net::UnixStream::connect(p).map_err(fail)?;
        s.set_read_timeout(Some(limit)).map_err(fail)?;
        s.write_all(request.as_bytes()).map_err(fail)?;
        read_head(&mut s)?;
    } else {
        let mut addr: std::net::SocketAddr = address
            .parse()
            .map_err(|_| format!("cannot verify through {address}"))?;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let mut s = std::net::TcpStream::connect_timeout(&addr, limit).map_err(fail)?;
        s.set_read_timeout(Some(limit)).map_err(fail)?;
        s.write_all(request.as_bytes()).map_err(fail)?;
        read_head(&mut s)?;
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("GET {path}: no HTTP answer"))?;
    let release = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("x-dream-release"))
        .map(|(_, v)| v.trim().to_string());
    Ok((code, release))
}

/// A provisional reload: the supervisor reverts it unless confirmed
/// within `within`; `confirm_now`: this deploy confirms it as soon as the
/// reload succeeded (a fleet host waits for the fleet's decision).
#[derive(Debug, Clone, Copy)]
pub struct Provisional {
    pub within: Duration,
    pub confirm_now: bool,
}

/// Confirms a provisional generation. If the supervisor reverted it
/// meanwhile (it crashed on probation, or the confirmation came too late),
/// the deploy fails: the supervisor has already switched `current` back
/// and marked the release bad.
fn confirm(
    store: &Store,
    id: &str,
    generation: Option<u64>,
    p: &mut Progress<'_>,
) -> Result<(), DeployError> {
    let request = control::Request::Confirm { generation };
    match control::ask(&store.root, &request, Some(Duration::from_secs(30))) {
        Ok(a) if a.ok => {
            p.step("confirmed", format!("release {id} stays"));
            Ok(())
        }
        Ok(a) => Err(err(
            Kind::Failed,
            format!(
                "the supervisor reverted release {id}: {}",
                a.error.unwrap_or_else(|| "unknown error".into())
            ),
        )),
        Err(e) => Err(err(
            Kind::Temporary,
            format!(
                "could not confirm release {id} ({e}); the supervisor reverts it when its confirmation deadline passes"
            ),
        )),
    }
}

/// Switches `current` back to `previous` after `id` did not go live, and
/// records it (a `switched` event with the reason, which does not count as
/// going live); returns what happened, for the error message.
fn switch_back(store: &Store, id: &str, previous: Option<&str>, why: String) -> String {
    let Some(prev) = previous else {
        return "there is no previous release to switch back to".into();
    };
    match store.switch(prev) {
        Ok(_) => {
            let mut ev = Event::new(EventKind::Switched, prev);
            ev.previous = Some(id.to_string());
            ev.reason = Some(why);
            let _ = store.append(&ev);
            format!("current switched back to {prev}, which is still serving")
        }
        Err(e) => format!("could not switch current back to {prev}: {e}"),
    }
}

/// How long a deploy waits for the supervisor's answer to a reload: the
/// new generation's ready timeout, once more for a reload queued ahead of
/// it, its drain timeout, and a margin; without a status, 150 s.
fn reload_deadline(store: &Store) -> Duration {
    match control::status(&store.root, Some(Duration::from_secs(10))) {
        Ok(s) => {
            let ms = Duration::from_millis;
            2 * ms(s.pool.ready_timeout_ms) + ms(s.pool.drain_timeout_ms) + Duration::from_secs(30)
        }
        Err(_) => Duration::from_secs(150),
    }
}

/// The deploy could not get an answer from the supervisor: that says
/// nothing about the release, so nothing is marked bad, and the exit is
/// 111 (try again). When the request was never taken (refused, or the
/// connection failed), `current` is switched back, so that it names what
/// is served; when it was taken but not answered in time, the supervisor
/// will carry it out, so `current` stays.
fn could_not_ask(
    store: &Store,
    id: &str,
    previous: Option<&str>,
    e: control::ControlError,
    deadline: Duration,
) -> DeployError {
    let timed_out = matches!(&e, control::ControlError::Io { source, .. }
        if matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
    if timed_out {
        return err(
            Kind::Temporary,
            format!(
                "the supervisor took the reload but did not answer within {}; current names {id}, which it loads when it can (see dream status); nothing is marked bad",
                crate::fmt_duration(deadline)
            ),
        );
    }
    let restored = switch_back(
        store,
        id,
        previous,
        format!("could not ask the supervisor to reload {id}"),
    );
    let code = if e.is_temporary() {
        Kind::Temporary
    } else {
        Kind::Failed
    };
    err(
        code,
        format!(
            "could not ask the supervisor to reload: {e}\n{restored}; release {id} is not marked bad (deploy again)"
        ),
    )
}

/// An INT, TERM or HUP received since the deploy began ends it here,
/// before anything was switched (staging is removed by the caller).
fn interrupted(signals: Option<&mut Signals>) -> Result<(), DeployError> {
    match signals.and_then(|s| s.try_next().ok().flatten()) {
        Some(sig) => Err(err(
            Kind::Interrupted(sig as i32),
            format!("interrupted by {sig:?}; nothing was switched"),
        )),
        None => Ok(()),
    }
}

/// Runs the build (a shell command) in the staged release, as every child
/// of a deploy runs ([`crate::child`]): its own process group, the
/// parent-death signal, output streamed (each line shown unless quiet,
/// the last ones kept for a failure report); an INT, TERM or HUP to the
/// deploy ends the build's whole group and the deploy (which then removes
/// its staging) with 128 + the signal.
fn run_build(
    cmd: &str,
    dir: &Path,
    id: &str,
    final_dir: &Path,
    quiet: bool,
    signals: Option<&mut Signals>,
) -> Result<(), DeployError> {
    let mut sh = std::process::Command::new("/bin/sh");
    sh.arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .env("DREAM_RELEASE", id)
        .env("DREAM_RELEASE_DIR", final_dir)
        .env("DREAM_BUILD_DIR", dir);
    let mut show = |text: &str| {
        if !quiet {
            crate::logtext::say(
                crate::logtext::Level::Info,
                "build_output",
                &format!("build | {text}"),
                &[("line", text.into())],
            );
        }
    };
    let ended = crate::child::run(
        sh,
        None,
        crate::child::Output::Lines {
            show: &mut show,
            tail: 20,
        },
        None,
        signals,
    )
    .map_err(|e| err(Kind::Failed, format!("cannot run the build: {e}")))?;
    let (status, tail) = match ended {
        crate::child::Ended::Exited { status, tail, .. } => (status, tail),
        crate::child::Ended::Interrupted(sig) => {
            return Err(err(
                Kind::Interrupted(sig as i32),
                format!(
                    "interrupted by {sig:?} during the build: the build's process group was ended and nothing was switched"
                ),
            ));
        }
        crate::child::Ended::TimedOut { tail } => {
            (std::os::unix::process::ExitStatusExt::from_raw(9), tail)
        }
    };
    if status.success() {
        return Ok(());
    }
    let how = match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => "was killed by a signal".into(),
    };
    let said = if tail.is_empty() {
        "It printed nothing.".to_string()
    } else {
        format!("Its output ended with:\n{}", tail.join("\n"))
    };
    Err(err(
        Kind::Failed,
        format!("build `{cmd}` {how}; nothing was switched. {said}"),
    ))
}

/// Bytes an unprivileged writer may still use on `dir`'s filesystem.
fn free_space(dir: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir)?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Makes the staged files durable: one `syncfs(2)` of their filesystem.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(dir)?;
    nix::unistd::syncfs(&f)?;
    Ok(())
}

/// Releases some live process runs in: a supervisor's generations, or any
/// process whose cwd is inside one.
fn in_use(store: &Store) -> Vec<String> {
    let mut used = Vec::new();
    if let Ok(s) = control::status(&store.root, Some(Duration::from_secs(10))) {
        used.extend(s.pool.generations.into_iter().map(|g| g.release));
    }
    let releases = store
        .releases()
        .canonicalize()
        .unwrap_or_else(|_| store.releases());
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cwd) = std::fs::read_link(e.path().join("cwd"))
            && let Ok(rest) = cwd.strip_prefix(&releases)
            && let Some(first) = rest.components().next()
        {
            used.push(first.as_os_str().to_string_lossy().into_owned());
        }
    }
    used
}

/// Removes releases beyond `--keep`: the newest `keep` *good* releases
/// stay (bad ones never push a rollback target out), and of the bad ones
/// at most `keep`, the newest, for a look at what failed. `current`,
/// `previous` and any release a process runs in always stay.
fn prune(store: &Store, keep: usize, current: &str, previous: Option<&str>) -> Vec<String> {
    let bad = store.bad();
    let used = in_use(store);
    let (mut good_kept, mut bad_kept) = (0, 0);
    let mut doomed = Vec::new();
    for id in store.ordered().into_iter().rev() {
        let protected = id == current || Some(id.as_str()) == previous || used.contains(&id);
        let seen = if bad.contains(&id) {
            &mut bad_kept
        } else {
            &mut good_kept
        };
        *seen += 1;
        if *seen > keep && !protected {
            doomed.push(id);
        }
    }
    let mut removed = Vec::new();
    for id in doomed {
        if release::remove_tree(&store.release_dir(&id)).is_ok() {
            let _ = std::fs::remove_file(store.manifest_path(&id));
            let _ = store.append(&Event::new(EventKind::Pruned, &id));
            removed.push(id);
        }
    }
    removed.reverse();
    removed
}

/// `dream rollback [ID]`. INT, TERM and HUP are read, not fatal: an
/// interrupt after the switch puts `current` back (as for a deploy).
#[allow(clippy::too_many_arguments)]
pub fn rollback(
    root: &Path,
    id: Option<&str>,
    reload: bool,
    verify: &[String],
    settle: Duration,
    wait_lock: Wait,
    command: &str,
    out: &mut dyn FnMut(&Step),
) -> Result<Report, DeployError> {
    let mut signals = Signals::new(&[
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ])
    .map_err(|e| io_failure("signals", e))?;
    let store = Store::new(root);
    store
        .prepare()
        .map_err(|e| err(Kind::Usage, e.to_string()))?;
    let _lock = take_lock(&store, command, wait_lock)?;
    let current = store.current();
    let target = rollback_target(&store, id)?;
    let mut report = Report {
        release: target.clone(),
        previous: current.clone(),
        ..Report::default()
    };
    let mut p = Progress {
        started: Instant::now(),
        report: &mut report,
        out,
    };
    p.step(
        "locked",
        format!(
            "rolling back from {} to {target}",
            current.as_deref().unwrap_or("nothing")
        ),
    );
    switch_reload_verify(
        &store,
        &target,
        current.as_deref(),
        if id.is_some() {
            EventKind::RolledBackNamed
        } else {
            EventKind::RolledBack
        },
        &ReloadHow {
            reload,
            provisional: None,
            verify: verify.to_vec(),
            hooks: true,
            quiet: false,
            settle,
        },
        Some(&mut signals),
        &mut p,
    )?;
    Ok(report)
}

/// One row of `dream releases`.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseInfo {
    pub id: String,
    pub current: bool,
    /// `current`, `ok`, `bad`, `rolled back` (left by a rollback: skipped
    /// by the next automatic one).
    pub state: &'static str,
    pub staged: Option<String>,
    pub age_s: Option<f64>,
    pub files: u64,
    pub bytes: u64,
}

/// `dream releases`.
pub fn list(root: &Path) -> Vec<ReleaseInfo> {
    let store = Store::new(root);
    let history = store.history();
    let current = store.current();
    let bad = store.bad();
    let left = store.rolled_back();
    store
        .ordered()
        .into_iter()
        .map(|id| {
            let staged = history
                .iter()
                .find(|e| e.event == EventKind::Staged && e.release == id)
                .map(|e| e.time.clone());
            let age_s = staged
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                .map(|d| d.as_secs_f64());
            let (bytes, files) = release::tree_size(&store.release_dir(&id));
            let is_current = current.as_deref() == Some(id.as_str());
            ReleaseInfo {
                state: if is_current {
                    "current"
                } else if bad.contains(&id) {
                    "bad"
                } else if left.contains(&id) {
                    "rolled back"
                } else {
                    "ok"
                },
                current: is_current,
                id,
                staged,
                age_s,
                files,
                bytes,
            }
        })
        .collect()
}

/// One release checked against its manifest.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub id: String,
    pub ok: bool,
    pub entries: usize,
    /// One line per difference: `changed PATH`, `missing PATH`, …
    pub differences: Vec<String>,
}

/// Hashes every file of each release (or of `only`) and compares it with
/// the release's stored manifest.
pub fn verify(root: &Path, only: Option<&str>) -> Result<Vec<Verified>, DeployError> {
    let store = Store::new(root);
    let ids = match only {
        Some(id) => {
            if !store.release_dir(id).is_dir() {
                return Err(err(
                    Kind::Usage,
                    format!("no release {id} in {}", store.releases().display()),
                ));
            }
            vec![id.to_string()]
        }
        None => store.ordered(),
    };
    let mut out = Vec::new();
    for id in ids {
        let stored = match Manifest::load(&Store::new(root).manifest_path(&id)) {
            Ok(m) => m,
            Err(e) => {
                out.push(Verified {
                    id,
                    ok: false,
                    entries: 0,
                    differences: vec![format!("no manifest: {e}")],
                });
                continue;
            }
        };
        let actual = Manifest::of_tree(&store.release_dir(&id))
            .map_err(|e| io_failure(&format!("reading release {id}"), e))?;
        let differences = stored.differences(&actual);
        out.push(Verified {
            ok: differences.is_empty(),
            entries: stored.entries().len(),
            id,
            differences,
        });
    }
    Ok(out)
}

/// `1.5 MB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Switches `current` to a release prepared earlier (`go_live: false`)
/// and asks the supervisor for a reload, provisional if `provisional`;
/// the caller holds the deploy lock. Returns the live generation.
pub fn go_live_prepared(
    root: &Path,
    id: &str,
    provisional: Option<Provisional>,
    verify: &[String],
    settle: Duration,
    out: &mut dyn FnMut(&Step),
) -> Result<Report, DeployError> {
    let store = Store::new(root);
    release::check_id(id).map_err(|e| err(Kind::Usage, e))?;
    if !store.release_dir(id).is_dir() {
        return Err(err(Kind::Failed, format!("no prepared release {id}")));
    }
    let previous = store.current();
    let mut report = Report {
        release: id.to_string(),
        previous: previous.clone(),
        ..Report::default()
    };
    if previous.as_deref() == Some(id) {
        // Already live (a repeated fleet deploy converging): nothing to do.
        return Ok(report);
    }
    let mut p = Progress {
        started: Instant::now(),
        report: &mut report,
        out,
    };
    switch_reload_verify(
        &store,
        id,
        previous.as_deref(),
        EventKind::Switched,
        &ReloadHow {
            reload: true,
            provisional,
            verify: verify.to_vec(),
            hooks: true,
            quiet: true,
            settle,
        },
        None,
        &mut p,
    )?;
    Ok(report)
}

/// Asks the supervisor to keep provisional generation `generation`;
/// without a supervisor there is nothing to confirm.
pub fn confirm_generation(root: &Path, generation: Option<u64>) -> Result<(), DeployError> {
    let request = control::Request::Confirm { generation };
    match control::ask(root, &request, Some(Duration::from_secs(30))) {
        Ok(a) if a.ok => Ok(()),
        Ok(a) => Err(err(
            Kind::Failed,
            a.error.unwrap_or_else(|| "unknown error".into()),
        )),
        Err(control::ControlError::NotRunning { .. }) => Ok(()),
        Err(e) => Err(err(Kind::Temporary, e.to_string())),
    }
}

/// Keeps provisional generation `generation` provisional for `within`
/// from now (see [`control::Request::Extend`]).
pub fn extend_generation(
    root: &Path,
    generation: u64,
    within: Duration,
) -> Result<(), DeployError> {
    let request = control::Request::Extend {
        generation,
        within_ms: within.as_millis() as u64,
    };
    match control::ask(root, &request, Some(Duration::from_secs(5))) {
        Ok(a) if a.ok => Ok(()),
        Ok(a) => Err(err(
            Kind::Failed,
            a.error.unwrap_or_else(|| "unknown error".into()),
        )),
        Err(e) => Err(err(Kind::Temporary, e.to_string())),
    }
}

/// Puts a host back on `to` after a fleet decided against `from`: `current`
/// switched back (if it names `from`), `from` marked bad with `reason`, and
/// a reload. The caller holds the deploy lock.
pub fn revert_to(root: &Path, from: &str, to: &str, reason: &str) -> Result<(), DeployError> {
    let store = Store::new(root);
    let mut bad = Event::new(EventKind::Failed, from);
    bad.reason = Some(reason.to_string());
    let _ = store.append(&bad);
    if store.current().as_deref() == Some(from) {
        store
            .switch(to)
            .map_err(|e| io_failure("switching current back", e))?;
        let mut ev = Event::new(EventKind::Switched, to);
        ev.previous = Some(from.to_string());
        ev.reason = Some(reason.to_string());
        let _ = store.append(&ev);
    }
    let request = control::Request::Reload {
        confirm_within_ms: None,
    };
    match control::ask(&store.root, &request, Some(reload_deadline(&store))) {
        Ok(a) if a.ok => Ok(()),
        Ok(a) => Err(err(
            Kind::Failed,
            format!(
                "reload of {to} failed: {}",
                a.error.unwrap_or_else(|| "unknown error".into())
            ),
        )),
        Err(control::ControlError::NotRunning { .. }) => Ok(()),
        Err(e) => Err(err(Kind::Temporary, e.to_string())),
    }
}

/// What `deploy --dry-run` would do: nothing is written and no lock taken.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub release: String,
    pub previous: Option<String>,
    pub files: u64,
    pub bytes: u64,
    /// Unchanged since the previous release (same path, content and mode):
    /// shared with it rather than copied.
    pub shared_files: u64,
    pub shared_bytes: u64,
    /// New or changed: copied.
    pub copied_files: u64,
    pub copied_bytes: u64,
    pub excluded: Vec<String>,
    pub build: Option<String>,
    /// `current` would name the new release, and the supervisor reload.
    pub switch: String,
}

/// `deploy --dry-run` for a directory source: hashes it (with the same
/// exclusions) and compares it with the current release's manifest.
pub fn plan(opts: &DeployOptions) -> Result<Plan, DeployError> {
    let Source::Dir(src) = &opts.source else {
        return Err(err(
            Kind::Usage,
            "--dry-run needs a directory source (a tarball or a git revision is only known once staged)",
        ));
    };
    refuse_source_in_root(&opts.source, &opts.root)?;
    let exclude =
        stage::Exclude::new(src, &opts.exclude, opts.keep_git).map_err(|e| err(Kind::Usage, e))?;
    // Modes as the frozen release will have them, as staging records
    // them: the digest, and so the id, is the one the deploy will make.
    let m = Manifest::of_tree_but(src, &|rel, dir| exclude.leaves_out(rel, dir))
        .map_err(|e| io_failure(&format!("reading {}", src.display()), e))?
        .frozen();
    let store = Store::new(&opts.root);
    let previous = store.current();
    let prev = previous
        .as_ref()
        .and_then(|id| Manifest::load(&store.manifest_path(id)).ok());
    let prev_index = prev.as_ref().map(|m| m.index());
    let mut plan = Plan {
        release: opts
            .id
            .clone()
            .unwrap_or_else(|| unused_id(&store, &m.digest()[..8])),
        previous: previous.clone(),
        files: 0,
        bytes: 0,
        shared_files: 0,
        shared_bytes: 0,
        copied_files: 0,
        copied_bytes: 0,
        excluded: exclude
            .left_out()
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        build: opts.build.clone(),
        switch: String::new(),
    };
    for e in m.entries() {
        let crate::manifest::Kind::File { mode, size, hash } = &e.kind else {
            continue;
        };
        plan.files += 1;
        plan.bytes += size;
        let same = prev_index.as_ref().is_some_and(|idx| {
            matches!(idx.get(e.path.as_path()),
                Some(crate::manifest::Kind::File { mode: m, hash: h, .. })
                    if h == hash && stage::frozen_mode(false, *m) == stage::frozen_mode(false, *mode))
        });
        // With a build, sharing is judged after it; before, it is a guess.
        if same && opts.build.is_none() {
            plan.shared_files += 1;
            plan.shared_bytes += size;
        } else {
            plan.copied_files += 1;
            plan.copied_bytes += size;
        }
    }
    plan.switch = format!(
        "current: {} -> {}{}",
        previous.as_deref().unwrap_or("nothing"),
        plan.release,
        if opts.reload {
            ", then the supervisor reloads (if one runs)"
        } else {
            " (no reload)"
        }
    );
    Ok(plan)
}

/// The release a rollback goes to: `id`, or the previous good one.
pub fn rollback_target(store: &Store, id: Option<&str>) -> Result<String, DeployError> {
    match id {
        Some(id) => {
            release::check_id(id).map_err(|e| err(Kind::Usage, e))?;
            if !store.release_dir(id).is_dir() {
                return Err(err(
                    Kind::Usage,
                    format!("no release {id} in {}", store.releases().display()),
                ));
            }
            Ok(id.to_string())
        }
        None => store.previous_good().ok_or_else(|| {
            err(
                Kind::Failed,
                "no previous good release to roll back to (see dream releases)",
            )
        }),
    }
}
