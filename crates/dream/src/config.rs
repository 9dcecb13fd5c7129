//! `dream.toml`: everything `serve` and `deploy` take on the command line,
//! kept with the deploy root. Flags win over the file; the file wins over
//! the built-in defaults. Unknown keys are errors that name the key, so a
//! typo never silently does nothing.
//!
//! ```toml
//! [serve]
//! listen = [":8080"]
//! workers = 4
//! ready = "notify"
//! ready_timeout = "60s"
//! drain_signal = "TERM"
//! drain_timeout = "30s"
//! probation = "10s"
//! backlog = 4096
//! user = "www-data"
//! command = ["./bin/server"]
//!
//! [deploy]
//! build = "make assets"
//! keep = 5
//! wait_lock = "1m"
//! max_size = "10G"
//! confirm_within = "30s"
//! canary = "1"              # every deploy a judged canary (--no-canary: not this one)
//! judge_for = "30s"
//! judge_path = "/healthz"
//! judge_max_errors = 2
//! judge_max_latency_ratio = 3
//! judge_min_requests = 50
//! ```
//!
//! A canary is a deploy's choice, not the supervisor's: its reloads that
//! go back (an interrupted deploy, a rollback, a revert) must be
//! immediate, never judged, so there is no `[serve] canary`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dream_core::sockets::spec::ListenSpec;
use dream_core::supervise::pool::Readiness;
use nix::sys::signal::Signal;
use serde::Deserialize;

use crate::values::de;

use crate::exit::{Failure, Result};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub serve: Serve,
    #[serde(default)]
    pub deploy: Deploy,
    #[serde(default)]
    pub fleet: FleetConfig,
}

/// `[fleet]`: the hosts and how to reach them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    pub hosts: Option<Vec<FleetHost>>,
    pub root: Option<String>,
    pub ssh: Option<SshCommand>,
    pub remote_dream: Option<String>,
    pub parallel: Option<usize>,
    #[serde(default, deserialize_with = "de::duration")]
    pub confirm_within: Option<Duration>,
    pub canary: Option<usize>,
    /// `3` or `"25%"`.
    pub group: Option<String>,
    #[serde(default, deserialize_with = "de::duration")]
    pub wait: Option<Duration>,
    pub max_fail: Option<usize>,
    pub install: Option<bool>,
    #[serde(default, deserialize_with = "de::duration")]
    pub wait_lock: Option<Duration>,
    #[serde(default, deserialize_with = "de::duration")]
    pub settle: Option<Duration>,
    pub keep: Option<usize>,
}

/// A host: `"web1"`, or `{ host = "web1", root = "/srv/a" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FleetHost {
    Name(String),
    Table { host: String, root: Option<String> },
}

/// The ssh command: a command line (split on spaces) or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SshCommand {
    Line(String),
    List(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serve {
    #[serde(default, deserialize_with = "de::listen")]
    pub listen: Option<Vec<ListenSpec>>,
    pub backlog: Option<u32>,
    pub workers: Option<usize>,
    pub user: Option<String>,
    #[serde(default, deserialize_with = "de::readiness")]
    pub ready: Option<Readiness>,
    #[serde(default, deserialize_with = "de::duration")]
    pub ready_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de::signal")]
    pub drain_signal: Option<Signal>,
    #[serde(default, deserialize_with = "de::duration")]
    pub drain_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de::duration")]
    pub probation: Option<Duration>,
    pub start_priority: Option<crate::values::StartPriority>,
    pub notify_socket: Option<crate::values::NotifySocket>,
    #[serde(default, deserialize_with = "de::listen_one")]
    pub metrics: Option<ListenSpec>,
    pub command: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    pub build: Option<String>,
    pub keep: Option<usize>,
    #[serde(default, deserialize_with = "de::duration")]
    pub wait_lock: Option<Duration>,
    #[serde(default, deserialize_with = "de::size")]
    pub max_size: Option<u64>,
    #[serde(default, deserialize_with = "de::duration")]
    pub confirm_within: Option<Duration>,
    #[serde(default, deserialize_with = "de::duration")]
    pub settle: Option<Duration>,
    /// Patterns left out of a directory source (gitignore syntax).
    pub exclude: Option<Vec<String>>,
    /// `"1"` (workers) or `"25%"`: every deploy a judged canary.
    pub canary: Option<String>,
    #[serde(default, deserialize_with = "de::duration")]
    pub judge_for: Option<Duration>,
    pub judge_path: Option<String>,
    pub judge_max_errors: Option<f64>,
    pub judge_max_latency_ratio: Option<f64>,
    pub judge_min_requests: Option<u32>,
}

impl Deploy {
    /// The canary `dream deploy` asks for: the flags' share, else the
    /// file's (unless `--no-canary`); each judge setting from the flags,
    /// else the file.
    pub fn canary(
        &self,
        a: &crate::cli::CanaryArgs,
        no_canary: bool,
    ) -> Result<Option<dream_core::supervise::canary::judge::Spec>> {
        let bad = |key: &str, e: String| Failure::usage(format!("dream.toml [deploy] {key}: {e}"));
        let share = match (a.canary, &self.canary) {
            (Some(s), _) => s,
            (None, Some(s)) if !no_canary => {
                crate::values::canary_share(s).map_err(|e| bad("canary", e))?
            }
            _ => return Ok(None),
        };
        let mut spec = a.judge.spec(share);
        if a.judge.judge_for.is_none()
            && let Some(d) = self.judge_for
        {
            spec.judge_ms = d.as_millis() as u64;
        }
        if a.judge.judge_path.is_none()
            && let Some(p) = &self.judge_path
        {
            spec.judge_path = Some(crate::values::url_path(p).map_err(|e| bad("judge_path", e))?);
        }
        if a.judge.judge_max_errors.is_none()
            && let Some(e) = self.judge_max_errors
        {
            spec.max_errors = crate::values::percent_points(&e.to_string())
                .map_err(|e| bad("judge_max_errors", e))?;
        }
        if a.judge.judge_max_latency_ratio.is_none()
            && let Some(r) = self.judge_max_latency_ratio
        {
            spec.max_latency_ratio = crate::values::ratio(&r.to_string())
                .map_err(|e| bad("judge_max_latency_ratio", e))?;
        }
        if a.judge.judge_min_requests.is_none()
            && let Some(n) = self.judge_min_requests
        {
            spec.min_requests = n;
        }
        Ok(Some(spec))
    }
}

/// Loads `explicit` (which must exist), else `ROOT/dream.toml` if present.
pub fn load(root: &Path, explicit: Option<&Path>) -> Result<Config> {
    let path: PathBuf = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let p = root.join("dream.toml");
            if !p.exists() {
                return Ok(Config::default());
            }
            p
        }
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Failure::usage(format!("config {}: {e}", path.display())))?;
    parse(&text).map_err(|e| Failure::usage(format!("{}:{e}", path.display())))
}

/// Parses the file's text. An error reads `LINE: TABLE.KEY: what is
/// wrong` (`3: serve.listen: expected a list, got a string ":8080"`).
pub fn parse(text: &str) -> std::result::Result<Config, String> {
    toml::from_str(text).map_err(|e| {
        let msg = plain(e.message());
        let Some(span) = e.span() else {
            return format!(" {msg}");
        };
        let before = &text[..span.start.min(text.len())];
        let line_no = before.matches('\n').count() + 1;
        let line = text.lines().nth(line_no - 1).unwrap_or("");
        let table = before
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('[') && l.ends_with(']'))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
        let key = line
            .split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"').to_string())
            .filter(|k| !k.is_empty() && !msg.contains(&format!("`{k}`")));
        let at = match (table, key) {
            (Some(t), Some(k)) => format!(" {t}.{k}:"),
            (None, Some(k)) => format!(" {k}:"),
            _ => String::new(),
        };
        format!("{line_no}:{at} {msg}")
    })
}

/// serde's wording made plain: `invalid type: string "x", expected a
/// sequence` becomes `expected a list, got a string "x"`.
fn plain(msg: &str) -> String {
    let msg = msg.trim();
    let msg = match msg
        .strip_prefix("invalid type: ")
        .and_then(|r| r.split_once(", expected "))
    {
        Some((got, want)) => {
            let vowel = got.starts_with(['a', 'e', 'i', 'o', 'u']);
            format!(
                "expected {want}, got {} {got}",
                if vowel { "an" } else { "a" }
            )
        }
        None => msg.to_string(),
    };
    let mut msg = msg.replace("a sequence", "a list");
    for int in ["usize", "u32", "u64", "i32", "i64", "u16"] {
        msg = msg.replace(&format!("expected {int}"), "expected a whole number");
    }
    msg.replace("a a ", "a ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let c = parse(
            r#"
            [serve]
            listen = [":8080", "unix:/run/a.sock"]
            backlog = 128
            workers = 3
            user = "www-data"
            ready = "notify"
            ready_timeout = "5s"
            drain_signal = "QUIT"
            drain_timeout = "10s"
            command = ["./bin/server", "-v"]
            [deploy]
            build = "make"
            keep = 7
            wait_lock = "1m"
            "#,
        )
        .unwrap();
        assert_eq!(c.serve.workers, Some(3));
        assert_eq!(c.serve.command.unwrap(), vec!["./bin/server", "-v"]);
        assert_eq!(c.deploy.keep, Some(7));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("[serve]\nworkrs = 3\n").unwrap_err();
        assert!(err.contains("workrs"), "{err}");
        let err = parse("[sreve]\n").unwrap_err();
        assert!(err.contains("sreve"), "{err}");
        let err = parse("[serve]\nworkers = \"three\"\n").unwrap_err();
        assert!(err.starts_with("2: serve.workers: expected"), "{err}");
        let err = parse("[serve]\nworkers = 2\nlisten = \"127.0.0.1:8080\"\n").unwrap_err();
        assert_eq!(
            err,
            "3: serve.listen: expected a list, got a string \"127.0.0.1:8080\""
        );
        let err = parse("[serve]\nlisten = 8080\n").unwrap_err();
        assert_eq!(
            err,
            "2: serve.listen: expected a list, got an integer `8080`"
        );
        let err = parse("[serve]\nready_timeout = \"soon\"\n").unwrap_err();
        assert!(
            err.starts_with("2: serve.ready_timeout: invalid duration \"soon\""),
            "{err}"
        );
        let err = parse("[serve]\ndrain_signal = \"NOPE\"\n").unwrap_err();
        assert!(
            err.starts_with("2: serve.drain_signal: unknown signal"),
            "{err}"
        );
        let err = parse("[deploy]\nmax_size = \"lots\"\n").unwrap_err();
        assert!(err.starts_with("2: deploy.max_size:"), "{err}");
        let err = parse("[serve]\nlisten = [\"nowhere\"]\n").unwrap_err();
        assert!(err.starts_with("2: serve.listen:"), "{err}");
        let err = parse("[serve\n").unwrap_err();
        assert!(err.starts_with("1:"), "{err}");
    }
}
