//! A tarball source: checked, then extracted entry by entry beneath the
//! release's directory descriptor.

use super::*;

/// Extracts a tarball into `dst` (which must not exist), refusing anything
/// that would land outside it. Every entry is created relative to the
/// release's directory descriptor ([`Tree`]): no entry is ever written
/// through a link, whatever links earlier entries made.
pub fn extract_tar(
    tarball: &Path,
    dst: &Path,
    max_bytes: u64,
) -> Result<(Stats, Manifest), StageError> {
    check_limits(tarball, max_bytes)?;
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
    let manifest = finish(&tree, dirs, entries);
    Ok((stats, manifest))
}

/// The limits, checked on the headers alone before anything is written:
/// a tar bomb costs a read, never a full disk or a million files.
fn check_limits(tarball: &Path, max_bytes: u64) -> Result<(), StageError> {
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
    Ok(())
}

/// Gives directories their modes once their contents are written, and
/// makes the manifest, with the directories the archive only implied.
fn finish(
    tree: &Tree,
    dirs: Vec<(PathBuf, u32)>,
    mut entries: std::collections::BTreeMap<PathBuf, Kind>,
) -> Manifest {
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
    Manifest::new(
        entries
            .into_iter()
            .map(|(path, kind)| Entry { path, kind })
            .collect(),
    )
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
