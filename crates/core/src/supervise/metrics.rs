//! `dream serve --metrics ADDR`: Prometheus text at `/metrics`, served by
//! the supervisor's own poll loop (no thread, no runtime). Between scrapes
//! it costs nothing: the listener sits in the poll set like the control
//! socket, and the supervisor still sleeps with no timeout when nothing
//! is due.

use std::fmt::Write as _;
use std::net::TcpStream;

use super::*;
use crate::protocol::StdListener;
use crate::supervise::pool::{GenerationState, WorkerPhase};

/// Scrapers served at once; the one waiting longest makes room.
const MAX_CLIENTS: usize = 8;
/// The longest request read.
const MAX_REQUEST: usize = 8 * 1024;

pub(super) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(buf),
            Stream::Unix(s) => s.write_all(buf),
        }
    }
}

pub(super) struct Scraper {
    stream: Stream,
    buf: Vec<u8>,
    since: Instant,
}

impl Scraper {
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.stream.fd()
    }
}

impl Driver {
    pub(super) fn on_metrics_accept(&mut self) {
        let Some(listener) = &self.metrics else {
            return;
        };
        loop {
            let stream = match listener {
                StdListener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nonblocking(true);
                    Stream::Tcp(s)
                }),
                StdListener::Unix(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nonblocking(true);
                    Stream::Unix(s)
                }),
            };
            let Ok(stream) = stream else {
                return;
            };
            if self.scrapers.len() >= MAX_CLIENTS
                && let Some(oldest) =
                    (0..self.scrapers.len()).min_by_key(|&i| self.scrapers[i].since)
            {
                self.scrapers.swap_remove(oldest);
            }
            self.scrapers.push(Scraper {
                stream,
                buf: Vec::new(),
                since: Instant::now(),
            });
        }
    }

    /// Reads a scraper's request; once it is whole, answers and lets go.
    pub(super) fn on_scraper(&mut self, i: usize) {
        let Some(s) = self.scrapers.get_mut(i) else {
            return;
        };
        let mut buf = [0u8; 2048];
        let done = loop {
            match s.stream.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    s.buf.extend_from_slice(&buf[..n]);
                    if s.buf.windows(4).any(|w| w == b"\r\n\r\n") || s.buf.len() > MAX_REQUEST {
                        break true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        if !done {
            return;
        }
        let mut s = self.scrapers.swap_remove(i);
        let request = String::from_utf8_lossy(&s.buf);
        let path = request
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("GET "))
            .and_then(|l| l.split_whitespace().next());
        let response = match path {
            Some("/metrics") => {
                let body = self.metrics_text();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            }
            Some(_) => "HTTP/1.1 404 Not Found\r\nContent-Length: 23\r\nConnection: close\r\n\r\nonly /metrics is here\r\n".to_string(),
            None => return,
        };
        // Small enough for the socket's buffer; a scraper that reads
        // nothing is not waited for.
        let _ = s.stream.write_all(response.as_bytes());
    }

    fn metrics_text(&self) -> String {
        let status = self.status();
        let pool = &status.pool;
        let mut m = String::new();
        let n = head(
            &mut m,
            "dream_build_info",
            "gauge",
            "The running dream's version.",
        );
        let _ = writeln!(
            m,
            "{n}{{version=\"{}\"}} 1",
            status.version.replace('"', "")
        );
        let n = head(
            &mut m,
            "dream_upgrades_total",
            "counter",
            "In-place upgrades of the supervisor.",
        );
        let _ = writeln!(m, "{n} {}", status.upgrades);
        let n = head(
            &mut m,
            "dream_uptime_seconds",
            "gauge",
            "Since the supervisor started.",
        );
        let _ = writeln!(m, "{n} {:.3}", status.uptime_s);
        let n = head(
            &mut m,
            "dream_generations",
            "gauge",
            "Generations by state.",
        );
        for state in GenerationState::ALL {
            let count = pool.generations.iter().filter(|g| g.state == state).count();
            let _ = writeln!(m, "{n}{{state=\"{}\"}} {count}", state.as_str());
        }
        let n = head(
            &mut m,
            "dream_workers",
            "gauge",
            "Workers by state, all generations.",
        );
        for state in WorkerPhase::ALL {
            let count = pool
                .generations
                .iter()
                .flat_map(|g| &g.workers)
                .filter(|w| w.state == state)
                .count();
            let _ = writeln!(m, "{n}{{state=\"{}\"}} {count}", state.as_str());
        }
        let n = head(
            &mut m,
            "dream_generation_workers",
            "gauge",
            "Each generation's workers by state, labelled with the generation, its release and its role (live, canary, starting, draining, killed, failed).",
        );
        for g in &pool.generations {
            let release = g.release.replace('"', "");
            for state in WorkerPhase::ALL {
                let count = g.workers.iter().filter(|w| w.state == state).count();
                if count > 0 {
                    let _ = writeln!(
                        m,
                        "{n}{{generation=\"{}\",release=\"{release}\",role=\"{}\",state=\"{}\"}} {count}",
                        g.id,
                        g.state.as_str(),
                        state.as_str()
                    );
                }
            }
        }
        canary_metrics(&mut m, pool);
        let n = head(
            &mut m,
            "dream_paused",
            "gauge",
            "1 while paused (nothing accepts; connections wait in the backlog).",
        );
        let _ = writeln!(m, "{n} {}", u8::from(pool.paused.is_some()));
        let n = head(
            &mut m,
            "dream_paused_seconds",
            "gauge",
            "How long the current pause has held connections (0 when not paused).",
        );
        let _ = writeln!(
            m,
            "{n} {:.3}",
            pool.paused.as_ref().map_or(0.0, |p| p.for_s)
        );
        let n = head(
            &mut m,
            "dream_worker_restarts_total",
            "counter",
            "Workers restarted outside reloads (crashes).",
        );
        let _ = writeln!(m, "{n} {}", pool.restarts);
        let n = head(
            &mut m,
            "dream_reloads_total",
            "counter",
            "Reloads by outcome.",
        );
        let _ = writeln!(m, "{n}{{outcome=\"ok\"}} {}", pool.reloads.ok);
        let _ = writeln!(m, "{n}{{outcome=\"failed\"}} {}", pool.reloads.failed);
        let _ = writeln!(m, "{n}{{outcome=\"reverted\"}} {}", pool.reverts);
        reload_histogram(&mut m, &pool.reloads);
        self.listen_queues(&mut m);
        let n = head(
            &mut m,
            "dream_output_dropped_bytes_total",
            "counter",
            "Log output dropped because its reader stalled.",
        );
        let _ = writeln!(m, "{n} {}", status.output_dropped_bytes);
        m
    }
}

impl Driver {
    /// Each listening socket's accept queue depth and limit.
    fn listen_queues(&self, m: &mut String) {
        let q = head(
            m,
            "dream_listen_queue",
            "gauge",
            "Connections waiting in a listening socket's accept queue (clients wait there during a reload).",
        );
        let mut limits = String::new();
        for listener in &self.cfg.sockets {
            if let Some((depth, limit)) = crate::sys::listen_queue(listener.fd.as_fd()) {
                let name = listener.name.replace('"', "");
                let _ = writeln!(m, "{q}{{socket=\"{name}\"}} {depth}");
                let _ = writeln!(
                    limits,
                    "dream_listen_queue_limit{{socket=\"{name}\"}} {limit}"
                );
            }
        }
        head(
            m,
            "dream_listen_queue_limit",
            "gauge",
            "The accept queue's limit (the backlog).",
        );
        m.push_str(&limits);
    }
}

/// The reload duration histogram (cumulative buckets, as Prometheus has
/// them).
fn reload_histogram(m: &mut String, reloads: &crate::supervise::pool::ReloadStats) {
    let n = head(
        m,
        "dream_reload_duration_seconds",
        "histogram",
        "From a reload's start to its generation going live.",
    );
    let mut cumulative = 0;
    for (i, le) in crate::supervise::pool::RELOAD_BUCKETS.iter().enumerate() {
        cumulative += reloads.buckets.get(i).copied().unwrap_or(0);
        let _ = writeln!(m, "{n}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(m, "{n}_bucket{{le=\"+Inf\"}} {}", reloads.ok);
    let _ = writeln!(m, "{n}_sum {:.6}", reloads.sum_s);
    let _ = writeln!(m, "{n}_count {}", reloads.ok);
}

/// The canary being judged: its share, and the judge's answers and p99
/// for each side, labelled with the generation and release.
fn canary_metrics(m: &mut String, pool: &crate::supervise::pool::PoolStatus) {
    let canary = pool
        .generations
        .iter()
        .find_map(|g| g.canary.as_ref().map(|c| (g, c)));
    let n = head(
        m,
        "dream_canary_share",
        "gauge",
        "The share of new connections steered to the canary (0 without one).",
    );
    let _ = writeln!(
        m,
        "{n} {}",
        canary.map_or(0.0, |(_, c)| c.share_basis as f64 / 10_000.0)
    );
    let Some((g, c)) = canary else {
        return;
    };
    let Some(f) = &c.figures else {
        return;
    };
    let release = g.release.replace('"', "");
    let n = head(
        m,
        "dream_judge_answers",
        "gauge",
        "The judge's answers so far in the canary's window, by side and outcome.",
    );
    for (side, s) in [("canary", &f.canary), ("baseline", &f.baseline)] {
        let _ = writeln!(
            m,
            "{n}{{generation=\"{}\",release=\"{release}\",side=\"{side}\",outcome=\"ok\"}} {}",
            g.id,
            s.answers - s.errors
        );
        let _ = writeln!(
            m,
            "{n}{{generation=\"{}\",release=\"{release}\",side=\"{side}\",outcome=\"error\"}} {}",
            g.id, s.errors
        );
    }
    let n = head(
        m,
        "dream_judge_p99_seconds",
        "gauge",
        "The judge's p99 latency so far, by side.",
    );
    for (side, s) in [("canary", &f.canary), ("baseline", &f.baseline)] {
        if let Some(ms) = s.p99_ms {
            let _ = writeln!(
                m,
                "{n}{{generation=\"{}\",release=\"{release}\",side=\"{side}\"}} {:.6}",
                g.id,
                ms / 1000.0
            );
        }
    }
}

/// A metric family's HELP and TYPE lines; returns its name.
fn head<'a>(m: &mut String, name: &'a str, kind: &str, help: &str) -> &'a str {
    let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}");
    name
}
