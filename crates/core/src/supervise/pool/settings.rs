//! How a pool is configured: its settings, with their defaults written
//! once, and when a worker counts as ready.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

/// When a worker counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Readiness {
    /// Only when it sends `READY=1`.
    Notify,
    /// Only when it writes a line to this inherited descriptor (s6's
    /// notification-fd).
    Fd(i32),
    /// When it has stayed alive this long (`READY=1` is ignored), counting
    /// only time in which it could run: time its tasks spent waiting for
    /// a CPU does not count.
    Delay(Duration),
    /// `READY=1`, or alive this long (counted as for `Delay`), whichever
    /// comes first.
    Auto(Duration),
}

impl Readiness {
    /// The time a worker must stay alive to count as ready, if any.
    pub fn timed(self) -> Option<Duration> {
        match self {
            Readiness::Notify | Readiness::Fd(_) => None,
            Readiness::Delay(d) | Readiness::Auto(d) => Some(d),
        }
    }
}

/// As typed on the command line: `notify`, `fd:3`, `delay:1s`, `auto:1s`.
impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Readiness::Notify => write!(f, "notify"),
            Readiness::Fd(n) => write!(f, "fd:{n}"),
            Readiness::Delay(d) => write!(f, "delay:{}", crate::fmt_duration(*d)),
            Readiness::Auto(d) => write!(f, "auto:{}", crate::fmt_duration(*d)),
        }
    }
}

impl std::str::FromStr for Readiness {
    type Err = String;

    fn from_str(s: &str) -> Result<Readiness, String> {
        let dur = |d: &str| crate::signals::parse_duration(d);
        match s.split_once(':') {
            None if s == "notify" => Ok(Readiness::Notify),
            Some(("fd", n)) => match n.parse::<i32>() {
                Ok(n) if (3..1024).contains(&n) => Ok(Readiness::Fd(n)),
                _ => Err(format!(
                    "invalid readiness {s:?}: fd:N needs a descriptor from 3 to 1023"
                )),
            },
            None if s == "auto" => Ok(Readiness::Auto(Duration::from_secs(1))),
            Some(("delay", d)) => Ok(Readiness::Delay(dur(d)?)),
            Some(("auto", d)) => Ok(Readiness::Auto(dur(d)?)),
            _ => Err(format!(
                "invalid readiness {s:?}: use notify, fd:N, delay:DUR or auto:DUR (e.g. auto:1s)"
            )),
        }
    }
}

/// Tunables of a pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub workers: usize,
    pub readiness: Readiness,
    pub ready_timeout: Duration,
    #[serde(with = "crate::signals::by_number")]
    pub drain_signal: Signal,
    pub drain_timeout: Duration,
    /// Generations allowed to drain at once; a reload that would make one
    /// more waits until one has drained or reached its drain deadline.
    pub max_draining: usize,
    /// For this long after a reload goes live, crashes count against it:
    /// three, or all its workers down at once, and it is reverted to the
    /// release it replaced. Zero turns probation off.
    #[serde(default)]
    pub probation: Duration,
    /// Start workers under `SCHED_IDLE` while others serve, and put them
    /// back at normal priority once ready (or after [`BACKGROUND_MAX`]):
    /// the serving workers keep the CPU while the new ones start.
    #[serde(default)]
    pub background_start: bool,
    /// Where each worker's `NOTIFY_SOCKET` is: a file in the root's
    /// `.dream/notify/` (what every sd_notify client can use), or an
    /// abstract socket (`@…`: no file; not every client understands it).
    #[serde(default)]
    pub notify_socket: NotifySocket,
}

/// Where a worker's `NOTIFY_SOCKET` lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifySocket {
    /// A socket file, `ROOT/.dream/notify/G-I-N.sock` (`dream serve`; an
    /// abstract one where there is no root or the path would be too long).
    #[default]
    Path,
    /// An abstract socket, `@dream/…`.
    Abstract,
}

/// The longest a worker runs in the background before it is put back at
/// normal priority even though not ready: on a machine busy to the last
/// cycle a `SCHED_IDLE` start would otherwise wait for the ready timeout.
pub const BACKGROUND_MAX: Duration = Duration::from_millis(500);

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            workers: 1,
            readiness: Readiness::Auto(Duration::from_secs(1)),
            ready_timeout: Duration::from_secs(60),
            drain_signal: Signal::SIGTERM,
            drain_timeout: Duration::from_secs(30),
            max_draining: 4,
            probation: Duration::from_secs(10),
            background_start: false,
            notify_socket: NotifySocket::Path,
        }
    }
}
