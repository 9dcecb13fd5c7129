//! Signals as readable events, for single-threaded event loops.
//!
//! The signals are blocked and read from a `signalfd`, so a handler never
//! runs at an arbitrary point: the loop sleeps in `poll(2)` on the signalfd
//! (and whatever else it waits for) until something happens or a deadline
//! passes. Children started by [`crate::sockets::spawn::Command`] get an empty signal
//! mask, so blocking here does not leak into them.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// A set of blocked signals readable from a descriptor.
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks `signals` in the calling thread and opens a signalfd for them.
    /// Call before starting other threads, which inherit the mask.
    pub fn new(signals: &[Signal]) -> io::Result<Signals> {
        let mut set = SigSet::empty();
        for s in signals {
            set.add(*s);
        }
        set.thread_block()?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
        Ok(Signals { fd })
    }

    /// The next pending signal, without waiting.
    pub fn try_next(&mut self) -> io::Result<Option<Signal>> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(sig) => return Ok(Some(sig)),
                    Err(_) => continue,
                },
                Ok(None) => return Ok(None),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits for a signal until `deadline` (forever with `None`).
    pub fn wait(&mut self, deadline: Option<Instant>) -> io::Result<Option<Signal>> {
        loop {
            if let Some(sig) = self.try_next()? {
                return Ok(Some(sig));
            }
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout_until(deadline)) {
                Ok(0) => return Ok(None),
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A poll timeout that ends at `deadline`, rounded up to whole milliseconds
/// so that the loop never wakes just before the deadline and spins.
pub fn timeout_until(deadline: Option<Instant>) -> PollTimeout {
    match deadline {
        None => PollTimeout::NONE,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128);
            PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX)
        }
    }
}

/// Parses a duration as users write it: `250ms`, `1s`, `2m`, `1h30m`, or a
/// bare number of seconds (`0.5`, `3`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if (0.0..1e9).contains(&secs) {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("invalid duration {s:?}: out of range"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (examples: 500ms, 2s, 1m)"))
}

/// `#[serde(with = "crate::signals::by_number")]` on a `nix` `Signal`.
pub mod by_number {
    use nix::sys::signal::Signal;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(sig: &Signal, s: S) -> Result<S::Ok, S::Error> {
        (*sig as i32).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let n = i32::deserialize(d)?;
        Signal::try_from(n).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("0.25").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn timeouts_round_up() {
        // A deadline a fraction of a millisecond away is one millisecond,
        // never zero (which would wake the loop early and make it spin).
        let t = timeout_until(Some(Instant::now() + Duration::from_micros(300)));
        assert_eq!(i32::from(t), 1);
        let t = timeout_until(Some(Instant::now() + Duration::from_millis(1500)));
        assert!((1400..=1500).contains(&i32::from(t)), "{}", i32::from(t));
        // A deadline already past polls without waiting.
        let t = timeout_until(Some(Instant::now() - Duration::from_millis(5)));
        assert_eq!(i32::from(t), 0);
        assert_eq!(timeout_until(None), PollTimeout::NONE);
    }
}
