//! The judge of a canary: what a control client asks for ([`Spec`]), what
//! the pool carries once the share is resolved ([`Plan`]), the requests
//! the supervisor sends through the shared address during the window
//! ([`Prober`]), and the verdict ([`verdict`]), a pure function of the
//! figures so far.
//!
//! The canary is compared with the baseline serving at the same time,
//! never with history: both see the same load, the same host, the same
//! minute. An answer is attributed by its `X-Dream-Release` header; one
//! that names neither release, or no answer at all, counts against the
//! canary (the side a verdict must never be generous to).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How much of the traffic a canary takes: `K` workers (of the live
/// generation's `N`: a share of K/N), or a share of new connections, in
/// hundredths of a percent (its worker count is that share of N, at
/// least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Share {
    Workers(usize),
    Basis(u32),
}

impl Share {
    /// `K` or `P%` (`25%`, `2.5%`).
    pub fn parse(s: &str) -> Result<Share, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("{s:?}: a share is K (workers) or P% (0 < P < 100)"))?;
            if !(v > 0.0 && v < 100.0) {
                return Err(format!(
                    "{s:?}: a canary's share must be above 0% and below 100%"
                ));
            }
            return Ok(Share::Basis((v * 100.0).round().max(1.0) as u32));
        }
        match s.parse::<usize>() {
            Ok(0) | Err(_) => Err(format!(
                "{s:?}: a share is K (a number of workers, at least 1) or P% (0 < P < 100)"
            )),
            Ok(k) => Ok(Share::Workers(k)),
        }
    }
}

impl std::fmt::Display for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Share::Workers(k) => write!(f, "{}", crate::plural(*k, "worker")),
            Share::Basis(b) => f.write_str(&percent(*b)),
        }
    }
}

/// Defaults, with why (`doc/DESIGN.md` says the same).
pub mod defaults {
    use std::time::Duration;
    /// At [`super::PROBES_PER_SECOND`], 600 requests: 150 reach a canary of
    /// 1 worker in 4, three times [`MIN_REQUESTS`].
    pub const WINDOW: Duration = Duration::from_secs(30);
    /// 2 percentage points more errors than the baseline: a release that
    /// fails 1 request in 50 more than the one it replaces is reverted;
    /// a single unlucky error among 150 (0.7 points) is not.
    pub const MAX_ERRORS_BASIS: u32 = 200;
    /// A p99 three times the baseline's (and at least 1 ms above it): a
    /// release 5x slower is reverted; the noise of a busy host between two
    /// generations of the same code (measured: up to 1.6x) is not.
    pub const MAX_LATENCY_RATIO_HUNDREDTHS: u32 = 300;
    /// Fewer answers than this from either side is too little to judge:
    /// "inconclusive", which reverts.
    pub const MIN_REQUESTS: u32 = 50;
}

/// Fewest answers from each side for the p99 to be judged (below it, the
/// p90).
pub const P99_SAMPLE: u32 = 100;

/// Requests per second the judge sends through the shared address.
pub const PROBES_PER_SECOND: u32 = 20;

/// A canary as a control client asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub share: Share,
    /// The judge window, from when every canary worker is ready.
    pub judge_ms: u64,
    /// Requested during the window; `None`: judged on worker exits only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_path: Option<String>,
    /// Most error rate above the baseline's, in hundredths of a point.
    pub max_errors: u32,
    /// Most p99 latency as a multiple of the baseline's, in hundredths.
    pub max_latency_ratio: u32,
    /// Fewest answers from each side for a verdict.
    pub min_requests: u32,
}

impl Spec {
    /// A canary of `share` with every default.
    pub fn new(share: Share) -> Spec {
        Spec {
            share,
            judge_ms: defaults::WINDOW.as_millis() as u64,
            judge_path: None,
            max_errors: defaults::MAX_ERRORS_BASIS,
            max_latency_ratio: defaults::MAX_LATENCY_RATIO_HUNDREDTHS,
            min_requests: defaults::MIN_REQUESTS,
        }
    }

    /// The plan for a pool of `workers` live workers, or why not.
    pub fn plan(&self, workers: usize) -> Result<Plan, String> {
        if let Some(p) = &self.judge_path
            && (!p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f))
        {
            return Err(format!(
                "--judge-path {p:?}: a path starts with / and has no spaces or control characters"
            ));
        }
        if self.judge_ms == 0 {
            return Err("--judge-for must be longer than 0s".into());
        }
        if self.max_latency_ratio < 100 {
            return Err("--judge-max-latency-ratio must be at least 1".into());
        }
        let (canary, share) = match self.share {
            Share::Workers(k) if k >= workers => {
                return Err(format!(
                    "--canary {k}: the live generation has {}, so a canary of {k} would take all of it (use fewer workers, or P%)",
                    crate::plural(workers, "worker")
                ));
            }
            Share::Workers(k) => (k, (k * 10_000 / workers.max(1)) as u32),
            Share::Basis(b) => ((workers * b as usize).div_ceil(10_000).max(1), b),
        };
        Ok(Plan {
            workers: canary,
            share,
            // Judged on requests, and room for a second share beside it.
            twin: self.judge_path.is_some() && 2 * share <= 10_000,
            spec: self.clone(),
        })
    }
}

/// A canary as the pool runs it: its worker count and its share of new
/// connections (per 10,000) resolved against the live generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub workers: usize,
    pub share: u32,
    /// The canary is compared with a twin of the baseline: as many fresh
    /// workers of the live release, started with it, taking an equal
    /// share on a listener of their own. Equal size, age and share: a
    /// canary of 1 worker is not judged against 3 that share one queue
    /// (a pooled queue waits far less), nor a cold start against warm
    /// workers (a healthy gunicorn canary measured 6x slower at p90
    /// against the whole live generation).
    #[serde(default)]
    pub twin: bool,
    pub spec: Spec,
}

impl Plan {
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.spec.judge_ms)
    }

    /// `1 worker, 25% of new connections`.
    pub fn describe(&self) -> String {
        format!(
            "{}, {} of new connections",
            crate::plural(self.workers, "worker"),
            percent(self.share)
        )
    }
}

/// `25%`, `2.5%` from hundredths of a percent.
pub fn percent(basis: u32) -> String {
    let v = basis as f64 / 100.0;
    if v.fract() == 0.0 {
        format!("{v:.0}%")
    } else {
        format!("{v}%")
    }
}

/// One side's answers so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Side {
    pub answers: u32,
    pub errors: u32,
    /// Latency of each answer, in microseconds.
    #[serde(skip)]
    pub latencies_us: Vec<u64>,
    /// The 99th percentile, as status carries it (the latencies stay in
    /// the supervisor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

impl Side {
    fn add(&mut self, error: bool, took: Duration) {
        self.answers += 1;
        if error {
            self.errors += 1;
        }
        self.latencies_us.push(took.as_micros() as u64);
    }

    /// Percent of answers that were errors.
    pub fn error_rate(&self) -> f64 {
        if self.answers == 0 {
            0.0
        } else {
            100.0 * self.errors as f64 / self.answers as f64
        }
    }

    /// The 99th percentile latency (nearest rank).
    pub fn p99(&self) -> Option<Duration> {
        if self.latencies_us.is_empty() {
            return self.p99_ms.map(|ms| Duration::from_secs_f64(ms / 1000.0));
        }
        self.quantile(0.99)
    }

    /// The latency below which `q` of the answers came (nearest rank).
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut v = self.latencies_us.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let rank = ((v.len() as f64) * q).ceil() as usize;
        Some(Duration::from_micros(v[rank.clamp(1, v.len()) - 1]))
    }

    fn describe(&self) -> String {
        format!(
            "{:.1}% errors ({} of {}), p99 {}",
            self.error_rate(),
            self.errors,
            self.answers,
            self.p99().map_or("-".into(), |d| format!(
                "{:.1} ms",
                d.as_secs_f64() * 1000.0
            ))
        )
    }
}

/// What the judge has seen: each side's answers, and those it could not
/// attribute (counted against the canary).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Figures {
    pub canary: Side,
    pub baseline: Side,
    /// Answers naming neither release, and requests with no answer.
    pub unattributed: u32,
    /// Canary workers that exited during the window.
    pub exits: u32,
    /// Answers from the live generation's other workers, when the canary
    /// is compared with its twin.
    #[serde(default)]
    pub rest: u32,
    /// The baseline side is the canary's twin (else the whole live
    /// generation).
    #[serde(default)]
    pub against_twin: bool,
}

/// Who is who, for the judge: the releases, the canary's generation and
/// its twin's.
#[derive(Debug, Clone)]
pub struct Sides {
    pub canary: String,
    pub baseline: String,
    pub canary_generation: u64,
    pub twin: Option<u64>,
}

impl Figures {
    /// One answer: `release` its `X-Dream-Release` (`None`: no header or
    /// no answer), `error` a status of 500 or more or no answer.
    pub fn record(&mut self, sides: &Sides, answer: Option<&crate::probe::Answer>, took: Duration) {
        let error = answer.is_none_or(|a| a.code >= 500);
        let release = answer.and_then(|a| a.release.as_deref());
        let generation = answer.and_then(|a| a.generation);
        let baseline = release == Some(sides.baseline.as_str());
        match generation {
            // By generation where the worker says it: the canary, its twin,
            // and the rest of the live generation (not compared).
            Some(g) if g == sides.canary_generation => self.canary.add(error, took),
            Some(g) if Some(g) == sides.twin => self.baseline.add(error, took),
            Some(_) if baseline && sides.twin.is_some() => self.rest += 1,
            // Else by release.
            _ if release == Some(sides.canary.as_str()) => self.canary.add(error, took),
            _ if baseline => self.baseline.add(error, took),
            _ => {
                self.unattributed += 1;
                if error {
                    self.canary.add(true, took);
                }
            }
        }
    }

    /// Fills in each side's `p99_ms`, for status.
    pub fn summarized(mut self) -> Figures {
        for side in [&mut self.canary, &mut self.baseline] {
            side.p99_ms = side.p99().map(|d| d.as_secs_f64() * 1000.0);
        }
        self
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "canary {}; {} {}",
            self.canary.describe(),
            if self.against_twin {
                "its twin"
            } else {
                "baseline"
            },
            self.baseline.describe()
        );
        if self.rest > 0 {
            s.push_str(&format!(
                "; {} from the rest of the live generation, not compared",
                self.rest
            ));
        }
        if self.unattributed > 0 {
            s.push_str(&format!(
                "; {} unattributed (failed ones count against the canary)",
                self.unattributed
            ));
        }
        s
    }
}

/// What the judge says now: `None` while the window runs and nothing
/// decides it early; `Some(Ok(why))` to promote; `Some(Err(why))` to
/// revert. Errors decide early, once the canary has its minimum sample;
/// latency and the minimum samples are judged at the end (`over`).
pub fn verdict(spec: &Spec, f: &Figures, over: bool) -> Option<Result<String, String>> {
    if f.exits > 0 {
        return Some(Err(format!(
            "{} during the judge window",
            crate::plural(f.exits as usize, "canary worker exit")
        )));
    }
    if spec.judge_path.is_none() {
        return over.then(|| {
            Ok("no canary worker exited in the judge window (no --judge-path: judged on worker exits only)".to_string())
        });
    }
    let min = spec.min_requests.max(1);
    let excess = f.canary.error_rate() - f.baseline.error_rate();
    let limit = spec.max_errors as f64 / 100.0;
    let sampled = f.canary.answers >= min && f.baseline.answers >= min;
    // Errors are judged as soon as both sides have their sample: a
    // canary failing its share of clients is not kept for the rest of
    // the window.
    if sampled && excess > limit {
        return Some(Err(format!(
            "error rate {:.1} points above the baseline's (limit {:.1}): {}",
            excess,
            limit,
            f.describe()
        )));
    }
    if !over {
        return None;
    }
    if !sampled {
        return Some(Err(format!(
            "inconclusive: {} answers from the canary and {} from the baseline, {min} needed from each (a longer --judge-for, a larger share, or a lower --judge-min-requests); {}",
            f.canary.answers,
            f.baseline.answers,
            f.describe()
        )));
    }
    // With fewer than 100 answers a p99 is the slowest one or two (a
    // worker's first, cold request): the p90 is judged instead.
    let (q, name) = if f.canary.answers.min(f.baseline.answers) >= P99_SAMPLE {
        (0.99, "p99")
    } else {
        (0.9, "p90")
    };
    if let (Some(c), Some(b)) = (f.canary.quantile(q), f.baseline.quantile(q)) {
        let ratio = spec.max_latency_ratio as f64 / 100.0;
        if c.as_secs_f64() > ratio * b.as_secs_f64() && c > b + Duration::from_millis(1) {
            return Some(Err(format!(
                "{name} latency {:.1}x the baseline's ({:.1} ms against {:.1} ms; limit {ratio}x): {}",
                c.as_secs_f64() / b.as_secs_f64().max(1e-6),
                c.as_secs_f64() * 1000.0,
                b.as_secs_f64() * 1000.0,
                f.describe()
            )));
        }
    }
    Some(Ok(f.describe()))
}

/// The judge's requests: a thread that sends `GET path` through the
/// shared address [`PROBES_PER_SECOND`] times a second, each on a thread
/// of its own (a hung answer delays nothing else), until dropped. The
/// supervisor's loop only reads the figures; it never waits on a worker.
pub struct Prober {
    pub figures: Arc<Mutex<Figures>>,
    stop: Arc<AtomicBool>,
}

/// How long one judge request may take before it counts as an error.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl Prober {
    pub fn start(address: String, path: String, sides: Sides) -> Prober {
        let figures = Arc::new(Mutex::new(Figures {
            against_twin: sides.twin.is_some(),
            ..Figures::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (figures.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("dream-judge".into())
            .spawn(move || {
                let every = Duration::from_secs(1) / PROBES_PER_SECOND;
                let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let mut next = Instant::now();
                while !s.load(Ordering::Relaxed) {
                    // At most a second's worth in flight: a canary that
                    // hangs is not answered by a pile of threads.
                    if in_flight.load(Ordering::Relaxed) < PROBES_PER_SECOND as usize * 2 {
                        in_flight.fetch_add(1, Ordering::Relaxed);
                        let (f, s, n) = (f.clone(), s.clone(), in_flight.clone());
                        let (address, path) = (address.clone(), path.clone());
                        let sides = sides.clone();
                        let _ = std::thread::Builder::new()
                            .name("dream-probe".into())
                            .spawn(move || {
                                let t = Instant::now();
                                let got = crate::probe::http_get(&address, &path, PROBE_TIMEOUT);
                                let took = t.elapsed();
                                if !s.load(Ordering::Relaxed) {
                                    let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                                    f.record(&sides, got.ok().as_ref(), took);
                                }
                                n.fetch_sub(1, Ordering::Relaxed);
                            });
                    }
                    next += every;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            });
        if spawned.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        Prober { figures, stop }
    }

    pub fn figures(&self) -> Figures {
        self.figures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        let mut s = Spec::new(Share::Workers(1));
        s.judge_path = Some("/".into());
        s.min_requests = 10;
        s
    }

    fn side(answers: u32, errors: u32, ms: u64) -> Side {
        Side {
            answers,
            errors,
            latencies_us: vec![ms * 1000; answers as usize],
            p99_ms: None,
        }
    }

    #[test]
    fn shares_parse_and_resolve() {
        assert_eq!(Share::parse("1"), Ok(Share::Workers(1)));
        assert_eq!(Share::parse("25%"), Ok(Share::Basis(2500)));
        assert_eq!(Share::parse("2.5%"), Ok(Share::Basis(250)));
        for bad in ["0", "0%", "100%", "-1", "x", "", "150%"] {
            assert!(Share::parse(bad).is_err(), "{bad:?}");
        }
        let p = Spec::new(Share::Workers(1)).plan(4).unwrap();
        assert_eq!((p.workers, p.share), (1, 2500));
        let p = Spec::new(Share::Basis(1000)).plan(4).unwrap();
        assert_eq!((p.workers, p.share), (1, 1000));
        let p = Spec::new(Share::Basis(5000)).plan(3).unwrap();
        assert_eq!((p.workers, p.share), (2, 5000));
        assert!(Spec::new(Share::Workers(4)).plan(4).is_err());
        let mut s = Spec::new(Share::Workers(1));
        s.judge_path = Some("no-slash".into());
        assert!(s.plan(4).is_err());
    }

    #[test]
    fn errors_revert_early_and_latency_at_the_end() {
        let s = spec();
        let mut f = Figures {
            canary: side(20, 4, 1),
            baseline: side(60, 0, 1),
            ..Figures::default()
        };
        assert!(matches!(verdict(&s, &f, false), Some(Err(e)) if e.contains("error rate")));
        f.canary = side(20, 0, 10);
        assert_eq!(verdict(&s, &f, false), None, "latency waits for the end");
        assert!(matches!(verdict(&s, &f, true), Some(Err(e)) if e.contains("p90")));
        // One cold answer among few is no verdict on latency.
        f.canary = side(20, 0, 1);
        f.canary.latencies_us[0] = 50_000;
        assert!(matches!(verdict(&s, &f, true), Some(Ok(_))));
        // With enough answers, the p99.
        f.canary = side(200, 0, 1);
        f.baseline = side(200, 0, 1);
        for i in 0..5 {
            f.canary.latencies_us[i] = 50_000;
        }
        assert!(matches!(verdict(&s, &f, true), Some(Err(e)) if e.contains("p99")));
        f.canary = side(20, 0, 1);
        assert!(matches!(verdict(&s, &f, true), Some(Ok(_))));
    }

    #[test]
    fn too_little_is_inconclusive_never_a_pass() {
        let s = spec();
        let f = Figures {
            canary: side(3, 0, 1),
            baseline: side(60, 0, 1),
            ..Figures::default()
        };
        assert!(matches!(verdict(&s, &f, true), Some(Err(e)) if e.starts_with("inconclusive")));
        // Answers that name neither release count only against the canary.
        let mut f = Figures::default();
        let sides = Sides {
            canary: "c".into(),
            baseline: "b".into(),
            canary_generation: 2,
            twin: None,
        };
        let ok_b = crate::probe::Answer {
            code: 200,
            release: Some("b".into()),
            generation: None,
        };
        for _ in 0..30 {
            f.record(&sides, None, Duration::from_millis(1));
            f.record(&sides, Some(&ok_b), Duration::from_millis(1));
        }
        assert!(matches!(verdict(&s, &f, false), Some(Err(_))));
    }

    #[test]
    fn answers_are_told_apart_by_generation_then_by_release() {
        let sides = Sides {
            canary: "new".into(),
            baseline: "old".into(),
            canary_generation: 5,
            twin: Some(6),
        };
        let answer = |release: &str, generation: Option<u64>, code| crate::probe::Answer {
            code,
            release: Some(release.into()),
            generation,
        };
        let mut f = Figures::default();
        let t = Duration::from_millis(1);
        f.record(&sides, Some(&answer("new", Some(5), 200)), t);
        f.record(&sides, Some(&answer("old", Some(6), 500)), t);
        f.record(&sides, Some(&answer("old", Some(1), 200)), t);
        f.record(&sides, Some(&answer("new", None, 200)), t);
        f.record(&sides, Some(&answer("old", None, 200)), t);
        f.record(&sides, Some(&answer("other", None, 200)), t);
        assert_eq!((f.canary.answers, f.canary.errors), (2, 0));
        assert_eq!((f.baseline.answers, f.baseline.errors), (2, 1));
        assert_eq!((f.rest, f.unattributed), (1, 1));
    }

    #[test]
    fn an_exit_reverts_and_no_path_judges_exits_only() {
        let mut s = spec();
        let f = Figures {
            exits: 1,
            ..Figures::default()
        };
        assert!(matches!(verdict(&s, &f, false), Some(Err(_))));
        s.judge_path = None;
        assert_eq!(verdict(&s, &Figures::default(), false), None);
        assert!(matches!(
            verdict(&s, &Figures::default(), true),
            Some(Ok(_))
        ));
    }
}
