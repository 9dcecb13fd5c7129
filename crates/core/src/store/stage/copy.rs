//! A directory source: copied into the release, each file hashed as it
//! is read, and shared with the previous release where identical.

use super::*;

/// How [`copy_dir`] treats the copy.
#[derive(Clone, Copy)]
pub struct CopyOptions<'a> {
    /// Paths the release leaves out.
    pub exclude: Option<&'a Exclude>,
    /// Share files whose content hash and mode equal this release's
    /// manifest entry (the release's directory and its manifest) instead
    /// of copying them.
    pub share_from: Option<(&'a Path, &'a Manifest)>,
    /// Make everything below `dst` read-only as it is written (when no build
    /// step will write to it), saving a second walk over the tree.
    pub freeze: bool,
    /// Most bytes of file content the release may hold.
    pub max_bytes: u64,
}

/// Copies directory `src` into `dst` (which must not exist), hashing every
/// file as it goes; returns what it did and the manifest of the copy (modes
/// as the frozen release will have them).
///
/// A file is read once: when the previous release has a file of the same
/// size and mode at the same path, the source is read only to hash it, and
/// shared if the hashes are equal (else copied); otherwise it is copied and
/// hashed in the same pass.
pub fn copy_dir(
    src: &Path,
    dst: &Path,
    opts: CopyOptions<'_>,
) -> Result<(Stats, Manifest), StageError> {
    let mut stats = Stats::default();
    let mut entries = Vec::new();
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    fs::create_dir(dst).map_err(io_at(dst))?;
    let tree = Tree::open(dst).map_err(io_at(dst))?;
    // The tree first (directories, links, the list of files), then the
    // files, on a few threads: most of the time is reading and hashing,
    // which the cores can share.
    walk_source(
        src,
        dst,
        Path::new(""),
        &opts,
        &mut stats,
        &mut entries,
        &mut files,
        &mut dirs,
    )?;
    let prev = opts.share_from.map(|(dir, m)| (dir, m.index()));
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<(Vec<Entry>, Stats), StageError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    let mut st = Stats::default();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((rel, meta)) = files.get(i) else {
                            return Ok((out, st));
                        };
                        out.push(copy_one(
                            src,
                            &tree,
                            rel,
                            meta,
                            &opts,
                            prev.as_ref(),
                            &mut st,
                        )?);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a staging thread panicked"))
            .collect()
    });
    for r in results {
        let (e, st) = r?;
        entries.extend(e);
        stats.shared_files += st.shared_files;
        stats.shared_bytes += st.shared_bytes;
        stats.reflinked_files += st.reflinked_files;
    }
    // Directories get their final modes last, deepest first (a frozen
    // directory could not be written into).
    dirs.sort_by_key(|(rel, _): &(PathBuf, u32)| std::cmp::Reverse(rel.components().count()));
    for (rel, mode) in dirs {
        let to = dst.join(&rel);
        fs::set_permissions(&to, fs::Permissions::from_mode(mode)).map_err(io_at(&to))?;
    }
    Ok((stats, Manifest::new(entries)))
}

type PrevIndex<'a> = (&'a Path, std::collections::HashMap<&'a Path, &'a Kind>);

/// Creates the directories and links of the copy and lists its files,
/// counting them against the limits.
#[allow(clippy::too_many_arguments)]
fn walk_source(
    src_root: &Path,
    dst_root: &Path,
    rel: &Path,
    opts: &CopyOptions<'_>,
    stats: &mut Stats,
    entries: &mut Vec<Entry>,
    files: &mut Vec<(PathBuf, fs::Metadata)>,
    dirs: &mut Vec<(PathBuf, u32)>,
) -> Result<(), StageError> {
    let dir = src_root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .map_err(io_at(&dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_at(&dir))?;
    names.sort();
    for name in names {
        let rel = rel.join(name);
        let from = src_root.join(&rel);
        let to = dst_root.join(&rel);
        let meta = fs::symlink_metadata(&from).map_err(io_at(&from))?;
        if opts
            .exclude
            .is_some_and(|x| x.leaves_out(&rel, meta.is_dir()))
        {
            continue;
        }
        if !meta.is_dir() {
            stats.files += 1;
        }
        if stats.files > max_entries() {
            return Err(StageError::Refused(format!(
                "more than {} files (DREAM_MAX_ENTRIES)",
                max_entries()
            )));
        }
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir(&to).map_err(io_at(&to))?;
            walk_source(src_root, dst_root, &rel, opts, stats, entries, files, dirs)?;
            let mode = if opts.freeze {
                frozen_mode(true, meta.mode())
            } else {
                meta.mode() & 0o777 | 0o700
            };
            dirs.push((rel.clone(), mode));
            entries.push(Entry {
                path: rel,
                kind: Kind::Dir {
                    mode: frozen_mode(true, meta.mode()),
                },
            });
        } else if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(io_at(&from))?;
            check_link(&rel, &target)?;
            std::os::unix::fs::symlink(&target, &to).map_err(io_at(&to))?;
            entries.push(Entry {
                path: rel,
                kind: Kind::Symlink { target },
            });
        } else if ft.is_file() {
            if stats.bytes + meta.len() > opts.max_bytes {
                return Err(too_big(opts.max_bytes));
            }
            stats.bytes += meta.len();
            files.push((rel, meta));
        } else {
            return Err(StageError::Refused(format!(
                "{} is not a regular file, directory or symlink",
                rel.display()
            )));
        }
    }
    Ok(())
}

/// Copies (or shares) one file and returns its manifest entry. When the
/// previous release has a file of the same size and mode at the same path,
/// the source is read to hash it and shared if the hashes are equal; else
/// it is copied and hashed in the same pass. Either way the bytes the
/// release holds are the bytes that were hashed, and a source file that
/// changes while it is read is refused, never recorded wrong.
fn copy_one(
    src_root: &Path,
    tree: &Tree,
    rel: &Path,
    meta: &fs::Metadata,
    opts: &CopyOptions<'_>,
    prev: Option<&PrevIndex<'_>>,
    stats: &mut Stats,
) -> Result<Entry, StageError> {
    let from = src_root.join(rel);
    let mode = frozen_mode(false, meta.mode());
    let candidate = prev.and_then(|(dir, index)| match index.get(rel) {
        Some(Kind::File {
            mode: m,
            size,
            hash,
        }) if *m == mode && *size == meta.len() => Some((dir.join(rel), *hash)),
        _ => None,
    });
    let mut src = File::open(&from).map_err(io_at(&from))?;
    let mut shared = None;
    if let Some((prev_file, prev_hash)) = candidate {
        let (hash, _) = read_unchanged(&mut src, &from, rel, meta, &mut io::sink())?;
        if hash == prev_hash
            && let Ok(reflinked) = share_file(tree, rel, &prev_file, opts.freeze)
        {
            stats.shared_files += 1;
            stats.shared_bytes += meta.len();
            stats.reflinked_files += u64::from(reflinked);
            shared = Some(hash);
        }
    }
    let hash = if let Some(hash) = shared {
        hash
    } else {
        use std::io::Seek;
        src.rewind().map_err(io_at(&from))?;
        copy_file(&mut src, &from, tree, rel, meta, opts.freeze)?
    };
    Ok(Entry {
        path: rel.to_path_buf(),
        kind: Kind::File {
            mode,
            size: meta.len(),
            hash,
        },
    })
}

/// Reads `src` whole into `w`, hashing it, and checks that it is the file
/// the walk saw and did not change while read (size, modification and
/// change times): what was hashed is then one version of the file, never a
/// mix of two.
fn read_unchanged(
    src: &mut File,
    from: &Path,
    rel: &Path,
    seen: &fs::Metadata,
    w: &mut impl io::Write,
) -> Result<(manifest::Hash, u64), StageError> {
    let (hash, n) = manifest::hash_copy(src, w).map_err(|e| match e {
        manifest::CopyError::Read(e) => io_at(from)(e),
        manifest::CopyError::Write(e) => io_at(rel)(e),
    })?;
    let after = src.metadata().map_err(io_at(from))?;
    let same = n == seen.len()
        && after.len() == seen.len()
        && after.ino() == seen.ino()
        && after.mtime() == seen.mtime()
        && after.mtime_nsec() == seen.mtime_nsec()
        && after.ctime() == seen.ctime()
        && after.ctime_nsec() == seen.ctime_nsec();
    if !same {
        return Err(StageError::Refused(format!(
            "{}: changed while staging; try again",
            crate::logtext::value(&rel.to_string_lossy())
        )));
    }
    Ok((hash, n))
}

/// Copies `src` into a new file `rel` beneath `tree`, hashing it in the
/// same pass, and keeps its modification time; returns the hash.
fn copy_file(
    src: &mut File,
    from: &Path,
    tree: &Tree,
    rel: &Path,
    meta: &fs::Metadata,
    freeze: bool,
) -> Result<manifest::Hash, StageError> {
    let mut dst = tree.create_file(rel, 0o600)?;
    let (hash, _) = read_unchanged(src, from, rel, meta, &mut dst)?;
    let mode = if freeze {
        frozen_mode(false, meta.mode())
    } else {
        meta.mode() & 0o777 | 0o200
    };
    dst.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_at(rel))?;
    if let Ok(m) = meta.modified() {
        dst.set_modified(m).map_err(io_at(rel))?;
    }
    Ok(hash)
}
