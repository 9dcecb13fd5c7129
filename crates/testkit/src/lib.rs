//! Helpers for dream's tests: binaries, temporary trees, child guards that
//! kill on drop, deadline-driven waits, and a tiny HTTP client.
//!
//! Every wait here has a deadline; nothing sleeps for a fixed time to let
//! something happen.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A binary built by this workspace (`dream`, `dream-probe`), found next to
/// the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("deps dir");
    for d in [dir, dir.parent().expect("target dir")] {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is not built in {}: run the tests with `cargo test --workspace`",
        dir.display()
    );
}

/// The probe worker (an example of this crate, built by `cargo test --workspace`).
pub fn probe() -> PathBuf {
    bin("examples/dream-probe")
}

/// Whether a test's prerequisite is met. When it is not, the test is
/// skipped with a message, except under CI (`CI` set), where a missing
/// prerequisite fails the test: a green CI means every test ran.
pub fn prerequisite(met: bool, what: &str) -> bool {
    if !met {
        assert!(
            std::env::var_os("CI").is_none(),
            "prerequisite missing under CI: {what}"
        );
        eprintln!("skipped: {what}");
    }
    met
}

/// Polls `f` until it returns `Some`, or panics after `limit` naming `what`.
pub fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// A child process that is killed (with its process group) when dropped.
/// A dream supervisor (`dream serve`) is first asked to stop
/// at once (QUIT), which ends its workers and what they started: killed
/// outright, its workers would only get their drain signal (their
/// parent-death signal), and one that ignores it would outlive the test.
pub struct Guard {
    pub child: Child,
    stderr_lines: Option<mpsc::Receiver<String>>,
    pub stderr_seen: Vec<String>,
    supervisor: bool,
}

impl Guard {
    /// Spawns `cmd` in its own process group, with stderr captured line by
    /// line (and echoed to the test's stderr for diagnosis).
    pub fn spawn(cmd: &mut Command) -> Guard {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0).stderr(Stdio::piped());
        let supervisor = cmd
            .get_program()
            .to_str()
            .is_some_and(|p| p.ends_with("dream"))
            && cmd.get_args().next().is_some_and(|a| a == "serve");
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[child] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guard {
            child,
            stderr_lines: Some(rx),
            stderr_seen: Vec::new(),
            supervisor,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_stderr(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        if let Some(l) = self.stderr_seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let rx = self.stderr_lines.as_ref().expect("stderr");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no stderr line with {needle:?} within {limit:?}; saw {:?}",
                    self.stderr_seen
                ),
            }
        }
    }

    /// All stderr so far, without waiting (plus whatever is buffered).
    pub fn stderr_now(&mut self) -> String {
        if let Some(rx) = &self.stderr_lines {
            while let Ok(l) = rx.try_recv() {
                self.stderr_seen.push(l);
            }
        }
        self.stderr_seen.join("\n")
    }

    /// The address from a `listening on ADDR` line on stderr.
    pub fn listening_addr(&mut self) -> SocketAddr {
        let line = self.wait_stderr("listening on ", Duration::from_secs(10));
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .expect("address after 'listening on'");
        addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"))
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Waits for exit within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = &mut self.child;
        wait_until(limit, "the child to exit", || {
            child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.supervisor && matches!(self.child.try_wait(), Ok(None)) {
            let pid = nix::unistd::Pid::from_raw(self.pid());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
            // One a test left stopped (a test point) goes on to handle it.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let pgid = nix::unistd::Pid::from_raw(self.pid());
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every core kept busy, as a host serving its peak is: two spinning
/// processes per core at normal priority, each in its own process group,
/// killed when this is dropped (also when the test fails).
pub struct Saturate(Vec<Guard>);

impl Saturate {
    pub fn cores() -> Saturate {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        let spinners: Vec<Guard> = (0..n)
            .map(|_| Guard::spawn(Command::new("sh").args(["-c", "while :; do :; done"])))
            .collect();
        // Spinning, not merely started: each has had CPU time of its own.
        for g in &spinners {
            wait_until(Duration::from_secs(20), "a spinner to run", || {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", g.pid())).ok()?;
                let after = stat.rsplit_once(')')?.1;
                let utime: u64 = after.split_whitespace().nth(11)?.parse().ok()?;
                (utime >= 2).then_some(())
            });
        }
        Saturate(spinners)
    }
}

impl Drop for Saturate {
    fn drop(&mut self) {
        self.0.clear();
    }
}

/// `dream ARGS` to completion (two minutes at most): exit code, stdout,
/// stderr. `DREAM_BIN` names this build, for scripts a test deploys.
pub fn dream(args: &[&str]) -> (Option<i32>, String, String) {
    dream_with(args, &[])
}

/// [`dream`] with `--root ROOT` appended.
pub fn dream_at(root: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let root = root.to_str().expect("a UTF-8 root");
    let mut all = args.to_vec();
    all.extend(["--root", root]);
    dream(&all)
}

/// [`dream`] with more environment.
pub fn dream_with(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(bin("dream"));
    cmd.args(args).env("DREAM_BIN", bin("dream"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (status, out, err) = run(&mut cmd, Duration::from_secs(120));
    (status.code(), out, err)
}

/// What `ROOT/.dream/history` records for `release`: each event's name
/// and reason (empty when it has none), oldest first.
pub fn history(root: &Path, release: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(root.join(".dream/history"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["release"] == release)
        .map(|e| {
            (
                e["event"].as_str().unwrap_or_default().to_string(),
                e["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The release `ROOT/current` names.
pub fn current(root: &Path) -> Option<String> {
    std::fs::read_link(root.join("current"))
        .ok()
        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
}

/// Runs a command to completion within `limit`; returns (status, stdout, stderr).
pub fn run(cmd: &mut Command, limit: Duration) -> (ExitStatus, String, String) {
    use std::os::unix::process::CommandExt;
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (status, t_out.join().unwrap(), t_err.join().unwrap())
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `raw` (a whole request) on a new connection and reads one
/// response (the server is expected to close, or to send Content-Length).
pub fn http_raw(addr: SocketAddr, raw: &str) -> Response {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    read_response(&mut s, raw.starts_with("HEAD "))
}

/// GET `path` with extra header lines.
pub fn get(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> Response {
    let mut raw = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in extra {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    http_raw(addr, &raw)
}

/// Reads one response from a stream (keep-alive aware via Content-Length).
pub fn read_response(s: &mut impl Read, head: bool) -> Response {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            Ok(_) => panic!(
                "connection closed in response head: {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Err(e) => panic!(
                "reading response head: {e}; got {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if head || status == 304 || status == 204 {
        return resp;
    }
    match resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(n) => {
            resp.body = vec![0; n];
            s.read_exact(&mut resp.body).expect("body");
        }
        None => {
            let _ = s.read_to_end(&mut resp.body);
        }
    }
    resp
}

/// A temporary directory with helpers to fill it.
pub struct Tree {
    pub dir: tempfile::TempDir,
}

impl Tree {
    pub fn new() -> Tree {
        Tree {
            dir: tempfile::Builder::new()
                .prefix("dream-test-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `contents` at `rel`, creating parent directories.
    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, contents).expect("write");
        p
    }
}

impl Default for Tree {
    fn default() -> Tree {
        Tree::new()
    }
}

/// Reads a probe's JSON report once it exists.
pub fn read_report(path: &Path) -> serde_json::Value {
    let text = wait_until(Duration::from_secs(10), "the probe's report", || {
        std::fs::read_to_string(path).ok()
    });
    serde_json::from_str(&text).expect("report JSON")
}

/// A deploy root with releases laid out by hand, for supervisor tests.
pub struct Root {
    pub tree: Tree,
}

impl Root {
    pub fn new() -> Root {
        let tree = Tree::new();
        std::fs::create_dir_all(tree.path().join("releases")).expect("releases");
        Root { tree }
    }

    pub fn path(&self) -> &Path {
        self.tree.path()
    }

    /// Creates `releases/<id>/public/index.html` saying `release <id>`,
    /// and `releases/<id>/run`, a shell script with `script` as its body.
    pub fn release(&self, id: &str, script: &str) -> PathBuf {
        let dir = self.path().join("releases").join(id);
        self.tree.write(
            &format!("releases/{id}/public/index.html"),
            format!("<p>release {id}</p>\n"),
        );
        let run = dir.join("run");
        std::fs::write(&run, format!("#!/bin/sh\n{script}\n")).expect("run script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        dir
    }

    /// Points `current` at `releases/<id>` with an atomic rename.
    pub fn switch(&self, id: &str) {
        let tmp = self.path().join(".current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("releases/{id}"), &tmp).expect("symlink");
        std::fs::rename(&tmp, self.path().join("current")).expect("rename");
    }

    /// `dream serve --root ROOT --listen 127.0.0.1:0 EXTRA -- ./run` with
    /// `env`, once its control socket answers; its guard and address.
    /// `DREAM_BIN` and `PROBE_BIN` name this build's programs.
    pub fn serve(&self, extra: &[&str], env: &[(&str, &str)]) -> (Guard, SocketAddr) {
        let mut cmd = Command::new(bin("dream"));
        cmd.arg("serve")
            .arg("--root")
            .arg(self.path())
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .args(["--", "./run"])
            .env("DREAM_BIN", bin("dream"))
            .env("PROBE_BIN", probe())
            .env_remove("NOTIFY_SOCKET");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut g = Guard::spawn(&mut cmd);
        let addr = g.listening_addr();
        self.wait_supervisor();
        (g, addr)
    }

    /// The supervisor's status, typed.
    pub fn status(&self) -> dream_core::supervise::control::Status {
        let v = self.control(r#"{"cmd":"status"}"#);
        serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("a status that is not one ({e}): {v}"))
    }

    /// The release `current` names.
    pub fn current(&self) -> Option<String> {
        current(self.path())
    }

    /// Sends a control request and returns the answer.
    pub fn control(&self, request: &str) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(request).expect("request JSON");
        dream_core::supervise::control::request(self.path(), &v, Some(Duration::from_secs(120)))
            .unwrap_or_else(|e| panic!("control {request}: {e}"))
    }

    /// Waits until the supervisor answers on its control socket.
    pub fn wait_supervisor(&self) -> serde_json::Value {
        wait_until(
            Duration::from_secs(20),
            "the supervisor's control socket",
            || {
                let v = serde_json::json!({"cmd": "status"});
                dream_core::supervise::control::request(
                    self.path(),
                    &v,
                    Some(Duration::from_secs(5)),
                )
                .ok()
            },
        )
    }

    /// Waits until only one generation is left (the old ones drained): from
    /// then on no old worker can take a connection.
    pub fn wait_drained(&self) {
        wait_until(
            Duration::from_secs(30),
            "the old generations to drain",
            || (self.status().pool.generations.len() == 1).then_some(()),
        );
    }

    /// Waits until the live generation runs `release` with all its
    /// `workers` ready; returns the status then.
    pub fn wait_live(
        &self,
        release: &str,
        workers: usize,
    ) -> dream_core::supervise::control::Status {
        use dream_core::supervise::pool::WorkerPhase;
        wait_until(
            Duration::from_secs(20),
            &format!("release {release} live and ready"),
            || {
                let s = self.status();
                let live = s.live()?;
                let ready = live
                    .workers
                    .iter()
                    .filter(|w| w.state == WorkerPhase::Ready)
                    .count();
                (live.release == release && ready == workers).then_some(s)
            },
        )
    }
}

impl Default for Root {
    fn default() -> Root {
        Root::new()
    }
}

/// The pids of the live generation's workers.
pub fn live_pids(status: &dream_core::supervise::control::Status) -> Vec<i64> {
    status
        .live()
        .into_iter()
        .flat_map(|g| &g.workers)
        .filter_map(|w| w.pid.map(i64::from))
        .collect()
}

/// True while a process with this pid exists (and is not a zombie).
pub fn alive(pid: i64) -> bool {
    state(pid).is_some_and(|c| c != 'Z')
}

/// True once every thread of process `pid` has exited (a zombie leader
/// whose other threads still run, and still hold its descriptors, is not
/// gone yet).
pub fn gone(pid: i64) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks
        .flatten()
        .all(|t| state_in(&t.path().join("stat")).is_none_or(|c| c == 'Z' || c == 'X'))
}

/// The state letter of process `pid` (`R`, `S`, `T`, `Z`…) from /proc.
pub fn state(pid: i64) -> Option<char> {
    state_in(Path::new(&format!("/proc/{pid}/stat")))
}

/// The state letter in a `stat` file of /proc (a process's or a thread's).
fn state_in(stat: &Path) -> Option<char> {
    let stat = std::fs::read_to_string(stat).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The referee (`dream check`) running on a thread against `addr`.
pub struct Referee {
    pub live: std::sync::Arc<dream_check::Live>,
    handle: std::thread::JoinHandle<dream_check::Report>,
}

impl Referee {
    /// 16 clients requesting `/` until [`Referee::finish`].
    pub fn start(addr: SocketAddr, keep_alive: bool) -> Referee {
        let live = std::sync::Arc::new(dream_check::Live::default());
        let opts = dream_check::Options {
            target: dream_check::Target::parse(&format!("http://{addr}/")).expect("url"),
            connections: 16,
            duration: Duration::from_secs(300),
            keep_alive,
            body_pattern: Some(dream_check::DEFAULT_BODY_PATTERN.into()),
            timeout: Duration::from_secs(10),
            max_requests: None,
            rate: None,
            timeline: false,
        };
        let l = live.clone();
        let handle = std::thread::spawn(move || dream_check::run(&opts, l).expect("referee"));
        Referee { live, handle }
    }

    /// Waits until `more` further good responses have arrived.
    pub fn wait_responses(&self, more: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        let from = self.live.ok.load(SeqCst);
        wait_until(Duration::from_secs(20), "responses", || {
            (self.live.ok.load(SeqCst) >= from + more).then_some(())
        });
    }

    /// Stops the clients and returns the report (also printed for diagnosis).
    pub fn finish(self) -> dream_check::Report {
        self.live.stop();
        let report = self.handle.join().expect("referee thread");
        eprintln!("{}", report.human());
        report
    }
}

/// A referee's report with no error of any kind and no mixed response.
pub fn assert_clean(report: &dream_check::Report) {
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
}

/// Waits until process `pid` has `path` open (e.g. is blocked on a lock).
pub fn wait_open(pid: i32, path: &Path) {
    wait_until(
        Duration::from_secs(10),
        &format!("pid {pid} to open {}", path.display()),
        || {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .ok()?
                .flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
                .then_some(())
        },
    );
}

/// The pids of `pid`'s children.
pub fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// True while process `pid` is stopped (SIGSTOP).
pub fn stopped(pid: i32) -> bool {
    state(pid.into()) == Some('T')
}

/// `dream serve --root ROOT --listen 127.0.0.1:0 EXTRA -- ./run` (with
/// `$DREAM_BIN` and `$PROBE_BIN` set for the release's script), once it
/// answers `GET /` with 200.
pub fn serve_root(root: &Path, extra: &[&str]) -> (Guard, SocketAddr) {
    let mut sup = Guard::spawn(
        Command::new(bin("dream"))
            .args(["serve", "--root"])
            .arg(root)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .args(["--", "./run"])
            .env("DREAM_BIN", bin("dream"))
            .env("PROBE_BIN", probe()),
    );
    let addr = sup.listening_addr();
    wait_until(Duration::from_secs(20), "the supervisor to serve", || {
        TcpStream::connect(addr)
            .ok()
            .map(|_| get(addr, "/", &[]).status == 200)
            .filter(|ok| *ok)
    });
    (sup, addr)
}

/// A TCP port free on 127.0.0.1 now, chosen below the ephemeral range so
/// that no outgoing connection takes it before the test binds it.
pub fn free_port() -> u16 {
    let (low, _) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| {
            let mut it = r.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let start = 10_000u16.min(low.saturating_sub(1000));
    let span = low.saturating_sub(start).max(1);
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    (0..span as u64)
        .map(|i| start + ((seed + i * 7919) % span as u64) as u16)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// The `--build` that writes the release's id into a [`stamped_site`]'s
/// page, as the referee expects.
pub const STAMP: &str = r#"sed -i "s/@R@/$DREAM_RELEASE/" public/index.html"#;

/// `dream deploy --id ID --root ROOT SITE --build STAMP`: a [`stamped_site`]
/// deployed as release `id`; add flags before running it.
pub fn deploy_stamped(root: &Path, site: &Path, id: &str) -> Command {
    let mut cmd = Command::new(bin("dream"));
    cmd.args(["deploy", "--id", id, "--root"])
        .arg(root)
        .arg(site)
        .args(["--build", STAMP]);
    cmd
}

/// A deployable site in `tree/name`: `public/index.html` saying `release
/// @R@` (for [`STAMP`]) and a `run` script that does `prelude` (shell
/// lines, may be empty), then serves `public/` with `dream static`.
pub fn stamped_site(tree: &Tree, name: &str, prelude: &str) -> PathBuf {
    tree.write(&format!("{name}/public/index.html"), "<p>release @R@</p>\n");
    tree.write(
        &format!("{name}/run"),
        format!("#!/bin/sh\n{prelude}exec \"$DREAM_BIN\" static --drain-grace 300ms\n"),
    );
    use std::os::unix::fs::PermissionsExt;
    let run = tree.path().join(name).join("run");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    tree.path().join(name)
}
