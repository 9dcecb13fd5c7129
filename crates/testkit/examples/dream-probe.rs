//! `dream-probe`: a worker for tests that reports what it was given and can
//! misbehave on demand.
//!
//! It writes a JSON report of its descriptors (number, kind, close-on-exec,
//! socket family, listening state, address), its protocol environment, pid
//! and cwd; then, in `--serve` mode, answers HTTP on its listener with its
//! release, one request per connection. Modes for the pool's tests:
//! `--crash-at-start`, `--never-ready`, `--ignore-term`, `--hang`,
//! `--exit-after-report`; for a canary's judge, `--fail-percent P` (answer
//! 500 to about P% of requests, at random) and `--delay-ms D` (answer D ms
//! late). USR1 makes it shut its listeners down and go on.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dream_core::protocol::{self, StdListener as Listener};
use dream_core::signals::Signals;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::os::fd::AsFd;

#[derive(Default)]
struct Modes {
    report: Option<String>,
    serve: bool,
    crash_at_start: bool,
    never_ready: bool,
    ignore_term: bool,
    hang: bool,
    exit_after_report: bool,
    stderr: Option<String>,
    /// Exit with status 4 this long after becoming ready.
    exit_after_ms: Option<u64>,
    /// Write a ready line to this descriptor (s6's notification-fd).
    ready_fd: Option<i32>,
    /// Serve as the seed's demo server does: a plain blocking `accept` on
    /// fd 0, exiting 1 on any accept error (EAGAIN included).
    seed_server: bool,
    /// `shutdown(SHUT_RDWR)` fd 0 (to wake accept threads), then exit 0.
    shutdown_listener: bool,
    /// Answer 500 to about this percent of requests.
    fail_percent: u32,
    /// Answer this late.
    delay_ms: u64,
}

fn main() {
    let mut m = Modes::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--report" => m.report = args.next(),
            "--report-dir" => {
                m.report = args
                    .next()
                    .map(|d| format!("{d}/{}.json", std::process::id()))
            }
            "--serve" => m.serve = true,
            "--crash-at-start" => m.crash_at_start = true,
            "--never-ready" => m.never_ready = true,
            "--ignore-term" => m.ignore_term = true,
            "--hang" => m.hang = true,
            "--exit-after-report" => m.exit_after_report = true,
            "--stderr" => m.stderr = args.next(),
            "--exit-after-ms" => m.exit_after_ms = args.next().and_then(|v| v.parse().ok()),
            "--ready-fd" => m.ready_fd = args.next().and_then(|v| v.parse().ok()),
            "--seed-server" => m.seed_server = true,
            "--shutdown-listener" => m.shutdown_listener = true,
            "--fail-percent" => {
                m.fail_percent = args.next().and_then(|v| v.parse().ok()).unwrap_or(0)
            }
            "--delay-ms" => m.delay_ms = args.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--send-notify" => {
                // Send one sd_notify datagram (to test who may), then exit.
                let (Some(to), Some(text)) = (args.next(), args.next()) else {
                    eprintln!("dream-probe: --send-notify SOCKET TEXT");
                    std::process::exit(100);
                };
                match protocol::notify_to(std::ffi::OsStr::new(&to), &text) {
                    Ok(()) => std::process::exit(0),
                    Err(e) => {
                        eprintln!("dream-probe: {to}: {e}");
                        std::process::exit(1);
                    }
                }
            }
            other => {
                eprintln!("dream-probe: unknown argument {other}");
                std::process::exit(100);
            }
        }
    }
    let report = report();
    if let Some(path) = &m.report {
        let text = serde_json::to_string_pretty(&report).expect("json");
        if path == "-" {
            println!("{text}");
        } else {
            // Write then rename, so a reader never sees half a report.
            let tmp = format!("{path}.tmp{}", std::process::id());
            std::fs::write(&tmp, text).expect("write report");
            std::fs::rename(&tmp, path).expect("rename report");
        }
    }
    if let Some(s) = &m.stderr {
        eprintln!("{s}");
    }
    if m.crash_at_start {
        std::process::exit(3);
    }
    if m.exit_after_report {
        return;
    }
    if m.shutdown_listener {
        use std::os::fd::AsRawFd;
        let fd = dream_core::with_raw_fd(0, |fd| fd.as_raw_fd()).expect("fd 0");
        // A second worker finds it already shut down (ENOTCONN): fine.
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        std::process::exit(0);
    }
    if m.seed_server {
        seed_server();
    }
    let mut signals = Signals::new(&[
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGUSR1,
    ])
    .expect("signalfd");
    let listeners: Vec<Listener> = if m.serve {
        protocol::take_listeners()
            .expect("a listening socket")
            .into_iter()
            .map(|l| l.into_std().expect("listener"))
            .collect()
    } else {
        Vec::new()
    };
    for l in &listeners {
        match l {
            Listener::Tcp(t) => t.set_nonblocking(true),
            Listener::Unix(u) => u.set_nonblocking(true),
        }
        .expect("nonblocking");
    }
    let active = Arc::new(AtomicUsize::new(0));
    let release = std::env::var("DREAM_RELEASE").unwrap_or_default();
    if !m.never_ready {
        let _ = protocol::notify("READY=1");
    }
    if let Some(fd) = m.ready_fd {
        dream_core::with_raw_fd(fd, |b| nix::unistd::write(b, b"\n"))
            .expect("the ready fd is open")
            .expect("write the ready line");
    }
    if let Some(ms) = m.exit_after_ms {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            std::process::exit(4);
        });
    }
    // One thread accepts, so that once a signal is seen no connection can
    // be accepted and then dropped at exit.
    loop {
        let mut fds: Vec<PollFd<'_>> = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        fds.extend(listeners.iter().map(|l| {
            let fd = match l {
                Listener::Tcp(t) => t.as_fd(),
                Listener::Unix(u) => u.as_fd(),
            };
            PollFd::new(fd, PollFlags::POLLIN)
        }));
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        match signals.try_next().expect("signals") {
            // USR1: shut the listeners down (as a careless server does on
            // its way out) and go on serving once they listen again.
            Some(Signal::SIGUSR1) => {
                for l in &listeners {
                    let fd = match l {
                        Listener::Tcp(t) => t.as_fd(),
                        Listener::Unix(u) => u.as_fd(),
                    };
                    let _ = nix::sys::socket::shutdown(
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        nix::sys::socket::Shutdown::Both,
                    );
                }
                continue;
            }
            Some(_) if !m.ignore_term => break,
            _ => {}
        }
        for l in &listeners {
            let conn: Option<Box<dyn ReadWrite>> = match l {
                Listener::Tcp(t) => t.accept().ok().map(|(s, _)| {
                    let _ = s.set_nonblocking(false);
                    Box::new(s) as Box<dyn ReadWrite>
                }),
                Listener::Unix(u) => u.accept().ok().map(|(s, _)| {
                    let _ = s.set_nonblocking(false);
                    Box::new(s) as Box<dyn ReadWrite>
                }),
            };
            if let Some(conn) = conn {
                active.fetch_add(1, Ordering::SeqCst);
                let (active, release, hang) = (active.clone(), release.clone(), m.hang);
                let (fail, delay) = (m.fail_percent, m.delay_ms);
                std::thread::spawn(move || {
                    answer_as(conn, &release, hang, fail, delay);
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
    }
    // Connections in flight finish; the process exits when they have.
    while active.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The seed's server: blocking `accept(2)` on fd 0, one answer per
/// connection, exit 1 on an accept error. It trusts the listener's mode.
fn seed_server() -> ! {
    use nix::sys::socket::{SockFlag, accept4};
    let release = std::env::var("DREAM_RELEASE").unwrap_or_default();
    let _ = protocol::notify("READY=1");
    let listener = dream_core::with_raw_fd(0, |fd| fd.try_clone_to_owned())
        .expect("fd 0")
        .expect("dup fd 0");
    loop {
        match accept4(&listener, SockFlag::SOCK_CLOEXEC) {
            Ok(conn) => answer(Box::new(std::net::TcpStream::from(conn)), &release, false),
            Err(e) => {
                eprintln!("dream-probe: accept: {e}");
                std::process::exit(1);
            }
        }
    }
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

fn answer(conn: Box<dyn ReadWrite>, release: &str, hang: bool) {
    answer_as(conn, release, hang, 0, 0)
}

/// A random number below 100, different for every call.
fn percentile_draw() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() % 100) as u32
}

fn answer_as(mut conn: Box<dyn ReadWrite>, release: &str, hang: bool, fail: u32, delay_ms: u64) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    }
    if hang {
        std::thread::sleep(Duration::from_secs(3600));
    }
    if delay_ms > 0 {
        std::thread::sleep(Duration::from_millis(delay_ms));
    }
    let status = if fail > 0 && percentile_draw() < fail {
        "500 Internal Server Error"
    } else {
        "200 OK"
    };
    let body = format!("release {release}\n");
    let generation = std::env::var("DREAM_GENERATION").unwrap_or_default();
    let resp = format!(
        "HTTP/1.1 {status}\r\nX-Dream-Release: {release}\r\nX-Dream-Generation: {generation}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(resp.as_bytes());
}

fn report() -> Value {
    let mut env = BTreeMap::new();
    for (k, v) in std::env::vars() {
        if k.starts_with("LISTEN_") || k.starts_with("DREAM_") || k == "NOTIFY_SOCKET" {
            env.insert(k, v);
        }
    }
    let mut numbers: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    numbers.sort();
    let fds: Vec<Value> = numbers.into_iter().filter_map(describe_fd).collect();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    json!({
        "uid": field("Uid:"),
        "gid": field("Gid:"),
        "groups": field("Groups:"),
        "pid": std::process::id(),
        "ppid": nix::unistd::getppid().as_raw(),
        "pgid": nix::unistd::getpgrp().as_raw(),
        "cwd": std::env::current_dir().ok(),
        "env": env,
        "fds": fds,
    })
}

/// Describes one descriptor, or `None` if it is not open (the directory
/// handle that listed /proc/self/fd is closed by now).
fn describe_fd(fd: i32) -> Option<Value> {
    dream_core::with_raw_fd(fd, |b| {
        let flags = nix::fcntl::fcntl(b, nix::fcntl::FcntlArg::F_GETFD).ok()?;
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut v = json!({ "fd": fd, "cloexec": flags & libc::FD_CLOEXEC != 0, "target": target });
        if target.starts_with("socket:") {
            let sock = socket2::SockRef::from(&b);
            v["kind"] = json!("socket");
            v["listening"] = json!(sock.is_listener().unwrap_or(false));
            v["domain"] = json!(match sock.domain() {
                Ok(d) if d == socket2::Domain::IPV4 => "ipv4",
                Ok(d) if d == socket2::Domain::IPV6 => "ipv6",
                Ok(d) if d == socket2::Domain::UNIX => "unix",
                _ => "other",
            });
            v["local"] = json!(protocol::describe_local(b));
        } else if target.starts_with("pipe:") {
            v["kind"] = json!("pipe");
        } else {
            v["kind"] = json!("file");
        }
        Some(v)
    })
    .flatten()
}
