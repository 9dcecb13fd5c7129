//! The control protocol: newline-delimited JSON over a Unix stream socket
//! at `ROOT/.dream/control.sock` (mode 0600, peer credentials checked).
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"reload"}` (answered when the
//! reload has succeeded or failed), `{"cmd":"scale","workers":N}`,
//! `{"cmd":"stop"}`. Every response has `"ok": true|false`; failures carry
//! `"error"`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::supervise::pool::{GenerationState, GenerationStatus, PoolStatus};

/// Longest request line the supervisor reads.
pub const MAX_LINE: usize = 64 * 1024;

/// A request, as clients send it and the supervisor parses it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    /// With `confirm_within_ms`, a provisional reload: the new generation
    /// reverts unless confirmed within that long of going live.
    Reload {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        confirm_within_ms: Option<u64>,
        /// A canary reload: the new generation serves a share beside the
        /// live one and is judged; answered once it is promoted and its
        /// full generation is live, or reverted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<crate::supervise::canary::judge::Spec>,
    },
    /// Keeps a provisional generation (default: the live one).
    Confirm {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<u64>,
    },
    /// Keeps provisional generation `generation` provisional, its deadline
    /// moved to `within_ms` from now (never earlier): a lease its holder
    /// renews while it is alive, so the generation reverts `within_ms`
    /// after the holder goes silent.
    Extend {
        generation: u64,
        within_ms: u64,
    },
    /// Answered once generation `generation` has been live for
    /// `within_ms` and is still live, not reverted, with every worker up;
    /// at once with a failure if it is reverted, fails or is replaced.
    Settle {
        generation: u64,
        within_ms: u64,
    },
    Scale {
        workers: usize,
    },
    /// Stop accepting: the live generation drains, new connections wait in
    /// the backlog until a reload (or `resume`) starts a generation, or
    /// `max_ms` passes. Answered once every worker is gone.
    Pause {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_ms: Option<u64>,
    },
    /// Ends a pause: a reload of what `current` names. Answered once it is
    /// live; refused when not paused.
    Resume,
    Stop,
    /// Replace the supervisor's program in place (default: the path it
    /// started from).
    Upgrade {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<PathBuf>,
    },
}

impl Request {
    /// Parses one request line strictly: unknown commands and unknown
    /// fields are errors, so a typo never does something unexpected.
    pub fn parse(line: &str) -> Result<Request, String> {
        // A key given twice (`{"cmd":"status","cmd":"stop"}`) would
        // silently mean its last value: refused.
        serde_json::from_str::<unique::Unique>(line).map_err(|e| format!("not JSON: {e}"))?;
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let obj = v.as_object().ok_or("a request is a JSON object")?;
        let cmd = obj.get("cmd").and_then(Value::as_str).unwrap_or_default();
        let allowed: &[&str] = match cmd {
            "scale" => &["cmd", "workers"],
            "upgrade" => &["cmd", "binary"],
            "reload" => &["cmd", "confirm_within_ms", "canary"],
            "confirm" => &["cmd", "generation"],
            "settle" | "extend" => &["cmd", "generation", "within_ms"],
            "pause" => &["cmd", "max_ms"],
            _ => &["cmd"],
        };
        if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!("unknown field {k:?} for {cmd:?}"));
        }
        serde_json::from_value(v).map_err(|e| e.to_string())
    }
}

/// A JSON document in which no object has a key twice, at any depth.
mod unique {
    use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};

    pub struct Unique;

    impl<'de> Deserialize<'de> for Unique {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Unique, D::Error> {
            d.deserialize_any(Checker)
        }
    }

    struct Checker;

    impl<'de> Visitor<'de> for Checker {
        type Value = Unique;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E: Error>(self, _: bool) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_i64<E: Error>(self, _: i64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_u64<E: Error>(self, _: u64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_f64<E: Error>(self, _: f64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_str<E: Error>(self, _: &str) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_unit<E: Error>(self) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Unique, A::Error> {
            while a.next_element::<Unique>()?.is_some() {}
            Ok(Unique)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Unique, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = m.next_key::<String>()? {
                if !seen.insert(k.clone()) {
                    return Err(A::Error::custom(format!("the key {k:?} is given twice")));
                }
                m.next_value::<Unique>()?;
            }
            Ok(Unique)
        }
    }
}

/// Why the supervisor refused to take a request at all (as opposed to
/// carrying it out and failing).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Refusal {
    /// Every client slot waits for an answer: ask again later.
    Busy,
    /// Not the supervisor's user or root.
    Permission,
    /// What was asked cannot be done here (a canary without TCP listeners
    /// that share a port, a canary of the live release): nothing was
    /// started, and the release is not at fault.
    Unsupported,
}

/// What a request that was carried out did: each request's own answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Done {
    /// Nothing beyond `ok` (a failure says why in `error`).
    #[default]
    Nothing,
    /// `reload`, `confirm`, `settle`: the generation live now, and its
    /// release.
    Live { generation: u64, release: String },
    /// `scale`: the new worker count.
    Scaled { workers: usize },
    /// `stop`: the supervisor is stopping.
    Stopping,
    /// `upgrade`: the version running now, and the one before.
    Upgraded {
        version: String,
        previous_version: String,
    },
}

/// The answer to every request but `status` (whose answer is the status
/// itself, with `"ok": true`): one type for the supervisor that writes it
/// and every client that reads it. On the wire the request's own fields
/// sit beside `ok`, `error` and `refused` ([`AnswerWire`]), as they always
/// have: a supervisor and a client of different versions understand each
/// other.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(from = "AnswerWire", into = "AnswerWire")]
pub struct Answer {
    pub ok: bool,
    pub error: Option<String>,
    /// Set when the request was not taken at all.
    pub refused: Option<Refusal>,
    pub done: Done,
}

/// [`Answer`] as JSON carries it: one flat object.
#[derive(Default, Serialize, Deserialize)]
struct AnswerWire {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refused: Option<Refusal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    workers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stopping: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_version: Option<String>,
}

impl From<AnswerWire> for Answer {
    fn from(w: AnswerWire) -> Answer {
        let done = match w {
            AnswerWire {
                generation: Some(generation),
                release: Some(release),
                ..
            } => Done::Live {
                generation,
                release,
            },
            AnswerWire {
                workers: Some(workers),
                ..
            } => Done::Scaled { workers },
            AnswerWire {
                stopping: Some(true),
                ..
            } => Done::Stopping,
            AnswerWire {
                version: Some(version),
                previous_version: Some(previous_version),
                ..
            } => Done::Upgraded {
                version,
                previous_version,
            },
            _ => Done::Nothing,
        };
        Answer {
            ok: w.ok,
            error: w.error,
            refused: w.refused,
            done,
        }
    }
}

impl From<Answer> for AnswerWire {
    fn from(a: Answer) -> AnswerWire {
        let w = AnswerWire {
            ok: a.ok,
            error: a.error,
            refused: a.refused,
            ..AnswerWire::default()
        };
        match a.done {
            Done::Nothing => w,
            Done::Live {
                generation,
                release,
            } => AnswerWire {
                generation: Some(generation),
                release: Some(release),
                ..w
            },
            Done::Scaled { workers } => AnswerWire {
                workers: Some(workers),
                ..w
            },
            Done::Stopping => AnswerWire {
                stopping: Some(true),
                ..w
            },
            Done::Upgraded {
                version,
                previous_version,
            } => AnswerWire {
                version: Some(version),
                previous_version: Some(previous_version),
                ..w
            },
        }
    }
}

impl Answer {
    /// A request carried out, with what it did.
    pub fn done(done: Done) -> Answer {
        Answer {
            ok: true,
            done,
            ..Answer::default()
        }
    }

    pub fn failed(error: impl Into<String>) -> Answer {
        Answer {
            ok: false,
            error: Some(error.into()),
            ..Answer::default()
        }
    }

    pub fn refused(why: Refusal, error: impl Into<String>) -> Answer {
        Answer {
            refused: Some(why),
            ..Answer::failed(error)
        }
    }

    /// The generation and release of a `Live` answer.
    pub fn live(&self) -> Option<(u64, &str)> {
        match &self.done {
            Done::Live {
                generation,
                release,
            } => Some((*generation, release)),
            _ => None,
        }
    }

    /// As one JSON value, for the wire.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("an answer serializes")
    }
}

/// The answer to `status`: the supervisor writes it, `dream status`, the
/// deploy and the demo read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub ok: bool,
    pub pid: u32,
    /// The supervisor's version, the program `dream upgrade` execs by
    /// default, and how many upgrades it has been through.
    pub version: String,
    pub binary: PathBuf,
    pub upgrades: u64,
    /// The deploy root (`dream serve`), none for `dream pool`.
    pub root: Option<PathBuf>,
    pub uptime_s: f64,
    /// Output dropped because its reader stalled (see `output.rs`).
    pub output_dropped_bytes: u64,
    pub sockets: Vec<SocketStatus>,
    pub pool: PoolStatus,
    /// What `current` names now, which may differ from what the live
    /// generation runs (a reload pending, or one that failed).
    pub current: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SocketStatus {
    /// Its `LISTEN_FDNAMES` name.
    pub name: String,
    pub address: String,
    /// TCP: connections accepted by the kernel and not yet by a worker,
    /// and how many its backlog holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<u32>,
}

impl Status {
    /// The live generation, if any.
    pub fn live(&self) -> Option<&GenerationStatus> {
        self.pool
            .generations
            .iter()
            .find(|g| g.state == GenerationState::Live)
    }

    /// A few lines for people (`dream status`, SIGUSR1).
    pub fn human(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "supervisor pid {} (dream {}{}), up {}{}",
            self.pid,
            self.version,
            match self.upgrades {
                0 => String::new(),
                1 => ", upgraded once".to_string(),
                n => format!(", upgraded {n} times"),
            },
            crate::fmt_duration(Duration::from_secs_f64(self.uptime_s.max(0.0))),
            self.root
                .as_ref()
                .map(|r| format!(", root {}", r.display()))
                .unwrap_or_default()
        );
        for sock in &self.sockets {
            let _ = writeln!(s, "listening on {}", sock.address);
        }
        if let Some(p) = &self.pool.paused {
            let queued: Vec<String> = self
                .sockets
                .iter()
                .filter_map(|s| Some(format!("{} of {} on {}", s.queued?, s.backlog?, s.address)))
                .collect();
            let _ = writeln!(
                s,
                "paused for {}: nothing accepts; resumes by itself in {}; waiting in the backlog: {}",
                crate::fmt_duration(Duration::from_secs_f64(p.for_s.max(0.0))),
                crate::fmt_duration(Duration::from_secs_f64(p.resumes_in_s.max(0.0))),
                if queued.is_empty() {
                    "-".to_string()
                } else {
                    queued.join(", ")
                }
            );
        }
        let judged = |r: &str| {
            self.pool
                .generations
                .iter()
                .any(|g| g.canary.is_some() && g.release == r)
        };
        if let (Some(current), Some(live)) = (&self.current, self.live())
            && *current != live.release
            && !judged(current)
        {
            let _ = writeln!(
                s,
                "warning: current is {current}, but the live generation runs {} (a reload failed or has not run: dream reload, or dream rollback)",
                live.release
            );
        }
        let pool = &self.pool;
        let _ = writeln!(
            s,
            "workers: {} wanted, {} restarts{}",
            pool.workers_target,
            pool.restarts,
            if pool.reloading {
                ", reload in progress"
            } else {
                ""
            }
        );
        for g in &pool.generations {
            let secs = |s: f64| crate::fmt_duration(Duration::from_secs_f64(s.max(0.0)));
            let mut trial = String::new();
            if let Some(c) = g.confirm_in_s {
                trial.push_str(&format!(", unconfirmed: reverts in {}", secs(c)));
            }
            if let Some(p) = g.probation_s {
                trial.push_str(&format!(", on probation for {}", secs(p)));
            }
            if g.reverted {
                trial.push_str(", reverted");
            }
            if let Some(c) = &g.canary {
                trial.push_str(&format!(
                    "\n  canary: {}, {} of new connections, {}",
                    crate::plural(c.workers, "worker"),
                    crate::supervise::canary::judge::percent(c.share_basis),
                    if c.promoted {
                        "promoted: its release's full generation is starting".to_string()
                    } else {
                        match c.judged_s {
                            Some(t) => format!("judged for {} of {}", secs(t), secs(c.judge_s)),
                            None => format!("starting (judged for {} once ready)", secs(c.judge_s)),
                        }
                    }
                ));
                if let Some(f) = &c.figures {
                    trial.push_str(&format!("\n  judge: {}", f.describe()));
                }
                if let Some(v) = &c.verdict {
                    trial.push_str(&format!("\n  verdict so far: {v}"));
                }
            }
            let _ = writeln!(
                s,
                "generation {} {}: release {} ({}), age {}{trial}",
                g.id,
                g.state.as_str(),
                g.release,
                g.release_dir.display(),
                secs(g.age_s)
            );
            for w in &g.workers {
                let _ = writeln!(
                    s,
                    "  worker {}.{} pid {} {}, restarts {}",
                    g.id,
                    w.index,
                    w.pid.map_or("-".to_string(), |p| p.to_string()),
                    w.state.as_str(),
                    w.restarts
                );
            }
        }
        s.trim_end().to_string()
    }
}

/// Asks for the status.
pub fn status(root: &Path, timeout: Option<Duration>) -> Result<Status, ControlError> {
    let v = request(
        root,
        &serde_json::to_value(Request::Status).expect("a request serializes"),
        timeout,
    )?;
    if v["ok"] != true {
        let message = v["error"].as_str().unwrap_or("unknown error").to_string();
        return Err(match v["refused"].as_str() {
            Some(why) => ControlError::Refused {
                busy: why == "busy",
                unsupported: why == "unsupported",
                message,
            },
            None => ControlError::Failed(message),
        });
    }
    serde_json::from_value(v.clone()).map_err(|_| ControlError::BadResponse(v.to_string()))
}

/// Sends `req` and reads the answer as an [`Answer`] (for every request
/// but `status`).
pub fn ask(root: &Path, req: &Request, timeout: Option<Duration>) -> Result<Answer, ControlError> {
    ask_or_interrupt(root, req, timeout, None)
}

/// [`ask`], ended early with [`ControlError::Interrupted`] when
/// `interrupt` (a signalfd) becomes readable while the answer is awaited.
pub fn ask_or_interrupt(
    root: &Path,
    req: &Request,
    timeout: Option<Duration>,
    interrupt: Option<BorrowedFd<'_>>,
) -> Result<Answer, ControlError> {
    let v = exchange(
        root,
        &serde_json::to_value(req).expect("a request serializes"),
        timeout,
        interrupt,
    )?;
    serde_json::from_value(v.clone()).map_err(|_| ControlError::BadResponse(v.to_string()))
}

/// Sends `req` and hangs up without waiting: a request the supervisor has
/// taken is carried out whether or not anyone reads its answer.
pub fn tell(root: &Path, req: &Request) -> Result<(), ControlError> {
    let socket = socket_path(root);
    let mut stream = UnixStream::connect(&socket).map_err(|source| ControlError::Io {
        socket: socket.clone(),
        source,
    })?;
    let mut line = serde_json::to_string(req).expect("a request serializes");
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|source| ControlError::Io { socket, source })
}

/// `ROOT/.dream/control.sock` (the paths under a root are `release::Store`'s).
pub fn socket_path(root: &Path) -> PathBuf {
    crate::store::release::Store::new(root).control_socket()
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no supervisor is running for {} (nothing answers on {})", .root.display(), .socket.display())]
    NotRunning { root: PathBuf, socket: PathBuf },
    #[error("control socket {}: {source}", .socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the supervisor's answer is not JSON: {0:?}")]
    BadResponse(String),
    /// The supervisor refused to take the request at all (not the outcome
    /// of carrying it out): too busy, or not allowed.
    #[error("the supervisor refused the request: {message}")]
    Refused {
        busy: bool,
        /// [`Refusal::Unsupported`]: what was asked cannot be done here.
        unsupported: bool,
        message: String,
    },
    /// Taken, and answered with a failure.
    #[error("{0}")]
    Failed(String),
    /// A signal arrived on the descriptor watched while waiting (the
    /// request may still be carried out).
    #[error("interrupted while waiting for the supervisor")]
    Interrupted,
}

impl ControlError {
    /// Whether asking again later may work (busy, timed out, connection
    /// lost), as opposed to not allowed or nothing running.
    pub fn is_temporary(&self) -> bool {
        match self {
            ControlError::Refused { busy, .. } => *busy,
            ControlError::Io { source, .. } => source.kind() != io::ErrorKind::PermissionDenied,
            ControlError::NotRunning { .. }
            | ControlError::BadResponse(_)
            | ControlError::Failed(_)
            | ControlError::Interrupted => false,
        }
    }
}

/// Sends one request and waits (up to `timeout`, or forever) for its answer.
pub fn request(
    root: &Path,
    request: &Value,
    timeout: Option<Duration>,
) -> Result<Value, ControlError> {
    exchange(root, request, timeout, None)
}

fn exchange(
    root: &Path,
    request: &Value,
    timeout: Option<Duration>,
    interrupt: Option<BorrowedFd<'_>>,
) -> Result<Value, ControlError> {
    let socket = socket_path(root);
    let io_err = |source| ControlError::Io {
        socket: socket.clone(),
        source,
    };
    let mut stream = match UnixStream::connect(&socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NotRunning {
                root: root.to_path_buf(),
                socket,
            });
        }
        Err(e) => return Err(io_err(e)),
    };
    stream.set_read_timeout(timeout).map_err(io_err)?;
    let mut line = request.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    if let Some(signals) = interrupt {
        use nix::poll::{PollFd, PollFlags, poll};
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let mut fds = [
                PollFd::new(stream.as_fd(), PollFlags::POLLIN),
                PollFd::new(signals, PollFlags::POLLIN),
            ];
            match poll(&mut fds, crate::signals::timeout_until(deadline)) {
                Ok(0) => {
                    return Err(io_err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no answer in time",
                    )));
                }
                Ok(_) if fds[1].any() == Some(true) => return Err(ControlError::Interrupted),
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io_err(e.into())),
            }
        }
    }
    let mut answer = String::new();
    BufReader::new(&stream)
        .take(16 << 20)
        .read_line(&mut answer)
        .map_err(io_err)?;
    if answer.is_empty() {
        return Err(io_err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the supervisor closed the connection without answering",
        )));
    }
    let v: Value =
        serde_json::from_str(answer.trim()).map_err(|_| ControlError::BadResponse(answer))?;
    if let Some(why) = v
        .get("refused")
        .and_then(|r| serde_json::from_value::<Refusal>(r.clone()).ok())
    {
        return Err(ControlError::Refused {
            busy: why == Refusal::Busy,
            unsupported: why == Refusal::Unsupported,
            message: v["error"].as_str().unwrap_or("refused").to_string(),
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_refusals_are_typed() {
        let a = Answer::done(Done::Live {
            generation: 3,
            release: "r".into(),
        });
        let v = a.to_value();
        assert_eq!(
            v,
            serde_json::json!({"ok": true, "generation": 3, "release": "r"})
        );
        assert_eq!(serde_json::from_value::<Answer>(v).unwrap(), a);
        let busy = Answer::refused(Refusal::Busy, "try again").to_value();
        assert_eq!(busy["refused"], "busy");
        assert_eq!(
            serde_json::to_value(Request::Scale { workers: 2 }).unwrap(),
            serde_json::json!({"cmd": "scale", "workers": 2})
        );
        assert_eq!(
            Request::parse(r#"{"cmd":"reload"}"#),
            Ok(Request::Reload {
                confirm_within_ms: None,
                canary: None,
            })
        );
        assert_eq!(
            serde_json::to_value(Request::Reload {
                confirm_within_ms: None,
                canary: None,
            })
            .unwrap(),
            serde_json::json!({"cmd": "reload"})
        );
    }

    #[test]
    fn a_key_given_twice_is_refused() {
        for line in [
            r#"{"cmd":"status","cmd":"stop"}"#,
            r#"{"cmd":"scale","workers":1,"workers":9}"#,
            r#"{"cmd":"upgrade","binary":"/a","cmd":"upgrade"}"#,
        ] {
            let e = Request::parse(line).unwrap_err();
            assert!(e.contains("given twice"), "{line}: {e}");
        }
        assert_eq!(
            Request::parse(r#"{"cmd":"settle","generation":2,"within_ms":300}"#),
            Ok(Request::Settle {
                generation: 2,
                within_ms: 300
            })
        );
    }

    #[test]
    fn parses_requests_strictly() {
        let p = Request::parse;
        assert_eq!(p(r#"{"cmd":"status"}"#).unwrap(), Request::Status);
        assert_eq!(
            p(r#"{"cmd":"reload","confirm_within_ms":500}"#).unwrap(),
            Request::Reload {
                confirm_within_ms: Some(500),
                canary: None,
            }
        );
        assert_eq!(
            p(r#"{"cmd":"confirm","generation":4}"#).unwrap(),
            Request::Confirm {
                generation: Some(4)
            }
        );
        assert_eq!(
            p(r#"{"cmd":"extend","generation":4,"within_ms":3000}"#).unwrap(),
            Request::Extend {
                generation: 4,
                within_ms: 3000
            }
        );
        assert!(p(r#"{"cmd":"extend","generation":4}"#).is_err());
        assert_eq!(
            p(r#"{"cmd":"upgrade","binary":"/usr/bin/dream"}"#).unwrap(),
            Request::Upgrade {
                binary: Some("/usr/bin/dream".into())
            }
        );
        assert_eq!(
            p(r#"{"cmd":"scale","workers":3}"#).unwrap(),
            Request::Scale { workers: 3 }
        );
        assert_eq!(p(r#"{"cmd":"stop"}"#).unwrap(), Request::Stop);
        for bad in [
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"scale"}"#,
            r#"{"cmd":"scale","workers":-1}"#,
            r#"{"cmd":"status","extra":1}"#,
            r#"{"cmd":"reload","generation":1}"#,
            r#"{"cmd":"confirm","generation":"two"}"#,
            r#"{"cmd":"upgrade","binary":1}"#,
            r#"[]"#,
            "garbage",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }
}
