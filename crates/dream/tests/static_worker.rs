//! `dream static` against real sockets: HTTP semantics, path safety,
//! hostile clients, and the graceful drain.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dream_testkit::{Guard, Tree, bin, get, http_raw, read_response};
use nix::sys::signal::Signal;

struct Worker {
    guard: Guard,
    addr: SocketAddr,
    tree: Tree,
    notify: UnixDatagram,
}

impl Worker {
    /// Signals the worker and waits until it says it is draining.
    fn drain(&self, sig: Signal) {
        self.guard.signal(sig);
        let mut buf = [0u8; 256];
        let n = self
            .notify
            .recv(&mut buf)
            .expect("STOPPING=1 from the worker");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}

/// Starts `dream static` on a socket bound here and passed as fd 0
/// (inetd style), and waits for its `READY=1`.
fn start(extra: &[&str]) -> Worker {
    let tree = Tree::new();
    tree.write("public/index.html", "<h1>release r1</h1>\n");
    tree.write("public/style.css", "body{}\n");
    tree.write("public/sub/index.html", "sub\n");
    tree.write("public/sp ace.txt", "space\n");
    tree.write("secret.txt", "TOP SECRET\n");
    let big: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    tree.write("public/big.bin", &big);
    std::os::unix::fs::symlink("../secret.txt", tree.path().join("public/leak.txt")).unwrap();
    std::os::unix::fs::symlink("style.css", tree.path().join("public/alias.css")).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let notify_path = tree.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let guard = Guard::spawn(
        Command::new(bin("dream"))
            .arg("static")
            .args(extra)
            .current_dir(tree.path())
            .env("DREAM_RELEASE", "r1")
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::from(OwnedFd::from(listener))),
    );
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 from the worker");
    assert_eq!(&buf[..n], b"READY=1");
    Worker {
        guard,
        addr,
        tree,
        notify,
    }
}

#[test]
fn serves_files_with_validators_and_release_header() {
    let w = start(&[]);
    let r = get(w.addr, "/", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "<h1>release r1</h1>\n");
    assert_eq!(r.header("x-dream-release"), Some("r1"));
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(r.header("content-length"), Some("20"));
    let etag = r.header("etag").unwrap().to_string();
    let last_modified = r.header("last-modified").unwrap().to_string();

    assert_eq!(
        get(w.addr, "/style.css", &[]).header("content-type"),
        Some("text/css; charset=utf-8")
    );
    assert_eq!(get(w.addr, "/sp%20ace.txt", &[]).text(), "space\n");
    assert_eq!(get(w.addr, "/alias.css", &[]).text(), "body{}\n");
    assert_eq!(get(w.addr, "/sub/", &[]).text(), "sub\n");
    let redirect = get(w.addr, "/sub?x=1", &[]);
    assert_eq!(redirect.status, 301);
    assert_eq!(redirect.header("location"), Some("/sub/?x=1"));
    assert_eq!(get(w.addr, "/missing", &[]).status, 404);

    let inm = get(w.addr, "/", &[("If-None-Match", &etag)]);
    assert_eq!(inm.status, 304);
    assert!(inm.body.is_empty());
    assert_eq!(
        get(w.addr, "/", &[("If-Modified-Since", &last_modified)]).status,
        304
    );
    assert_eq!(
        get(w.addr, "/", &[("If-None-Match", "\"other\"")]).status,
        200
    );

    let head = http_raw(
        w.addr,
        "HEAD / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("20"));
    assert!(head.body.is_empty());

    let post = http_raw(
        w.addr,
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
}

#[test]
fn ranges() {
    let w = start(&[]);
    let r = get(w.addr, "/big.bin", &[("Range", "bytes=10-19")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 10-19/8388608"));
    let want: Vec<u8> = (10..20u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(r.body, want);
    let tail = get(w.addr, "/big.bin", &[("Range", "bytes=-5")]);
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body.len(), 5);
    let past = get(w.addr, "/big.bin", &[("Range", "bytes=99999999-")]);
    assert_eq!(past.status, 416);
    assert_eq!(past.header("content-range"), Some("bytes */8388608"));
    for absurd in [
        "bytes=0-1,2-3",
        "bytes=99999999999999999999999-1",
        "bytes=z",
        "lines=1-2",
    ] {
        let r = get(w.addr, "/style.css", &[("Range", absurd)]);
        assert_eq!(r.status, 200, "{absurd}");
        assert_eq!(r.text(), "body{}\n");
    }
    // A stale If-Range gets the whole file.
    let r = get(
        w.addr,
        "/style.css",
        &[("Range", "bytes=0-1"), ("If-Range", "\"stale\"")],
    );
    assert_eq!(r.status, 200);
    // The whole big file streams intact.
    let full = get(w.addr, "/big.bin", &[]);
    assert_eq!(full.body.len(), 8 * 1024 * 1024);
    assert!(
        full.body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 251) as u8)
    );
}

#[test]
fn never_escapes_its_directory() {
    let w = start(&[]);
    for path in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/sub/..%2F..%2Fsecret.txt",
        "/leak.txt",
        "/..%5csecret.txt",
        "/%00",
    ] {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let r = http_raw(w.addr, &raw);
        assert!(r.status == 404 || r.status == 400, "{path}: {}", r.status);
        assert!(!r.text().contains("TOP SECRET"), "{path} leaked");
    }
}

/// `GET //sub` must not answer `Location: //sub/` (another host, to a
/// browser); every directory redirect stays on this origin.
#[test]
fn directory_redirects_never_leave_the_origin() {
    let w = start(&[]);
    for (path, want) in [
        ("/sub", "/sub/"),
        ("//sub", "/sub/"),
        ("///sub", "/sub/"),
        ("/%2Fsub", "/sub/"),
        ("//sub?x=1", "/sub/?x=1"),
    ] {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let r = http_raw(w.addr, &raw);
        assert_eq!(r.status, 301, "{path}");
        assert_eq!(r.header("location"), Some(want), "{path}");
    }
}

/// A request path cannot forge a log line, send terminal escapes, or
/// write 60 kB per request into the log.
#[test]
fn request_paths_cannot_forge_or_flood_the_log() {
    let mut w = start(&[]);
    let long = "y".repeat(60_000);
    let forged = format!(
        "/a%0a2026-01-01T00:00:00Z%20dream%20serve:%20FORGED%1b[2J{}{long}",
        "x".repeat(300)
    );
    let raw = format!("GET {forged} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let r = http_raw(w.addr, &raw);
    assert!(r.status >= 400, "{}", r.status);
    let line = w.guard.wait_stderr("FORGED", Duration::from_secs(10));
    // A marker after it, so that every line the request caused is seen.
    let r = http_raw(
        w.addr,
        &format!(
            "GET /MARK{} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            "z".repeat(300)
        ),
    );
    assert!(r.status >= 400);
    w.guard.wait_stderr("MARK", Duration::from_secs(10));
    assert!(
        line.contains("\\n2026-01-01") && line.contains("\\u{1b}[2J"),
        "{line}"
    );
    for l in &w.guard.stderr_seen {
        assert!(
            !l.starts_with("2026-01-01") && !l.contains('\x1b'),
            "forged: {l:?}"
        );
        assert!(l.len() < 1000, "{} bytes logged for one request", l.len());
    }
}

/// A FIFO in the served directory hung the worker in `open()`; an
/// absolute symlink to a file inside the directory answered 404.
#[test]
fn only_regular_files_are_served_and_absolute_links_inside_work() {
    let w = start(&[]);
    let public = w.tree.path().join("public");
    nix::unistd::mkfifo(&public.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::os::unix::fs::symlink(public.join("style.css"), public.join("abs.css")).unwrap();
    std::os::unix::fs::symlink(w.tree.path().join("secret.txt"), public.join("abs-secret"))
        .unwrap();
    for _ in 0..3 {
        let r = get(w.addr, "/fifo", &[]);
        assert_eq!(r.status, 404);
    }
    assert_serving(w.addr, Duration::from_secs(2));
    let r = get(w.addr, "/abs.css", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "body{}\n"));
    let r = get(w.addr, "/abs-secret", &[]);
    assert_eq!(r.status, 404);
    assert!(!r.text().contains("TOP SECRET"));
}

/// A lookup confined beneath the root that passes `..` (a link such as
/// `sub/up.css -> ../style.css`) fails with EAGAIN when any rename happens
/// on the system meanwhile, and a deploy's switch is a rename: each such
/// request must still be answered with the file.
#[test]
fn links_through_dotdot_are_served_while_renames_happen_elsewhere() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let w = start(&[]);
    let public = w.tree.path().join("public");
    std::os::unix::fs::symlink("../style.css", public.join("sub/up.css")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let renamer = {
        let stop = stop.clone();
        let dir = w.tree.path().join("elsewhere");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a"), "x").unwrap();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (from, to) = if n % 2 == 0 { ("a", "b") } else { ("b", "a") };
                std::fs::rename(dir.join(from), dir.join(to)).unwrap();
                n += 1;
            }
            n
        })
    };
    let mut failed = Vec::new();
    for _ in 0..1500 {
        let r = get(w.addr, "/sub/up.css", &[]);
        if (r.status, r.text().as_str()) != (200, "body{}\n") {
            failed.push(r.status);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let renames = renamer.join().unwrap();
    assert!(renames > 0, "the renames ran");
    assert!(
        failed.is_empty(),
        "{} of 1500 failed: {failed:?}",
        failed.len()
    );
}

fn assert_serving(addr: SocketAddr, within: Duration) {
    let start = Instant::now();
    let r = get(addr, "/", &[]);
    assert_eq!(r.status, 200);
    assert!(start.elapsed() < within, "took {:?}", start.elapsed());
}

#[test]
fn idle_and_vanishing_clients_do_not_stall_it() {
    let w = start(&[]);
    let idle: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(w.addr).unwrap())
        .collect();
    assert_serving(w.addr, Duration::from_secs(2));
    for _ in 0..50 {
        drop(TcpStream::connect(w.addr).unwrap());
    }
    assert_serving(w.addr, Duration::from_secs(2));
    // Half a request, then a hang-up.
    for _ in 0..20 {
        let mut s = TcpStream::connect(w.addr).unwrap();
        s.write_all(b"GET / HT").unwrap();
    }
    assert_serving(w.addr, Duration::from_secs(2));
    drop(idle);
}

#[test]
fn slow_senders_are_cut_off_at_the_header_timeout() {
    let w = start(&["--header-timeout", "1s"]);
    let mut slow = TcpStream::connect(w.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    // One byte at a time; the worker keeps serving others meanwhile.
    for b in b"GET / HTTP/1.1\r\nX-Slow: 1" {
        if slow.write_all(&[*b]).is_err() {
            break;
        }
        assert_serving(w.addr, Duration::from_secs(2));
        if started.elapsed() > Duration::from_millis(1500) {
            break;
        }
    }
    let mut buf = [0u8; 1024];
    let got = slow.read(&mut buf);
    assert!(
        matches!(got, Ok(0) | Err(_)) || String::from_utf8_lossy(&buf).contains("408"),
        "the slow client was not cut off"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn oversized_headers_are_refused_and_it_keeps_serving() {
    let w = start(&[]);
    let big = "x".repeat(200 * 1024);
    let mut s = TcpStream::connect(w.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(format!("GET / HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n").as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("200 OK"), "{text}");
    let garbage = http_raw(w.addr, "\x01\x02garbage\r\n\r\n");
    assert_eq!(garbage.status, 400);
    assert_serving(w.addr, Duration::from_secs(2));
}

#[test]
fn drain_finishes_in_flight_work_and_closes_keep_alive_politely() {
    let mut w = start(&["--drain-grace", "2s", "--drain-spread", "0s"]);
    // A keep-alive connection, used once.
    let mut ka = TcpStream::connect(w.addr).unwrap();
    ka.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ka.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let first = read_response(&mut ka, false);
    assert_eq!(first.status, 200);
    assert_eq!(first.header("connection"), None);
    // A large download in flight, read only after the signal.
    let mut dl = TcpStream::connect(w.addr).unwrap();
    dl.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    dl.write_all(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 1];
    dl.read_exact(&mut head).unwrap(); // the response has started

    w.drain(Signal::SIGTERM);
    // The next request on the keep-alive connection is still answered,
    // and told to close.
    ka.write_all(b"GET /style.css HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let second = read_response(&mut ka, false);
    assert_eq!(second.status, 200);
    assert_eq!(second.header("connection"), Some("close"));
    let mut rest = Vec::new();
    assert_eq!(ka.read_to_end(&mut rest).unwrap(), 0, "then closed cleanly");
    // The download completes in full.
    let mut resp = vec![head[0]];
    dl.read_to_end(&mut resp).unwrap();
    let text_end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(resp.len() - text_end, 8 * 1024 * 1024);
    let status = w.guard.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    drop(w.tree);
}

#[test]
fn drain_spreads_the_closes_of_busy_keep_alive_connections() {
    let mut w = start(&["--drain-grace", "5s", "--drain-spread", "600ms"]);
    // Eight keep-alive connections, each used once before the drain.
    let mut conns: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = TcpStream::connect(w.addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            assert_eq!(read_response(&mut c, false).status, 200);
            c
        })
        .collect();
    w.drain(Signal::SIGHUP);
    let signalled = Instant::now();
    // Every connection keeps asking until it is told to close; when each
    // was told is recorded.
    let mut told = vec![None; conns.len()];
    while told.iter().any(Option::is_none) {
        assert!(
            signalled.elapsed() < Duration::from_secs(4),
            "not all told to close within the spread: {told:?}"
        );
        for (i, c) in conns.iter_mut().enumerate() {
            if told[i].is_some() {
                continue;
            }
            c.write_all(b"GET /style.css HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            let r = read_response(c, false);
            assert_eq!(r.status, 200, "served while draining");
            if r.header("connection") == Some("close") {
                told[i] = Some(signalled.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let told: Vec<Duration> = told.into_iter().flatten().collect();
    let (first, last) = (told.iter().min().unwrap(), told.iter().max().unwrap());
    // Not all at once: spread over most of the window, none after it.
    assert!(*first < Duration::from_millis(300), "{told:?}");
    assert!(*last - *first >= Duration::from_millis(300), "{told:?}");
    assert!(*last < Duration::from_millis(600 + 1000), "{told:?}");
    for c in &mut conns {
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).unwrap(), 0, "then closed cleanly");
    }
    assert!(w.guard.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn drain_closes_idle_connections_after_the_grace() {
    let mut w = start(&["--drain-grace", "200ms"]);
    let mut idle = TcpStream::connect(w.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle, false).status, 200);
    let signalled = Instant::now();
    w.drain(Signal::SIGHUP);
    let mut buf = [0u8; 16];
    assert_eq!(idle.read(&mut buf).unwrap(), 0, "closed without a byte");
    assert!(
        signalled.elapsed() >= Duration::from_millis(150),
        "{:?}",
        signalled.elapsed()
    );
    assert!(w.guard.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn without_a_socket_it_explains_what_to_do() {
    let (status, _, err) = dream_testkit::run(
        Command::new(bin("dream"))
            .arg("static")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null()),
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(100), "{err}");
    assert!(err.contains("no listening socket"), "{err}");
}

#[test]
fn missing_directory_is_a_clear_error() {
    let tree = Tree::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (status, _, err) = dream_testkit::run(
        Command::new(bin("dream"))
            .args(["static", "nope"])
            .current_dir(tree.path())
            .stdin(Stdio::from(OwnedFd::from(listener))),
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("cannot serve nope"), "{err}");
}

#[test]
fn edited_and_replaced_files_are_never_served_stale() {
    let w = start(&[]);
    let path = w.tree.path().join("public/style.css");
    assert_eq!(get(w.addr, "/style.css", &[]).text(), "body{}\n");
    // Same size, new content, written in place.
    std::fs::write(&path, "p{ }{}\n").unwrap();
    assert_eq!(get(w.addr, "/style.css", &[]).text(), "p{ }{}\n");
    // Same size again, and the modification time set back: only the
    // change time (which no one can set) tells.
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::fs::write(&path, "q{ }{}\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(get(w.addr, "/style.css", &[]).text(), "q{ }{}\n");
    // Replaced by rename: a new inode.
    let tmp = w.tree.path().join("public/.new");
    std::fs::write(&tmp, "a{}\n").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let r = get(w.addr, "/style.css", &[]);
    assert_eq!(r.text(), "a{}\n");
    assert_eq!(r.header("content-length"), Some("4"));
    // A file served from memory (confirmed by a stat of its path, not
    // opened again) that becomes a link out of the directory, or a
    // directory, is not served from memory.
    assert_eq!(get(w.addr, "/style.css", &[]).text(), "a{}\n");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("../secret.txt", &path).unwrap();
    let r = get(w.addr, "/style.css", &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(!r.text().contains("TOP SECRET"));
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    assert_eq!(get(w.addr, "/style.css", &[]).status, 301);
    std::fs::remove_dir(&path).unwrap();
    assert_eq!(get(w.addr, "/style.css", &[]).status, 404);
    // The same for a directory's index, served at the directory's URL.
    let index = w.tree.path().join("public/index.html");
    let before = get(w.addr, "/", &[]).text();
    assert_eq!(get(w.addr, "/", &[]).text(), before);
    std::fs::remove_file(&index).unwrap();
    std::fs::write(&index, "new index\n").unwrap();
    assert_eq!(get(w.addr, "/", &[]).text(), "new index\n");
    std::fs::remove_file(&index).unwrap();
    std::os::unix::fs::symlink("../secret.txt", &index).unwrap();
    let r = get(w.addr, "/", &[]);
    assert!(!r.text().contains("TOP SECRET"), "{}", r.text());
}

/// The open descriptors of a process.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Its resident memory in kB.
fn rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Clients that ask for an 8 MiB file with a tiny receive buffer and never
/// read took a worker to 1.5 GB and 20,000 descriptors, and a good client
/// got no answer. Memory per connection is one chunk, a send that makes no
/// progress times out, and good clients are served throughout.
#[test]
fn clients_that_never_read_cost_little_and_are_cut_off() {
    use nix::sys::socket::{setsockopt, sockopt::RcvBuf};
    let w = start(&["--send-timeout", "3s"]);
    let pid = w.guard.pid();
    let before = fd_count(pid);
    let mut hogs = Vec::new();
    for _ in 0..200 {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, connect, socket};
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        setsockopt(&fd, RcvBuf, &1024).unwrap();
        let std::net::SocketAddr::V4(v4) = w.addr else {
            unreachable!()
        };
        connect(fd.as_raw_fd(), &SockaddrIn::from(v4)).unwrap();
        let mut s = TcpStream::from(fd);
        s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        hogs.push(s);
    }
    // A good client is served while the stalled downloads are still held
    // (they are cut off only at the send timeout): an event, not a time.
    assert_eq!(get(w.addr, "/", &[]).status, 200);
    let held = fd_count(pid);
    assert!(
        held > before + 150,
        "served only once the stalled downloads were gone ({held} descriptors, {before} before)"
    );
    let rss = rss_kb(pid);
    assert!(
        rss < 200_000,
        "{rss} kB resident with 300 stalled downloads"
    );
    // Past the send timeout every stalled connection is closed.
    dream_testkit::wait_until(
        Duration::from_secs(15),
        "stalled connections closed",
        || (fd_count(pid) <= before + 5).then_some(()),
    );
    assert_eq!(get(w.addr, "/", &[]).status, 200);
    drop(hogs);
}

/// At the connection cap, idle and slow-header connections starved good
/// clients (they waited in the backlog for a header timeout). Now the
/// connection idle the longest is shed to make room.
#[test]
fn at_the_cap_idle_and_slow_connections_make_room() {
    let w = start(&["--max-connections", "50", "--header-timeout", "60s"]);
    let mut idlers = Vec::new();
    for i in 0..120 {
        let mut s = TcpStream::connect(w.addr).unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET / HTTP/1.1\r\nHost:").unwrap();
        }
        idlers.push(s);
    }
    for _ in 0..3 {
        assert_serving(w.addr, Duration::from_secs(5));
    }
    drop(idlers);
}

/// Reads responses off `c` until the server closes it; their statuses.
fn read_all_responses(c: &mut TcpStream) -> Vec<u16> {
    let mut got = Vec::new();
    loop {
        let mut probe = [0u8; 1];
        match c.peek(&mut probe) {
            Ok(0) | Err(_) => return got,
            Ok(_) => {}
        }
        got.push(read_response(c, false).status);
    }
}

#[test]
fn pipelined_requests_received_across_a_drain_are_all_answered() {
    let mut w = start(&["--drain-grace", "5s", "--drain-spread", "0ms"]);
    let paths = [
        "/",
        "/style.css",
        "/sp%20ace.txt",
        "/sub/",
        "/missing",
        "/alias.css",
    ];
    let mut conns: Vec<TcpStream> = (0..4)
        .map(|_| {
            let c = TcpStream::connect(w.addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c
        })
        .collect();
    // Accepted before the drain: each asks once so that it is.
    for c in &mut conns {
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(read_response(c, false).status, 200);
    }
    w.drain(Signal::SIGHUP);
    // Then eight pipelined requests in one write on each: every one is
    // answered, and only then is the connection closed.
    let mut seed = std::process::id() as usize;
    for c in &mut conns {
        let mut batch = String::new();
        for _ in 0..8 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            batch.push_str(&format!(
                "GET {} HTTP/1.1\r\nHost: t\r\n\r\n",
                paths[(seed >> 33) % paths.len()]
            ));
        }
        c.write_all(batch.as_bytes()).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let got = read_all_responses(c);
        assert_eq!(got.len(), 8, "connection {i}: {got:?}");
    }
    assert!(w.guard.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn clients_that_half_close_after_their_request_get_the_answer() {
    let w = start(&[]);
    for round in 0..60 {
        let version = if round % 2 == 0 { "1.0" } else { "1.1" };
        let mut c = TcpStream::connect(w.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(format!("GET /style.css HTTP/{version}\r\nHost: t\r\n\r\n").as_bytes())
            .unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        let text = String::from_utf8_lossy(&all);
        assert!(
            text.starts_with("HTTP/1.") && text.contains(" 200 ") && text.ends_with("body{}\n"),
            "round {round} (HTTP/{version}): {text:?}"
        );
    }
}

/// Two versions of a file with the same size and modification time (two
/// releases, a build that sets every mtime to 1970): a client holding the
/// old one's validator gets the new bytes, never 304.
#[test]
fn validators_follow_the_content_not_size_and_time() {
    let w = start(&[]);
    let public = w.tree.path().join("public");
    let when = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    for (name, len) in [("small.txt", 4096usize), ("large.bin", 200_000)] {
        let mut etag: Option<String> = None;
        for (round, byte) in [b'A', b'B', b'C'].into_iter().enumerate() {
            // A new file renamed over the old one, as a new release's is.
            let tmp = public.join(".tmp");
            std::fs::write(&tmp, vec![byte; len]).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&tmp)
                .unwrap()
                .set_modified(when)
                .unwrap();
            std::fs::rename(&tmp, public.join(name)).unwrap();
            let path = format!("/{name}");
            let r = match &etag {
                Some(old) => get(w.addr, &path, &[("If-None-Match", old.as_str())]),
                None => get(w.addr, &path, &[]),
            };
            assert_eq!(
                r.status, 200,
                "{name} round {round}: the old validator matched new bytes"
            );
            assert!(
                r.body.iter().all(|b| *b == byte) && r.body.len() == len,
                "{name} round {round}"
            );
            let now = r.header("etag").unwrap().to_string();
            assert_eq!(
                get(w.addr, &path, &[("If-None-Match", now.as_str())]).status,
                304,
                "{name} round {round}: its own validator"
            );
            etag = Some(now);
        }
    }
}
