//! What a run looked like over time, for `dream check --report`: per slot
//! of time, responses, errors, mixed responses and the latency's p50 and
//! p99.
//!
//! Each client keeps its own [`Timeline`] (no lock on the hot path). A slot
//! is 250 ms at first; when a timeline would pass [`MAX_SLOTS`] it merges
//! neighbours and doubles the width, so a run of any length costs at most a
//! few hundred slots per client. Widths are powers of two of the first one,
//! so timelines of different widths merge exactly.
//!
//! Latencies go into log-spaced buckets (four per power of two, about 19%
//! apart): a chart's p99, not a benchmark's.

use std::time::{Duration, Instant};

use serde::Serialize;

/// The first slot width.
const FIRST: Duration = Duration::from_millis(250);
/// The most slots a timeline keeps before it halves their number.
const MAX_SLOTS: usize = 400;
/// Latency buckets: four per power of two of microseconds, up to 2^32 µs.
const BUCKETS: usize = 128;

/// One slot being counted.
#[derive(Clone)]
struct Acc {
    responses: u64,
    errors: u64,
    mixed: u64,
    latency: [u32; BUCKETS],
}

impl Default for Acc {
    fn default() -> Acc {
        Acc {
            responses: 0,
            errors: 0,
            mixed: 0,
            latency: [0; BUCKETS],
        }
    }
}

impl Acc {
    fn add(&mut self, o: &Acc) {
        self.responses += o.responses;
        self.errors += o.errors;
        self.mixed += o.mixed;
        for (a, b) in self.latency.iter_mut().zip(o.latency.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    /// The latency at quantile `q`, in milliseconds (the bucket's top).
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let n: u64 = self.latency.iter().map(|c| *c as u64).sum();
        if n == 0 {
            return None;
        }
        let want = ((n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, c) in self.latency.iter().enumerate() {
            seen += *c as u64;
            if seen >= want {
                return Some(bucket_top_us(i) / 1000.0);
            }
        }
        None
    }
}

fn bucket(us: u64) -> usize {
    let us = us.max(1) as f64;
    ((us.log2() * 4.0).floor() as usize).min(BUCKETS - 1)
}

fn bucket_top_us(i: usize) -> f64 {
    2f64.powf((i + 1) as f64 / 4.0)
}

/// One client's counts over time.
pub(crate) struct Timeline {
    start: Instant,
    /// The slot width is `FIRST * 2^shift`.
    shift: u32,
    slots: Vec<Acc>,
}

/// What happened in one slot, for the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Slot {
    /// The slot's start, in seconds since the run began.
    pub t_s: f64,
    /// Its width, in seconds.
    pub width_s: f64,
    pub responses: u64,
    pub errors: u64,
    pub mixed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

impl Timeline {
    pub(crate) fn new(start: Instant) -> Timeline {
        Timeline {
            start,
            shift: 0,
            slots: Vec::new(),
        }
    }

    fn width(&self) -> Duration {
        FIRST * (1u32 << self.shift)
    }

    fn slot(&mut self, at: Instant) -> &mut Acc {
        let mut i = (at.saturating_duration_since(self.start).as_nanos() / self.width().as_nanos())
            as usize;
        while i >= MAX_SLOTS {
            self.coarsen();
            i /= 2;
        }
        if self.slots.len() <= i {
            self.slots.resize(i + 1, Acc::default());
        }
        &mut self.slots[i]
    }

    /// Halves the number of slots: neighbours merged, the width doubled.
    fn coarsen(&mut self) {
        let merged = self
            .slots
            .chunks(2)
            .map(|pair| {
                let mut a = pair[0].clone();
                if let Some(b) = pair.get(1) {
                    a.add(b);
                }
                a
            })
            .collect();
        self.slots = merged;
        self.shift += 1;
    }

    /// A response that ended now, `micros` after it was due.
    pub(crate) fn response(&mut self, micros: u64, error: bool, mixed: bool) {
        let s = self.slot(Instant::now());
        s.responses += 1;
        s.errors += error as u64;
        s.mixed += mixed as u64;
        s.latency[bucket(micros)] += 1;
    }

    /// A request that failed now, with no response.
    pub(crate) fn failure(&mut self) {
        self.slot(Instant::now()).errors += 1;
    }

    /// Adds `other` (of the same run) to this one.
    pub(crate) fn merge(&mut self, mut other: Timeline) {
        while self.shift < other.shift {
            self.coarsen();
        }
        while other.shift < self.shift {
            other.coarsen();
        }
        if self.slots.len() < other.slots.len() {
            self.slots.resize(other.slots.len(), Acc::default());
        }
        for (a, b) in self.slots.iter_mut().zip(other.slots.iter()) {
            a.add(b);
        }
    }

    pub(crate) fn slots(&self) -> Vec<Slot> {
        let w = self.width().as_secs_f64();
        self.slots
            .iter()
            .enumerate()
            .map(|(i, a)| Slot {
                t_s: i as f64 * w,
                width_s: w,
                responses: a.responses,
                errors: a.errors,
                mixed: a.mixed,
                p50_ms: a.quantile_ms(0.5),
                p99_ms: a.quantile_ms(0.99),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_the_latency_within_a_fifth() {
        for us in [1u64, 7, 100, 999, 12_345, 2_000_000] {
            let top = bucket_top_us(bucket(us));
            assert!(
                top >= us as f64 && top <= us as f64 * 1.2 + 1.0,
                "{us}: {top}"
            );
        }
    }

    #[test]
    fn coarsening_keeps_every_count_and_merges_across_widths() {
        let t0 = Instant::now() - Duration::from_secs(200);
        let mut a = Timeline::new(t0);
        // 200 s at 250 ms is 800 slots: twice coarsened to 1 s slots.
        a.response(1000, false, false);
        assert_eq!(a.shift, 2);
        let mut b = Timeline::new(t0);
        b.slots.resize(3, Acc::default());
        b.slots[2].responses = 5;
        b.slots[2].mixed = 1;
        a.merge(b);
        let slots = a.slots();
        let total: u64 = slots.iter().map(|s| s.responses).sum();
        assert_eq!(total, 6);
        assert_eq!(slots.iter().map(|s| s.mixed).sum::<u64>(), 1);
        assert_eq!(
            slots[0].responses, 5,
            "0.5–0.75 s lands in the first 1 s slot"
        );
        assert!(slots.len() <= MAX_SLOTS);
    }
}
