//! Text that goes into a log line: whatever a client, a worker or a
//! request put into a value, it cannot forge a line, move the cursor or
//! flood the log.
//!
//! Every control character (C0, DEL, C1; newlines and escapes included)
//! is written as a visible escape (`\n`, `\u{1b}`), and a value is cut at
//! a fixed length with a note of how much was left out.

use std::fmt::Write;

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
