//! `Instant`s that cross an `execve`.
//!
//! `Instant` is `CLOCK_MONOTONIC`, which the kernel keeps for the whole
//! system, so a deadline is the same moment in the program before an
//! upgrade and in the one after it. Rust does not expose an `Instant`'s
//! value, so it is written as monotonic nanoseconds: the distance from
//! `Instant::now()` applied to `clock_gettime(CLOCK_MONOTONIC)` read at
//! the same moment, and read back the same way.

use std::time::{Duration, Instant};

use nix::time::{ClockId, clock_gettime};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

fn mono_now() -> i128 {
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always there");
    ts.tv_sec() as i128 * 1_000_000_000 + ts.tv_nsec() as i128
}

/// `t` as monotonic nanoseconds.
pub fn to_mono(t: Instant) -> i128 {
    let (now, mono) = (Instant::now(), mono_now());
    if t <= now {
        mono - now.duration_since(t).as_nanos() as i128
    } else {
        mono + t.duration_since(now).as_nanos() as i128
    }
}

/// Monotonic nanoseconds as an `Instant` (clamped to what `Instant` can
/// hold: a time before this process could measure reads as its start).
pub fn from_mono(ns: i128) -> Instant {
    let (now, mono) = (Instant::now(), mono_now());
    let delta = ns - mono;
    let d = Duration::from_nanos(delta.unsigned_abs().min(u64::MAX as u128) as u64);
    if delta >= 0 {
        now + d
    } else {
        now.checked_sub(d).unwrap_or(now)
    }
}

/// `#[serde(with = "crate::supervise::clock::mono")]` on an `Instant`.
pub mod mono {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Instant, s: S) -> Result<S::Ok, S::Error> {
        // As a string: JSON numbers lose precision past 2^53.
        to_mono(*t).to_string().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<i128>()
            .map(from_mono)
            .map_err(serde::de::Error::custom)
    }
}

/// `#[serde(with = "crate::supervise::clock::mono_opt")]` on an `Option<Instant>`.
pub mod mono_opt {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Option<Instant>, s: S) -> Result<S::Ok, S::Error> {
        t.map(|t| to_mono(t).to_string()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Instant>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| s.parse::<i128>().map(from_mono))
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_survive_the_round_trip_to_within_a_millisecond() {
        let now = Instant::now();
        for t in [
            now,
            now + Duration::from_secs(30),
            now.checked_sub(Duration::from_millis(1500)).unwrap_or(now),
        ] {
            let back = from_mono(to_mono(t));
            let diff = if back > t { back - t } else { t - back };
            assert!(diff < Duration::from_millis(1), "{diff:?}");
        }
    }
}
