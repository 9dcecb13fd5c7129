//! Text that goes into a log line: whatever a client, a worker or a
//! request put into a value, it cannot forge a line, move the cursor or
//! flood the log.
//!
//! Every control character (C0, DEL, C1; newlines and escapes included)
//! is written as a visible escape (`\n`, `\u{1b}`), and a value is cut at
//! a fixed length with a note of how much was left out.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// `--log-format json`: dream's own lines on stderr become JSON objects.
static JSON: AtomicBool = AtomicBool::new(false);

/// Turns JSON log lines on (for the whole process).
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

/// Whether log lines are JSON.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// How much a line matters: `-q` keeps `Warn` and `Error`, `-v` adds
/// `Debug`. `Error` is a command's own failure, its last line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// One JSON log line: time, level, the event's kind, its message and
/// fields (values are JSON-escaped, so a message cannot forge a line).
pub fn json_line(
    level: Level,
    event: &str,
    msg: &str,
    fields: &[(&str, serde_json::Value)],
) -> String {
    let mut o = serde_json::Map::new();
    o.insert("time".into(), crate::log_time().into());
    o.insert("level".into(), level.as_str().into());
    o.insert("event".into(), event.into());
    o.insert("msg".into(), bounded_lines(msg, 16 * 1024).into());
    for (k, v) in fields {
        o.insert((*k).into(), v.clone());
    }
    let mut line = serde_json::Value::Object(o).to_string();
    line.push('\n');
    line
}

/// `s` bounded to `max` bytes (at a character boundary), newlines kept.
fn bounded_lines(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} more bytes)", &s[..end], s.len() - end)
}

/// One of dream's own lines on stderr: `dream: TEXT`, or with JSON logs an
/// object whose `event` is `event`.
pub fn say(level: Level, event: &str, text: &str, fields: &[(&str, serde_json::Value)]) {
    if json() {
        eprint!("{}", json_line(level, event, text, fields));
    } else {
        eprintln!("dream: {text}");
    }
}

/// One line of a program's own log on stderr, as the supervisor writes
/// them: `TIME dream WHO: TEXT`, or with `--log-format json` one object
/// whose `from` is `who`, with `fields` beside it.
pub fn say_as(
    level: Level,
    event: &str,
    who: &str,
    text: &str,
    fields: &[(&str, serde_json::Value)],
) {
    if json() {
        let mut all = vec![("from", serde_json::Value::from(who))];
        all.extend(fields.iter().cloned());
        eprint!("{}", json_line(level, event, text, &all));
    } else {
        eprintln!("{} dream {who}: {text}", crate::log_time());
    }
}

/// The most characters of one value that reach the log.
pub const MAX_VALUE: usize = 256;

/// One value, escaped and bounded to [`MAX_VALUE`] characters.
pub fn value(s: &str) -> String {
    bounded(s, MAX_VALUE)
}

/// `s` with control characters escaped, cut after `max` characters.
pub fn bounded(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max + 32));
    for (n, c) in s.chars().enumerate() {
        if n == max {
            let rest = s.len() - s.char_indices().nth(n).map_or(s.len(), |(i, _)| i);
            let _ = write!(out, "…({rest} more bytes)");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_length_bounded() {
        assert_eq!(value("/a\nb\x1b[2J\r\u{9b}"), "/a\\nb\\u{1b}[2J\\r\\u{9b}");
        assert_eq!(value("héllo wörld"), "héllo wörld");
        let long = "x".repeat(60_000);
        let v = value(&long);
        assert!(v.starts_with(&"x".repeat(MAX_VALUE)));
        assert!(v.ends_with(&format!("…({} more bytes)", 60_000 - MAX_VALUE)));
        assert!(v.len() < 300);
    }
}
