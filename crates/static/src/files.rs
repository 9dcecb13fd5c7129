//! Mapping a request to a file and a response: path safety, conditional
//! requests, ranges. Pure functions where possible, so the rules are unit
//! tested without sockets.

use std::path::{Path, PathBuf};

use percent_encoding::percent_decode_str;

/// Why a request path does not name a servable file.
#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    /// `..`, a NUL, or a malformed encoding: never served.
    Forbidden,
}

/// The path of a request, relative to the served directory, with every
/// segment decoded and checked. Returns the segments and whether the path
/// ended in `/`.
pub fn relative_path(uri_path: &str) -> Result<(PathBuf, bool), PathError> {
    if !uri_path.starts_with('/') {
        return Err(PathError::Forbidden);
    }
    let decoded: Vec<u8> = percent_decode_str(uri_path).collect();
    if decoded.contains(&0) || decoded.contains(&b'\\') {
        return Err(PathError::Forbidden);
    }
    let decoded = String::from_utf8(decoded).map_err(|_| PathError::Forbidden)?;
    let mut rel = PathBuf::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => return Err(PathError::Forbidden),
            s => rel.push(s),
        }
    }
    Ok((rel, decoded.ends_with('/')))
}

/// Where a request for directory `rel` (without its trailing slash) is
/// sent: the directory's own path with one leading `/`, rebuilt from the
/// checked segments and percent-encoded. It is always a path on this
/// origin, never `//host/` or `/\host` (which browsers read as another
/// host), whatever the request's path looked like.
pub fn directory_location(rel: &Path) -> String {
    use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
    const SEGMENT: &AsciiSet = &CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'#')
        .add(b'%')
        .add(b'/')
        .add(b'<')
        .add(b'>')
        .add(b'?')
        .add(b'\\')
        .add(b'`')
        .add(b'{')
        .add(b'}');
    let mut out = String::from("/");
    for seg in rel.iter() {
        out.extend(utf8_percent_encode(&seg.to_string_lossy(), SEGMENT));
        out.push('/');
    }
    out
}

/// Resolves `rel` under `root` (already canonical), following symlinks,
/// and refuses anything whose real path leaves `root`.
pub fn resolve(root: &Path, rel: &Path) -> Option<PathBuf> {
    let real = root.join(rel).canonicalize().ok()?;
    real.starts_with(root).then_some(real)
}

/// The served directory, opened once. Files are opened relative to it with
/// `openat2(RESOLVE_BENEATH)`, so the kernel itself refuses any path (`..`
/// or a symlink) that leads out, in one system call; kernels without
/// `openat2` fall back to resolving the real path and checking its prefix.
pub struct Root {
    dir: std::os::fd::OwnedFd,
    path: PathBuf,
}

impl Root {
    /// Opens `path` (canonical) as the root.
    pub fn open(path: &Path) -> std::io::Result<Root> {
        use nix::fcntl::{OFlag, open};
        let dir = open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        Ok(Root {
            dir,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What `stat(2)` says of `rel` under the root now (symlinks followed),
    /// without opening it: only to confirm that a file opened before
    /// through [`Root::open_file`] is still the one at `rel`, unchanged.
    pub fn stat(&self, rel: &Path) -> Option<nix::sys::stat::FileStat> {
        let rel = rel.as_os_str();
        (!rel.is_empty())
            .then(|| nix::sys::stat::fstatat(&self.dir, rel, nix::fcntl::AtFlags::empty()).ok())
            .flatten()
    }

    /// Opens `rel` for reading if it stays inside the root and is a
    /// regular file or a directory. An escape is reported as `NotFound`, so
    /// it looks like any missing file. The open never blocks (a FIFO or a
    /// device would hang the worker in `open`): `O_NONBLOCK`, then
    /// anything but a file or directory is refused by its `fstat`.
    pub fn open_file(&self, rel: &Path) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
        use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
        use std::os::unix::fs::OpenOptionsExt;
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
        let how = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        // Retried on EAGAIN: a lookup that passed `..` raced a rename or a
        // mount anywhere on the system (a deploy's switch is one).
        let file = match dream_core::store::tree::openat2(&self.dir, rel, how) {
            Ok(fd) => std::fs::File::from(fd),
            // An absolute symlink, or no openat2: resolve the real path and
            // serve it only if it lies inside the root.
            Err(nix::errno::Errno::EXDEV) | Err(nix::errno::Errno::ENOSYS) => {
                let real = resolve(&self.path, rel).ok_or(std::io::ErrorKind::NotFound)?;
                std::fs::File::options()
                    .read(true)
                    .custom_flags(libc_flags(flags))
                    .open(real)?
            }
            Err(nix::errno::Errno::ELOOP) => return Err(std::io::ErrorKind::NotFound.into()),
            Err(e) => return Err(e.into()),
        };
        let meta = file.metadata()?;
        if !(meta.is_file() || meta.is_dir()) {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        Ok((file, meta))
    }
}

fn libc_flags(flags: nix::fcntl::OFlag) -> i32 {
    (flags & !nix::fcntl::OFlag::O_RDONLY).bits()
}

/// A strong validator: the content's BLAKE3 hash when the bytes are at
/// hand (a small file, read whole anyway), else the file's identity (inode,
/// size, modification and change time). Two files with the same size and
/// modification time but other bytes (two releases, a build that sets
/// every mtime to 1970) never share a validator: a changed file in a
/// release is always a new inode, and an edit in place moves the change
/// time, which no one can set back.
pub fn etag(content: Option<&[u8]>, meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    match content {
        Some(bytes) => format!("\"{}\"", &blake3::hash(bytes).to_hex()[..32]),
        None => format!(
            "\"{:x}-{:x}-{:x}.{:x}-{:x}.{:x}\"",
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec()
        ),
    }
}

/// True if an `If-None-Match` header value matches `etag`.
pub fn none_match(header: &str, etag: &str) -> bool {
    let bare = etag.trim_start_matches("W/");
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == bare)
}

/// A byte range `start..=end` of a file of `len` bytes.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// Serve the whole file (no header, several ranges, or a header we do
    /// not understand: RFC 9110 lets a server ignore Range).
    Full,
    /// Serve one part with 206.
    Partial(ByteRange),
    /// 416: the range starts past the end.
    Unsatisfiable,
}

/// Parses a `Range` header for a file of `len` bytes. Only a single range
/// is honoured; anything absurd falls back to the full file.
pub fn parse_range(header: &str, len: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') || spec.len() > 64 {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let range = match (a.trim().is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes
        (true, _, Some(n)) => {
            if n == 0 {
                return RangeRequest::Unsatisfiable;
            }
            if len == 0 {
                return RangeRequest::Unsatisfiable;
            }
            ByteRange {
                start: len.saturating_sub(n),
                end: len - 1,
            }
        }
        (false, Some(start), end) => {
            if !b.trim().is_empty() && end.is_none() {
                return RangeRequest::Full;
            }
            if start >= len {
                return RangeRequest::Unsatisfiable;
            }
            let end = end.map_or(len - 1, |e| e.min(len - 1));
            if end < start {
                return RangeRequest::Full;
            }
            ByteRange { start, end }
        }
        _ => return RangeRequest::Full,
    };
    if range.start == 0 && range.end + 1 == len {
        return RangeRequest::Full;
    }
    RangeRequest::Partial(range)
}

/// The `Content-Type` for a file name.
pub fn content_type(path: &Path) -> String {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    if mime.type_() == "text" || mime.essence_str() == "application/javascript" {
        format!("{}; charset=utf-8", mime.essence_str())
    } else {
        mime.essence_str().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_never_escape() {
        for bad in [
            "/../etc/passwd",
            "/a/../../x",
            "/%2e%2e/etc/passwd",
            "/%2E%2E%2Fetc",
            "/a/%2e%2e/%2e%2e/x",
            "/a%00b",
            "/a\\..\\b",
            "/a%5c..%5cb",
            "relative",
            "/%ff%fe",
        ] {
            assert_eq!(relative_path(bad), Err(PathError::Forbidden), "{bad}");
        }
        assert_eq!(relative_path("/").unwrap(), (PathBuf::new(), true));
        assert_eq!(
            relative_path("/a/./b//c").unwrap(),
            (PathBuf::from("a/b/c"), false)
        );
        assert_eq!(
            relative_path("/sp%20ace/").unwrap(),
            (PathBuf::from("sp ace"), true)
        );
    }

    #[test]
    fn symlinks_out_of_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("public");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("secret"), "x").unwrap();
        std::fs::write(root.join("ok"), "x").unwrap();
        std::os::unix::fs::symlink("../secret", root.join("leak")).unwrap();
        std::os::unix::fs::symlink("ok", root.join("alias")).unwrap();
        let root = root.canonicalize().unwrap();
        assert!(resolve(&root, Path::new("leak")).is_none());
        assert!(resolve(&root, Path::new("alias")).is_some());
        assert!(resolve(&root, Path::new("missing")).is_none());
        let r = Root::open(&root).unwrap();
        assert!(r.open_file(Path::new("leak")).is_err());
        assert!(r.open_file(Path::new("../secret")).is_err());
        assert!(r.open_file(Path::new("alias")).is_ok());
        assert!(r.open_file(Path::new("")).is_ok(), "the root itself");
        // An absolute link is served only when it leads inside the root.
        std::os::unix::fs::symlink(root.join("ok"), root.join("abs-in")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("abs-out")).unwrap();
        assert!(r.open_file(Path::new("abs-in")).is_ok());
        assert!(r.open_file(Path::new("abs-out")).is_err());
        // A FIFO is refused without blocking in open().
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = r.open_file(Path::new("fifo")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn directory_redirects_stay_on_this_origin() {
        for (uri, want) in [
            ("/sub", "/sub/"),
            ("//sub", "/sub/"),
            ("///evil.example//x", "/evil.example/x/"),
            ("/%2Fevil.example", "/evil.example/"),
            ("/a%20b", "/a%20b/"),
            ("/q%3Fx", "/q%3Fx/"),
        ] {
            let (rel, _) = relative_path(uri).unwrap();
            let loc = directory_location(&rel);
            assert_eq!(loc, want, "{uri}");
            assert!(
                !loc.starts_with("//") && !loc.contains('\\'),
                "{uri}: {loc}"
            );
        }
    }

    #[test]
    fn ranges() {
        use RangeRequest::*;
        let r = |s, e| Partial(ByteRange { start: s, end: e });
        assert_eq!(parse_range("bytes=0-9", 100), r(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), r(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), r(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), Full);
        assert_eq!(parse_range("bytes=50-5000", 100), r(50, 99));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-99", 100), Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Full);
        assert_eq!(parse_range("bytes=9-1", 100), Full);
        assert_eq!(parse_range("bytes=99999999999999999999999-", 100), Full);
        assert_eq!(parse_range("bytes=a-b", 100), Full);
        assert_eq!(parse_range("items=0-1", 100), Full);
        assert_eq!(
            parse_range(&format!("bytes={}", "1".repeat(10000)), 100),
            Full
        );
    }

    #[test]
    fn etags_match() {
        let meta = std::fs::metadata("/").unwrap();
        let t = etag(Some(b"0123456789"), &meta);
        assert_ne!(t, etag(Some(b"0123456780"), &meta), "the content decides");
        assert_ne!(
            etag(None, &meta),
            etag(None, &std::fs::metadata("/tmp").unwrap())
        );
        assert!(none_match(&t, &t));
        assert!(none_match(&format!("\"x\", {t}"), &t));
        assert!(none_match("*", &t));
        assert!(!none_match("\"other\"", &t));
    }

    #[test]
    fn types() {
        assert_eq!(
            content_type(Path::new("a.html")),
            "text/html; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("a.png")), "image/png");
        assert_eq!(content_type(Path::new("noext")), "application/octet-stream");
    }
}
