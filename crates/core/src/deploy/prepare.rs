//! Phase one: the source becomes a sealed release under `releases/`:
//! staged (copied, extracted or checked out, and hashed), built, its links
//! checked, shared with the previous release, frozen, its manifest written
//! and synced, and renamed into place.

use super::*;

impl Pipeline<'_, '_> {
    /// Copies, extracts or checks out the source into staging, hashing it;
    /// picks the id; records the holder and the `staged` event.
    pub(super) fn stage(
        &mut self,
        lock: &mut Lock,
        prev: Option<&Manifest>,
    ) -> Result<Staged, DeployError> {
        let (opts, store, staged) = (self.opts, self.store, self.staged.as_path());
        let max_bytes = match opts.max_size {
            Some(n) => n,
            None => free_space(&store.root).map_err(|e| io_failure("free space", e))?,
        };
        let prev_pair = self.prev_dir.as_deref().zip(prev);
        let over_limit = |e| over_limit(opts.max_size, e);
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
            Source::Objects { manifest, objects } => self
                .stage_objects(manifest, objects, prev_pair, max_bytes)
                .map_err(over_limit)?,
            Source::Git { url, rev } => {
                let (stats, m, hash) = self.checkout(url, rev.as_deref(), max_bytes)?;
                git_hash = Some(hash);
                (stats, m)
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

    /// A fleet's release: its manifest, the objects the coordinator sent,
    /// and what the current release already holds (shared without a
    /// build, copied with one).
    fn stage_objects(
        &self,
        manifest: &Path,
        objects: &Path,
        prev_pair: Option<(&Path, &Manifest)>,
        max_bytes: u64,
    ) -> Result<(Stats, Manifest), StageError> {
        let m = Manifest::load(manifest).map_err(|e| StageError::Io {
            path: manifest.to_path_buf(),
            source: e,
        })?;
        // What the current release holds is not sent: taken from
        // it (shared, without a build; copied, with one).
        let local: std::collections::HashMap<crate::store::manifest::Hash, (PathBuf, u32)> =
            prev_pair
                .map(|(dir, pm)| {
                    pm.entries()
                        .iter()
                        .filter_map(|e| match &e.kind {
                            crate::store::manifest::Kind::File { hash, mode, .. } => {
                                Some((*hash, (dir.join(&e.path), *mode)))
                            }
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
        let content = |h: &crate::store::manifest::Hash| {
            let o = objects.join(crate::store::manifest::hex(h));
            if o.is_file() {
                Some(o)
            } else {
                local.get(h).map(|(p, _)| p.clone())
            }
        };
        let share = |h: &crate::store::manifest::Hash, frozen: u32| {
            local
                .get(h)
                .filter(|(_, m)| stage::frozen_mode(false, *m) == frozen)
                .map(|(p, _)| p.clone())
        };
        let share: Option<&stage::ShareFrom<'_>> = if self.direct() { Some(&share) } else { None };
        stage::from_manifest(&m, &content, share, &self.staged, max_bytes)
    }

    /// A git revision checked out and hashed; its commit names the id.
    fn checkout(
        &mut self,
        url: &str,
        rev: Option<&str>,
        max_bytes: u64,
    ) -> Result<(Stats, Manifest, String), DeployError> {
        let staged = self.staged.clone();
        let h = stage::git_checkout(url, rev, &staged, max_bytes, self.signals.as_mut())
            .map_err(|e| over_limit(self.opts.max_size, e))?;
        let (bytes, files) = release::tree_size(&staged);
        if bytes > max_bytes {
            return Err(err(
                Kind::Failed,
                format!(
                    "refused: the checkout holds {bytes} bytes, more than {max_bytes} (--max-size)"
                ),
            ));
        }
        let m = Manifest::of_tree(&staged).map_err(|e| io_failure("hashing the checkout", e))?;
        let stats = Stats {
            files,
            bytes,
            ..Stats::default()
        };
        Ok((stats, self.leave_out(m)?, h))
    }

    /// Runs `--build`, if any; a failure marks the release bad.
    pub(super) fn build(&mut self, id: &str) -> Result<(), DeployError> {
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
    pub(super) fn seal(
        &mut self,
        staged: Staged,
        prev: Option<&Manifest>,
    ) -> Result<String, DeployError> {
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
        sync_tree(&dir, self.direct()).map_err(|e| io_failure("syncing the release", e))?;
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
    pub(super) fn leave_out(&mut self, m: Manifest) -> Result<Manifest, DeployError> {
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
}

/// A directory source that is the deploy root, contains it, or lies
/// inside it would be copied into itself (staging is inside ROOT): refused
/// at once, exit 100.
pub(super) fn refuse_source_in_root(source: &Source, root: &Path) -> Result<(), DeployError> {
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
pub(super) fn with_shared_links(m: &Manifest, names: &[String]) -> Manifest {
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
pub(super) fn refuse_escaping_links(staged: &Path) -> Result<(), DeployError> {
    let bad = crate::store::tree::links_escaping(staged)
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
pub(super) fn link_shared(store: &Store, staged: &Path) -> std::io::Result<Vec<String>> {
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

/// Runs the build (a shell command) in the staged release, as every child
/// of a deploy runs ([`crate::child`]): its own process group, the
/// parent-death signal, output streamed (each line shown unless quiet,
/// the last ones kept for a failure report); an INT, TERM or HUP to the
/// deploy ends the build's whole group and the deploy (which then removes
/// its staging) with 128 + the signal.
pub(super) fn run_build(
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
        crate::child::Ended::TimedOut { tail } => (
            crate::exit::Exit::Signal {
                signal: libc::SIGKILL,
                core: false,
            },
            tail,
        ),
    };
    if status.success() {
        return Ok(());
    }
    let how = status;
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
pub(super) fn free_space(dir: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir)?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Past this many files and directories to sync one by one, a release is
/// made durable with one `syncfs(2)` instead.
const SYNC_ONE_BY_ONE: usize = 512;
/// Threads syncing files one by one.
const SYNC_THREADS: usize = 8;

/// Makes the staged release durable. Staged straight from a directory or a
/// fleet's objects (`only_written`: no build, nothing bridged), it holds two
/// kinds of file: links to the previous release's files (a link count of 2
/// or more, durable since that release was made) and files written here (a
/// count of 1): those and the directories are synced one by one, which
/// costs what this release wrote and nothing else. Otherwise, or past
/// [`SYNC_ONE_BY_ONE`] of them, one `syncfs(2)` of the filesystem: cheaper
/// for a large release, but it also writes whatever else waits on that
/// filesystem (another program's 1.5 GB, not yet written back, made a
/// deploy of one changed file take 2.2 s instead of 0.01 s).
pub(super) fn sync_tree(dir: &Path, only_written: bool) -> std::io::Result<()> {
    let one_by_one = if only_written {
        written_below(dir, SYNC_ONE_BY_ONE)?
    } else {
        None
    };
    match one_by_one {
        // On a few threads: syncs that wait together share the
        // filesystem's journal commits and the disk's cache flushes.
        Some(paths) => {
            let next = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                let workers: Vec<_> = (0..SYNC_THREADS)
                    .map(|_| {
                        s.spawn(|| -> std::io::Result<()> {
                            while let Some(p) =
                                paths.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                            {
                                std::fs::File::open(p)?.sync_all()?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .try_for_each(|w| w.join().expect("a sync thread panicked"))
            })?;
        }
        None => nix::unistd::syncfs(&std::fs::File::open(dir)?)?,
    }
    Ok(())
}

/// The directories below `dir` (itself included) and its regular files
/// with a single link, deepest first; `None` past `limit` of them.
fn written_below(dir: &Path, limit: usize) -> std::io::Result<Option<Vec<PathBuf>>> {
    use std::os::unix::fs::MetadataExt;
    let mut found = vec![(dir.to_path_buf(), true)];
    let mut i = 0;
    while i < found.len() {
        let (here, is_dir) = found[i].clone();
        i += 1;
        if !is_dir {
            continue;
        }
        for e in std::fs::read_dir(&here)? {
            let e = e?;
            let kind = e.file_type()?;
            if kind.is_dir() || (kind.is_file() && e.metadata()?.nlink() == 1) {
                found.push((e.path(), kind.is_dir()));
                if found.len() > limit {
                    return Ok(None);
                }
            }
        }
    }
    Ok(Some(found.into_iter().rev().map(|(p, _)| p).collect()))
}

/// Over the limit: with --max-size a refusal (exit 1); with the default,
/// the free space, a full disk (exit 111: free space and retry).
fn over_limit(max_size: Option<u64>, e: StageError) -> DeployError {
    match e {
        StageError::TooBig { limit, needs } if max_size.is_none() => err(
            Kind::Temporary,
            format!(
                "staging: No space left on device: the release needs more than the {limit} bytes free on ROOT's filesystem{}; nothing was written past that. Free some space and retry, or set --max-size",
                needs
                    .map(|n| format!(" ({n} bytes of files)"))
                    .unwrap_or_default()
            ),
        ),
        e => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a release staged straight from its source syncs one by one:
    /// every directory and every file written for it, never a file it
    /// shares with the release before (durable since that one was made),
    /// deepest first; and nothing once the count passes the limit.
    #[test]
    fn a_release_syncs_what_it_wrote_and_no_shared_file() {
        let t = tempfile::tempdir().unwrap();
        let (prev, new) = (t.path().join("prev"), t.path().join("new"));
        std::fs::create_dir_all(prev.join("a")).unwrap();
        std::fs::create_dir_all(new.join("a/b c")).unwrap();
        std::fs::write(prev.join("a/kept"), b"old").unwrap();
        std::fs::hard_link(prev.join("a/kept"), new.join("a/kept")).unwrap();
        std::fs::write(new.join("a/b c/written\n"), b"new").unwrap();
        std::fs::write(new.join("top"), b"new").unwrap();
        std::os::unix::fs::symlink("top", new.join("link")).unwrap();
        let got = written_below(&new, 100).unwrap().unwrap();
        let rel: Vec<_> = got
            .iter()
            .map(|p| p.strip_prefix(&new).unwrap().to_string_lossy().into_owned())
            .collect();
        let mut sorted = rel.clone();
        sorted.sort();
        assert_eq!(sorted, ["", "a", "a/b c", "a/b c/written\n", "top"]);
        // Deepest first: a file before its directory, a directory before
        // its parent.
        let at = |s: &str| rel.iter().position(|r| r == s).unwrap();
        assert!(at("a/b c/written\n") < at("a/b c") && at("a/b c") < at("a") && at("a") < at(""));
        assert!(written_below(&new, 4).unwrap().is_none());
        sync_tree(&new, true).unwrap();
        sync_tree(&new, false).unwrap();
    }
}
