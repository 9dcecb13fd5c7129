//! A release rebuilt from a manifest and the content store (the fleet
//! agent's), and bridged files carried over from the live release.

use super::*;

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
