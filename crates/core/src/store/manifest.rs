//! Content manifests: what a release holds, entry by entry, with each
//! file's BLAKE3 hash.
//!
//! A manifest is the basis of everything that must know a release's
//! content: sharing with the previous release (a file is shared only when
//! its hash and mode equal that release's entry), the release id's suffix
//! (the digest of the source's manifest), `dream releases --verify`, and
//! the fleet's transfer (a host is sent only the content it lacks). Size
//! and modification time never decide that two files are the same.
//!
//! The file `.dream/manifests/<id>` is text, one entry per line, sorted by
//! path, after a version line:
//!
//! ```text
//! dream-manifest 1
//! d 755 public
//! f 644 12 <64 hex digits of BLAKE3> public/index.html
//! l index.html public/home.html
//! ```
//!
//! `d` is a directory, `f` a regular file (mode, size, hash), `l` a symlink
//! (its target). Modes are octal permission bits as the release has them
//! (frozen: no write bits). Paths and targets are bytes: space, `%`,
//! control and non-ASCII bytes are written `%XX`, so every line splits on
//! spaces and any name round-trips.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const VERSION_LINE: &str = "dream-manifest 1";

/// The mode a file or directory has in a frozen release: permission bits
/// without write bits (set-id bits dropped); a directory stays traversable
/// and listable by its owner.
pub fn frozen_mode(is_dir: bool, mode: u32) -> u32 {
    if is_dir {
        mode & 0o555 | 0o500
    } else {
        mode & 0o555
    }
}

/// A BLAKE3 hash of a file's content.
pub type Hash = [u8; 32];

/// What a manifest says of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir { mode: u32 },
    File { mode: u32, size: u64, hash: Hash },
    Symlink { target: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the release's top.
    pub path: PathBuf,
    pub kind: Kind,
}

/// A release's entries, sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<Entry>,
    /// Files bridged from the previous release (`--bridge`): entries like
    /// the others, also listed as `b PATH` lines.
    bridged: Vec<PathBuf>,
}

/// Which side of [`hash_copy`] failed.
#[derive(Debug)]
pub enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies `r` to its end into `w`, hashing what passes through (one read);
/// returns the hash and the byte count.
pub fn hash_copy(r: &mut impl Read, w: &mut impl Write) -> Result<(Hash, u64), CopyError> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                hasher.update(&buf[..k]);
                w.write_all(&buf[..k]).map_err(CopyError::Write)?;
                n += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CopyError::Read(e)),
        }
    }
    Ok((*hasher.finalize().as_bytes(), n))
}

/// Hashes a reader to its end; returns the hash and the byte count.
pub fn hash_reader(r: &mut impl Read) -> io::Result<(Hash, u64)> {
    hash_copy(r, &mut io::sink()).map_err(|e| match e {
        CopyError::Read(e) | CopyError::Write(e) => e,
    })
}

/// Hashes a file's content.
pub fn hash_file(path: &Path) -> io::Result<(Hash, u64)> {
    hash_reader(&mut File::open(path)?)
}

pub fn hex(h: &Hash) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

fn unhex(s: &str) -> Option<Hash> {
    blake3::Hash::from_hex(s).ok().map(|h| *h.as_bytes())
}

fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn path_of(s: &str) -> Option<PathBuf> {
    Some(PathBuf::from(std::ffi::OsString::from_vec(unescape(s)?)))
}

impl Manifest {
    pub fn new(mut entries: Vec<Entry>) -> Manifest {
        entries.sort_by(|a, b| a.path.as_os_str().cmp(b.path.as_os_str()));
        Manifest {
            entries,
            bridged: Vec::new(),
        }
    }

    /// The same manifest, recording `paths` as bridged.
    pub fn with_bridged(mut self, mut paths: Vec<PathBuf>) -> Manifest {
        paths.sort();
        self.bridged = paths;
        self
    }

    /// The files bridged from the previous release.
    pub fn bridged(&self) -> &[PathBuf] {
        &self.bridged
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Entries by path.
    pub fn index(&self) -> HashMap<&Path, &Kind> {
        self.entries
            .iter()
            .map(|e| (e.path.as_path(), &e.kind))
            .collect()
    }

    /// The same entries with the modes a frozen release has (no write
    /// bits; see [`frozen_mode`]).
    pub fn frozen(&self) -> Manifest {
        let entries = self
            .entries
            .iter()
            .map(|e| Entry {
                path: e.path.clone(),
                kind: match &e.kind {
                    Kind::Dir { mode } => Kind::Dir {
                        mode: frozen_mode(true, *mode),
                    },
                    Kind::File { mode, size, hash } => Kind::File {
                        mode: frozen_mode(false, *mode),
                        size: *size,
                        hash: *hash,
                    },
                    k => k.clone(),
                },
            })
            .collect();
        Manifest {
            entries,
            bridged: self.bridged.clone(),
        }
    }

    /// The manifest as text (the file's bytes).
    pub fn to_text(&self) -> String {
        let mut s = String::from(VERSION_LINE);
        s.push('\n');
        for e in &self.entries {
            let path = escape(e.path.as_os_str().as_bytes());
            match &e.kind {
                Kind::Dir { mode } => s.push_str(&format!("d {mode:o} {path}\n")),
                Kind::File { mode, size, hash } => {
                    s.push_str(&format!("f {mode:o} {size} {} {path}\n", hex(hash)))
                }
                Kind::Symlink { target } => s.push_str(&format!(
                    "l {} {path}\n",
                    escape(target.as_os_str().as_bytes())
                )),
            }
        }
        for b in &self.bridged {
            s.push_str(&format!("b {}\n", escape(b.as_os_str().as_bytes())));
        }
        s
    }

    /// Parses a manifest's text; the error names the line.
    pub fn parse(text: &str) -> Result<Manifest, String> {
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, l)) if l == VERSION_LINE => {}
            Some((_, l)) => return Err(format!("line 1: not a dream manifest ({l:?})")),
            None => return Err("empty manifest".into()),
        }
        let mut entries = Vec::new();
        let mut bridged = Vec::new();
        for (i, line) in lines {
            let bad = || format!("line {}: malformed entry {line:?}", i + 1);
            let f: Vec<&str> = line.split(' ').collect();
            if let ["b", path] = f.as_slice() {
                bridged.push(path_of(path).ok_or_else(bad)?);
                continue;
            }
            let kind_path = match f.as_slice() {
                ["d", mode, path] => (
                    Kind::Dir {
                        mode: u32::from_str_radix(mode, 8).map_err(|_| bad())?,
                    },
                    path,
                ),
                ["f", mode, size, hash, path] => (
                    Kind::File {
                        mode: u32::from_str_radix(mode, 8).map_err(|_| bad())?,
                        size: size.parse().map_err(|_| bad())?,
                        hash: unhex(hash).ok_or_else(bad)?,
                    },
                    path,
                ),
                ["l", target, path] => (
                    Kind::Symlink {
                        target: path_of(target).ok_or_else(bad)?,
                    },
                    path,
                ),
                _ => return Err(bad()),
            };
            let path = path_of(kind_path.1).ok_or_else(bad)?;
            // Paths are relative and plain: no root, no `.` or `..`.
            let plain = !path.as_os_str().is_empty()
                && path
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain {
                return Err(format!(
                    "line {}: {path:?} is not a plain relative path",
                    i + 1
                ));
            }
            entries.push(Entry {
                path,
                kind: kind_path.0,
            });
        }
        Ok(Manifest::new(entries).with_bridged(bridged))
    }

    /// The digest of the manifest's text: the same content (paths, types,
    /// modes, bytes) always gives the same digest.
    pub fn digest(&self) -> String {
        blake3::hash(self.to_text().as_bytes()).to_hex().to_string()
    }

    /// Writes the manifest to `path` durably (temporary file, fsync,
    /// rename), so a reader sees the old one or the whole new one.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = File::create(&tmp)?;
        f.write_all(self.to_text().as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    }

    pub fn load(path: &Path) -> io::Result<Manifest> {
        let text = fs::read_to_string(path)?;
        Manifest::parse(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })
    }

    /// The manifest of a tree as it is on disk: every file read and hashed.
    pub fn of_tree(root: &Path) -> io::Result<Manifest> {
        Manifest::of_tree_but(root, &|_, _| false)
    }

    /// [`Manifest::of_tree`], leaving out what `skip(rel, is_dir)` says
    /// (a skipped directory is not entered).
    pub fn of_tree_but(root: &Path, skip: &dyn Fn(&Path, bool) -> bool) -> io::Result<Manifest> {
        let mut entries = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            for e in fs::read_dir(root.join(&rel))? {
                let e = e?;
                let rel = rel.join(e.file_name());
                let path = root.join(&rel);
                let meta = fs::symlink_metadata(&path)?;
                if skip(&rel, meta.is_dir()) {
                    continue;
                }
                let mode = meta.permissions().mode() & 0o7777;
                let kind = if meta.is_dir() {
                    stack.push(rel.clone());
                    Kind::Dir { mode }
                } else if meta.file_type().is_symlink() {
                    Kind::Symlink {
                        target: fs::read_link(&path)?,
                    }
                } else if meta.is_file() {
                    let (hash, size) = hash_file(&path)?;
                    Kind::File { mode, size, hash }
                } else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: not a file, directory or symlink (mode {:o})",
                            rel.display(),
                            meta.mode()
                        ),
                    ));
                };
                entries.push(Entry { path: rel, kind });
            }
        }
        Ok(Manifest::new(entries))
    }

    /// How `actual` (a tree's manifest now) differs from this one, as one
    /// line per path: `changed`, `mode`, `missing`, `added`, `type`.
    pub fn differences(&self, actual: &Manifest) -> Vec<Difference> {
        let want = self.index();
        let have = actual.index();
        let mut out = Vec::new();
        let mut push = |what: What, path: &Path| {
            out.push(Difference {
                what,
                path: path.to_path_buf(),
            })
        };
        for e in &self.entries {
            match (have.get(e.path.as_path()), &e.kind) {
                (None, _) => push(What::Missing, &e.path),
                (
                    Some(Kind::File {
                        hash: h2, mode: m2, ..
                    }),
                    Kind::File { hash, mode, .. },
                ) => {
                    if h2 != hash {
                        push(What::Changed, &e.path);
                    } else if m2 != mode {
                        push(
                            What::Mode {
                                was: *mode,
                                now: *m2,
                            },
                            &e.path,
                        );
                    }
                }
                (Some(Kind::Dir { mode: m2 }), Kind::Dir { mode }) => {
                    if m2 != mode {
                        push(
                            What::Mode {
                                was: *mode,
                                now: *m2,
                            },
                            &e.path,
                        );
                    }
                }
                (Some(Kind::Symlink { target: t2 }), Kind::Symlink { target }) => {
                    if t2 != target {
                        push(
                            What::Link {
                                was: target.clone(),
                                now: t2.clone(),
                            },
                            &e.path,
                        );
                    }
                }
                (Some(_), _) => push(What::Type, &e.path),
            }
        }
        for e in &actual.entries {
            if !want.contains_key(e.path.as_path()) {
                push(What::Added, &e.path);
            }
        }
        out
    }
}

/// How a release's tree differs from its manifest at one path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    #[serde(flatten)]
    pub what: What,
    pub path: PathBuf,
}

/// What differs (`"what"` in JSON, with the old and new value where there
/// are two).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum What {
    /// In the manifest, not in the tree.
    Missing,
    /// A file whose content is not the manifest's.
    Changed,
    /// Permissions (octal) not the manifest's.
    Mode { was: u32, now: u32 },
    /// A symbolic link pointing elsewhere.
    Link { was: PathBuf, now: PathBuf },
    /// A file where the manifest has a directory, or the like.
    Type,
    /// In the tree, not in the manifest.
    Added,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.path.display();
        match &self.what {
            What::Missing => write!(f, "missing  {p}"),
            What::Changed => write!(f, "changed  {p}"),
            What::Mode { was, now } => write!(f, "mode     {p} ({was:o} -> {now:o})"),
            What::Link { was, now } => write!(
                f,
                "changed  {p} -> {} (was -> {})",
                now.display(),
                was.display()
            ),
            What::Type => write!(f, "type     {p}"),
            What::Added => write!(f, "added    {p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_any_name() {
        let names: Vec<PathBuf> = [
            &b"plain.txt"[..],
            b"with space",
            b"100%",
            b"new\nline",
            b"\xff\xfe not utf-8",
            b"d/e/f",
        ]
        .iter()
        .map(|b| PathBuf::from(std::ffi::OsStr::from_bytes(b)))
        .collect();
        let m = Manifest::new(
            names
                .iter()
                .enumerate()
                .map(|(i, p)| Entry {
                    path: p.clone(),
                    kind: match i % 3 {
                        0 => Kind::File {
                            mode: 0o444,
                            size: i as u64,
                            hash: *blake3::hash(p.as_os_str().as_bytes()).as_bytes(),
                        },
                        1 => Kind::Dir { mode: 0o555 },
                        _ => Kind::Symlink {
                            target: PathBuf::from("../a b/%"),
                        },
                    },
                })
                .collect(),
        );
        let text = m.to_text();
        assert_eq!(text.lines().count(), names.len() + 1, "{text}");
        assert_eq!(Manifest::parse(&text).unwrap(), m);
        assert!(Manifest::parse("dream-manifest 1\nf 644 x y z\n").is_err());
        assert!(Manifest::parse("something else\n").is_err());
    }

    #[test]
    fn same_size_same_time_different_bytes_differ() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        fs::create_dir(&a).unwrap();
        fs::write(a.join("config"), "DEBUG=0\n").unwrap();
        let before = Manifest::of_tree(&a).unwrap();
        let t = fs::metadata(a.join("config")).unwrap().modified().unwrap();
        fs::write(a.join("config"), "DEBUG=1\n").unwrap();
        File::options()
            .write(true)
            .open(a.join("config"))
            .unwrap()
            .set_modified(t)
            .unwrap();
        let after = Manifest::of_tree(&a).unwrap();
        assert_ne!(before.digest(), after.digest());
        let d = before.differences(&after);
        assert_eq!(
            d.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            ["changed  config"]
        );
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!([{"what": "changed", "path": "config"}])
        );
        assert_eq!(Manifest::of_tree(&a).unwrap().digest(), after.digest());
    }
}
