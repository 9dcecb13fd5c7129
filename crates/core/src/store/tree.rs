//! A directory tree reached only through its directory descriptor.
//!
//! Everything a source (a tarball above all) creates in a release goes
//! through [`Tree`]: each entry's parent directory is opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so the kernel refuses
//! any walk that would leave the tree or pass through a symlink, whatever
//! links earlier entries planted and whatever `..` means after them. The
//! entry itself is then created relative to that descriptor without
//! following a link at its name (`O_CREAT | O_EXCL | O_NOFOLLOW`,
//! `symlinkat`, `linkat` without `AT_SYMLINK_FOLLOW`).
//!
//! [`links_escaping`] is the second half: after the build, it walks the
//! final tree and asks the kernel to resolve every symlink beneath the
//! release; a link that resolves outside it (or through a loop) refuses the
//! release before it can be switched.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, linkat, symlinkat, unlinkat};

/// Why an entry could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// The entry would be written outside the tree or through a link.
    #[error("refused: {} would be written through a link or outside the release", .0.display())]
    Escape(PathBuf),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(Errno) -> TreeError + '_ {
    move |e| TreeError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// A directory opened once; every operation is relative to it.
pub struct Tree {
    dir: OwnedFd,
    /// The parent directory last opened for an entry, by its path: a
    /// release's entries come directory by directory, and opening the same
    /// parent again for each of its files was a third of a fleet host's
    /// prepare. Entries are only ever created in it, and a directory is
    /// never replaced through a `Tree` (`clear` refuses one), so it stays
    /// the directory `openat2` would open.
    parent: std::sync::Mutex<Option<(PathBuf, std::sync::Arc<OwnedFd>)>>,
}

/// Set once a reflink has failed for want of filesystem support, so that
/// the rest of the tree goes straight to hard links.
static NO_REFLINK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

const BENEATH: ResolveFlag = ResolveFlag::RESOLVE_BENEATH
    .union(ResolveFlag::RESOLVE_NO_SYMLINKS)
    .union(ResolveFlag::RESOLVE_NO_MAGICLINKS);

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Splits a relative path into its parent and last name, refusing
/// anything but plain names.
fn split(rel: &Path) -> Result<(&Path, &OsStr), TreeError> {
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
    match (plain, rel.parent(), rel.file_name()) {
        (true, Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(TreeError::Escape(rel.to_path_buf())),
    }
}

/// `openat2(2)`, again when the kernel answers EAGAIN: a lookup confined
/// beneath a directory that passes `..` fails that way when any rename or
/// mount happened on the system meanwhile (a deploy's switch is a rename),
/// and the kernel asks the caller to retry.
pub fn openat2<P: ?Sized + nix::NixPath, Fd: AsFd>(
    dir: Fd,
    path: &P,
    how: OpenHow,
) -> nix::Result<OwnedFd> {
    let mut tries = 0;
    loop {
        match nix::fcntl::openat2(&dir, path, how) {
            Err(Errno::EAGAIN) if tries < 64 => tries += 1,
            other => return other,
        }
    }
}

impl Tree {
    /// Opens `dir` (which must be a real directory, not a link to one).
    pub fn open(dir: &Path) -> io::Result<Tree> {
        let fd = nix::fcntl::open(dir, dir_flags(), Mode::empty())?;
        Ok(Tree {
            dir: fd,
            parent: std::sync::Mutex::new(None),
        })
    }

    /// Opens directory `rel` beneath the tree, creating missing directories
    /// (mode 0755) when `create` is set. No component may be a symlink.
    fn open_dir(&self, rel: &Path, create: bool) -> Result<OwnedFd, TreeError> {
        let how = || OpenHow::new().flags(dir_flags()).resolve(BENEATH);
        let dot = Path::new(".");
        let first = if rel.as_os_str().is_empty() { dot } else { rel };
        match openat2(&self.dir, first, how()) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) if create => {}
            Err(Errno::EXDEV | Errno::ELOOP | Errno::ENOTDIR) => {
                return Err(TreeError::Escape(rel.to_path_buf()));
            }
            Err(e) => return Err(io_at(rel)(e)),
        }
        // Create one component at a time, each opened beneath the last.
        let mut at = nix::unistd::dup(&self.dir).map_err(io_at(rel))?;
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(TreeError::Escape(rel.to_path_buf()));
            };
            match mkdirat(&at, name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(io_at(rel)(e)),
            }
            at = match openat2(&at, name, how()) {
                Ok(fd) => fd,
                Err(Errno::EXDEV | Errno::ELOOP | Errno::ENOTDIR) => {
                    return Err(TreeError::Escape(rel.to_path_buf()));
                }
                Err(e) => return Err(io_at(rel)(e)),
            };
        }
        Ok(at)
    }

    /// Makes room for a new entry `name` in `parent`: an existing
    /// non-directory there is removed (a later archive entry replaces an
    /// earlier one, as with tar); a directory is refused.
    /// [`Tree::open_dir`] of an entry's parent, creating it, from the
    /// one-directory cache when it is the last one opened.
    fn parent_dir(&self, parent: &Path) -> Result<std::sync::Arc<OwnedFd>, TreeError> {
        let mut last = self.parent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((path, fd)) = last.as_ref()
            && path == parent
        {
            return Ok(fd.clone());
        }
        let fd = std::sync::Arc::new(self.open_dir(parent, true)?);
        *last = Some((parent.to_path_buf(), fd.clone()));
        Ok(fd)
    }

    fn clear(parent: &OwnedFd, name: &OsStr, rel: &Path) -> Result<(), TreeError> {
        match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
                Err(TreeError::Io {
                    path: rel.to_path_buf(),
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "a directory of that name exists",
                    ),
                })
            }
            Ok(_) => unlinkat(parent, name, UnlinkatFlags::NoRemoveDir).map_err(io_at(rel)),
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(io_at(rel)(e)),
        }
    }

    /// Creates directory `rel` (and its parents).
    pub fn create_dir(&self, rel: &Path) -> Result<(), TreeError> {
        self.open_dir(rel, true).map(drop)
    }

    /// Creates regular file `rel` for writing, with `mode`.
    pub fn create_file(&self, rel: &Path, mode: u32) -> Result<File, TreeError> {
        let (parent, name) = split(rel)?;
        let dir = self.parent_dir(parent)?;
        Self::clear(&dir, name, rel)?;
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::openat(&dir, name, flags, Mode::from_bits_truncate(mode & 0o777))
            .map_err(io_at(rel))?;
        Ok(File::from(fd))
    }

    /// Creates symlink `rel` with text `target` (never followed here).
    pub fn symlink(&self, rel: &Path, target: &Path) -> Result<(), TreeError> {
        let (parent, name) = split(rel)?;
        let dir = self.parent_dir(parent)?;
        Self::clear(&dir, name, rel)?;
        symlinkat(target, &*dir, name).map_err(io_at(rel))
    }

    /// Makes `rel` a hard link to the regular file `existing`, both beneath
    /// the tree; neither path may pass through a link.
    pub fn hard_link(&self, rel: &Path, existing: &Path) -> Result<(), TreeError> {
        let (from_parent, from_name) = split(existing)?;
        let from_dir = self.open_dir(from_parent, false)?;
        let st =
            fstatat(&from_dir, from_name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(io_at(existing))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(TreeError::Escape(existing.to_path_buf()));
        }
        let (parent, name) = split(rel)?;
        let dir = self.parent_dir(parent)?;
        Self::clear(&dir, name, rel)?;
        linkat(&from_dir, from_name, &*dir, name, AtFlags::empty()).map_err(io_at(rel))
    }

    /// Makes `rel` share the data of the regular file `prev` (outside the
    /// tree, in an earlier release): a reflink (a new inode with `prev`'s
    /// permissions, read-only unless `writable`, and modification time,
    /// its blocks shared copy-on-write) where
    /// the filesystem has them, else a hard link to the very inode opened.
    /// Like every entry, `rel` is created beneath the tree's descriptor
    /// and never through a link; an entry already at `rel` is replaced.
    /// Returns whether it is a reflink.
    pub fn share(&self, rel: &Path, prev: &Path, writable: bool) -> Result<bool, TreeError> {
        use std::sync::atomic::Ordering::Relaxed;
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let src = File::from(nix::fcntl::open(prev, flags, Mode::empty()).map_err(io_at(prev))?);
        let meta = src.metadata().map_err(|e| TreeError::Io {
            path: prev.to_path_buf(),
            source: e,
        })?;
        if !meta.is_file() {
            return Err(TreeError::Escape(prev.to_path_buf()));
        }
        let io = |e: io::Error| TreeError::Io {
            path: rel.to_path_buf(),
            source: e,
        };
        if !NO_REFLINK.load(Relaxed) {
            let dst = self.create_file(rel, 0o600)?;
            match crate::sys::reflink(&src, &dst) {
                Ok(()) => {
                    use std::os::unix::fs::{MetadataExt, PermissionsExt};
                    let mode = if writable {
                        meta.mode() & 0o777 | 0o200
                    } else {
                        meta.mode() & 0o555
                    };
                    dst.set_permissions(std::fs::Permissions::from_mode(mode))
                        .map_err(io)?;
                    dst.set_modified(meta.modified().map_err(io)?).map_err(io)?;
                    return Ok(true);
                }
                Err(e) => {
                    let unsupported = matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY)
                    );
                    if !unsupported {
                        return Err(io(e));
                    }
                    NO_REFLINK.store(true, Relaxed);
                }
            }
        }
        let (parent, name) = split(rel)?;
        let dir = self.parent_dir(parent)?;
        // The inode opened above, through its /proc name (linkat with
        // AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH). An entry already
        // there (rare: a fresh tree has none) is cleared and the link made
        // again, rather than looked for before every link.
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", src.as_fd().as_raw_fd()));
        let link = || match linkat(AT_FDCWD, &by_fd, &*dir, name, AtFlags::AT_SYMLINK_FOLLOW) {
            Err(Errno::ENOENT) if !Path::new("/proc/self/fd").exists() => {
                linkat(AT_FDCWD, prev, &*dir, name, AtFlags::empty())
            }
            other => other,
        };
        match link() {
            Ok(()) => Ok(false),
            Err(Errno::EEXIST) => {
                Self::clear(&dir, name, rel)?;
                link().map_err(io_at(rel))?;
                Ok(false)
            }
            Err(e) => Err(io_at(rel)(e)),
        }
    }

    /// Sets the permission bits of directory `rel` (never through a link).
    pub fn chmod_dir(&self, rel: &Path, mode: u32) -> Result<(), TreeError> {
        let dir = self.open_dir(rel, false)?;
        nix::sys::stat::fchmod(&dir, Mode::from_bits_truncate(mode & 0o7777)).map_err(io_at(rel))
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

/// The symlinks below `root` that resolve outside it (or loop), as
/// `(path, target)` pairs relative to `root`, first ones first. A link is
/// resolved by the kernel beneath `root` (`RESOLVE_BENEATH`), so chains of
/// links, each harmless on its own, are judged by where they really lead. A
/// dangling link is judged by its text: it may not climb out lexically.
pub fn links_escaping(root: &Path) -> io::Result<Vec<(PathBuf, PathBuf)>> {
    let tree = Tree::open(root)?;
    let mut bad = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        // The type each entry has from the directory itself (`d_type`; a
        // stat of its own only where the filesystem does not say): one
        // `lstat` per file was a tenth of a fleet host's prepare.
        let mut names: Vec<_> = std::fs::read_dir(&dir)?
            .map(|e| e.and_then(|e| Ok((e.file_name(), e.file_type()?))))
            .collect::<io::Result<_>>()?;
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, kind) in names {
            let rel = rel.join(&name);
            if kind.is_dir() {
                stack.push(rel);
                continue;
            }
            if !kind.is_symlink() {
                continue;
            }
            let target = std::fs::read_link(root.join(&rel))?;
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            match openat2(tree.fd(), &rel, how) {
                Ok(_) => {}
                Err(Errno::ENOENT | Errno::ENOTDIR) if stays_inside(&rel, &target) => {}
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::EXDEV | Errno::ELOOP) => {
                    bad.push((rel, target))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    bad.sort();
    Ok(bad)
}

/// Whether the text of a link at `rel` stays inside the tree when read on
/// its own (used only for dangling links, which the kernel cannot resolve).
pub fn stays_inside(rel: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = rel.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_of_links_cannot_carry_a_write_outside() {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("r");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(top.path().join("victim.txt"), "safe").unwrap();
        let t = Tree::open(&root).unwrap();
        t.symlink(Path::new("l0"), Path::new(".")).unwrap();
        t.symlink(Path::new("l1"), Path::new("l0/..")).unwrap();
        t.symlink(Path::new("victim"), Path::new("l1/victim.txt"))
            .unwrap();
        // The regular file replaces the link; it is never written through.
        let mut f = t.create_file(Path::new("victim"), 0o644).unwrap();
        std::io::Write::write_all(&mut f, b"pwned").unwrap();
        assert_eq!(
            std::fs::read_to_string(top.path().join("victim.txt")).unwrap(),
            "safe"
        );
        // A directory walk through a link is refused.
        assert!(matches!(
            t.create_file(Path::new("l1/x"), 0o644),
            Err(TreeError::Escape(_))
        ));
        assert!(
            t.hard_link(Path::new("h"), Path::new("l1/victim.txt"))
                .is_err()
        );
        let bad = links_escaping(&root).unwrap();
        assert_eq!(
            bad.iter()
                .map(|(p, _)| p.to_str().unwrap())
                .collect::<Vec<_>>(),
            ["l1"]
        );
    }

    #[test]
    fn text_of_dangling_links() {
        assert!(stays_inside(Path::new("a/b"), Path::new("../c")));
        assert!(stays_inside(Path::new("a/b"), Path::new("c/../d")));
        assert!(!stays_inside(Path::new("b"), Path::new("../c")));
        assert!(!stays_inside(Path::new("a"), Path::new("/etc/passwd")));
        assert!(!stays_inside(Path::new("a"), Path::new("x/../../y")));
    }
}
