//! The control protocol: newline-delimited JSON over a Unix stream socket
//! at `ROOT/.dream/control.sock` (mode 0600, peer credentials checked).
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"reload"}` (answered when the
//! reload has succeeded or failed), `{"cmd":"scale","workers":N}`,
//! `{"cmd":"stop"}`. Every response has `"ok": true|false`; failures carry
//! `"error"`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// Longest request line the supervisor reads.
pub const MAX_LINE: usize = 64 * 1024;

/// A request, as the supervisor parses it.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Reload,
    Scale { workers: usize },
    Stop,
}

impl Request {
    /// Parses one request line strictly: unknown commands and unknown
    /// fields are errors, so a typo never does something unexpected.
    pub fn parse(line: &str) -> Result<Request, String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let obj = v.as_object().ok_or("a request is a JSON object")?;
        let cmd = obj.get("cmd").and_then(Value::as_str).unwrap_or_default();
        let allowed: &[&str] = if cmd == "scale" {
            &["cmd", "workers"]
        } else {
            &["cmd"]
        };
        if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!("unknown field {k:?} for {cmd:?}"));
        }
        serde_json::from_value(v).map_err(|e| e.to_string())
    }
}

/// `ROOT/.dream`.
pub fn state_dir(root: &Path) -> PathBuf {
    root.join(".dream")
}

/// `ROOT/.dream/control.sock`.
pub fn socket_path(root: &Path) -> PathBuf {
    state_dir(root).join("control.sock")
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
    Refused { busy: bool, message: String },
}

impl ControlError {
    /// Whether asking again later may work (busy, timed out, connection
    /// lost), as opposed to not allowed or nothing running.
    pub fn is_temporary(&self) -> bool {
        match self {
            ControlError::Refused { busy, .. } => *busy,
            ControlError::Io { source, .. } => source.kind() != io::ErrorKind::PermissionDenied,
            ControlError::NotRunning { .. } | ControlError::BadResponse(_) => false,
        }
    }
}

/// Sends one request and waits (up to `timeout`, or forever) for its answer.
pub fn request(
    root: &Path,
    request: &Value,
    timeout: Option<Duration>,
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
    if let Some(why) = v["refused"].as_str() {
        return Err(ControlError::Refused {
            busy: why == "busy",
            message: v["error"].as_str().unwrap_or(why).to_string(),
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_strictly() {
        let p = Request::parse;
        assert_eq!(p(r#"{"cmd":"status"}"#).unwrap(), Request::Status);
        assert_eq!(p(r#"{"cmd":"reload"}"#).unwrap(), Request::Reload);
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
            r#"[]"#,
            "garbage",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }
}
