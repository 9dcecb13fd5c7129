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

mod copy;
mod git;
mod rebuild;
mod tarball;

pub use copy::{CopyOptions, copy_dir};
pub use git::git_checkout;
pub use rebuild::{ShareFrom, bridge, from_manifest};
pub use tarball::extract_tar;

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

fn too_big(max_bytes: u64) -> StageError {
    StageError::TooBig {
        limit: max_bytes,
        needs: None,
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
