//! `dream fleet`'s wire: the coordinator and each host's `dream agent`,
//! over the stdin and stdout of an OpenSSH session.
//!
//! **Frames**: a 4-byte big-endian length, a kind byte (`0` a JSON
//! message, `1` a chunk of a blob's bytes, deflate-compressed), the
//! payload. A blob is a [`ToAgent::Blob`] message followed by its chunks
//! and an empty chunk.
//!
//! **Conversation**: `hello` (versions; an incompatible coordinator is
//! refused with both named), `base` (fingerprints of the lines of the
//! manifest the host runs, see [`super::delta`]), `lock`, `offer` (the
//! manifest, whole or as a delta against that base; the agent answers with
//! the hashes it lacks), blobs, `prepare` (the same pipeline
//! as `dream deploy`, stopping before the switch), `switch` (a
//! provisional reload), `confirm` or `revert`, `bye`. Every request gets
//! one [`Reply`]. `ping` frames keep the session alive while the
//! coordinator works on other hosts; an agent that hears nothing for
//! [`silence`], or reads EOF, treats the coordinator as gone: it removes
//! what it staged, releases its locks and exits, leaving a switched but
//! unconfirmed release to its supervisor's confirmation deadline.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The protocol's version; both sides must speak the same (2: the agent
/// sends `alive` frames while it works, and both sides read with a
/// deadline; 3: `base`, and an `offer` may carry a delta).
pub const PROTOCOL: u32 = 4;

/// How long either side waits for a byte from the other before it calls
/// the peer gone: 20 s, or `DREAM_FLEET_SILENCE` (a duration: `2s`,
/// `500ms`), for slow links and for tests. Each side sends a heartbeat
/// every quarter of it while it has nothing else to say.
pub fn silence() -> Duration {
    static SILENCE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SILENCE.get_or_init(|| {
        std::env::var("DREAM_FLEET_SILENCE")
            .ok()
            .and_then(|v| crate::signals::parse_duration(&v).ok())
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
pub(super) const MAX_MANIFEST: usize = 128 << 20;
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
    /// The fingerprints of the lines of the manifest of the release this
    /// host runs: the answer names that manifest's digest (`base`) and the
    /// fingerprints follow it in chunk frames; no `base`, no chunks.
    Base,
    /// The release to prepare; its manifest follows in chunk frames
    /// (compressed, as a blob's content), and the answer lists the content
    /// hashes this host lacks. With `base`, the payload is a delta against
    /// the manifest of that digest (the host's current one), and `digest`
    /// is the whole manifest's: a host that cannot rebuild exactly it
    /// refuses, and the coordinator sends the manifest whole.
    Offer {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
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
        /// A canary host's switch is judged there: the new release beside
        /// the old one on a share of connections, promoted or reverted by
        /// the host's supervisor before the other hosts switch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<crate::supervise::canary::judge::Spec>,
    },
    /// The run committed: the host keeps its switched generation, and
    /// with `keep` prunes its releases as `dream deploy --keep` does.
    Confirm {
        generation: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keep: Option<u32>,
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
            | ToAgent::Base
            | ToAgent::Status
            | ToAgent::Ping
            | ToAgent::Bye => return None,
        })
    }

    /// The release ids a request names.
    pub(super) fn ids(&self) -> Vec<&str> {
        match self {
            ToAgent::Offer { id, .. }
            | ToAgent::Prepare { id, .. }
            | ToAgent::Switch { id, .. }
            | ToAgent::Commit { id, .. } => vec![id],
            ToAgent::Revert { from, to, .. } => vec![from, to],
            _ => Vec::new(),
        }
    }
}

/// What a reply says beyond the host's state: each request's own answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Said {
    #[default]
    Nothing,
    /// `hello`: the agent's protocol and version.
    Hello { protocol: u32, version: String },
    /// `offer`, `plan`: the content hashes this host lacks, or that the
    /// release is already prepared (or live) here.
    Offer { lacks: Vec<String>, present: bool },
    /// `base`: the digest of the manifest the host runs (its lines'
    /// fingerprints follow the reply).
    Base { digest: String },
    /// `status`: the agent's version and the manual hold's message.
    Status {
        version: String,
        hold: Option<String>,
    },
}

/// The answer to every request but `ping` and blobs: whether it was
/// carried out, the host's state where the request touches it, and what
/// the request itself answers ([`Said`]). On the wire it is one flat
/// object ([`ReplyWire`]), as it always was.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(from = "ReplyWire", into = "ReplyWire")]
pub struct Reply {
    pub ok: bool,
    pub error: Option<String>,
    /// The failure may pass (a lock held, the link busy): exit 111.
    pub temporary: bool,
    /// What `current` named before this session changed it (`switch`), or
    /// the last release that was good here (`status`).
    pub previous: Option<String>,
    pub current: Option<String>,
    pub generation: Option<u64>,
    pub said: Said,
}

/// [`Reply`] as JSON carries it.
#[derive(Default, Serialize, Deserialize)]
struct ReplyWire {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default)]
    temporary: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    protocol: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    lacks: Vec<String>,
    #[serde(default)]
    present: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    current: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hold: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<String>,
}

impl From<ReplyWire> for Reply {
    fn from(w: ReplyWire) -> Reply {
        let said = match (w.protocol, w.version) {
            (Some(protocol), version) => Said::Hello {
                protocol,
                version: version.unwrap_or_default(),
            },
            (None, None) if w.base.is_some() => Said::Base {
                digest: w.base.unwrap_or_default(),
            },
            _ if !w.lacks.is_empty() || w.present => Said::Offer {
                lacks: w.lacks,
                present: w.present,
            },
            (None, Some(version)) => Said::Status {
                version,
                hold: w.hold,
            },
            (None, None) => Said::Nothing,
        };
        Reply {
            ok: w.ok,
            error: w.error,
            temporary: w.temporary,
            previous: w.previous,
            current: w.current,
            generation: w.generation,
            said,
        }
    }
}

impl From<Reply> for ReplyWire {
    fn from(r: Reply) -> ReplyWire {
        let w = ReplyWire {
            ok: r.ok,
            error: r.error,
            temporary: r.temporary,
            previous: r.previous,
            current: r.current,
            generation: r.generation,
            ..ReplyWire::default()
        };
        match r.said {
            Said::Nothing => w,
            Said::Hello { protocol, version } => ReplyWire {
                protocol: Some(protocol),
                version: Some(version),
                ..w
            },
            Said::Offer { lacks, present } => ReplyWire {
                lacks,
                present,
                ..w
            },
            Said::Status { version, hold } => ReplyWire {
                version: Some(version),
                hold,
                ..w
            },
            Said::Base { digest } => ReplyWire {
                base: Some(digest),
                ..w
            },
        }
    }
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            ..Reply::default()
        }
    }

    /// A reply that says something of its own, with this host's `current`.
    pub fn saying(said: Said, current: Option<String>) -> Reply {
        Reply {
            said,
            current,
            ..Reply::ok()
        }
    }

    /// `offer`, `plan`: the content hashes this host lacks (none for any
    /// other reply).
    pub fn lacks(&self) -> &[String] {
        match &self.said {
            Said::Offer { lacks, .. } => lacks,
            _ => &[],
        }
    }

    /// The agent's version, where the reply says it (`hello`, `status`).
    pub fn version(&self) -> Option<&str> {
        match &self.said {
            Said::Hello { version, .. } | Said::Status { version, .. } => Some(version),
            _ => None,
        }
    }

    /// The same reply with every string escaped and bounded
    /// ([`crate::logtext::value`]): what a host says is data, never
    /// terminal control.
    pub fn escaped(self) -> Reply {
        let v = |s: Option<String>| s.map(|s| crate::logtext::value(&s));
        let e = |s: String| crate::logtext::value(&s);
        let said = match self.said {
            Said::Nothing => Said::Nothing,
            Said::Hello { protocol, version } => Said::Hello {
                protocol,
                version: e(version),
            },
            Said::Offer { lacks, present } => Said::Offer {
                lacks: lacks.into_iter().map(e).collect(),
                present,
            },
            Said::Status { version, hold } => Said::Status {
                version: e(version),
                hold: v(hold),
            },
            Said::Base { digest } => Said::Base { digest: e(digest) },
        };
        Reply {
            error: v(self.error),
            previous: v(self.previous),
            current: v(self.current),
            said,
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

/// Writes a frame as [`read_frame`] returned it (a relay's forward).
pub fn write_frame_as_read(w: &mut impl Write, frame: &Frame) -> io::Result<()> {
    match frame {
        Frame::Message(body) => write_frame(w, 0, body),
        Frame::Chunk(data) => write_frame(w, 1, data),
        Frame::Alive => write_frame(w, 2, &[]),
    }
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

/// Sends a message (a request, or the agent's reply) whose payload
/// follows it in chunks (a manifest, fingerprints).
pub fn write_with_payload(
    w: &mut impl Write,
    msg: &impl Serialize,
    payload: &[u8],
) -> io::Result<u64> {
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
            // The agent's heartbeat may fall between a reply and its
            // payload's frames.
            Some(Frame::Alive) => {}
            Some(Frame::Message(_)) => {
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
pub(super) fn inflate_chunk(c: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
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

pub(super) fn protocol_error(text: String) -> io::Error {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Replies keep the flat form every agent has sent: each request's
    /// fields beside `ok` and the host's state, read back into the same
    /// typed reply.
    #[test]
    fn replies_keep_their_wire_form() {
        let cases = [
            (
                r#"{"ok":true,"temporary":false,"protocol":3,"version":"0.1.0","present":false,"current":"r1"}"#,
                Said::Hello {
                    protocol: 3,
                    version: "0.1.0".into(),
                },
            ),
            (
                r#"{"ok":true,"temporary":false,"lacks":["ab","cd"],"present":false}"#,
                Said::Offer {
                    lacks: vec!["ab".into(), "cd".into()],
                    present: false,
                },
            ),
            (
                r#"{"ok":true,"temporary":false,"present":false,"current":"r1","base":"d1"}"#,
                Said::Base {
                    digest: "d1".into(),
                },
            ),
            (
                r#"{"ok":true,"temporary":false,"present":true,"current":"r2"}"#,
                Said::Offer {
                    lacks: Vec::new(),
                    present: true,
                },
            ),
            (
                r#"{"ok":true,"temporary":false,"version":"0.1.0","present":false,"previous":"r0","current":"r1","hold":"freeze"}"#,
                Said::Status {
                    version: "0.1.0".into(),
                    hold: Some("freeze".into()),
                },
            ),
            (
                r#"{"ok":false,"error":"offer before lock","temporary":false,"present":false}"#,
                Said::Nothing,
            ),
        ];
        for (text, said) in cases {
            let r: Reply = serde_json::from_str(text).unwrap();
            assert_eq!(r.said, said, "{text}");
            let again: serde_json::Value = serde_json::to_value(&r).unwrap();
            let wire: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(again, wire, "{text}");
        }
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
