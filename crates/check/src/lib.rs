//! `dream check`: a load generator that is also a referee.
//!
//! It keeps N clients requesting one URL and counts what a deploy must
//! never cause: connection errors (refused, reset, timeout), server errors,
//! and **mixed responses**: a response whose `X-Dream-Release` header names
//! another release than its body does, or a keep-alive connection that is
//! answered by two releases (one connection is served by one process, so by
//! one release).
//!
//! Counters are live ([`Live`]) so that a caller such as `dream demo` can
//! show them while the run goes on.

mod page;
mod timeline;
pub use page::{Mark, html};
pub use timeline::Slot;

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;

pub const DEFAULT_BODY_PATTERN: &str = r"release ([A-Za-z0-9._-]+)";
/// Bodies longer than this are not read for the release pattern.
const BODY_LIMIT: usize = 1 << 20;

/// A `http://host:port/path` target.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    pub url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("invalid URL {0:?}: {1} (example: http://127.0.0.1:8080/)")]
    Url(String, &'static str),
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("invalid --body-pattern: {0}")]
    Pattern(String),
    #[error("{0}")]
    Runtime(#[from] std::io::Error),
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, CheckError> {
        let bad = |why| CheckError::Url(url.to_string(), why);
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            if url.starts_with("https://") {
                bad("https is not supported: point the referee at the server itself")
            } else {
                bad("it must start with http://")
            }
        })?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("no host"));
        }
        if path.chars().any(|c| c.is_control() || c == ' ') {
            return Err(bad("the path has spaces or control characters"));
        }
        let with_port = if authority.ends_with(']') || !authority.contains(':') {
            format!("{authority}:80")
        } else {
            authority.to_string()
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| CheckError::Resolve(authority.to_string(), e.to_string()))?
            .next()
            .ok_or_else(|| CheckError::Resolve(authority.to_string(), "no address".into()))?;
        Ok(Target {
            addr,
            host: authority.to_string(),
            path,
            url: url.to_string(),
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub target: Target,
    pub connections: usize,
    pub duration: Duration,
    pub keep_alive: bool,
    /// A regex whose first capture names the release in a body; `None`:
    /// bodies are not judged, only `X-Dream-Release`.
    pub body_pattern: Option<String>,
    /// Limit for connecting, and for a whole response.
    pub timeout: Duration,
    /// Stop after this many requests in all (for bounded tests).
    pub max_requests: Option<u64>,
    /// Requests per second in all, sent on a schedule whatever the
    /// answers (an open loop): each response's latency counts from when
    /// its request was due, so a stall is not hidden by the client waiting
    /// it out. `None`: each connection sends as soon as it has an answer.
    pub rate: Option<f64>,
    /// Keep what happened over time ([`Report::timeline`]), for a report.
    pub timeline: bool,
}

/// Counters readable while a run goes on.
#[derive(Debug, Default)]
pub struct Live {
    pub requests: AtomicU64,
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    pub mixed: AtomicU64,
    stop: AtomicBool,
    /// Latencies of every response so far, when [`Live::with_latency`]
    /// asked for them (a display wants a running p99).
    latency: Option<std::sync::Mutex<Histogram<u64>>>,
}

/// The longest latency recorded (an hour, in microseconds); longer ones
/// count as this.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// A histogram of latencies in microseconds, 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid bounds")
}

impl Live {
    /// Counters that also keep a shared latency histogram.
    pub fn with_latency() -> Live {
        Live {
            latency: Some(std::sync::Mutex::new(latency_histogram())),
            ..Live::default()
        }
    }

    /// The running latency quantile in microseconds, if tracked.
    pub fn latency_quantile(&self, q: f64) -> Option<u64> {
        let h = self.latency.as_ref()?.lock().ok()?;
        (!h.is_empty()).then(|| h.value_at_quantile(q))
    }

    /// Asks a running check to finish early.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Connection-level failures, by kind.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Errors {
    pub connect_refused: u64,
    pub connect_reset: u64,
    pub connect_timeout: u64,
    pub connect_other: u64,
    /// The connection was reset or closed before a full response.
    pub read_reset: u64,
    pub read_timeout: u64,
    pub read_other: u64,
    /// Responses with status 400 or more.
    pub bad_status: u64,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.connect_refused
            + self.connect_reset
            + self.connect_timeout
            + self.connect_other
            + self.read_reset
            + self.read_timeout
            + self.read_other
            + self.bad_status
    }

    fn add(&mut self, o: &Errors) {
        self.connect_refused += o.connect_refused;
        self.connect_reset += o.connect_reset;
        self.connect_timeout += o.connect_timeout;
        self.connect_other += o.connect_other;
        self.read_reset += o.read_reset;
        self.read_timeout += o.read_timeout;
        self.read_other += o.read_other;
        self.bad_status += o.bad_status;
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub connections: usize,
    pub keep_alive: bool,
    pub duration_s: f64,
    pub requests: u64,
    pub responses: u64,
    pub requests_per_s: f64,
    pub status: BTreeMap<u16, u64>,
    pub errors: Errors,
    pub error_total: u64,
    pub mixed: u64,
    /// Responses per release seen (header, else body).
    pub releases: BTreeMap<String, u64>,
    pub latency: Latency,
    /// Connections opened (in keep-alive mode, a reconnect after the
    /// server closed one counts too).
    pub connects: u64,
    /// Latency of the requests that had to open their connection first:
    /// set beside `latency`, it shows how much of a tail reconnects make.
    pub connect_latency: Latency,
    /// Keep-alive: connections opened because the server closed the one
    /// before (each client's first connection is not one).
    pub reconnects: u64,
    /// Latency of the requests that reopened their connection: what a
    /// server closing keep-alive connections (a reload's drain) costs the
    /// requests it moves, without the run's first connections, which all
    /// open at once.
    pub reconnect_latency: Latency,
    /// Latency of the requests sent on a connection already open: set
    /// beside `reconnect_latency`, it shows what a reload costs the
    /// requests it did not make reconnect.
    pub kept_latency: Latency,
    /// A few examples of what went wrong, for diagnosis.
    pub examples: Vec<String>,
    pub ok: bool,
    /// When the run began, in seconds since the Unix epoch.
    pub started_unix_s: f64,
    /// What happened over time (with [`Options::timeline`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Vec<Slot>>,
}

/// One client's tallies, merged at the end.
struct Tally {
    status: BTreeMap<u16, u64>,
    errors: Errors,
    mixed: u64,
    releases: BTreeMap<String, u64>,
    hist: Histogram<u64>,
    /// Requests that opened their connection first.
    connect_hist: Histogram<u64>,
    /// Requests that reopened their connection after the server closed it.
    reconnect_hist: Histogram<u64>,
    /// Requests sent on a connection already open.
    kept_hist: Histogram<u64>,
    connects: u64,
    reconnects: u64,
    /// Distinct examples and how often each was seen (the first few).
    examples: Vec<(String, u64)>,
    responses: u64,
    timeline: Option<timeline::Timeline>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            timeline: None,
            status: BTreeMap::new(),
            errors: Errors::default(),
            mixed: 0,
            releases: BTreeMap::new(),
            hist: latency_histogram(),
            connect_hist: latency_histogram(),
            reconnect_hist: latency_histogram(),
            kept_hist: latency_histogram(),
            connects: 0,
            reconnects: 0,
            examples: Vec::new(),
            responses: 0,
        }
    }

    /// Records an example; the same text is counted, not repeated.
    fn example(&mut self, s: String, times: u64) {
        if let Some(e) = self.examples.iter_mut().find(|(t, _)| *t == s) {
            e.1 += times;
        } else if self.examples.len() < 5 {
            self.examples.push((s, times));
        }
    }
}

/// Runs a check to completion.
pub fn run(opts: &Options, live: Arc<Live>) -> Result<Report, CheckError> {
    let pattern = opts
        .body_pattern
        .as_deref()
        .map(regex_lite::Regex::new)
        .transpose()
        .map_err(|e| CheckError::Pattern(e.to_string()))?;
    if pattern.as_ref().is_some_and(|p| p.captures_len() < 2) {
        return Err(CheckError::Pattern(
            "it needs a capture group for the release, e.g. release ([A-Za-z0-9._-]+)".into(),
        ));
    }
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let start = Instant::now();
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let deadline = start + opts.duration;
    let budget = Arc::new(AtomicU64::new(opts.max_requests.unwrap_or(u64::MAX)));
    let tallies = rt.block_on(async {
        let mut handles = Vec::new();
        let connections = opts.connections.max(1);
        for i in 0..connections {
            let opts = opts.clone();
            let live = live.clone();
            let pattern = pattern.clone();
            let budget = budget.clone();
            // Open loop: connection i sends every connections/rate
            // seconds, the connections spread evenly over one interval.
            let schedule = opts.rate.filter(|r| *r > 0.0).map(|r| {
                let every = Duration::from_secs_f64(connections as f64 / r);
                (start + every.mul_f64(i as f64 / connections as f64), every)
            });
            let timeline = opts.timeline.then(|| timeline::Timeline::new(start));
            handles.push(tokio::spawn(async move {
                let at = Clock { deadline, timeline };
                client(&opts, pattern.as_ref(), at, &live, &budget, schedule).await
            }));
        }
        let mut out = Vec::new();
        for h in handles {
            if let Ok(t) = h.await {
                out.push(t);
            }
        }
        out
    });
    let elapsed = start.elapsed();
    let mut all = Tally::merge(tallies);
    let requests = live.requests.load(Ordering::SeqCst);
    let latency = Latency::of(&all.hist);
    let error_total = all.errors.total();
    if all.responses == 0 && error_total == 0 {
        all.example("no request completed".into(), 1);
    }
    Ok(Report {
        url: opts.target.url.clone(),
        connections: opts.connections,
        keep_alive: opts.keep_alive,
        duration_s: elapsed.as_secs_f64(),
        requests,
        responses: all.responses,
        requests_per_s: all.responses as f64 / elapsed.as_secs_f64().max(1e-9),
        ok: error_total == 0 && all.mixed == 0 && all.responses > 0,
        status: all.status,
        errors: all.errors,
        error_total,
        mixed: all.mixed,
        releases: all.releases,
        latency,
        connects: all.connects,
        connect_latency: Latency::of(&all.connect_hist),
        reconnects: all.reconnects,
        reconnect_latency: Latency::of(&all.reconnect_hist),
        kept_latency: Latency::of(&all.kept_hist),
        examples: all
            .examples
            .into_iter()
            .map(|(e, n)| if n > 1 { format!("{e} ({n} times)") } else { e })
            .collect(),
        started_unix_s,
        timeline: all.timeline.map(|t| t.slots()),
    })
}

impl Tally {
    /// The connections' tallies as one.
    fn merge(tallies: Vec<Tally>) -> Tally {
        let mut all = Tally::new();
        for t in tallies {
            for (k, v) in t.status {
                *all.status.entry(k).or_default() += v;
            }
            all.errors.add(&t.errors);
            all.mixed += t.mixed;
            for (k, v) in t.releases {
                *all.releases.entry(k).or_default() += v;
            }
            let _ = all.hist.add(&t.hist);
            let _ = all.connect_hist.add(&t.connect_hist);
            let _ = all.kept_hist.add(&t.kept_hist);
            let _ = all.reconnect_hist.add(&t.reconnect_hist);
            all.connects += t.connects;
            all.reconnects += t.reconnects;
            for (e, n) in t.examples {
                all.example(e, n);
            }
            all.responses += t.responses;
            if let Some(tl) = t.timeline {
                match &mut all.timeline {
                    Some(a) => a.merge(tl),
                    None => all.timeline = Some(tl),
                }
            }
        }
        all
    }
}

enum Failure {
    Connect(std::io::Error),
    ConnectTimeout,
    Read(hyper::Error),
    ReadTimeout,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(opts: &Options) -> Result<Sender, Failure> {
    let stream = match tokio::time::timeout(
        opts.timeout,
        tokio::net::TcpStream::connect(opts.target.addr),
    )
    .await
    {
        Err(_) => return Err(Failure::ConnectTimeout),
        Ok(Err(e)) => return Err(Failure::Connect(e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(Failure::Read)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

struct Answer {
    status: u16,
    header_release: Option<String>,
    body: Option<String>,
    close: bool,
}

async fn exchange(opts: &Options, sender: &mut Sender) -> Result<Answer, Failure> {
    let mut req = Request::get(&opts.target.path).header(hyper::header::HOST, &opts.target.host);
    if !opts.keep_alive {
        req = req.header(hyper::header::CONNECTION, "close");
    }
    let req = req.body(Empty::new()).expect("valid request");
    let work = async {
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let header_release = resp
            .headers()
            .get("x-dream-release")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let close = resp
            .headers()
            .get(hyper::header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        // The whole body is read, however long: a response counts only
        // once it is complete (a body cut short is an error, and one that
        // never ends meets the deadline below). Its first BODY_LIMIT bytes
        // are kept for judging; a longer body is not judged.
        let mut body = resp.into_body();
        let mut kept = Some(Vec::new());
        while let Some(frame) = body.frame().await {
            if let (Ok(data), Some(k)) = (frame?.into_data(), kept.as_mut()) {
                if k.len() + data.len() <= BODY_LIMIT {
                    k.extend_from_slice(&data);
                } else {
                    kept = None;
                }
            }
        }
        Ok::<_, hyper::Error>((status, header_release, close, kept))
    };
    // One deadline for the whole response, body included.
    match tokio::time::timeout(opts.timeout, work).await {
        Err(_) => Err(Failure::ReadTimeout),
        Ok(Err(e)) => Err(Failure::Read(e)),
        Ok(Ok((status, header_release, close, body))) => Ok(Answer {
            status,
            header_release,
            body: body.map(|b| String::from_utf8_lossy(&b).into_owned()),
            close,
        }),
    }
}

/// When a client stops, and where it counts what happened over time.
struct Clock {
    deadline: Instant,
    timeline: Option<timeline::Timeline>,
}

/// How a request found its connection.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    /// One already open.
    Kept,
    /// A new one: the client's first, or any with a connection per request.
    Opened,
    /// Keep-alive: a new one, because the one before ended.
    Reopened,
}

/// One answer: its latency, status and release counted, and checked
/// against what its connection answered before (a mix of releases).
fn record_answer(
    t: &mut Tally,
    live: &Live,
    pattern: Option<&regex_lite::Regex>,
    seen: &mut Vec<String>,
    a: &Answer,
    micros: u64,
    via: Via,
) {
    let micros = micros.min(LATENCY_MAX_US);
    let _ = t.hist.record(micros);
    let _ = match via {
        Via::Kept => t.kept_hist.record(micros),
        Via::Opened => t.connect_hist.record(micros),
        Via::Reopened => t
            .connect_hist
            .record(micros)
            .and_then(|()| t.reconnect_hist.record(micros)),
    };
    if let Some(h) = &live.latency
        && let Ok(mut h) = h.lock()
    {
        let _ = h.record(micros);
    }
    t.responses += 1;
    *t.status.entry(a.status).or_default() += 1;
    let body_release = a
        .body
        .as_deref()
        .zip(pattern)
        .and_then(|(b, p)| p.captures(b))
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().to_string());
    let mut mixed = None;
    if let (Some(h), Some(b)) = (&a.header_release, &body_release)
        && h != b
    {
        mixed = Some(format!("header says release {h}, body says {b}"));
    }
    let release = a.header_release.clone().or(body_release);
    if let Some(r) = &release {
        *t.releases.entry(r.clone()).or_default() += 1;
        // One connection moving to a newer release can be a
        // proxy's doing; going back to one it left never is.
        match seen.last() {
            Some(last) if last != r && seen.contains(r) && mixed.is_none() => {
                mixed = Some(format!(
                    "one keep-alive connection went back from release {last} to {r}"
                ));
            }
            _ => {}
        }
        if seen.last() != Some(r) {
            seen.push(r.clone());
        }
    }
    if let Some(tl) = &mut t.timeline {
        tl.response(micros, a.status >= 400, mixed.is_some());
    }
    if let Some(m) = mixed {
        t.mixed += 1;
        live.mixed.fetch_add(1, Ordering::Relaxed);
        t.example(format!("mixed: {m}"), 1);
    } else if a.status >= 400 {
        t.errors.bad_status += 1;
        live.errors.fetch_add(1, Ordering::Relaxed);
        t.example(format!("status {}", a.status), 1);
    } else {
        live.ok.fetch_add(1, Ordering::Relaxed);
    }
}

async fn client(
    opts: &Options,
    pattern: Option<&regex_lite::Regex>,
    at: Clock,
    live: &Live,
    budget: &AtomicU64,
    mut schedule: Option<(Instant, Duration)>,
) -> Tally {
    let deadline = at.deadline;
    let mut t = Tally::new();
    t.timeline = at.timeline;
    // A connection, and the releases it has answered with, in order.
    let mut conn: Option<(Sender, Vec<String>)> = None;
    // Whether a connection was ever opened: the next one is a reconnect.
    let mut opened = false;
    loop {
        if Instant::now() >= deadline || live.stop.load(Ordering::Relaxed) {
            break;
        }
        if budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_err()
        {
            break;
        }
        let began = match &mut schedule {
            Some((due, every)) => {
                let this = *due;
                *due += *every;
                tokio::time::sleep_until(this.into()).await;
                if this >= deadline || live.stop.load(Ordering::Relaxed) {
                    break;
                }
                this
            }
            None => Instant::now(),
        };
        live.requests.fetch_add(1, Ordering::Relaxed);
        let via = match (&conn, opened && opts.keep_alive) {
            (Some(_), _) => Via::Kept,
            (None, false) => Via::Opened,
            (None, true) => Via::Reopened,
        };
        if via != Via::Kept {
            t.connects += 1;
            if via == Via::Reopened {
                t.reconnects += 1;
            }
            match connect(opts).await {
                Ok(s) => {
                    conn = Some((s, Vec::new()));
                    opened = true;
                }
                Err(f) => {
                    record_failure(&mut t, live, f, true);
                    // A refused connection returns at once: pause briefly so
                    // a dead server is reported, not hammered.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let (sender, seen) = conn.as_mut().expect("connected above");
        match exchange(opts, sender).await {
            Err(f) => {
                record_failure(&mut t, live, f, false);
                conn = None;
            }
            Ok(a) => {
                let micros = began.elapsed().as_micros().max(1) as u64;
                record_answer(&mut t, live, pattern, seen, &a, micros, via);
                if a.close || !opts.keep_alive {
                    conn = None;
                }
            }
        }
    }
    t
}

fn record_failure(t: &mut Tally, live: &Live, f: Failure, connecting: bool) {
    use std::io::ErrorKind::*;
    live.errors.fetch_add(1, Ordering::Relaxed);
    if let Some(tl) = &mut t.timeline {
        tl.failure();
    }
    let e = &mut t.errors;
    let text = match f {
        Failure::ConnectTimeout => {
            e.connect_timeout += 1;
            "connect: timed out".to_string()
        }
        Failure::ReadTimeout => {
            e.read_timeout += 1;
            "response: timed out".to_string()
        }
        Failure::Connect(io) => {
            match io.kind() {
                ConnectionRefused => e.connect_refused += 1,
                ConnectionReset | ConnectionAborted => e.connect_reset += 1,
                TimedOut => e.connect_timeout += 1,
                _ => e.connect_other += 1,
            }
            format!("connect: {io}")
        }
        Failure::Read(he) => {
            let io_kind = std::error::Error::source(&he)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .map(|io| io.kind());
            // Canceled: hyper dropped the request because its connection
            // closed before the request went out, a reset by another name.
            if he.is_incomplete_message()
                || he.is_closed()
                || he.is_canceled()
                || matches!(
                    io_kind,
                    Some(ConnectionReset | ConnectionAborted | BrokenPipe)
                )
            {
                if connecting {
                    e.connect_reset += 1;
                } else {
                    e.read_reset += 1;
                }
            } else if he.is_timeout() {
                e.read_timeout += 1;
            } else {
                e.read_other += 1;
            }
            format!("response: {he}")
        }
    };
    t.example(text, 1);
}

impl Report {
    /// A few lines for people.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let mode = if self.keep_alive {
            "keep-alive"
        } else {
            "new connection per request"
        };
        let _ = writeln!(
            s,
            "dream check {}: {} connections, {:.1}s, {mode}",
            self.url, self.connections, self.duration_s
        );
        let _ = writeln!(
            s,
            "  responses  {} ({:.0}/s)",
            self.responses, self.requests_per_s
        );
        let statuses: Vec<String> = self
            .status
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(
            s,
            "  status     {}",
            if statuses.is_empty() {
                "-".into()
            } else {
                statuses.join(", ")
            }
        );
        let e = &self.errors;
        let _ = writeln!(
            s,
            "  errors     {} (refused {}, reset {}, timeout {}, other {}, status>=400 {})",
            self.error_total,
            e.connect_refused,
            e.connect_reset + e.read_reset,
            e.connect_timeout + e.read_timeout,
            e.connect_other + e.read_other,
            e.bad_status
        );
        let _ = writeln!(s, "  mixed      {}", self.mixed);
        if !self.releases.is_empty() {
            let r: Vec<String> = self
                .releases
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = writeln!(s, "  releases   {}", r.join(", "));
        }
        let l = &self.latency;
        let _ = writeln!(
            s,
            "  latency    p50 {}  p99 {}  p99.9 {}  max {}",
            ms(l.p50_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us)
        );
        if self.keep_alive {
            let _ = writeln!(
                s,
                "  connects   {} (their first request: p99 {}), {} of them reconnects (p99 {})",
                self.connects,
                ms(self.connect_latency.p99_us),
                self.reconnects,
                ms(self.reconnect_latency.p99_us),
            );
            let _ = writeln!(
                s,
                "  kept       requests on a connection already open: p99 {}",
                ms(self.kept_latency.p99_us)
            );
        }
        for ex in &self.examples {
            let _ = writeln!(s, "  e.g.       {ex}");
        }
        let _ = write!(s, "result: {}", if self.ok { "OK" } else { "FAILED" });
        s
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("http://127.0.0.1:8080/a/b?c=d").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.path, "/a/b?c=d");
        let t = Target::parse("http://[::1]:9/").unwrap();
        assert_eq!(t.addr, "[::1]:9".parse().unwrap());
        let t = Target::parse("http://127.0.0.1:1").unwrap();
        assert_eq!(t.path, "/");
        let t = Target::parse("http://localhost:7?x").unwrap();
        assert_eq!(t.path, "/?x");
        assert!(Target::parse("https://127.0.0.1/").is_err());
        assert!(Target::parse("127.0.0.1:80").is_err());
        assert!(Target::parse("http:///x").is_err());
        assert!(Target::parse("http://127.0.0.1:80/a b").is_err());
    }
}
