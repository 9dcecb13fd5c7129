//! `dream fleet`'s wire: the coordinator and each host's `dream agent`,
//! over the stdin and stdout of an OpenSSH session.
//!
//! **Frames**: a 4-byte big-endian length, a kind byte (`0` a JSON
//! message, `1` a chunk of a blob's bytes, deflate-compressed), the
//! payload. A blob is a [`ToAgent::Blob`] message followed by its chunks
//! and an empty chunk.
//!
//! **Conversation**: `hello` (versions; an incompatible coordinator is
//! refused with both named), `lock`, `offer` (the manifest; the agent
//! answers with the hashes it lacks), blobs, `prepare` (the same pipeline
//! as `dream deploy`, stopping before the switch), `switch` (a
//! provisional reload), `confirm` or `revert`, `bye`. Every request gets
//! one [`Reply`]. `ping` frames keep the session alive while the
//! coordinator works on other hosts; an agent that hears nothing for
//! [`silence`], or reads EOF, treats the coordinator as gone: it removes
//! what it staged, releases its locks and exits, leaving a switched but
//! unconfirmed release to its supervisor's confirmation deadline.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::deploy::{self, DeployOptions, Provisional};
use crate::store::lock::{Holder, Lock, LockError, Wait};
use crate::store::manifest::{self, Manifest};
use crate::store::release::{self, Store};
use crate::store::stage::Source;

/// The protocol's version; both sides must speak the same (2: the agent
/// sends `alive` frames while it works, and both sides read with a
/// deadline).
pub const PROTOCOL: u32 = 2;

/// How long either side waits for a byte from the other before it calls
/// the peer gone: 20 s, or `DREAM_FLEET_SILENCE` (a duration: `2s`,
/// `500ms`), for slow links and for tests. Each side sends a heartbeat
/// every quarter of it while it has nothing else to say.
pub fn silence() -> Duration {
    static SILENCE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SILENCE.get_or_init(|| {
        std::env::var("DREAM_FLEET_SILENCE")
            .ok()
            .and_then(|v| crate::supervise::signals::parse_duration(&v).ok())
            .filter(|d| *d >= Duration::from_millis(100))
            .unwrap_or(Duration::from_secs(20))
    })
}

/// How often each side says it is alive when it has nothing else to say.
pub fn heartbeat() -> Duration {
    silence() / 4
}
/// The largest frame either side accepts.
const MAX_FRAME: usize = 16 << 20;
/// The largest manifest an agent reads (a million entries of ~100 bytes).
const MAX_MANIFEST: usize = 128 << 20;
/// A blob is sent in chunks of this much (before compression).
pub const CHUNK: usize = 256 << 10;

/// A request from the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "msg", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToAgent {
    Hello {
        protocol: u32,
        version: String,
    },
    /// Take this host's deploy lock for the session; `fleet`: this host is
    /// the primary, and its lock is the fleet's (a manual hold refuses).
    Lock {
        command: String,
        fleet: bool,
        /// Wait this long for a lock another deploy holds (`--wait-lock`);
        /// a manual fleet hold is refused at once all the same.
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// The release to prepare; its manifest follows in chunk frames
    /// (compressed, as a blob's content), and the answer lists the content
    /// hashes this host lacks.
    Offer {
        id: String,
    },
    /// What this host would need for the release (a dry run): the same
    /// answer as `offer` (its manifest follows the same way), with
    /// nothing locked or written.
    Plan,
    /// A blob of content follows in chunk frames, then an empty chunk.
    Blob {
        hash: String,
    },
    /// Build the offered release into `releases/ID` (not switched),
    /// bridging `bridge` directories from the current release.
    Prepare {
        id: String,
        build: Option<String>,
        #[serde(default)]
        bridge: Vec<PathBuf>,
    },
    /// Switch to the prepared release; a provisional reload, then each of
    /// `verify` requested through the host's own socket.
    Switch {
        id: String,
        confirm_within_ms: u64,
        #[serde(default)]
        verify: Vec<String>,
        /// How long the new generation must stay up before the switch
        /// counts (`--settle`).
        #[serde(default)]
        settle_ms: u64,
    },
    Confirm {
        generation: Option<u64>,
    },
    /// Back to `to` (the previous release this host recorded).
    Revert {
        from: String,
        to: String,
        reason: String,
    },
    /// Record the fleet's decision in this host's history (the primary).
    Commit {
        id: String,
        hosts: Vec<String>,
    },
    /// What this host runs.
    Status,
    /// Set or clear the manual fleet hold (`dream fleet lock -m MSG`).
    Hold {
        message: Option<String>,
    },
    Ping,
    Bye,
}

impl ToAgent {
    /// For a request that changes the host, its name (for a refusal).
    pub fn mutation(&self) -> Option<&'static str> {
        Some(match self {
            ToAgent::Offer { .. } => "offer",
            ToAgent::Blob { .. } => "blob",
            ToAgent::Prepare { .. } => "prepare",
            ToAgent::Switch { .. } => "switch",
            ToAgent::Confirm { .. } => "confirm",
            ToAgent::Revert { .. } => "revert",
            ToAgent::Commit { .. } => "commit",
            ToAgent::Hold { .. } => "hold",
            ToAgent::Hello { .. }
            | ToAgent::Lock { .. }
            | ToAgent::Plan
            | ToAgent::Status
            | ToAgent::Ping
            | ToAgent::Bye => return None,
        })
    }

    /// The release ids a request names.
    fn ids(&self) -> Vec<&str> {
        match self {
            ToAgent::Offer { id }
            | ToAgent::Prepare { id, .. }
            | ToAgent::Switch { id, .. }
            | ToAgent::Commit { id, .. } => vec![id],
            ToAgent::Revert { from, to, .. } => vec![from, to],
            _ => Vec::new(),
        }
    }
}

/// The answer to every request but `ping` and blobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The failure may pass (a lock held, the link busy): exit 111.
    #[serde(default)]
    pub temporary: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `offer`: the content hashes this host lacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lacks: Vec<String>,
    /// `offer`: the release is already prepared (or live) here.
    #[serde(default)]
    pub present: bool,
    /// What `current` named before this session changed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// `status`: the manual hold's message, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<String>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            ..Reply::default()
        }
    }

    /// The same reply with every string escaped and bounded
    /// ([`crate::logtext::value`]): what a host says is data, never
    /// terminal control.
    pub fn escaped(self) -> Reply {
        let v = |s: Option<String>| s.map(|s| crate::logtext::value(&s));
        Reply {
            error: v(self.error),
            version: v(self.version),
            previous: v(self.previous),
            current: v(self.current),
            hold: v(self.hold),
            lacks: self
                .lacks
                .into_iter()
                .map(|s| crate::logtext::value(&s))
                .collect(),
            ..self
        }
    }

    pub fn failed(error: impl Into<String>) -> Reply {
        Reply {
            error: Some(error.into()),
            ..Reply::default()
        }
    }
}

/// A frame read off the wire.
#[derive(Debug)]
pub enum Frame {
    Message(Vec<u8>),
    Chunk(Vec<u8>),
    /// The agent is working on a request (kind 2, empty): the coordinator
    /// skips it, and its arrival restarts the silence deadline.
    Alive,
}

/// A reader that waits at most [`silence`] for each read: a peer that
/// stops sending (stopped, wedged, or gone without closing the link) ends
/// the session with `TimedOut` instead of holding it, and every lock
/// behind it, forever. Put a `BufReader` over it, never under it: the
/// wait must see what the descriptor holds, not what a buffer does.
pub struct Patient<R> {
    inner: R,
    silence: Duration,
    peer: &'static str,
}

impl<R: Read + AsFd> Patient<R> {
    pub fn new(inner: R, peer: &'static str) -> Patient<R> {
        Patient {
            inner,
            silence: silence(),
            peer,
        }
    }
}

impl<R: Read + AsFd> Read for Patient<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let deadline = std::time::Instant::now() + self.silence;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
                .unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.inner.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no word from the {} in {}",
                            self.peer,
                            crate::fmt_duration(self.silence)
                        ),
                    ));
                }
                Ok(_) => return self.inner.read(buf),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A writer shared by threads, each `write` whole under the lock: with
/// frames written in one `write_all`, a heartbeat never lands inside
/// another frame.
pub struct SharedWriter<W>(pub std::sync::Arc<std::sync::Mutex<W>>);

impl<W: Write> Write for SharedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(buf)?;
        w.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends an `alive` frame.
pub fn write_alive(w: &mut impl Write) -> io::Result<()> {
    write_frame(w, 2, &[])
}

pub fn write_message(w: &mut impl Write, msg: &impl Serialize) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    write_frame(w, 0, &body)
}

pub fn write_chunk(w: &mut impl Write, data: &[u8]) -> io::Result<()> {
    write_frame(w, 1, data)
}

/// One frame in one `write_all` (see [`SharedWriter`]).
fn write_frame(w: &mut impl Write, kind: u8, body: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.push(kind);
    frame.extend_from_slice(body);
    w.write_all(&frame)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` at a clean EOF.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (the limit is {MAX_FRAME})"),
        ));
    }
    // Grown as bytes arrive, never allocated from the peer's word alone.
    let mut body = Vec::with_capacity(len.min(CHUNK));
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    match head[4] {
        0 => Ok(Some(Frame::Message(body))),
        1 => Ok(Some(Frame::Chunk(body))),
        2 if body.is_empty() => Ok(Some(Frame::Alive)),
        k => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown frame kind {k}"),
        )),
    }
}

/// Sends a blob: its message, its content compressed in chunks, an empty
/// chunk.
pub fn write_blob(w: &mut impl Write, hash: &str, content: impl Read) -> io::Result<u64> {
    write_message(
        w,
        &ToAgent::Blob {
            hash: hash.to_string(),
        },
    )?;
    write_chunks(w, content)
}

/// Sends a request whose payload follows it in chunks (a manifest).
pub fn write_with_payload(w: &mut impl Write, msg: &ToAgent, payload: &[u8]) -> io::Result<u64> {
    write_message(w, msg)?;
    write_chunks(w, payload)
}

/// Reads chunks up to the empty one, decompressed, at most `limit` bytes.
pub fn read_chunks(r: &mut impl Read, limit: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        match read_frame(r)? {
            Some(Frame::Chunk(c)) if c.is_empty() => return Ok(out),
            Some(Frame::Chunk(c)) => {
                inflate_chunk(&c, &mut out)?;
                if out.len() > limit {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a payload over {limit} bytes"),
                    ));
                }
            }
            Some(Frame::Message(_) | Frame::Alive) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a message inside a payload",
                ));
            }
            None => return Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// Inflates one chunk onto `out`: at most [`CHUNK`] bytes, as a sender
/// makes them; a chunk that inflates to more is refused, so a small frame
/// can never ask for a large allocation.
fn inflate_chunk(c: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let n = flate2::read::DeflateDecoder::new(c)
        .take(CHUNK as u64 + 1)
        .read_to_end(out)?;
    if n > CHUNK {
        return Err(protocol_error(format!(
            "a chunk that inflates to more than {CHUNK} bytes"
        )));
    }
    Ok(())
}

fn protocol_error(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, text)
}

/// Content as compressed chunks, then an empty chunk; the bytes sent.
fn write_chunks(w: &mut impl Write, mut content: impl Read) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    loop {
        let n = content.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&buf[..n])?;
        let packed = z.finish()?;
        sent += packed.len() as u64 + 5;
        write_chunk(w, &packed)?;
    }
    write_chunk(w, &[])?;
    Ok(sent + 5)
}

/// The manual hold on the primary: `ROOT/.dream/fleet-hold`.
fn hold_path(store: &Store) -> PathBuf {
    store.state().join("fleet-hold")
}

/// One agent session: `dream agent --root ROOT` on a host.
pub struct Agent {
    store: Store,
    lock: Option<Lock>,
    offered: Option<(String, PathBuf)>,
    /// The blobs the offered release lacks here, by hash: their sizes.
    wanted: std::collections::HashMap<String, u64>,
    /// Where received objects and the offered manifest wait.
    incoming: PathBuf,
    prepared: Option<String>,
    /// What `current` named before this session switched it.
    previous: Option<String>,
    generation: Option<u64>,
    /// The lease on a switched, unconfirmed generation: renewed to
    /// `confirm_within` from now each time the coordinator is heard from
    /// (at most every [`LEASE_EVERY`]), so the host reverts that long
    /// after its coordinator went silent, however long the rollout.
    lease: Option<Lease>,
}

struct Lease {
    generation: u64,
    within: Duration,
    renewed: std::time::Instant,
}

/// How often an agent renews its lease at most (the coordinator pings at
/// least this often while it waits).
pub const LEASE_EVERY: Duration = Duration::from_millis(500);

impl Agent {
    pub fn new(root: &Path) -> Agent {
        let store = Store::new(root);
        // Not under staging/: the deploy pipeline clears that when it
        // starts, and the objects must outlive its start.
        let incoming = store
            .state()
            .join("incoming")
            .join(std::process::id().to_string());
        // What agents that were killed left behind.
        if let Ok(dir) = std::fs::read_dir(store.state().join("incoming")) {
            for e in dir.flatten() {
                let pid = e.file_name().to_string_lossy().parse::<i32>().ok();
                let alive = pid.is_some_and(|p| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok()
                });
                if !alive {
                    let _ = release::remove_tree(&e.path());
                }
            }
        }
        Agent {
            store,
            lock: None,
            offered: None,
            wanted: std::collections::HashMap::new(),
            incoming,
            prepared: None,
            previous: None,
            generation: None,
            lease: None,
        }
    }

    /// The coordinator was heard from: a switched, unconfirmed generation
    /// stays provisional for another `confirm_within`.
    fn renew(&mut self) {
        let Some(lease) = &mut self.lease else {
            return;
        };
        if lease.renewed.elapsed() < LEASE_EVERY {
            return;
        }
        lease.renewed = std::time::Instant::now();
        if let Err(e) = deploy::extend_generation(&self.store.root, lease.generation, lease.within)
        {
            // Reverted, replaced, or no supervisor: nothing left to renew.
            eprintln!(
                "dream agent: generation {} stays provisional no longer: {}",
                lease.generation, e.message
            );
            self.lease = None;
        }
    }

    /// Serves one session on stdin/stdout until `bye`, EOF or silence.
    ///
    /// A coordinator that dies while this agent is busy (a build) closes
    /// the session's input: a watcher thread sees the hang-up and raises
    /// SIGHUP, which the deploy pipeline reads from its signalfd and
    /// answers by ending the build's process group and its staging. (INT,
    /// TERM and HUP are blocked first, so the signal is read, never
    /// delivered to a thread.)
    pub fn serve(mut self) -> io::Result<()> {
        use nix::sys::signal::{SigSet, Signal};
        let mut set = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(s);
        }
        set.thread_block()?;
        std::thread::spawn(|| {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            let stdin = io::stdin();
            // No events asked: poll reports only a hang-up or an error.
            let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::empty())];
            loop {
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) if fds[0].revents().is_some_and(|r| !r.is_empty()) => break,
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return,
                }
            }
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGHUP);
        });
        // The descriptor itself, not Stdin's buffer: the silence deadline
        // must see what the pipe holds.
        let stdin = std::fs::File::from(io::stdin().as_fd().try_clone_to_owned()?);
        let mut input = io::BufReader::with_capacity(CHUNK, Patient::new(stdin, "coordinator"));
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(io::stdout()));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // `alive` frames while this agent works (a build can take long):
        // the coordinator's own deadline then only ends a session whose
        // agent is stopped or gone.
        let beat = {
            let (stdout, done) = (stdout.clone(), done.clone());
            std::thread::spawn(move || {
                let mut w = SharedWriter(stdout);
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::park_timeout(heartbeat());
                    if done.load(std::sync::atomic::Ordering::SeqCst)
                        || write_alive(&mut w).is_err()
                    {
                        return;
                    }
                }
            })
        };
        let result = self.session(&mut input, &mut SharedWriter(stdout));
        if let Err(e) = &result
            && e.kind() == io::ErrorKind::TimedOut
        {
            eprintln!("dream agent: {e}: it is gone");
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        beat.thread().unpark();
        self.abandon();
        result
    }

    /// One session over any byte stream (`serve` gives it stdin and
    /// stdout): requests in, one reply each out, until `bye` or EOF.
    pub fn session(&mut self, input: &mut impl Read, out: &mut impl Write) -> io::Result<()> {
        loop {
            let Some(frame) = read_frame(input)? else {
                return Ok(());
            };
            self.renew();
            let Frame::Message(body) = frame else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a chunk outside a blob",
                ));
            };
            let msg: ToAgent = match serde_json::from_slice(&body) {
                Ok(m) => m,
                Err(e) => {
                    write_message(out, &Reply::failed(format!("bad request: {e}")))?;
                    continue;
                }
            };
            let refused = self.refusal(&msg);
            let reply = match msg {
                ToAgent::Ping => continue,
                ToAgent::Bye => {
                    write_message(out, &Reply::ok())?;
                    return Ok(());
                }
                // A payload is read (bounded) even when the request is
                // refused, so the next frame is a request again.
                ToAgent::Blob { hash } => {
                    let reply = self.receive_blob(&hash, input, refused.is_none())?;
                    refused.unwrap_or(reply)
                }
                // A payload over its bounds breaks the framing: the
                // session ends (`?`), nothing of it kept.
                ToAgent::Offer { id } => match (read_manifest(input)?, refused) {
                    (_, Some(refused)) => refused,
                    (Ok(text), None) => self.offer(&id, &text),
                    (Err(e), None) => Reply::failed(format!("the manifest: {e}")),
                },
                ToAgent::Plan => match read_manifest(input)? {
                    Ok(text) => match Manifest::parse(&text) {
                        Ok(m) => Reply {
                            lacks: self.lacking(&m),
                            current: self.store.current(),
                            ..Reply::ok()
                        },
                        Err(e) => Reply::failed(format!("the manifest: {e}")),
                    },
                    Err(e) => Reply::failed(format!("the manifest: {e}")),
                },
                other => self.handle(other),
            };
            write_message(out, &reply)?;
        }
    }

    /// The one gate every request passes: whatever changes this host needs
    /// the lock taken by this very session, and every id it names is a
    /// valid release id. `Some` is the refusal.
    fn refusal(&self, msg: &ToAgent) -> Option<Reply> {
        let what = msg.mutation()?;
        if self.lock.is_none() {
            return Some(Reply::failed(format!(
                "{what} refused: this session holds no lock (send lock first)"
            )));
        }
        let bad = msg
            .ids()
            .into_iter()
            .find_map(|id| release::check_id(id).err());
        bad.map(|e| Reply::failed(format!("{what} refused: {e}")))
    }

    fn handle(&mut self, msg: ToAgent) -> Reply {
        if let Some(refused) = self.refusal(&msg) {
            return refused;
        }
        match msg {
            ToAgent::Hello { protocol, version } => {
                if protocol != PROTOCOL {
                    return Reply::failed(format!(
                        "the coordinator (dream {version}) speaks fleet protocol {protocol}; this host's agent (dream {}) speaks {PROTOCOL}: install a matching dream here, or run the coordinator with --install",
                        crate::supervise::version()
                    ));
                }
                Reply {
                    protocol: Some(PROTOCOL),
                    version: Some(crate::supervise::version()),
                    current: self.store.current(),
                    ..Reply::ok()
                }
            }
            ToAgent::Lock {
                command,
                fleet,
                wait_ms,
            } => self.take_lock(&command, fleet, wait_ms.map(Duration::from_millis)),

            ToAgent::Prepare { id, build, bridge } => self.prepare(&id, build, bridge),
            ToAgent::Switch {
                id,
                confirm_within_ms,
                verify,
                settle_ms,
            } => self.switch(&id, confirm_within_ms, &verify, settle_ms),
            ToAgent::Confirm { generation } => {
                match deploy::confirm_generation(&self.store.root, generation.or(self.generation)) {
                    Ok(()) => {
                        self.previous = None;
                        self.lease = None;
                        Reply::ok()
                    }
                    Err(e) => Reply::failed(e.message),
                }
            }
            ToAgent::Revert { from, to, reason } => {
                self.lease = None;
                match deploy::revert_to(&self.store.root, &from, &to, &reason) {
                    Ok(()) => Reply {
                        current: self.store.current(),
                        ..Reply::ok()
                    },
                    Err(e) => Reply::failed(e.message),
                }
            }
            ToAgent::Commit { id, hosts } => {
                let mut commit = release::Event::new(release::EventKind::FleetCommitted, &id);
                let hosts: Vec<String> = hosts
                    .iter()
                    .take(1000)
                    .map(|h| crate::logtext::value(h))
                    .collect();
                commit.reason = Some(format!("live on {}", hosts.join(", ")));
                match self.store.append(&commit) {
                    Ok(()) => Reply::ok(),
                    Err(e) => Reply::failed(format!("recording the commit: {e}")),
                }
            }
            ToAgent::Status => Reply {
                current: self.store.current(),
                previous: self.store.previous_good(),
                hold: std::fs::read_to_string(hold_path(&self.store)).ok(),
                version: Some(crate::supervise::version()),
                ..Reply::ok()
            },
            ToAgent::Hold { message } if message.as_ref().is_some_and(|m| m.len() > 4096) => {
                Reply::failed("hold refused: a message over 4096 bytes")
            }
            ToAgent::Hold { message } => {
                let path = hold_path(&self.store);
                let done = match message {
                    Some(m) => self.store.prepare().and_then(|()| std::fs::write(&path, m)),
                    None => match std::fs::remove_file(&path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                        _ => Ok(()),
                    },
                };
                match done {
                    Ok(()) => Reply::ok(),
                    Err(e) => Reply::failed(format!("{}: {e}", path.display())),
                }
            }
            ToAgent::Ping
            | ToAgent::Bye
            | ToAgent::Blob { .. }
            | ToAgent::Offer { .. }
            | ToAgent::Plan => Reply::ok(),
        }
    }

    fn take_lock(&mut self, command: &str, fleet: bool, wait: Option<Duration>) -> Reply {
        if self.lock.is_some() {
            return Reply {
                current: self.store.current(),
                ..Reply::ok()
            };
        }
        if let Err(e) = self.store.prepare() {
            return Reply::failed(format!("{}: {e}", self.store.root.display()));
        }
        if fleet && let Ok(message) = std::fs::read_to_string(hold_path(&self.store)) {
            return Reply {
                temporary: true,
                ..Reply::failed(format!(
                    "the fleet is held by hand: {} (dream fleet unlock releases it)",
                    message.trim()
                ))
            };
        }
        let wait = wait.map_or(Wait::No, Wait::For);
        let holder = Holder::me(crate::logtext::value(command));
        match Lock::acquire(&self.store.lock_path(), &holder, wait) {
            Ok(lock) => {
                self.lock = Some(lock);
                Reply {
                    current: self.store.current(),
                    ..Reply::ok()
                }
            }
            Err(e @ LockError::Held { .. }) => Reply {
                temporary: true,
                ..Reply::failed(e.to_string())
            },
            Err(e) => Reply::failed(e.to_string()),
        }
    }

    fn offer(&mut self, id: &str, text: &str) -> Reply {
        if let Err(e) = release::check_id(id) {
            return Reply::failed(e);
        }
        if self.lock.is_none() {
            return Reply::failed("offer before lock");
        }
        if self.store.release_dir(id).is_dir() {
            self.prepared = Some(id.to_string());
            return Reply {
                present: true,
                current: self.store.current(),
                ..Reply::ok()
            };
        }
        let m = match Manifest::parse(text) {
            Ok(m) => m,
            Err(e) => return Reply::failed(format!("the manifest: {e}")),
        };
        let lacks = self.lacking(&m);
        let objects = self.incoming.join("objects");
        let saved = std::fs::create_dir_all(&objects)
            .and_then(|()| m.save(&self.incoming.join("manifest")));
        if let Err(e) = saved {
            return Reply::failed(format!("{}: {e}", self.incoming.display()));
        }
        self.wanted = m
            .entries()
            .iter()
            .filter_map(|e| match &e.kind {
                manifest::Kind::File { hash, size, .. } => Some((manifest::hex(hash), *size)),
                _ => None,
            })
            .filter(|(h, _)| lacks.binary_search(h).is_ok())
            .collect();
        self.offered = Some((id.to_string(), self.incoming.join("manifest")));
        Reply {
            lacks,
            current: self.store.current(),
            ..Reply::ok()
        }
    }

    /// The content hashes of `m` this host's current release lacks.
    fn lacking(&self, m: &Manifest) -> Vec<String> {
        // What the current release holds need not be sent.
        let have: std::collections::HashSet<manifest::Hash> = self
            .store
            .current()
            .and_then(|c| Manifest::load(&self.store.manifest_path(&c)).ok())
            .map(|pm| {
                pm.entries()
                    .iter()
                    .filter_map(|e| match &e.kind {
                        manifest::Kind::File { hash, .. } => Some(*hash),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut lacks: Vec<String> = m
            .entries()
            .iter()
            .filter_map(|e| match &e.kind {
                manifest::Kind::File { hash, .. } if !have.contains(hash) => {
                    Some(manifest::hex(hash))
                }
                _ => None,
            })
            .collect();
        lacks.sort();
        lacks.dedup();
        lacks
    }

    /// Reads a blob's chunks, checks its hash, stores it by name. Only a
    /// blob the offered manifest names and this host lacks is stored, and
    /// never more of it than the manifest's size for it: each chunk is
    /// inflated to at most [`CHUNK`] bytes, so neither memory nor disk
    /// grows with what a peer claims. `Err` ends the session (the peer
    /// broke the framing or sent more than it offered).
    fn receive_blob(
        &mut self,
        hash: &str,
        input: &mut impl Read,
        allowed: bool,
    ) -> io::Result<Reply> {
        let expected = self.wanted.get(hash).copied().filter(|_| allowed);
        let objects = self.incoming.join("objects");
        let tmp = objects.join(format!("{hash}.part"));
        let mut file = match expected {
            Some(_) => Some(std::fs::File::create(&tmp)?),
            None => None,
        };
        let mut hasher = blake3::Hasher::new();
        let mut got = 0u64;
        let mut failure = None;
        let mut data = Vec::with_capacity(CHUNK);
        loop {
            let c = match read_frame(input)? {
                Some(Frame::Chunk(c)) if c.is_empty() => break,
                Some(Frame::Chunk(c)) => c,
                _ => {
                    return Err(protocol_error(format!(
                        "blob {hash}: ended without its end"
                    )));
                }
            };
            data.clear();
            if let Err(e) = inflate_chunk(&c, &mut data) {
                failure.get_or_insert(format!("blob {hash}: {e}"));
                continue;
            }
            got += data.len() as u64;
            if let Some(size) = expected
                && got > size
            {
                let _ = std::fs::remove_file(&tmp);
                return Err(protocol_error(format!(
                    "blob {hash}: more than the {size} bytes its manifest offered"
                )));
            }
            hasher.update(&data);
            if let Some(f) = file.as_mut()
                && let Err(e) = f.write_all(&data)
            {
                failure.get_or_insert(format!("blob {hash}: {e}"));
            }
        }
        if expected.is_none() {
            return Ok(Reply::failed(format!(
                "blob {}: not offered or not lacking",
                crate::logtext::value(hash)
            )));
        }
        if let Some(f) = failure {
            let _ = std::fs::remove_file(&tmp);
            return Ok(Reply::failed(f));
        }
        if hasher.finalize().to_hex().as_str() != hash {
            let _ = std::fs::remove_file(&tmp);
            return Ok(Reply::failed(format!(
                "blob {hash}: its content has another hash"
            )));
        }
        match std::fs::rename(&tmp, objects.join(hash)) {
            Ok(()) => {
                self.wanted.remove(hash);
                Ok(Reply::ok())
            }
            Err(e) => Ok(Reply::failed(format!("blob {hash}: {e}"))),
        }
    }

    fn prepare(&mut self, id: &str, build: Option<String>, bridge: Vec<PathBuf>) -> Reply {
        if self.prepared.as_deref() == Some(id) {
            return Reply {
                current: self.store.current(),
                ..Reply::ok()
            };
        }
        let Some((offered, manifest)) = self.offered.clone() else {
            return Reply::failed("prepare before offer");
        };
        if offered != id {
            return Reply::failed(format!("prepare {id}, but {offered} was offered"));
        }
        let Some(lock) = self.lock.as_mut() else {
            return Reply::failed("prepare before lock");
        };
        let opts = DeployOptions {
            id: Some(id.to_string()),
            build,
            reload: false,
            go_live: false,
            keep_git: true,
            bridge,
            quiet: true,
            interruptible: true,
            ..DeployOptions::new(
                &self.store.root,
                Source::Objects {
                    manifest,
                    objects: self.incoming.join("objects"),
                },
                &format!("dream fleet deploy {id}"),
            )
        };
        let result = deploy::deploy_locked(&opts, lock, &mut |_| {});
        let _ = release::remove_tree(&self.incoming);
        match result {
            Ok(_) => {
                self.prepared = Some(id.to_string());
                Reply {
                    current: self.store.current(),
                    ..Reply::ok()
                }
            }
            Err(e) => Reply {
                temporary: e.kind == deploy::Kind::Temporary,
                ..Reply::failed(e.message)
            },
        }
    }

    fn switch(
        &mut self,
        id: &str,
        confirm_within_ms: u64,
        verify: &[String],
        settle_ms: u64,
    ) -> Reply {
        if self.lock.is_none() {
            return Reply::failed("switch before lock");
        }
        let provisional = Provisional {
            within: Duration::from_millis(confirm_within_ms),
            confirm_now: false,
        };
        let before = self.store.current();
        let settle = Duration::from_millis(settle_ms);
        match deploy::go_live_prepared(
            &self.store.root,
            id,
            Some(provisional),
            verify,
            settle,
            &mut |_| {},
        ) {
            Ok(report) => {
                self.previous = before.clone();
                self.generation = report.generation;
                self.lease = report.generation.map(|generation| Lease {
                    generation,
                    within: Duration::from_millis(confirm_within_ms),
                    renewed: std::time::Instant::now(),
                });
                Reply {
                    previous: before,
                    current: self.store.current(),
                    generation: report.generation,
                    ..Reply::ok()
                }
            }
            Err(e) => Reply {
                previous: before,
                current: self.store.current(),
                temporary: e.kind == deploy::Kind::Temporary,
                ..Reply::failed(e.message)
            },
        }
    }

    /// The session ended (bye, EOF, silence): what was staged goes; a
    /// prepared release that never went live stays for the next run to
    /// reuse; a switched one is the supervisor's to confirm or revert; the
    /// lock goes with this process.
    fn abandon(&mut self) {
        let _ = release::remove_tree(&self.incoming);
        self.lock = None;
    }
}

/// A manifest's text from the chunks after an `offer` or a `plan`: `Err`
/// when the payload broke the protocol (the session cannot go on),
/// `Ok(Err)` when it is only not text.
fn read_manifest(input: &mut impl Read) -> io::Result<Result<String, String>> {
    let bytes = read_chunks(input, MAX_MANIFEST)?;
    Ok(String::from_utf8(bytes).map_err(|_| "not UTF-8".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incompatible_coordinator_is_refused_with_both_versions_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = Agent::new(dir.path());
        let r = agent.handle(ToAgent::Hello {
            protocol: PROTOCOL + 1,
            version: "9.9.9".into(),
        });
        assert!(!r.ok);
        let e = r.error.unwrap();
        assert!(
            e.contains("9.9.9") && e.contains(&crate::supervise::version()),
            "{e}"
        );
        assert!(e.contains(&format!("protocol {}", PROTOCOL + 1)), "{e}");
        let r = agent.handle(ToAgent::Hello {
            protocol: PROTOCOL,
            version: "x".into(),
        });
        assert!(r.ok, "{r:?}");
        // Nothing before a lock: an offer or a switch is refused.
        assert!(!agent.offer("one", "dream-manifest 1\n").ok);
        assert!(!agent.switch("one", 1000, &[], 0).ok);
    }

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let mut wire = Vec::new();
        write_message(&mut wire, &ToAgent::Ping).unwrap();
        let content = b"x".repeat(CHUNK * 2 + 17);
        let hash = blake3::hash(&content).to_hex().to_string();
        write_blob(&mut wire, &hash, &content[..]).unwrap();
        let mut r = &wire[..];
        let Some(Frame::Message(m)) = read_frame(&mut r).unwrap() else {
            panic!("a message")
        };
        assert_eq!(
            serde_json::from_slice::<ToAgent>(&m).unwrap(),
            ToAgent::Ping
        );
        let Some(Frame::Message(_)) = read_frame(&mut r).unwrap() else {
            panic!("the blob's message")
        };
        let mut got = Vec::new();
        while let Some(Frame::Chunk(c)) = read_frame(&mut r).unwrap() {
            if c.is_empty() {
                break;
            }
            flate2::read::DeflateDecoder::new(&c[..])
                .read_to_end(&mut got)
                .unwrap();
        }
        assert_eq!(got, content);
        assert!(read_frame(&mut r).unwrap().is_none(), "clean EOF");
        let huge = [0xffu8, 0xff, 0xff, 0xff, 0];
        assert!(read_frame(&mut &huge[..]).is_err());
        let kind = [0u8, 0, 0, 0, 9];
        assert!(read_frame(&mut &kind[..]).is_err());
        assert!(read_frame(&mut &[0u8, 0][..]).is_err(), "a torn header");
        assert!(
            serde_json::from_str::<ToAgent>(r#"{"msg":"confirm","generation":1,"x":1}"#).is_err(),
            "unknown fields are refused"
        );
        assert!(serde_json::from_str::<ToAgent>(r#"{"msg":"explode"}"#).is_err());
    }
}
