//! Staging a release: copying a directory, extracting a tarball, or
//! checking out a git revision into `.dream/staging/`, and then sharing the
//! files identical to the previous release's.
//!
//! Nothing a source contains may land outside the release: absolute paths,
//! `..`, links pointing out, and device files are refused, and the number of
//! entries is bounded.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::store::manifest::{self, Entry, Kind, Manifest};
use crate::store::tree::{Tree, TreeError};

/// Most entries a source may have (a tar bomb is refused, not extracted);
/// `DREAM_MAX_ENTRIES` lowers or raises it.
pub const MAX_ENTRIES: u64 = 1_000_000;

fn max_entries() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("DREAM_MAX_ENTRIES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MAX_ENTRIES)
    })
}

/// The git transports a `git:` source may use (also handed to git as
/// `GIT_ALLOW_PROTOCOL`, so a redirect or submodule cannot reach another).
pub const GIT_TRANSPORTS: &[&str] = &["file", "http", "https", "ssh", "git"];

/// Where a release comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Dir(PathBuf),
    Tar(PathBuf),
    Git {
        url: String,
        rev: Option<String>,
    },
    /// A manifest and a directory of content objects named by their hash
    /// (what a `dream fleet` coordinator sent); content the host already
    /// has in its current release is taken from there.
    Objects {
        manifest: PathBuf,
        objects: PathBuf,
    },
}

impl Source {
    pub fn parse(s: &str) -> Result<Source, String> {
        if let Some(rest) = s.strip_prefix("git:") {
            let (url, rev) = match rest.rsplit_once('#') {
                Some((u, r)) => (u.to_string(), Some(r.to_string())),
                None => (rest.to_string(), None),
            };
            if url.is_empty() || url.starts_with('-') {
                return Err(format!("invalid git URL {url:?}"));
            }
            if let Some(r) = &rev
                && (r.is_empty()
                    || r.starts_with('-')
                    || r.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return Err(format!("invalid git revision {r:?}"));
            }
            if url.starts_with("ext::") || url.contains("::") {
                return Err(format!("git transport helpers are not allowed: {url:?}"));
            }
            if let Some((scheme, _)) = url.split_once("://")
                && !GIT_TRANSPORTS.contains(&scheme.to_ascii_lowercase().as_str())
            {
                return Err(format!(
                    "git transport {scheme:?} is not allowed: use {}",
                    GIT_TRANSPORTS.join(", ")
                ));
            }
            return Ok(Source::Git { url, rev });
        }
        let p = PathBuf::from(s);
        let name = s.to_ascii_lowercase();
        if name.ends_with(".tar") || name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            if !p.is_file() {
                return Err(format!("{s}: no such tarball"));
            }
            return Ok(Source::Tar(p));
        }
        match fs::metadata(&p) {
            Ok(m) if m.is_dir() => Ok(Source::Dir(p)),
            Ok(_) => Err(format!(
                "{s}: not a directory, a .tar/.tar.gz/.tgz tarball, or git:URL[#REV]"
            )),
            Err(e) => Err(format!("{s}: {e}")),
        }
    }
}

/// What staging did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub bytes: u64,
    pub shared_files: u64,
    pub shared_bytes: u64,
    /// Of the shared files, how many are reflinks (copy-on-write clones)
    /// rather than hard links.
    pub reflinked_files: u64,
}

/// Makes `rel` beneath `tree` share `prev`'s data ([`Tree::share`]: a
/// reflink where the filesystem has them, else a hard link), created
/// beneath the tree's descriptor, never through a link. Returns whether it
/// was a reflink.
fn share_file(tree: &Tree, rel: &Path, prev: &Path, frozen: bool) -> Result<bool, StageError> {
    Ok(tree.share(rel, prev, !frozen)?)
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("refused: {0}")]
    Refused(String),
    /// INT, TERM or HUP while a child (git) ran: it was ended.
    #[error("interrupted by {0:?}; nothing was switched")]
    Interrupted(nix::sys::signal::Signal),
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// The source holds more than the size limit allows; nothing of it
    /// past the limit was written (a tarball: nothing at all).
    #[error("refused: the release would hold more than {limit} bytes{}; nothing was written", .needs.map(|n| format!(" ({n} bytes of files)")).unwrap_or_default())]
    TooBig { limit: u64, needs: Option<u64> },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("git: {0}")]
    Git(String),
}

impl StageError {
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            StageError::Io { source, .. } | StageError::Tree(TreeError::Io { source, .. }) => {
                Some(source)
            }
            _ => None,
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StageError + '_ {
    move |source| StageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `rel` is a plain relative path with no `..`.
fn safe_relative(rel: &Path) -> Result<PathBuf, StageError> {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => {
                return Err(StageError::Refused(format!(
                    "{} would land outside the release",
                    rel.display()
                )));
            }
        }
    }
    Ok(out)
}

/// Checks that a symlink at `rel` (relative to the release) pointing at
/// `target` stays inside the release, read on its own. Chains of links are
/// judged on the final tree by [`crate::store::tree::links_escaping`].
fn check_link(rel: &Path, target: &Path) -> Result<(), StageError> {
    if crate::store::tree::stays_inside(rel, target) {
        return Ok(());
    }
    Err(StageError::Refused(format!(
        "link {} -> {} points outside the release",
        rel.display(),
        target.display()
    )))
}

pub use crate::store::manifest::frozen_mode;

/// What a directory source leaves out of its release: `.git/` (unless
/// kept), the source's own `.dreamignore`, and `--exclude` patterns, all
/// in gitignore syntax (matched by the `ignore` crate, as git would).
/// What was left out is recorded for the report.
pub struct Exclude {
    matcher: ignore::gitignore::Gitignore,
    left_out: std::sync::Mutex<Vec<PathBuf>>,
}

impl Exclude {
    pub fn new(src: &Path, patterns: &[String], keep_git: bool) -> Result<Exclude, String> {
        let mut b = ignore::gitignore::GitignoreBuilder::new(src);
        if !keep_git {
            b.add_line(None, "/.git/")
                .map_err(|e| format!(".git/: {e}"))?;
        }
        let own = src.join(".dreamignore");
        if own.is_file()
            && let Some(e) = b.add(&own)
        {
            return Err(format!("{}: {e}", own.display()));
        }
        for p in patterns {
            b.add_line(None, p)
                .map_err(|e| format!("--exclude {p:?}: {e}"))?;
        }
        let matcher = b.build().map_err(|e| e.to_string())?;
        Ok(Exclude {
            matcher,
            left_out: std::sync::Mutex::default(),
        })
    }

    /// Whether `rel` (relative to the source) is left out; it is recorded.
    pub fn leaves_out(&self, rel: &Path, is_dir: bool) -> bool {
        let out = self.matcher.matched(rel, is_dir).is_ignore();
        if out {
            self.left_out
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(rel.to_path_buf());
        }
        out
    }

    /// What was left out so far (a directory stands for all it holds).
    pub fn left_out(&self) -> Vec<PathBuf> {
        let mut v = self
            .left_out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        v.sort();
        v
    }
}

/// Leaves out of a staged tree that was not copied from a directory (a
/// tarball's, a checkout's) what `exclude` leaves out of a directory
/// source: each entry it matches (a directory with all it holds) is
/// removed from the tree and from its manifest, so `--exclude` and
/// `.dreamignore` mean the same for every source.
pub fn leave_out(
    staged: &Path,
    manifest: Manifest,
    exclude: &Exclude,
) -> Result<Manifest, StageError> {
    let mut gone: Vec<PathBuf> = Vec::new();
    let kept: Vec<Entry> = manifest
        .entries()
        .iter()
        .filter(|e| {
            // Entries are sorted: a directory comes before what it holds.
            if gone.iter().any(|g| e.path.starts_with(g)) {
                return false;
            }
            let out = exclude.leaves_out(&e.path, matches!(e.kind, Kind::Dir { .. }));
            if out {
                gone.push(e.path.clone());
            }
            !out
        })
        .cloned()
        .collect();
    for rel in &gone {
        let at = staged.join(rel);
        // The entry's parent may be read-only (a tarball's modes).
        let parent = at.parent().unwrap_or(staged).to_path_buf();
        let mode = fs::metadata(&parent).map_err(io_at(&parent))?.mode();
        fs::set_permissions(&parent, fs::Permissions::from_mode(mode | 0o700))
            .map_err(io_at(&parent))?;
        let removed = match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => crate::store::release::remove_tree(&at),
            Ok(_) => fs::remove_file(&at),
            Err(e) => Err(e),
        };
        removed.map_err(io_at(&at))?;
        fs::set_permissions(&parent, fs::Permissions::from_mode(mode & 0o7777))
            .map_err(io_at(&parent))?;
    }
    Ok(Manifest::new(kept).with_bridged(manifest.bridged().to_vec()))
}

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

/// Extracts a tarball into `dst` (which must not exist), refusing anything
/// that would land outside it. Every entry is created relative to the
/// release's directory descriptor ([`Tree`]): no entry is ever written
/// through a link, whatever links earlier entries made.
pub fn extract_tar(
    tarball: &Path,
    dst: &Path,
    max_bytes: u64,
) -> Result<(Stats, Manifest), StageError> {
    // The limits are checked on the headers alone before anything is
    // written: a tar bomb costs a read, never a full disk or a million files.
    let (entries, bytes) = scan_tar(tarball)?;
    if entries > max_entries() {
        return Err(StageError::Refused(format!(
            "the tarball has more than {} entries (DREAM_MAX_ENTRIES); nothing was written",
            max_entries()
        )));
    }
    if bytes > max_bytes {
        return Err(StageError::TooBig {
            limit: max_bytes,
            needs: Some(bytes),
        });
    }
    let reader = tar_reader(tarball)?;
    fs::create_dir(dst).map_err(io_at(dst))?;
    let tree = Tree::open(dst).map_err(io_at(dst))?;
    let mut archive = tar::Archive::new(reader);
    let mut stats = Stats::default();
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    let mut entries: std::collections::BTreeMap<PathBuf, Kind> = Default::default();
    let mut count = 0u64;
    let limit = max_entries();
    for entry in archive.entries().map_err(io_at(tarball))? {
        let mut entry = entry.map_err(io_at(tarball))?;
        count += 1;
        if count > limit {
            return Err(StageError::Refused(format!(
                "the tarball has more than {limit} entries (DREAM_MAX_ENTRIES)"
            )));
        }
        let raw = entry.path().map_err(io_at(tarball))?.into_owned();
        let rel = safe_relative(&raw)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => {
                tree.create_dir(&rel)?;
                entries.insert(
                    rel.clone(),
                    Kind::Dir {
                        mode: frozen_mode(true, mode),
                    },
                );
                dirs.push((rel, mode | 0o700));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                stats.files += 1;
                let size = entry.header().size().unwrap_or(0);
                if stats.bytes + size > max_bytes {
                    return Err(too_big(max_bytes));
                }
                stats.bytes += size;
                let kind = extract_file(&mut entry, &tree, &rel, mode, tarball)?;
                entries.insert(rel, kind);
            }
            tar::EntryType::Symlink => {
                let target = link_target(&entry, tarball, &rel)?;
                check_link(&rel, &target)?;
                tree.symlink(&rel, &target)?;
                entries.insert(rel, Kind::Symlink { target });
            }
            tar::EntryType::Link => {
                let target = link_target(&entry, tarball, &rel)?;
                let kind = extract_hard_link(&tree, &rel, &target, &entries)?;
                entries.insert(rel, kind);
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {}
            other => {
                return Err(StageError::Refused(format!(
                    "{} is a {:?} entry; only files, directories and links are allowed",
                    rel.display(),
                    other
                )));
            }
        }
    }
    for (dir, mode) in dirs {
        let _ = tree.chmod_dir(&dir, mode);
    }
    // Directories the archive implied without entries of their own.
    let implied: Vec<PathBuf> = entries
        .keys()
        .flat_map(|p| p.ancestors().skip(1))
        .filter(|a| !a.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .collect();
    for dir in implied {
        entries.entry(dir).or_insert(Kind::Dir {
            mode: frozen_mode(true, 0o755),
        });
    }
    let manifest = Manifest::new(
        entries
            .into_iter()
            .map(|(path, kind)| Entry { path, kind })
            .collect(),
    );
    Ok((stats, manifest))
}

/// A regular file of a tarball, written beneath the release's directory
/// from the bytes it hashes; its manifest entry.
fn extract_file(
    entry: &mut tar::Entry<'_, Box<dyn Read>>,
    tree: &Tree,
    rel: &Path,
    mode: u32,
    tarball: &Path,
) -> Result<Kind, StageError> {
    let size = entry.header().size().unwrap_or(0);
    let mut out = tree.create_file(rel, 0o600)?;
    let (hash, _) = manifest::hash_copy(entry, &mut out).map_err(|e| match e {
        manifest::CopyError::Read(e) => io_at(tarball)(e),
        manifest::CopyError::Write(e) => io_at(rel)(e),
    })?;
    out.set_permissions(fs::Permissions::from_mode(mode | 0o200))
        .map_err(io_at(rel))?;
    if let Ok(mtime) = entry.header().mtime() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
        let _ = out.set_modified(t);
    }
    Ok(Kind::File {
        mode: frozen_mode(false, mode),
        size,
        hash,
    })
}

/// A hard link of a tarball, made beneath the release's directory to a
/// file extracted before it; the entry of what it links to (same inode,
/// same content).
fn extract_hard_link(
    tree: &Tree,
    rel: &Path,
    target: &Path,
    entries: &std::collections::BTreeMap<PathBuf, Kind>,
) -> Result<Kind, StageError> {
    let target_rel = safe_relative(target)?;
    let nothing = || {
        StageError::Refused(format!(
            "hard link {} -> {} names nothing extracted before it",
            rel.display(),
            target.display()
        ))
    };
    tree.hard_link(rel, &target_rel).map_err(|e| match e {
        TreeError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => nothing(),
        TreeError::Escape(_) => StageError::Refused(format!(
            "hard link {} -> {} is not to a regular file inside the release",
            rel.display(),
            target.display()
        )),
        e => e.into(),
    })?;
    entries.get(&target_rel).cloned().ok_or_else(nothing)
}

fn too_big(max_bytes: u64) -> StageError {
    StageError::TooBig {
        limit: max_bytes,
        needs: None,
    }
}

/// The tarball's contents as a stream, decompressed if its name says so.
fn tar_reader(tarball: &Path) -> Result<Box<dyn Read>, StageError> {
    let file = File::open(tarball).map_err(io_at(tarball))?;
    let name = tarball.to_string_lossy().to_ascii_lowercase();
    Ok(if name.ends_with(".gz") || name.ends_with(".tgz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

/// Counts a tarball's entries and adds up its files' sizes from the
/// headers, writing nothing (a plain tarball's data is skipped by seeking).
/// Stops counting one past the entry limit.
fn scan_tar(tarball: &Path) -> Result<(u64, u64), StageError> {
    let limit = max_entries();
    let count = |entries: &mut dyn Iterator<Item = io::Result<(tar::EntryType, u64)>>| {
        let (mut n, mut bytes) = (0u64, 0u64);
        for e in entries {
            let (kind, size) = e.map_err(io_at(tarball))?;
            n += 1;
            if matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
                bytes = bytes.saturating_add(size);
            }
            if n > limit {
                break;
            }
        }
        Ok::<_, StageError>((n, bytes))
    };
    fn header<R: Read>(e: io::Result<tar::Entry<'_, R>>) -> io::Result<(tar::EntryType, u64)> {
        e.map(|e| (e.header().entry_type(), e.header().size().unwrap_or(0)))
    }
    let name = tarball.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".gz") || name.ends_with(".tgz") {
        let mut archive = tar::Archive::new(tar_reader(tarball)?);
        let mut it = archive.entries().map_err(io_at(tarball))?.map(header);
        count(&mut it)
    } else {
        let file = File::open(tarball).map_err(io_at(tarball))?;
        let mut archive = tar::Archive::new(file);
        let mut it = archive
            .entries_with_seek()
            .map_err(io_at(tarball))?
            .map(header);
        count(&mut it)
    }
}

/// The target of a link entry.
fn link_target<R: Read>(
    entry: &tar::Entry<'_, R>,
    tarball: &Path,
    rel: &Path,
) -> Result<PathBuf, StageError> {
    Ok(entry
        .link_name()
        .map_err(io_at(tarball))?
        .ok_or_else(|| StageError::Refused(format!("{}: link without a target", rel.display())))?
        .into_owned())
}

/// Checks out `url` at `rev` into `dst` with the system git, without its
/// `.git`; returns the short commit hash.
pub fn git_checkout(
    url: &str,
    rev: Option<&str>,
    dst: &Path,
    max_bytes: u64,
    mut signals: Option<&mut crate::signals::Signals>,
) -> Result<String, StageError> {
    let mut git = |args: &[&str], dir: Option<&Path>| -> Result<String, StageError> {
        let mut cmd = std::process::Command::new("git");
        cmd.args([
            "-c",
            "protocol.ext.allow=never",
            "-c",
            "core.hooksPath=/dev/null",
        ]);
        if let Some(d) = dir {
            cmd.arg("-C").arg(d);
        }
        // Nothing of a calling git's environment (a post-receive hook
        // runs with GIT_DIR=.): this clone is its own repository.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("GIT_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ALLOW_PROTOCOL", GIT_TRANSPORTS.join(":"));
        // As every child of a deploy: its own group, ended with the
        // deploy, and an interrupt while it waits on a stalled server ends
        // it (exit 128 + the signal, from the caller).
        let ended = crate::child::run(
            cmd,
            None,
            crate::child::Output::Capture { limit: 64 << 20 },
            None,
            signals.as_deref_mut(),
        )
        .map_err(|e| StageError::Git(format!("cannot run git: {e} (is git installed?)")))?;
        let (status, tail, stdout) = match ended {
            crate::child::Ended::Exited {
                status,
                tail,
                stdout,
            } => (status, tail, stdout),
            crate::child::Ended::Interrupted(sig) => return Err(StageError::Interrupted(sig)),
            crate::child::Ended::TimedOut { tail } => {
                return Err(StageError::Git(tail.last().cloned().unwrap_or_default()));
            }
        };
        if !status.success() {
            let last = tail.last().cloned().unwrap_or_else(|| "failed".into());
            if tail.iter().any(|l| l.contains("No space left on device")) {
                return Err(StageError::Io {
                    path: dst.to_path_buf(),
                    source: io::Error::new(io::ErrorKind::StorageFull, last),
                });
            }
            return Err(StageError::Git(last));
        }
        Ok(String::from_utf8_lossy(&stdout).trim().to_string())
    };
    let dst_str = dst
        .to_str()
        .ok_or_else(|| StageError::Git("staging path is not UTF-8".into()))?;
    git(
        &["clone", "--quiet", "--no-checkout", "--", url, dst_str],
        None,
    )?;
    let rev = rev.unwrap_or("HEAD");
    // The size of the tree, judged before anything of it is written.
    let sizes = git(&["ls-tree", "-r", "-l", "--full-tree", rev], Some(dst))?;
    let (mut files, mut bytes) = (0u64, 0u64);
    for line in sizes.lines() {
        files += 1;
        bytes += line
            .split_whitespace()
            .nth(3)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    if bytes > max_bytes {
        return Err(StageError::TooBig {
            limit: max_bytes,
            needs: Some(bytes),
        });
    }
    if files > max_entries() {
        return Err(StageError::Refused(format!(
            "more than {} files (DREAM_MAX_ENTRIES)",
            max_entries()
        )));
    }
    git(&["checkout", "--quiet", "--detach", rev, "--"], Some(dst))?;
    let hash = git(&["rev-parse", "--short=8", "HEAD"], Some(dst))?;
    let dotgit = dst.join(".git");
    fs::remove_dir_all(&dotgit).map_err(io_at(&dotgit))?;
    Ok(hash)
}

/// Where [`from_manifest`] finds a local file of a content and frozen mode.
pub type ShareFrom<'a> = dyn Fn(&crate::store::manifest::Hash, u32) -> Option<PathBuf> + 'a;

/// Builds a release's tree in `dst` from a manifest alone: directories and
/// links as it says, each file's content from `content(hash)` (a received
/// object, or a local release's file of that hash), copied and hashed
/// again on the way, so a file whose bytes are not what the manifest says
/// is refused. What `dream fleet` sends a host: the manifest, and only the
/// objects it lacks. Entries are created beneath `dst`'s descriptor, as
/// for a tarball.
///
/// With `share` (no build will write to the tree), a file whose content
/// and frozen mode a file of the current release already has is shared
/// with it (reflink, else hard link) instead of copied, and the tree is
/// made frozen as it is built, as for a directory source.
pub fn from_manifest(
    manifest: &Manifest,
    content: &dyn Fn(&crate::store::manifest::Hash) -> Option<PathBuf>,
    share: Option<&ShareFrom<'_>>,
    dst: &Path,
    max_bytes: u64,
) -> Result<(Stats, Manifest), StageError> {
    let freeze = share.is_some();
    let total: u64 = manifest
        .entries()
        .iter()
        .map(|e| match e.kind {
            Kind::File { size, .. } => size,
            _ => 0,
        })
        .sum();
    if total > max_bytes {
        return Err(StageError::TooBig {
            limit: max_bytes,
            needs: Some(total),
        });
    }
    fs::create_dir(dst).map_err(io_at(dst))?;
    let tree = crate::store::tree::Tree::open(dst).map_err(io_at(dst))?;
    let mut stats = Stats::default();
    let mut dirs = Vec::new();
    for e in manifest.entries() {
        match &e.kind {
            Kind::Dir { mode } => {
                tree.create_dir(&e.path)?;
                dirs.push((e.path.clone(), *mode));
            }
            Kind::Symlink { target } => {
                tree.symlink(&e.path, target)?;
                stats.files += 1;
            }
            Kind::File { mode, size, hash } => {
                let frozen = frozen_mode(false, *mode);
                if let Some(prev) = share.and_then(|s| s(hash, frozen)) {
                    let reflinked = share_file(&tree, &e.path, &prev, true)?;
                    stats.files += 1;
                    stats.bytes += size;
                    stats.shared_files += 1;
                    stats.shared_bytes += size;
                    stats.reflinked_files += u64::from(reflinked);
                    continue;
                }
                let from = content(hash).ok_or_else(|| {
                    StageError::Refused(format!(
                        "{}: its content ({}) was neither sent nor found on this host",
                        e.path.display(),
                        crate::store::manifest::hex(hash)
                    ))
                })?;
                let mut src = fs::File::open(&from).map_err(io_at(&from))?;
                let mut out = tree.create_file(&e.path, if freeze { frozen } else { *mode })?;
                let at = dst.join(&e.path);
                let (got, n) =
                    crate::store::manifest::hash_copy(&mut src, &mut out).map_err(|c| match c {
                        crate::store::manifest::CopyError::Read(err) => io_at(&from)(err),
                        crate::store::manifest::CopyError::Write(err) => io_at(&at)(err),
                    })?;
                if got != *hash || n != *size {
                    return Err(StageError::Refused(format!(
                        "{}: its content does not match the manifest (hash {}, {n} bytes)",
                        e.path.display(),
                        crate::store::manifest::hex(&got)
                    )));
                }
                stats.files += 1;
                stats.bytes += size;
            }
        }
    }
    // Directory modes last: a read-only directory could not be filled.
    for (rel, mode) in dirs.iter().rev() {
        tree.chmod_dir(
            rel,
            if freeze {
                frozen_mode(true, *mode)
            } else {
                *mode
            },
        )?;
    }
    Ok((stats, manifest.clone()))
}

/// `--bridge DIR`: files under each of `dirs` in the previous release that
/// the staged one lacks are linked into it (reflink, else hard link),
/// never over anything the new release has; missing parent directories
/// are made. Returns the entries added (directories and files) and the
/// bridged files' paths. Pages the previous release rendered can then
/// still load their assets from a host that has already switched.
pub fn bridge(
    staged: &Path,
    manifest: &Manifest,
    prev: (&Path, &Manifest),
    dirs: &[PathBuf],
) -> Result<(Vec<Entry>, Vec<PathBuf>), StageError> {
    let tree = Tree::open(staged).map_err(io_at(staged))?;
    let have = manifest.index();
    let prev_index = prev.1.index();
    let mut added: Vec<Entry> = Vec::new();
    let mut bridged = Vec::new();
    for e in prev.1.entries() {
        let Kind::File { .. } = &e.kind else {
            continue;
        };
        if !dirs.iter().any(|d| e.path.starts_with(d)) || have.contains_key(e.path.as_path()) {
            continue;
        }
        // Every parent must be a directory in the new release (or one made
        // here); a file or link in the way means: leave it.
        let mut blocked = false;
        let mut made = Vec::new();
        for parent in e
            .path
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
        {
            match have.get(parent) {
                Some(Kind::Dir { .. }) => break,
                Some(_) => {
                    blocked = true;
                    break;
                }
                None if added.iter().any(|a| a.path == parent) => break,
                None => made.push(parent.to_path_buf()),
            }
        }
        if blocked {
            continue;
        }
        for dir in made.iter().rev() {
            tree.create_dir(dir)?;
            let mode = match prev_index.get(dir.as_path()) {
                Some(Kind::Dir { mode }) => *mode,
                _ => 0o755,
            };
            added.push(Entry {
                path: dir.clone(),
                kind: Kind::Dir { mode },
            });
        }
        if fs::symlink_metadata(staged.join(&e.path)).is_ok() {
            continue;
        }
        share_file(&tree, &e.path, &prev.0.join(&e.path), false)?;
        added.push(e.clone());
        bridged.push(e.path.clone());
    }
    Ok((added, bridged))
}

/// Replaces files in `staged` whose content hash and mode equal the
/// previous release's manifest entry at the same path with links to that
/// release's files (reflinks where the filesystem has them). `manifest` is
/// the staged tree's. Counts the tree.
pub fn share(
    staged: &Path,
    manifest: &Manifest,
    prev: Option<(&Path, &Manifest)>,
) -> Result<Stats, StageError> {
    let mut stats = Stats::default();
    let prev_index = prev.map(|(dir, m)| (dir, m.index()));
    let mut tree: Option<Tree> = None;
    for e in manifest.entries() {
        let Kind::File { mode, size, hash } = &e.kind else {
            if !matches!(e.kind, Kind::Dir { .. }) {
                stats.files += 1;
            }
            continue;
        };
        stats.files += 1;
        stats.bytes += size;
        let Some((dir, index)) = &prev_index else {
            continue;
        };
        let same = matches!(index.get(e.path.as_path()),
            Some(Kind::File { mode: m, hash: h, .. }) if h == hash && frozen_mode(false, *m) == frozen_mode(false, *mode));
        if !same {
            continue;
        }
        let tree = match &tree {
            Some(t) => t,
            None => tree.insert(Tree::open(staged).map_err(io_at(staged))?),
        };
        // Not frozen yet: the whole tree is frozen after sharing. The
        // staged entry is replaced beneath the tree's descriptor, never
        // written through a link the source or its build planted.
        let reflinked = share_file(tree, &e.path, &dir.join(&e.path), false)?;
        stats.shared_files += 1;
        stats.shared_bytes += size;
        stats.reflinked_files += u64::from(reflinked);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_must_stay_inside() {
        assert!(check_link(Path::new("a/b"), Path::new("../c")).is_ok());
        assert!(check_link(Path::new("a/b"), Path::new("c/../d")).is_ok());
        assert!(check_link(Path::new("b"), Path::new("../c")).is_err());
        assert!(check_link(Path::new("a/b"), Path::new("../../c")).is_err());
        assert!(check_link(Path::new("a"), Path::new("/etc/passwd")).is_err());
        assert!(check_link(Path::new("a"), Path::new("x/../../y")).is_err());
    }

    #[test]
    fn relative_paths_must_stay_inside() {
        assert!(safe_relative(Path::new("a/./b")).is_ok());
        assert!(safe_relative(Path::new("../x")).is_err());
        assert!(safe_relative(Path::new("a/../../x")).is_err());
        assert!(safe_relative(Path::new("/etc/passwd")).is_err());
    }

    /// Random archives of links, directories, files and hard links, with
    /// chains of `..` through earlier links: whatever the sequence, nothing
    /// outside the release is created or changed. A seed from the clock (or
    /// `DREAM_TAR_SEED`) is printed so that a failure can be replayed.
    #[test]
    fn random_tar_entries_never_touch_anything_outside() {
        use std::time::{SystemTime, UNIX_EPOCH};
        let seed: u64 = std::env::var("DREAM_TAR_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("DREAM_TAR_SEED={seed}");
        let mut x = seed | 1;
        let mut next = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let names = [
            "a", "b", "l0", "l1", "l2", "d", "d/x", "d/l", "victim", "a/b", "l1/v", "l0/d/x",
        ];
        let targets = [
            ".",
            "..",
            "l0/..",
            "l1/..",
            "l2/..",
            "a/../..",
            "d/..",
            "../victim.txt",
            "l1/victim.txt",
            "l2/victim.txt",
            "d",
            "victim",
            "l0/l1/..",
            "/etc",
            "d/l/..",
        ];
        let top = tempfile::tempdir().unwrap();
        let outside = top.path().join("victim.txt");
        for round in 0..300 {
            std::fs::write(&outside, "untouched").unwrap();
            let tarball = top.path().join("t.tar");
            let mut b = tar::Builder::new(File::create(&tarball).unwrap());
            let mut listing = Vec::new();
            for _ in 0..1 + next(12) {
                let name = names[next(names.len())];
                let mut h = tar::Header::new_gnu();
                h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
                h.set_mode(0o644);
                h.set_size(0);
                let kind = [
                    tar::EntryType::Symlink,
                    tar::EntryType::Symlink,
                    tar::EntryType::Directory,
                    tar::EntryType::Regular,
                    tar::EntryType::Link,
                ][next(5)];
                h.set_entry_type(kind);
                let target = if kind == tar::EntryType::Link {
                    names[next(names.len())]
                } else {
                    targets[next(targets.len())]
                };
                if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
                    h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
                }
                let body: &[u8] = if kind == tar::EntryType::Regular {
                    h.set_size(5);
                    b"pwned"
                } else {
                    b""
                };
                h.set_cksum();
                b.append(&h, body).unwrap();
                listing.push(format!("{kind:?} {name} {target}"));
            }
            b.finish().unwrap();
            drop(b);
            let dst = top.path().join("r");
            let _ = crate::store::release::remove_tree(&dst);
            let _ = extract_tar(&tarball, &dst, u64::MAX);
            let mut seen: Vec<_> = std::fs::read_dir(top.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            seen.sort();
            assert_eq!(
                seen,
                ["r", "t.tar", "victim.txt"],
                "round {round} (DREAM_TAR_SEED={seed}): {listing:?}"
            );
            assert_eq!(
                std::fs::read_to_string(&outside).unwrap(),
                "untouched",
                "round {round} (DREAM_TAR_SEED={seed}): {listing:?}"
            );
            // What survives extraction and the final-tree check resolves
            // inside: every link left opens beneath the release.
            if crate::store::tree::links_escaping(&dst).unwrap().is_empty() {
                for name in names {
                    let p = dst.join(name);
                    if let Ok(real) = p.canonicalize() {
                        assert!(
                            real.starts_with(dst.canonicalize().unwrap()),
                            "round {round} (DREAM_TAR_SEED={seed}): {name} -> {real:?}: {listing:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sources() {
        assert_eq!(
            Source::parse("git:/srv/repo.git#v1.2").unwrap(),
            Source::Git {
                url: "/srv/repo.git".into(),
                rev: Some("v1.2".into())
            }
        );
        assert!(Source::parse("git:--upload-pack=touch /tmp/x").is_err());
        assert!(Source::parse("git:/r#--output=x").is_err());
        assert!(Source::parse("git:ext::sh -c touch% /tmp/pwned").is_err());
        assert!(Source::parse("/nonexistent/dir").is_err());
    }
}
