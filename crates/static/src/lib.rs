//! `dream static`: a static file worker that follows dream's protocol.
//!
//! Theory of operation. The worker never binds: it takes its listening
//! sockets from `LISTEN_FDS` or fd 0 ([`dream_protocol`]), serves
//! files from one directory with HTTP/1.1 (hyper), and tells the
//! supervisor it is ready with `READY=1` once it accepts.
//!
//! Draining (on HUP or TERM) is where workers usually break clients:
//!
//! 1. stop accepting at once: new connections wait in the shared backlog
//!    for the next generation;
//! 2. keep serving requests already on open connections, but answer them
//!    with `Connection: close`, so a keep-alive client reconnects (to the
//!    new generation) instead of sending on a socket we are about to close;
//!    each connection starts doing so at its own offset within the drain
//!    spread (150 ms), so that a few clients at a time reconnect to workers
//!    that have just started, not all of them at once;
//! 3. close connections that stayed idle only after a grace period: closing
//!    an idle keep-alive connection at the very moment its client sends a
//!    request is what makes clients such as `wrk` count read errors;
//! 4. exit 0 when the last connection is done (or at the drain timeout).
//!
//! Hostile clients are bounded: a header read timeout (which also bounds
//! idle keep-alive time), a cap on header size, and a cap on connections,
//! past which the worker stops accepting and lets the kernel queue.

mod accept;
mod conn;
mod files;

use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dream_protocol::StdListener;
use hyper::body::{Frame, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, Semaphore, watch};

pub use files::{ByteRange, RangeRequest, parse_range, relative_path};

/// Files up to this size are read whole in the request handler (from the
/// page cache this is microseconds); larger ones are streamed.
const READ_WHOLE_MAX: u64 = 256 * 1024;
/// Connections open at once that count as a flood, whose memory is given
/// back once they are all gone.
const FLOOD: usize = 1000;

/// A streamed file goes out this much at a time.
const CHUNK: usize = 32 * 1024;

/// How the worker behaves; `Default` is what `dream static` uses.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory to serve, relative to the cwd (the release) unless absolute.
    pub root: PathBuf,
    /// Value of the `X-Dream-Release` header (from `$DREAM_RELEASE`).
    pub release: Option<String>,
    /// Value of the `X-Dream-Generation` header (from `$DREAM_GENERATION`):
    /// with it a canary's judge tells this worker's answers from those of
    /// other generations of the same release.
    pub generation: Option<String>,
    /// Time allowed for a request's headers, and for an idle keep-alive
    /// connection to start its next request.
    pub header_timeout: Duration,
    /// Connections served at once; past this the worker stops accepting.
    pub max_connections: usize,
    /// While draining, how long an idle keep-alive connection is kept open.
    pub drain_grace: Duration,
    /// While draining, keep-alive connections are told to close spread
    /// over this window (each at its own offset) rather than all on their
    /// next request: their clients then reconnect to the new workers a few
    /// at a time instead of in one burst that lands on processes just
    /// started.
    pub drain_spread: Duration,
    /// While draining, when to give up on connections still busy.
    pub drain_timeout: Duration,
    /// A connection whose client takes nothing for this long is closed.
    pub send_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            root: PathBuf::from("public"),
            release: None,
            generation: None,
            header_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            drain_grace: Duration::from_secs(1),
            drain_spread: Duration::from_millis(150),
            drain_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves until HUP, TERM or INT, then drains and returns.
pub fn serve(listeners: Vec<StdListener>, config: Config) -> io::Result<()> {
    if listeners.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no listening socket",
        ));
    }
    let root = config.root.canonicalize().map_err(|e| {
        let cwd = std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        io::Error::new(
            e.kind(),
            format!("cannot serve {}: {e} (cwd {cwd})", config.root.display()),
        )
    })?;
    if !root.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot serve {}: not a directory", config.root.display()),
        ));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(listeners, root, config))
}

struct Shared {
    root: files::Root,
    cache: FileCache,
    release: Option<HeaderValue>,
    generation: Option<HeaderValue>,
    /// When the drain began (unset while serving); each connection is told
    /// to close once its own share of `drain_spread` has passed since.
    drain_began: std::sync::OnceLock<std::time::Instant>,
    drain_spread: Duration,
    connections: AtomicUsize,
    closed: Notify,
    shutdown: watch::Sender<bool>,
    conns: conn::Registry,
    send_timeout: Duration,
    /// Most connections open at once since the last time none was.
    peak: AtomicUsize,
}

async fn run(listeners: Vec<StdListener>, root: PathBuf, config: Config) -> io::Result<()> {
    // HUP, TERM and INT make this pipe readable: the accept threads poll
    // it beside their listener, so they stop accepting the moment the
    // drain signal arrives, not once this task has been scheduled.
    let signals: Vec<_> = accept::drain_signals().iter().collect();
    let drain = dream_core::signal_pipe(&signals)?;

    let shared = Arc::new(Shared {
        root: files::Root::open(&root)?,
        cache: FileCache::default(),
        release: config
            .release
            .as_deref()
            .and_then(|r| HeaderValue::from_str(r).ok()),
        generation: config
            .generation
            .as_deref()
            .and_then(|g| HeaderValue::from_str(g).ok()),
        drain_began: std::sync::OnceLock::new(),
        drain_spread: config.drain_spread,
        connections: AtomicUsize::new(0),
        closed: Notify::new(),
        shutdown: watch::channel(false).0,
        conns: conn::Registry::default(),
        send_timeout: config.send_timeout,
        peak: AtomicUsize::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(true)
        // A client that sends its request and shuts its side (`nc -N`,
        // health checkers) still gets the answer.
        .half_close(true);

    let mut accepting = Vec::new();
    for listener in listeners {
        let (fd, tcp): (std::os::fd::OwnedFd, bool) = match listener {
            StdListener::Tcp(l) => (l.into(), true),
            StdListener::Unix(l) => (l.into(), false),
        };
        let sink = Spawner {
            handle: tokio::runtime::Handle::current(),
            permits: permits.clone(),
            stop: stop_rx.clone(),
            permit: None,
            shared: shared.clone(),
            http: http.clone(),
            tcp,
        };
        accepting.push(accept::spawn(fd, drain.try_clone()?, sink)?);
    }
    let _ = dream_protocol::notify("READY=1");

    // Sleep (on a blocking-pool thread) until the drain signal.
    tokio::task::spawn_blocking(move || accept::wait_readable_fd(std::os::fd::AsFd::as_fd(&drain)))
        .await
        .map_err(io::Error::other)?;
    // 1. Stop accepting. 2. Answer what comes with Connection: close.
    let _ = stop_tx.send(true);
    tokio::task::spawn_blocking(move || accept::stop(accepting))
        .await
        .map_err(io::Error::other)?;
    let _ = shared.drain_began.set(std::time::Instant::now());
    let _ = dream_protocol::notify("STOPPING=1");
    // 3. Idle connections get a grace period before they are closed.
    if !wait_closed(&shared, config.drain_grace).await {
        let _ = shared.shutdown.send(true);
        // 4. Busy ones get until the drain timeout.
        wait_closed(&shared, config.drain_timeout).await;
    }
    Ok(())
}

/// Waits until no connection is open, or `limit` passes; true if none is.
async fn wait_closed(shared: &Shared, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let closed = shared.closed.notified();
        if shared.connections.load(Ordering::SeqCst) == 0 {
            return true;
        }
        if tokio::time::timeout_at(deadline, closed).await.is_err() {
            return shared.connections.load(Ordering::SeqCst) == 0;
        }
    }
}

/// Hands each accepted connection to the runtime, within the connection
/// cap.
struct Spawner {
    handle: tokio::runtime::Handle,
    permits: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    shared: Arc<Shared>,
    http: hyper::server::conn::http1::Builder,
    tcp: bool,
}

impl accept::Sink for Spawner {
    fn room(&mut self) -> bool {
        if self.permit.is_some() {
            return true;
        }
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            self.permit = Some(p);
            return true;
        }
        // At the cap: shed the connection idle the longest (an idle
        // keep-alive one, or one slow to send its headers), so that a new
        // client is served instead of waiting behind idlers.
        self.shared.conns.shed_idlest();
        let permits = self.permits.clone();
        let mut stop = self.stop.clone();
        self.permit = self.handle.block_on(async move {
            tokio::select! {
                p = permits.acquire_owned() => p.ok(),
                _ = stop.wait_for(|s| *s) => None,
            }
        });
        self.permit.is_some()
    }

    fn accepted(&mut self, conn: std::os::fd::OwnedFd) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let shared = self.shared.clone();
        let http = self.http.clone();
        let tcp = self.tcp;
        let open = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak.fetch_max(open, Ordering::Relaxed);
        let (id, me) = shared.conns.add(std::os::fd::AsRawFd::as_raw_fd(&conn));
        self.handle.spawn(async move {
            if tcp {
                let s = std::net::TcpStream::from(conn);
                let _ = s.set_nodelay(true);
                if let Ok(s) = tokio::net::TcpStream::from_std(s) {
                    serve_connection(s, id, me, &shared, &http).await;
                }
            } else if let Ok(s) =
                tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(conn))
            {
                serve_connection(s, id, me, &shared, &http).await;
            }
            shared.conns.remove(id);
            drop(permit);
            if shared.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
                shared.closed.notify_waiters();
                // The last connection of a flood is gone: give its memory
                // back rather than keep the peak for ever.
                if shared.peak.swap(0, Ordering::Relaxed) >= FLOOD {
                    dream_core::release_free_memory();
                }
            }
        });
    }
}

async fn serve_connection<S>(
    stream: S,
    id: u64,
    me: Arc<conn::Conn>,
    shared: &Arc<Shared>,
    http: &hyper::server::conn::http1::Builder,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = shared.clone();
    let shed = me.clone();
    // When this connection is told to close, after the drain began:
    // consecutive connections land far apart (golden-ratio steps), so
    // any number of them covers the spread evenly.
    let share = shared
        .drain_spread
        .mul_f64((id as f64 * 0.618_033_988_749_895).fract());
    let counted = me.clone();
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        let busy = ctx.conns.busy(&me);
        let conn = me.clone();
        async move {
            let resp = handle(req, &ctx, &conn, share).await;
            Ok::<_, Infallible>(resp.map(|body| Tracked { body, _busy: busy }))
        }
    });
    let stream = conn::SendTimeout::new(stream, shared.send_timeout, counted);
    let conn = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut shutdown = shared.shutdown.subscribe();
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = shed.shed.notified() => return,
        _ = shutdown.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shared: &Shared,
    conn: &conn::Conn,
    share: Duration,
) -> Response<Body> {
    // Every request received is answered before a close: while more
    // wait behind this one (pipelined), it does not say close.
    let close = shared
        .drain_began
        .get()
        .is_some_and(|t| t.elapsed() >= share);
    let more_waiting = conn.answer_one(close);
    let close = close && !more_waiting;
    let mut resp = respond(&req, shared).await;
    let h = resp.headers_mut();
    h.insert(header::SERVER, HeaderValue::from_static("dream"));
    if let Some(r) = &shared.release {
        h.insert("x-dream-release", r.clone());
    }
    if let Some(g) = &shared.generation {
        h.insert("x-dream-generation", g.clone());
    }
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn simple(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::full(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn respond(req: &Request<hyper::body::Incoming>, shared: &Shared) -> Response<Body> {
    let root = &shared.root;
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut r = simple(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
    };
    let not_found = || simple(StatusCode::NOT_FOUND, "not found\n");
    let Ok((rel, trailing_slash)) = files::relative_path(req.uri().path()) else {
        return not_found();
    };
    // A directory's own URL (`/`, `/docs/`) is its index file's.
    let wanted = if trailing_slash || rel.as_os_str().is_empty() {
        std::borrow::Cow::Owned(rel.join("index.html"))
    } else {
        std::borrow::Cow::Borrowed(rel.as_path())
    };
    if let Some(c) = shared.cache.fresh(root, &wanted) {
        return match serve_file(req, &c, None, head).await {
            Ok(r) => r,
            Err(e) => io_response(e, root.path(), &wanted),
        };
    }
    let (file, meta, path) = match root.open_file(&rel) {
        Ok((_, meta)) if meta.is_dir() => {
            if !trailing_slash {
                let mut location = files::directory_location(&rel);
                if let Some(q) = req.uri().query() {
                    location.push('?');
                    location.push_str(q);
                }
                let mut r = simple(StatusCode::MOVED_PERMANENTLY, "moved\n");
                if let Ok(v) = HeaderValue::from_str(&location) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                return r;
            }
            let index = rel.join("index.html");
            match root.open_file(&index) {
                Ok((f, m)) => (f, m, index),
                Err(e) => return io_response(e, root.path(), &index),
            }
        }
        Ok((f, meta)) => (f, meta, rel),
        Err(e) => return io_response(e, root.path(), &rel),
    };
    if !meta.is_file() {
        return not_found();
    }
    let served = match shared.cache.describe(&path, &file, &meta) {
        Ok(c) => serve_file(req, &c, Some(file), head).await,
        Err(e) => Err(e),
    };
    served.unwrap_or_else(|e| io_response(e, root.path(), &path))
}

fn io_response(e: io::Error, root: &Path, rel: &Path) -> Response<Body> {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => {
            simple(StatusCode::NOT_FOUND, "not found\n")
        }
        io::ErrorKind::PermissionDenied => simple(StatusCode::FORBIDDEN, "forbidden\n"),
        _ => {
            // The path came from a request: escaped and bounded.
            let path = root.join(rel);
            let path = dream_core::logtext::value(&path.to_string_lossy());
            eprintln!("dream static: {path}: {e}");
            simple(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
        }
    }
}

/// What is worth remembering about a file between requests: its
/// validators, its headers and, if small, its bytes. An entry is used only
/// while the device, inode, size, modification time and change time that
/// `fstat` reports on the freshly opened file (or, for small files,
/// `stat` on its path: [`FileCache::fresh`]) are unchanged, so an edited or
/// replaced file is never served stale: the change time moves with every
/// write and no one can set it back (size and modification time alone can
/// be the same for different bytes). Within a dream release nothing changes
/// at all.
#[derive(Clone)]
struct Cached {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    etag: HeaderValue,
    last_modified: Option<HeaderValue>,
    content_type: HeaderValue,
    body: Option<Bytes>,
}

impl Cached {
    fn modified(&self) -> Option<SystemTime> {
        let ns = u64::try_from(self.mtime_ns).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(ns))
    }
}

/// Small files only, bounded in count and bytes.
const CACHE_FILE_MAX: u64 = 64 * 1024;
const CACHE_BYTES_MAX: usize = 64 << 20;
const CACHE_ENTRIES_MAX: usize = 10_000;

#[derive(Default)]
struct FileCache {
    map: std::sync::Mutex<std::collections::HashMap<PathBuf, Cached>>,
    bytes: AtomicUsize,
}

impl FileCache {
    fn lookup(&self, path: &Path, meta: &std::fs::Metadata) -> Option<Cached> {
        use std::os::unix::fs::MetadataExt;
        let map = self.map.lock().ok()?;
        let c = map.get(path)?;
        (c.dev == meta.dev()
            && c.ino == meta.ino()
            && c.len == meta.len()
            && c.mtime_ns == mtime_ns(meta)
            && c.ctime_ns == ctime_ns(meta))
        .then(|| c.clone())
    }

    /// A small file served before, confirmed unchanged by one `stat(2)`
    /// of its path, without opening it (three system calls a request
    /// fewer). The same device, inode, size, modification and change
    /// time mean the very file opened safely inside the root before, with
    /// the bytes it had: whatever path reaches it now, nothing else is
    /// served. Anything else (a miss, a change, a large file) opens it.
    fn fresh(&self, root: &files::Root, rel: &Path) -> Option<Cached> {
        let c = self.map.lock().ok()?.get(rel)?.clone();
        c.body.as_ref()?;
        use nix::sys::stat::SFlag;
        let st = root.stat(rel)?;
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let same = kind == SFlag::S_IFREG
            && c.dev == st.st_dev
            && c.ino == st.st_ino
            && u64::try_from(st.st_size).ok() == Some(c.len)
            && c.mtime_ns == ns(st.st_mtime, st.st_mtime_nsec)
            && c.ctime_ns == ns(st.st_ctime, st.st_ctime_nsec);
        same.then_some(c)
    }

    fn describe(
        &self,
        path: &Path,
        file: &std::fs::File,
        meta: &std::fs::Metadata,
    ) -> io::Result<Cached> {
        use std::os::unix::fs::{FileExt, MetadataExt};
        if let Some(c) = self.lookup(path, meta) {
            return Ok(c);
        }
        let len = meta.len();
        let modified = meta.modified().ok();
        let header = |s: String| HeaderValue::from_str(&s).map_err(io::Error::other);
        let body = if len <= CACHE_FILE_MAX && len > 0 {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, 0)?;
            Some(Bytes::from(buf))
        } else {
            None
        };
        let c = Cached {
            dev: meta.dev(),
            ino: meta.ino(),
            len,
            mtime_ns: mtime_ns(meta),
            ctime_ns: ctime_ns(meta),
            etag: header(files::etag(body.as_deref(), meta))?,
            last_modified: modified
                .map(|m| header(httpdate::fmt_http_date(m)))
                .transpose()?,
            content_type: header(files::content_type(path))?,
            body,
        };
        let size = c.body.as_ref().map_or(0, |b| b.len()) + 256;
        if let Ok(mut map) = self.map.lock()
            && map.len() < CACHE_ENTRIES_MAX
            && self.bytes.load(Ordering::Relaxed) + size <= CACHE_BYTES_MAX
            && map.insert(path.to_path_buf(), c.clone()).is_none()
        {
            self.bytes.fetch_add(size, Ordering::Relaxed);
        }
        Ok(c)
    }
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

fn ctime_ns(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.ctime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.ctime_nsec())
}

/// The response for a file described by `c`: from its cached bytes, or
/// read from `file` (which a description without bytes comes with).
async fn serve_file(
    req: &Request<hyper::body::Incoming>,
    c: &Cached,
    file: Option<std::fs::File>,
    head: bool,
) -> io::Result<Response<Body>> {
    let len = c.len;
    let etag = c.etag.to_str().unwrap_or_default();
    let last_modified = c.last_modified.as_ref().and_then(|v| v.to_str().ok());

    let header_str =
        |name: header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
    let not_modified = match header_str(header::IF_NONE_MATCH) {
        Some(inm) => files::none_match(inm, etag),
        None => match (header_str(header::IF_MODIFIED_SINCE), c.modified()) {
            (Some(ims), Some(m)) => {
                httpdate::parse_http_date(ims).is_ok_and(|since| truncate_secs(m) <= since)
            }
            _ => false,
        },
    };

    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(header::ETAG, c.etag.clone());
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(lm) = &c.last_modified {
        h.insert(header::LAST_MODIFIED, lm.clone());
    }
    if not_modified {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(resp);
    }
    h.insert(header::CONTENT_TYPE, c.content_type.clone());

    let range_ok = match header_str(header::IF_RANGE) {
        None => true,
        Some(v) => v == etag || last_modified == Some(v),
    };
    let range = match (header_str(header::RANGE), range_ok) {
        (Some(r), true) => files::parse_range(r, len),
        _ => RangeRequest::Full,
    };
    let part = match range {
        RangeRequest::Full => ByteRange {
            start: 0,
            end: len.saturating_sub(1),
        },
        RangeRequest::Partial(r) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let v = HeaderValue::from_str(&format!("bytes {}-{}/{len}", r.start, r.end))
                .map_err(io::Error::other)?;
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
            r
        }
        RangeRequest::Unsatisfiable => {
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            let v = HeaderValue::from_str(&format!("bytes */{len}")).map_err(io::Error::other)?;
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
            return Ok(resp);
        }
    };
    let body_len = if len == 0 { 0 } else { part.len() };
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    *resp.body_mut() = match (&c.body, file) {
        _ if head || body_len == 0 => Body::empty(),
        (Some(bytes), _) => Body::full(bytes.slice(part.start as usize..=part.end as usize)),
        (None, None) => return Err(io::Error::from(io::ErrorKind::NotFound)),
        (None, Some(file)) if body_len <= READ_WHOLE_MAX => {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; body_len as usize];
            file.read_exact_at(&mut buf, part.start)?;
            Body::full(Bytes::from(buf))
        }
        (None, Some(file)) => Body::File {
            file,
            offset: part.start,
            remaining: body_len,
        },
    };
    Ok(resp)
}

/// HTTP dates have whole seconds.
fn truncate_secs(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

/// A response body that keeps its connection marked busy until it has
/// been written (or abandoned), so that shedding never picks a connection
/// in the middle of a response.
struct Tracked {
    body: Body,
    _busy: conn::BusyGuard,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body: bytes in memory, or a file streamed in chunks.
///
/// A file is read with `pread(2)` one chunk at a time, only when hyper asks
/// for the next frame, which it does once the previous one is written: a
/// client that does not read holds at most one chunk of this worker's
/// memory (and no thread, as a blocking-pool read would), until the send
/// timeout closes it.
pub enum Body {
    Full(Option<Bytes>),
    File {
        file: std::fs::File,
        offset: u64,
        remaining: u64,
    },
}

impl Body {
    fn full(b: Bytes) -> Body {
        Body::Full(Some(b))
    }

    fn empty() -> Body {
        Body::Full(None)
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::File {
                file,
                offset,
                remaining,
            } => {
                use std::os::unix::fs::FileExt;
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let want = (*remaining).min(CHUNK as u64) as usize;
                let mut buf = vec![0u8; want];
                match file.read_at(&mut buf, *offset) {
                    Err(e) => Poll::Ready(Some(Err(e))),
                    Ok(0) => Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while being served",
                    )))),
                    Ok(n) => {
                        *remaining -= n as u64;
                        *offset += n as u64;
                        buf.truncate(n);
                        Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.is_none(),
            Body::File { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::File { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}
