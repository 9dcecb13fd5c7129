//! The release store: `ROOT/releases/<id>`, the `current` symlink, and the
//! append-only history.
//!
//! Going live is one `rename(2)` of a symlink over `current`, followed by an
//! fsync of the root directory, so a crash leaves `current` naming either
//! the old release or the new one, never neither. Release order comes from
//! the history, never from modification times.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// What happened to a release, as `.dream/history` names it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Staged into `.dream/staging` (its id is taken from then on).
    Staged,
    /// `current` now names it. With a reason: switched back to after
    /// another release did not go live, which does not count as going live.
    Switched,
    /// Its deploy failed: it is bad, and skipped by rollbacks.
    Failed,
    /// An automatic rollback went to it; the release it left is skipped
    /// by the next automatic rollback.
    RolledBack,
    /// A rollback to it by name; marks nothing.
    RolledBackNamed,
    /// The supervisor reverted it (it crashed on probation, or was not
    /// confirmed in time): it is bad, like a failed deploy.
    Reverted,
    /// A canary of it started beside the live release (`previous`): a
    /// share of new connections, judged against it.
    Canary,
    /// The judge promoted its canary (`reason`: the figures); its full
    /// generation starts.
    Promoted,
    /// A fleet deploy decided it: live on every host (recorded on the
    /// fleet's primary host).
    FleetCommitted,
    /// Removed by pruning.
    Pruned,
    /// Written by a newer dream; ignored.
    #[serde(other)]
    Other,
}

impl EventKind {
    /// Whether the release went live by this event (a switch back after a
    /// failure carries a reason and does not count).
    fn went_live(self, e: &Event) -> bool {
        matches!(
            self,
            EventKind::Switched | EventKind::RolledBack | EventKind::RolledBackNamed
        ) && e.reason.is_none()
    }
}

/// One line of `.dream/history`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    pub time: String,
    pub event: EventKind,
    pub release: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Event {
    pub fn new(event: EventKind, release: &str) -> Event {
        Event {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
            release: release.into(),
            previous: None,
            reason: None,
        }
    }
}

/// Checks a release id: `[A-Za-z0-9._-]`, not starting with `.`, at most
/// 128 bytes.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!("release id {id:?} must be 1 to 128 characters"));
    }
    if id == "current" {
        return Err("release id \"current\" is reserved (it is the name of the live link)".into());
    }
    if id.starts_with('.') || id.starts_with('-') {
        return Err(format!(
            "release id {id:?} must not start with '{}' (it would read as a hidden file or an option)",
            &id[..1]
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return Err(format!(
            "release id {:?} has {c:?}: use letters, digits, '.', '_' and '-'",
            id.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// A release by id and directory: what `current` resolves to, and what a
/// generation of the supervisor runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub id: String,
    pub dir: PathBuf,
}

/// The deploy root's release store.
#[derive(Debug, Clone)]
pub struct Store {
    pub root: PathBuf,
}

impl Store {
    pub fn new(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
        }
    }

    pub fn releases(&self) -> PathBuf {
        self.root.join("releases")
    }

    pub fn release_dir(&self, id: &str) -> PathBuf {
        self.releases().join(id)
    }

    pub fn state(&self) -> PathBuf {
        self.root.join(".dream")
    }

    pub fn staging(&self) -> PathBuf {
        self.state().join("staging")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.state().join("lock")
    }

    pub fn history_path(&self) -> PathBuf {
        self.state().join("history")
    }

    pub fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }

    /// `.dream/notify/`, where workers' notify sockets are files.
    pub fn notify_dir(&self) -> PathBuf {
        self.state().join("notify")
    }

    /// `.dream/control.sock`, where the supervisor answers.
    pub fn control_socket(&self) -> PathBuf {
        self.state().join("control.sock")
    }

    /// `.dream/manifests/`, one manifest per release.
    pub fn manifests(&self) -> PathBuf {
        self.state().join("manifests")
    }

    /// The stored manifest of release `id`.
    pub fn manifest_path(&self, id: &str) -> PathBuf {
        self.manifests().join(id)
    }

    /// What `current` names: the release's id and its real directory.
    /// The one place `current` is resolved; the supervisor starts each
    /// generation in the directory this returns, so a later switch never
    /// moves a running generation.
    pub fn resolve_current(&self) -> Result<Release, String> {
        let current = self.current_link();
        let dir = fs::canonicalize(&current).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                format!(
                    "{} does not exist: deploy a release first (dream deploy SOURCE --root {})",
                    current.display(),
                    self.root.display()
                )
            } else {
                format!("cannot resolve {}: {e}", current.display())
            }
        })?;
        if !dir.is_dir() {
            return Err(format!("{} is not a directory", current.display()));
        }
        let id = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Only a release of this root is ever served: a `current` planted
        // to name any other directory starts nothing.
        let releases = fs::canonicalize(self.releases()).ok();
        if dir.parent() != releases.as_deref() || check_id(&id).is_err() {
            return Err(format!(
                "{} names {}, which is not a release in {}: nothing started (point it at releases/<id>, or deploy)",
                current.display(),
                crate::logtext::value(&dir.to_string_lossy()),
                self.releases().display()
            ));
        }
        Ok(Release { id, dir })
    }

    /// Creates `releases/` and `.dream/`; refuses a root that someone else
    /// could have prepared (see [`trusted_dir`]) and a `current` that is a
    /// real directory (it cannot be replaced atomically).
    pub fn prepare(&self) -> io::Result<()> {
        if !self.root.exists() {
            fs::create_dir_all(&self.root)?;
        }
        trusted_dir(&self.root, true)?;
        // `.dream/hooks` too: there to drop a hook into, and (like the
        // rest) refused when others could write to it, since what is in it
        // runs as the deployer.
        for dir in [
            self.state(),
            self.staging(),
            self.releases(),
            self.state().join("hooks"),
        ] {
            trusted_subdir(&dir)?;
        }
        if let Ok(meta) = fs::symlink_metadata(self.current_link())
            && !meta.file_type().is_symlink()
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} is a real {}, not a symlink: move it into {}/<id> and make current a symlink to it (ln -s releases/<id> current), then deploy again",
                    self.current_link().display(),
                    if meta.is_dir() { "directory" } else { "file" },
                    self.releases().display()
                ),
            ));
        }
        Ok(())
    }

    /// The id `current` points at, if it points into `releases/`.
    pub fn current(&self) -> Option<String> {
        let release = self.resolve_current().ok()?;
        let releases = fs::canonicalize(self.releases()).ok()?;
        (release.dir.parent() == Some(releases.as_path())).then_some(release.id)
    }

    /// The whole history, oldest first; unreadable lines are skipped.
    pub fn history(&self) -> Vec<Event> {
        let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.history_path())
        else {
            return Vec::new();
        };
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    /// Appends one event, whole or not at all, and makes it durable.
    ///
    /// The line goes out in one `write(2)`; if that fails or is short (a
    /// full disk), the file is cut back to where it was, so a later event
    /// never merges into a torn line. A torn last line left by an older
    /// crash is cut off first. Only the deploy lock's holder appends.
    pub fn append(&self, event: &Event) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.history_path())?;
        let mut len = f.metadata()?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            f.read_exact_at(&mut last, len - 1)?;
            if last[0] != b'\n' {
                // Find the last complete line and cut what follows it.
                let keep = last_newline(&mut f, len)?;
                f.set_len(keep)?;
                len = keep;
            }
        }
        let mut line = serde_json::to_string(event).map_err(io::Error::other)?;
        line.push('\n');
        let written = f.write(line.as_bytes());
        if !matches!(written, Ok(n) if n == line.len()) {
            let _ = f.set_len(len);
            return Err(match written {
                Err(e) => e,
                Ok(_) => io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        if let Err(e) = f.sync_data() {
            let _ = f.set_len(len);
            return Err(e);
        }
        Ok(())
    }

    /// The judge's figures from the last promotion of `id`'s canary.
    pub fn promotion(&self, id: &str) -> Option<String> {
        self.history()
            .into_iter()
            .rev()
            .find(|e| e.event == EventKind::Promoted && e.release == id)
            .and_then(|e| e.reason)
    }

    /// Releases whose deploy failed (marked bad), unless switched to
    /// successfully later.
    pub fn bad(&self) -> HashSet<String> {
        let mut bad = HashSet::new();
        for e in self.history() {
            if matches!(e.event, EventKind::Failed | EventKind::Reverted) {
                bad.insert(e.release);
            } else if e.event.went_live(&e) {
                bad.remove(&e.release);
            }
        }
        bad
    }

    /// Every id ever used (staged), so ids are never reused.
    pub fn used_ids(&self) -> HashSet<String> {
        let mut ids: HashSet<String> = self.history().into_iter().map(|e| e.release).collect();
        if let Ok(rd) = fs::read_dir(self.releases()) {
            ids.extend(
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string)),
            );
        }
        ids
    }

    /// Release ids in the order they were staged (history), then any
    /// present but unknown to the history, by name.
    pub fn ordered(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in self.history() {
            if e.event == EventKind::Staged && !out.contains(&e.release) {
                out.push(e.release);
            }
        }
        let mut extra: Vec<String> = fs::read_dir(self.releases())
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| !out.contains(n) && check_id(n).is_ok())
                    .collect()
            })
            .unwrap_or_default();
        extra.sort();
        out.extend(extra);
        out.retain(|id| self.release_dir(id).is_dir());
        out
    }

    /// The releases that were live, most recent last (from `switched` and
    /// `rolled_back` events).
    pub fn went_live(&self) -> Vec<String> {
        self.history()
            .into_iter()
            .filter(|e| e.event.went_live(e))
            .map(|e| e.release)
            .collect()
    }

    /// Releases that a rollback left (and that did not go live again
    /// since): an automatic rollback skips them, so two rollbacks in a row
    /// go two steps back, never forward to the release just left.
    pub fn rolled_back(&self) -> HashSet<String> {
        let mut left = HashSet::new();
        for e in self.history() {
            if !e.event.went_live(&e) {
                continue;
            }
            left.remove(&e.release);
            // A release named by hand, or deployed anew, is wanted again;
            // what a named rollback leaves is not marked.
            if e.event == EventKind::RolledBack
                && let Some(p) = e.previous
            {
                left.insert(p);
            }
        }
        left
    }

    /// The release to roll back to: the most recent one that was live
    /// before the current one, not bad, not left by a rollback, still
    /// present.
    pub fn previous_good(&self) -> Option<String> {
        let current = self.current();
        let bad = self.bad();
        let left = self.rolled_back();
        self.went_live()
            .into_iter()
            .rev()
            .filter(|id| Some(id) != current.as_ref() && !bad.contains(id) && !left.contains(id))
            .find(|id| self.release_dir(id).is_dir())
    }

    /// Puts `current` back from `from` to `to`, if it still names `from`,
    /// and records it: a `switched` event with `previous` = `from` and the
    /// reason (a switch back, which does not count as going live).
    /// `Ok(false)`: `current` named something else, and nothing was done.
    /// The one switch back: a deploy whose release did not go live, a
    /// fleet's revert, the supervisor's.
    pub fn switch_back(&self, from: &str, to: &str, reason: String) -> io::Result<bool> {
        if self.current().as_deref() != Some(from) {
            return Ok(false);
        }
        self.switch(to)?;
        let mut ev = Event::new(EventKind::Switched, to);
        ev.previous = Some(from.to_string());
        ev.reason = Some(reason);
        let _ = self.append(&ev);
        Ok(true)
    }

    /// Points `current` at `releases/<id>`: a temporary symlink renamed
    /// over `current`, then an fsync of the root directory. Returns how
    /// long the switch took.
    pub fn switch(&self, id: &str) -> io::Result<Duration> {
        let started = Instant::now();
        // The one gate every switch passes: `current` only ever names a
        // real directory `releases/<valid id>`.
        check_id(id).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        match fs::symlink_metadata(self.release_dir(id)) {
            Ok(m) if m.is_dir() => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no release {id} in {}", self.releases().display()),
                ));
            }
        }
        let tmp = self
            .root
            .join(format!(".current.dream-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("releases").join(id), &tmp)?;
        if let Err(e) = fs::rename(&tmp, self.current_link()) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fsync_dir(&self.root)?;
        Ok(started.elapsed())
    }
}

/// The length of `f` up to and including its last newline (0 if none),
/// read backwards in blocks.
fn last_newline(f: &mut File, len: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut end = len;
    let mut buf = vec![0u8; 8192];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        f.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Refuses a directory of the deploy root that another user could have
/// prepared against us: one not owned by us or root, or writable by group
/// or others, or (unless `follow`) a symlink. A root prepared by another
/// user could otherwise point `.dream/staging`, `.dream/lock` or
/// `.dream/history` at files of ours and have our deploy empty, replace or
/// append to them. The error says why and how to fix it, in one line.
pub fn trusted_dir(dir: &Path, follow: bool) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = if follow {
        fs::metadata(dir)?
    } else {
        fs::symlink_metadata(dir)?
    };
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing {}: {why}", dir.display()),
        ))
    };
    if meta.file_type().is_symlink() {
        return refuse("it is a symlink (dream never follows one inside a deploy root)".into());
    }
    if !meta.is_dir() {
        return refuse("it is not a directory".into());
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return refuse(format!(
            "it is owned by uid {}, not by you (uid {me}) or root; chown it, or deploy as its owner",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return refuse(format!(
            "it is writable by {} (mode {:o}); chmod go-w it",
            if meta.mode() & 0o002 != 0 {
                "others"
            } else {
                "its group"
            },
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Creates directory `dir` of a deploy root if it is missing (never
/// through a symlink: `mkdir` does not follow one) and checks it with
/// [`trusted_dir`], without following.
pub fn trusted_subdir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    trusted_dir(dir, false)
}

/// fsync(2) of a directory, making renames and creations in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes a tree writable again (releases are frozen read-only), so that it
/// can be removed.
pub fn thaw(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        let mode = meta.permissions().mode();
        if mode & 0o700 != 0o700 {
            fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o700))?;
        }
        for e in fs::read_dir(path)?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                thaw(&e.path())?;
            }
        }
    }
    Ok(())
}

/// Removes a release tree, frozen or not.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match thaw(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        r => r?,
    }
    fs::remove_dir_all(path)
}

/// Removes write permission from everything below `dir` (not `dir`
/// itself, which is frozen last, after it is renamed into place).
pub fn freeze_below(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let meta = fs::symlink_metadata(e.path())?;
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.is_dir() {
            freeze_below(&e.path())?;
        }
        let mode = meta.permissions().mode();
        if mode & 0o222 != 0 {
            fs::set_permissions(e.path(), fs::Permissions::from_mode(mode & !0o222))?;
        }
    }
    Ok(())
}

/// Removes write permission from `dir` itself.
pub fn freeze_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(dir)?.permissions().mode();
    fs::set_permissions(dir, fs::Permissions::from_mode(mode & !0o222))
}

/// Apparent size in bytes and number of files of a tree.
pub fn tree_size(dir: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else {
                files += 1;
                bytes += meta.len();
            }
        }
    }
    (bytes, files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "20261126T145506Z-1a2b3c4", "v1.2.3", "x_y-z"] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-rf",
            "--help",
            "current",
            "..",
            "a/b",
            "../x",
            "a b",
            "a\nb",
            "é",
            &"x".repeat(129),
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn switch_is_a_rename_and_history_orders_releases() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.prepare().unwrap();
        for id in ["b", "a"] {
            fs::create_dir(store.release_dir(id)).unwrap();
            store.append(&Event::new(EventKind::Staged, id)).unwrap();
        }
        store.switch("b").unwrap();
        store.append(&Event::new(EventKind::Switched, "b")).unwrap();
        assert_eq!(store.current().as_deref(), Some("b"));
        store.switch("a").unwrap();
        store.append(&Event::new(EventKind::Switched, "a")).unwrap();
        assert_eq!(
            fs::read_link(store.current_link()).unwrap(),
            Path::new("releases/a")
        );
        assert_eq!(store.ordered(), vec!["b", "a"], "staging order, not names");
        assert_eq!(store.previous_good().as_deref(), Some("b"));
        store.append(&Event::new(EventKind::Failed, "b")).unwrap();
        assert_eq!(store.previous_good(), None, "bad releases are skipped");
        // No temporary links are left.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn a_switch_back_happens_only_from_the_release_current_still_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.prepare().unwrap();
        for id in ["a", "b", "c"] {
            fs::create_dir(store.release_dir(id)).unwrap();
        }
        store.switch("b").unwrap();
        // Someone else already moved on: nothing is done, nothing recorded.
        assert!(!store.switch_back("c", "a", "late".into()).unwrap());
        assert_eq!(store.current().as_deref(), Some("b"));
        assert!(store.history().is_empty());
        assert!(store.switch_back("b", "a", "b failed".into()).unwrap());
        assert_eq!(store.current().as_deref(), Some("a"));
        let ev = store.history().pop().unwrap();
        assert_eq!(
            (
                ev.event,
                ev.release.as_str(),
                ev.previous.as_deref(),
                ev.reason.as_deref()
            ),
            (EventKind::Switched, "a", Some("b"), Some("b failed"))
        );
        assert!(store.switch_back("b", "nope", "x".into()).is_ok_and(|d| !d));
    }

    #[test]
    fn readers_never_see_a_missing_current_during_switches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.prepare().unwrap();
        for id in ["a", "b"] {
            fs::create_dir(store.release_dir(id)).unwrap();
            fs::write(store.release_dir(id).join("index.html"), id).unwrap();
        }
        store.switch("a").unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let path = store.current_link().join("index.html");
        let reader = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let text = fs::read_to_string(&path).expect("current/index.html always opens");
                    assert!(text == "a" || text == "b");
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..2000 {
            store.switch(if i % 2 == 0 { "b" } else { "a" }).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }

    /// A crash mid-append left a torn last line, and the next event merged
    /// into it and was lost. The torn line is cut off on the next append.
    #[test]
    fn a_torn_last_line_is_cut_and_later_events_stay_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.prepare().unwrap();
        store.append(&Event::new(EventKind::Staged, "a")).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(store.history_path())
            .unwrap();
        f.write_all(br#"{"time":"2026-01-01T00:00:00Z","event":"swi"#)
            .unwrap();
        drop(f);
        store.append(&Event::new(EventKind::Switched, "a")).unwrap();
        let events: Vec<_> = store.history().into_iter().map(|e| e.event).collect();
        assert_eq!(events, [EventKind::Staged, EventKind::Switched]);
        let text = fs::read_to_string(store.history_path()).unwrap();
        assert!(text.ends_with('\n') && text.lines().count() == 2, "{text}");
    }

    #[test]
    fn a_real_current_directory_is_refused_with_guidance() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("current")).unwrap();
        let err = Store::new(dir.path()).prepare().unwrap_err();
        assert!(err.to_string().contains("not a symlink"), "{err}");
    }
}
