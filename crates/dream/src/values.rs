//! Typed values from the command line and from `dream.toml`, parsed once
//! at the edge: clap calls these as value parsers, and the config file's
//! fields deserialize through the same functions, so `--ready-timeout 5s`
//! and `ready_timeout = "5s"` accept and refuse exactly the same things.

use std::time::Duration;

use dream_core::sockets::spec::ListenSpec;
use dream_core::supervise::pool::Readiness;
use nix::sys::signal::Signal;
use serde::{Deserialize, Deserializer};

/// `250ms`, `1s`, `2m`, `1h30m`, or a bare number of seconds.
pub fn duration(s: &str) -> Result<Duration, String> {
    dream_core::signals::parse_duration(s)
}

/// `TERM`, `SIGTERM`, `15`.
pub fn signal(s: &str) -> Result<Signal, String> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("no signal number {n}"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse()
        .map_err(|_| format!("unknown signal {s:?} (e.g. TERM, QUIT, INT, USR1)"))
}

/// `notify`, `fd:N`, `delay:DUR`, `auto:DUR`.
pub fn readiness(s: &str) -> Result<Readiness, String> {
    s.parse()
}

/// `127.0.0.1:8080`, `[::1]:80`, `:8080`, `localhost:80`, `unix:/path`.
pub fn listen(s: &str) -> Result<ListenSpec, String> {
    s.parse()
        .map_err(|e: dream_core::sockets::spec::SpecError| e.to_string())
}

/// A URL path to request: `/`, `/healthz?full=1` (no spaces, no host).
pub fn url_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') && !s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a path (it starts with /, e.g. /healthz)"
        ))
    }
}

/// A canary's share: `K` workers or `P%`.
pub fn canary_share(s: &str) -> Result<dream_core::supervise::canary::judge::Share, String> {
    dream_core::supervise::canary::judge::Share::parse(s)
}

/// Percentage points (`2`, `0.5`), in hundredths.
pub fn percent_points(s: &str) -> Result<u32, String> {
    match s.trim().trim_end_matches('%').parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok((v * 100.0).round() as u32),
        _ => Err(format!(
            "{s:?} is not a number of percentage points from 0 to 100"
        )),
    }
}

/// A ratio of at least 1 (`3`, `1.5`), in hundredths.
pub fn ratio(s: &str) -> Result<u32, String> {
    match s.trim().trim_end_matches('x').parse::<f64>() {
        Ok(v) if (1.0..=1000.0).contains(&v) => Ok((v * 100.0).round() as u32),
        _ => Err(format!("{s:?} is not a ratio from 1 to 1000 (3, 1.5)")),
    }
}

/// A directory inside a release: relative, without `..` (`public/assets`).
pub fn release_dir(s: &str) -> Result<std::path::PathBuf, String> {
    let p = std::path::Path::new(s.trim_end_matches('/'));
    let inside = !s.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if inside {
        Ok(p.to_path_buf())
    } else {
        Err(format!(
            "{s:?}: a directory inside the release, relative, without .. (e.g. public/assets)"
        ))
    }
}

/// A size such as `500M`, `10G`, `1.5T` or `4096` (bytes; K, M, G and T
/// are powers of 1024, an optional trailing `B` or `iB` is allowed).
pub fn size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size (try 500M, 10G or a number of bytes)");
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, unit) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&t[..i], &t[i..]),
        None => (t, ""),
    };
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(bad()),
    };
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n <= 0.0 || n * mult as f64 >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok((n * mult as f64) as u64)
}

/// `dream.toml` fields through the same parsers: `#[serde(default,
/// deserialize_with = "values::de::duration")]` on an `Option<Duration>`.
pub mod de {
    use super::*;

    fn through<'de, D: Deserializer<'de>, T>(
        d: D,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(Some).map_err(serde::de::Error::custom)
    }

    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        through(d, super::duration)
    }

    pub fn signal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Signal>, D::Error> {
        through(d, super::signal)
    }

    pub fn readiness<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Readiness>, D::Error> {
        through(d, super::readiness)
    }

    pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        through(d, super::size)
    }

    pub fn listen_one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ListenSpec>, D::Error> {
        through(d, super::listen)
    }

    pub fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<ListenSpec>>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| super::listen(s))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size("1K"), Ok(1024));
        assert_eq!(size("1.5KiB"), Ok(1536));
        assert_eq!(size("10G"), Ok(10 << 30));
        assert!(size("0").is_err());
        assert!(size("-1M").is_err());
        assert!(size("ten").is_err());
        assert!(size("1P").is_err());
    }

    #[test]
    fn signals() {
        assert_eq!(signal("TERM"), Ok(Signal::SIGTERM));
        assert_eq!(signal("sigquit"), Ok(Signal::SIGQUIT));
        assert_eq!(signal("1"), Ok(Signal::SIGHUP));
        assert!(signal("NOPE").is_err());
        assert!(signal("999").is_err());
    }
}

/// Where a worker's `NOTIFY_SOCKET` is (`--notify-socket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifySocket {
    /// A socket file in ROOT/.dream/notify/ (every sd_notify client can use it)
    Path,
    /// An abstract socket, @dream/… (no file; some clients, e.g. Ruby's sd_notify gem, cannot use it)
    Abstract,
}

/// How a worker starts while others serve (`--start-priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartPriority {
    /// `idle` if dream may put workers back at normal priority (root, or
    /// `CAP_SYS_NICE`), else `normal`
    Auto,
    /// Under `SCHED_IDLE` until ready (at most 0.5s): the serving workers
    /// keep the CPU while the new ones start
    Idle,
    /// At the supervisor's own priority
    Normal,
}
