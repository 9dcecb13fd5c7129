//! Faults, hostile input and privileges: what breaks the alternatives must
//! not break dream. Each case is bounded; the long soak is
//! `DREAM_SOAK=1000 cargo test --test reliability soak` (see RELIABILITY.md).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dream_core::supervise::control::Status;
use dream_core::supervise::pool::{GenerationState, WorkerPhase};
use dream_testkit::{
    Guard, Referee, Root, STAMP, Tree, alive, bin, children, free_port, get, live_pids, probe,
    read_report, run, stamped_site, stopped, wait_until,
};
use nix::sys::signal::Signal;

const STATIC: &str = r#"exec "$DREAM_BIN" static --drain-grace 300ms"#;

fn serve_on(root: &Root, listen: &[&str], extra: &[&str]) -> Guard {
    let mut cmd = Command::new(bin("dream"));
    cmd.arg("serve").arg("--root").arg(root.path());
    for l in listen {
        cmd.args(["--listen", l]);
    }
    cmd.args(extra)
        .args(["--", "./run"])
        .env("DREAM_BIN", bin("dream"))
        .env("PROBE_BIN", probe());
    let g = Guard::spawn(&mut cmd);
    root.wait_supervisor();
    g
}

/// A filesystem mounted for one test, unmounted (lazily) when dropped.
struct Mount(std::path::PathBuf);

impl Mount {
    /// `mount ARGS AT`, or `None` where mounting is not allowed.
    fn new(args: &[&str], at: &Path) -> Option<Mount> {
        let ok = Command::new("mount")
            .args(args)
            .arg(at)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_killed_supervisor_leaves_no_orphans_and_restarts_on_the_same_addresses() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let (mut first, addr, sock, unix) = serve_tcp_and_unix(&root, "notify");
    let workers = live_pids(&root.wait_live("a", 2));
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10));
    // Every thread of every worker: a zombie leader whose other threads
    // are still exiting still holds the listening socket. They had the
    // drain signal when their parent died, and drained.
    for pid in &workers {
        wait_until(
            Duration::from_secs(10),
            "workers to drain when their supervisor dies",
            || dream_testkit::gone(*pid).then_some(()),
        );
    }
    // Same port, same Unix path (now stale), same control socket path.
    let spec = addr.to_string();
    let _second = serve_on(
        &root,
        &[&spec, &unix],
        &["--workers", "1", "--ready", "notify"],
    );
    root.wait_live("a", 1);
    assert_eq!(get(addr, "/", &[]).status, 200);
    let out = get_unix(&sock);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// Whether this process may make cgroups (root, a writable hierarchy):
/// how a supervisor finds what a dead one left, whoever its parent is.
fn cgroups_usable() -> bool {
    nix::unistd::geteuid().is_root()
        && (Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
            || Path::new("/sys/fs/cgroup/pids").is_dir())
}

#[test]
fn what_a_killed_supervisor_left_serving_is_ended_by_the_next_one_on_its_addresses() {
    if !dream_testkit::prerequisite(cgroups_usable(), "cgroups (run as root)") {
        return;
    }
    let _busy = dream_testkit::Saturate::cores();
    let root = Root::new();
    // The worker (a shell) ignores its parent-death signal; the servers
    // it started (one on the TCP socket, fd 3, one on the Unix one, fd 4)
    // keep serving once the supervisor is gone. Only the kernel's count
    // (the generation's cgroup) still knows whose they are. (A background
    // command's stdin is /dev/null unless redirected.)
    root.release(
        "a",
        r#"trap '' TERM
"$DREAM_BIN" static --drain-grace 300ms <&3 &
"$DREAM_BIN" static --drain-grace 300ms <&4 &
wait"#,
    );
    root.switch("a");
    let (mut first, addr, sock, unix) = serve_tcp_and_unix(&root, "delay:300ms");
    let old = first.pid();
    let workers = live_pids(&root.wait_live("a", 2));
    let servers: Vec<i64> = workers
        .iter()
        .flat_map(|w| children(*w as i32))
        .map(i64::from)
        .collect();
    assert_eq!(servers.len(), 4, "two servers per worker shell");
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10));
    // Still serving, on the old supervisor's sockets, with no supervisor.
    assert_eq!(get(addr, "/", &[]).status, 200);
    assert!(get_unix(&sock).starts_with("HTTP/1.1 200"));
    for pid in workers.iter().chain(&servers) {
        assert!(alive(*pid), "pid {pid} ignores the drain signal");
    }

    let spec = addr.to_string();
    let mut second = serve_on(
        &root,
        &[&spec, &unix],
        &["--workers", "1", "--ready", "delay:300ms"],
    );
    second.wait_stderr(
        &format!("that supervisor pid {old} (gone) left running"),
        Duration::from_secs(20),
    );
    for pid in workers.iter().chain(&servers) {
        wait_until(Duration::from_secs(10), "the strays to be gone", || {
            dream_testkit::gone(*pid).then_some(())
        });
    }
    let s = root.wait_live("a", 1);
    assert!(live_pids(&s).iter().all(|p| !workers.contains(p)));
    // Status names the socket's path, not the name it was bound under.
    let shown: Vec<&str> = s.sockets.iter().map(|k| k.address.as_str()).collect();
    assert!(
        shown.contains(&format!("unix:{}", sock.display()).as_str()),
        "{shown:?}"
    );
    assert_eq!(get(addr, "/", &[]).status, 200);
    let out = get_unix(&sock);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// Two workers on a loopback port and a Unix socket `ROOT/app.sock`:
/// the supervisor, its port, the socket's path and its spec.
fn serve_tcp_and_unix(root: &Root, ready: &str) -> (Guard, SocketAddr, PathBuf, String) {
    let sock = root.path().join("app.sock");
    let unix = format!("unix:{}", sock.display());
    let mut sup = serve_on(
        root,
        &["127.0.0.1:0", &unix],
        &["--workers", "2", "--ready", ready],
    );
    let addr = sup.listening_addr();
    (sup, addr, sock, unix)
}

/// One request on a Unix socket, answered within 10 s.
fn get_unix(path: &Path) -> String {
    let mut c = UnixStream::connect(path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    out
}

#[test]
fn what_a_drained_worker_leaves_in_its_group_is_drained_then_killed_at_the_deadline() {
    let _busy = dream_testkit::Saturate::cores();
    let root = Root::new();
    let marks = root.tree.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    // Two helpers in the worker's group: one drains (on TERM it writes
    // its mark and exits 0), one ignores TERM. Then the worker serves.
    let script = format!(
        r#"sh -c 'trap "echo polite helper draining >&2; echo drained > {m}/$$; exit 0" TERM; echo started > {m}/$$; while :; do sleep 0.05; done' &
echo $! > {m}/polite-$$
trap '' TERM; sleep 1000 & echo $! > {m}/deaf-$$; trap - TERM
exec "$DREAM_BIN" static --drain-grace 100ms"#,
        m = marks.display()
    );
    root.release("a", &script);
    root.release("b", STATIC);
    root.switch("a");
    let mut sup = serve_on(
        &root,
        &["127.0.0.1:0"],
        &[
            "--workers",
            "1",
            "--ready",
            "notify",
            "--drain-timeout",
            "5s",
        ],
    );
    let worker = live_pids(&root.wait_live("a", 1))[0];
    let read_pid = |name: String| -> i64 {
        wait_until(Duration::from_secs(10), &name, || {
            std::fs::read_to_string(marks.join(&name))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
    };
    let polite = read_pid(format!("polite-{worker}"));
    let deaf = read_pid(format!("deaf-{worker}"));
    wait_until(Duration::from_secs(10), "the polite helper's trap", || {
        std::fs::read_to_string(marks.join(polite.to_string()))
            .ok()
            .filter(|s| s.trim() == "started")
    });
    root.switch("b");
    assert_eq!(root.control(r#"{"cmd":"reload"}"#)["ok"], true);
    // The polite one was told, not killed: its trap ran.
    let told = || std::fs::read_to_string(marks.join(polite.to_string())).unwrap_or_default();
    wait_until(
        Duration::from_secs(15),
        "the polite helper to drain",
        || (told().trim() == "drained" && dream_testkit::gone(polite)).then_some(()),
    );
    sup.wait_stderr(
        &format!("what worker pid {worker} left in its process group"),
        Duration::from_secs(10),
    );
    // What it wrote after its worker had exited reached the log (the pipe
    // is kept open for it: before, that line was a SIGPIPE).
    sup.wait_stderr("polite helper draining", Duration::from_secs(10));
    // The deaf one outlives the signal and is killed at the deadline.
    assert!(alive(deaf), "killed before its drain deadline");
    wait_until(
        Duration::from_secs(15),
        "the deaf helper to be killed",
        || dream_testkit::gone(deaf).then_some(()),
    );
    sup.wait_stderr(&format!("group {worker}"), Duration::from_secs(10));
}

#[test]
fn workers_that_crash_after_ready_are_respawned_and_reported() {
    let root = Root::new();
    root.release("flaky", r#"exec "$PROBE_BIN" --serve --exit-after-ms 200"#);
    root.switch("flaky");
    let mut sup = serve_on(
        &root,
        &["127.0.0.1:0"],
        &["--workers", "2", "--ready", "notify"],
    );
    let status = wait_until(Duration::from_secs(20), "several restarts", || {
        let s = root.status();
        (s.pool.restarts >= 4).then_some(s)
    });
    assert!(status.ok);
    sup.wait_stderr("exited with status 4", Duration::from_secs(10));
    assert!(
        sup.child.try_wait().unwrap().is_none(),
        "the supervisor keeps running"
    );
}

/// A 1 MiB tmpfs mounted (as root) at `tree/root`, for full-disk tests;
/// `None` when mounting is not possible here (the test is then skipped, or
/// fails under CI).
fn small_disk_root(tree: &Tree) -> Option<(std::path::PathBuf, Mount)> {
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    match Mount::new(
        &["-t", "tmpfs", "-o", "size=1m,mode=755", "dream-test"],
        &root,
    ) {
        Some(m) => Some((root, m)),
        None => {
            dream_testkit::prerequisite(false, "needs root and mount permission for a small tmpfs");
            None
        }
    }
}

#[test]
fn a_full_disk_during_staging_is_temporary_and_leaves_current_intact() {
    let tree = Tree::new();
    let Some((root, _mount)) = small_disk_root(&tree) else {
        return;
    };
    tree.write("small/public/index.html", "small\n");
    let big: Vec<u8> = vec![7; 3 << 20];
    tree.write("big/public/index.html", "big\n");
    tree.write("big/public/blob.bin", &big);
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .args(["deploy", "--root"])
            .arg(&root)
            .arg(tree.path().join("small")),
        Duration::from_secs(30),
    );
    assert!(status.success(), "{err}");
    let before = std::fs::read_link(root.join("current")).unwrap();
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .args(["deploy", "--root"])
            .arg(&root)
            .arg(tree.path().join("big")),
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(111), "{err}");
    assert!(err.contains("No space left"), "{err}");
    assert_eq!(std::fs::read_link(root.join("current")).unwrap(), before);
    assert_eq!(
        std::fs::read_dir(root.join(".dream/staging"))
            .unwrap()
            .count(),
        0,
        "staging cleaned"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("current/public/index.html")).unwrap(),
        "small\n"
    );
}

/// The disk fills between the release being synced and the switch being
/// recorded: the history append fails. `current` must not be left naming a
/// release that nothing records and no supervisor was asked to serve, and
/// the history keeps whole lines only.
#[test]
fn a_full_disk_at_the_switch_leaves_current_on_the_served_release() {
    let tree = Tree::new();
    let Some((root, _mount)) = small_disk_root(&tree) else {
        return;
    };
    tree.write("a/public/index.html", "a\n");
    tree.write("b/public/index.html", "bb\n");
    let deploy = |src: &str| {
        let mut c = Command::new(bin("dream"));
        c.args(["deploy", "--root"])
            .arg(&root)
            .arg(tree.path().join(src));
        c
    };
    let (status, _, err) = run(&mut deploy("a"), Duration::from_secs(30));
    assert!(status.success(), "{err}");
    let mut stopped_deploy = Guard::spawn(deploy("b").env("DREAM_TEST_STOP_AFTER", "synced"));
    wait_until(
        Duration::from_secs(20),
        "the deploy to stop after syncing",
        || stopped(stopped_deploy.pid()).then_some(()),
    );
    // The history ends on a page boundary, so the next line needs a new
    // page; then the disk is filled to the last byte.
    let history = root.join(".dream/history");
    let len = std::fs::metadata(&history).unwrap().len();
    let pad = 4096 - (len % 4096);
    let mut h = std::fs::OpenOptions::new()
        .append(true)
        .open(&history)
        .unwrap();
    h.write_all(format!("{}\n", "#".repeat(pad as usize - 1)).as_bytes())
        .unwrap();
    drop(h);
    let mut filler = std::fs::File::create(root.join("filler")).unwrap();
    while filler.write(&[0u8; 4096]).is_ok_and(|n| n > 0) {}
    drop(filler);
    let before_len = std::fs::metadata(&history).unwrap().len();
    stopped_deploy.signal(Signal::SIGCONT);
    let status = stopped_deploy.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(111), "exit 111: disk full");
    stopped_deploy.wait_stderr("No space left", Duration::from_secs(5));
    assert_eq!(
        std::fs::read_to_string(root.join("current/public/index.html")).unwrap(),
        "a\n",
        "current names the release that was served"
    );
    let text = std::fs::read(&history).unwrap();
    assert_eq!(text.len() as u64, before_len, "no torn line");
    assert!(text.ends_with(b"\n"));
    // Room again: the next deploy succeeds and its events are whole.
    std::fs::remove_file(root.join("filler")).unwrap();
    let (status, _, err) = run(&mut deploy("b"), Duration::from_secs(30));
    assert!(status.success(), "{err}");
    assert_eq!(
        std::fs::read_to_string(root.join("current/public/index.html")).unwrap(),
        "bb\n"
    );
}

#[test]
fn a_tar_bomb_is_refused_at_the_entry_limit() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let tarball = tree.path().join("bomb.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&tarball).unwrap());
    for i in 0..101 {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("f{i}"), std::io::empty())
            .unwrap();
    }
    b.finish().unwrap();
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .args(["deploy", "--root"])
            .arg(&root)
            .arg(&tarball)
            .env("DREAM_MAX_ENTRIES", "100"),
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("more than 100 entries"), "{err}");
    assert_eq!(
        std::fs::read_dir(root.join(".dream/staging"))
            .unwrap()
            .count(),
        0
    );
}

/// A 10 MB `.tar.gz` of zeros filled the disk before failing. Sizes and
/// counts are now checked on the headers before anything is written.
#[test]
fn a_compressed_size_bomb_is_refused_before_anything_is_written() {
    use std::io::Read as _;
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    // 256 MiB of zeros in one entry: about 250 kB compressed.
    let bomb = tree.path().join("bomb.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&bomb).unwrap(),
        flate2::Compression::fast(),
    );
    let mut b = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_size(256 << 20);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "zeros.bin", std::io::repeat(0).take(256 << 20))
        .unwrap();
    b.into_inner().unwrap().finish().unwrap();
    assert!(std::fs::metadata(&bomb).unwrap().len() < 2 << 20);
    let deploy = |extra: &[&str]| {
        run(
            Command::new(bin("dream"))
                .args(["deploy", "--root"])
                .arg(&root)
                .arg(&bomb)
                .args(extra),
            Duration::from_secs(60),
        )
    };
    let (status, _, err) = deploy(&["--max-size", "10M"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("more than 10485760") && err.contains("nothing was written"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(root.join(".dream/staging"))
            .unwrap()
            .count(),
        0
    );
    let (status, _, err) = deploy(&["--max-size", "ten"]);
    assert_eq!(status.code(), Some(100), "{err}");
    // A directory source is held to the same limit while it is copied.
    tree.write("dir/a.bin", vec![1u8; 4096]);
    tree.write("dir/b.bin", vec![2u8; 4096]);
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .args(["deploy", "--max-size", "6K", "--root"])
            .arg(&root)
            .arg(tree.path().join("dir")),
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("more than 6144 bytes"), "{err}");
    assert!(!root.join("current").exists());
}

#[test]
fn the_static_worker_serves_others_past_1000_idle_connections() {
    let tree = Tree::new();
    tree.write("public/index.html", "ok\n");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let _w = Guard::spawn(
        Command::new(bin("dream"))
            .arg("static")
            .current_dir(tree.path())
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                listener,
            ))),
    );
    wait_until(Duration::from_secs(10), "the worker", || {
        TcpStream::connect(addr).ok()
    });
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let t = Instant::now();
    assert_eq!(get(addr, "/", &[]).text(), "ok\n");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(idle);
}

#[test]
fn another_uid_cannot_control_the_supervisor() {
    if !nix::unistd::geteuid().is_root()
        || Command::new("setpriv").arg("--version").output().is_err()
    {
        dream_testkit::prerequisite(false, "needs root and setpriv to act as another user");
        return;
    }
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let _sup = serve_on(&root, &["127.0.0.1:0"], &["--workers", "1"]);
    let as_nobody = |args: &[&str]| {
        run(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(bin("dream"))
                .args(args),
            Duration::from_secs(20),
        )
    };
    let root_arg = root.path().to_str().unwrap();
    // The socket's mode (0600, owned by root) keeps nobody out.
    let (status, _, err) = as_nobody(&["reload", "--root", root_arg]);
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("Permission denied") || err.contains("permission denied"),
        "{err}"
    );
    // Even through a socket made world-writable, the peer credentials are checked.
    let sock = root.path().join(".dream/control.sock");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (status, out, err) = as_nobody(&["status", "--root", root_arg, "--json"]);
    assert!(
        !status.success() || out.contains("permission denied"),
        "{out}{err}"
    );
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        root.control(r#"{"cmd":"status"}"#)["ok"],
        true,
        "still answering its owner"
    );
    // Nor can that user switch this root's current (lock and root are root's).
    let before = std::fs::read_link(root.path().join("current")).unwrap();
    let (status, _, err) = as_nobody(&["rollback", "--root", root_arg, "a"]);
    assert!(!status.success(), "{err}");
    assert_eq!(
        std::fs::read_link(root.path().join("current")).unwrap(),
        before
    );
}

#[test]
fn workers_run_as_the_given_user_on_a_privileged_port() {
    if !nix::unistd::geteuid().is_root() {
        dream_testkit::prerequisite(
            false,
            "needs root to bind a privileged port and switch users",
        );
        return;
    }
    let root = Root::new();
    let reports = root.tree.path().join("reports");
    std::fs::create_dir(&reports).unwrap();
    use std::os::unix::fs::PermissionsExt;
    // nobody may pass through the root and write its reports; the root
    // itself stays writable only by us (dream refuses it otherwise).
    for (p, mode) in [
        (root.tree.path().to_path_buf(), 0o755),
        (reports.clone(), 0o777),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    root.release(
        "a",
        &format!(
            r#"exec "$PROBE_BIN" --serve --report-dir {}"#,
            reports.display()
        ),
    );
    root.switch("a");
    // A free privileged port on loopback.
    let port = (900..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1000");
    let spec = format!("127.0.0.1:{port}");
    let _sup = serve_on(
        &root,
        &[&spec],
        &["--workers", "1", "--ready", "notify", "--user", "nobody"],
    );
    let pid = live_pids(&root.wait_live("a", 1))[0];
    let r = read_report(&reports.join(format!("{pid}.json")));
    assert!(
        r["uid"].as_array().unwrap().iter().all(|u| u == "65534"),
        "{r:#}"
    );
    assert!(
        r["gid"].as_array().unwrap().iter().all(|g| g == "65534"),
        "{r:#}"
    );
    assert!(
        r["groups"].as_array().unwrap().is_empty(),
        "supplementary groups dropped: {r:#}"
    );
    let text = get(format!("127.0.0.1:{port}").parse().unwrap(), "/", &[]).text();
    assert!(text.contains("release a"), "{text}");
    // The control socket and the lock are root's, not the worker user's.
    let meta = std::fs::metadata(root.path().join(".dream/control.sock")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    // dream listen --user drops privileges before exec'ing its program.
    let report = reports.join("listen.json");
    let port2 = (port + 1..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a second free port below 1000");
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .args([
                "listen",
                &format!("127.0.0.1:{port2}"),
                "--user",
                "nobody",
                "--",
            ])
            .arg(probe())
            .arg("--report")
            .arg(&report)
            .arg("--exit-after-report"),
        Duration::from_secs(20),
    );
    assert!(status.success(), "{err}");
    let r = read_report(&report);
    assert!(
        r["uid"].as_array().unwrap().iter().all(|u| u == "65534"),
        "{r:#}"
    );
    assert_eq!(r["fds"][3]["listening"], true);
}

/// Many reloads under load: no errors, and no growth in the supervisor's
/// descriptors, memory or children; no zombies. `DREAM_SOAK=N` sets N
/// (default 100 here; 1,000 for the report).
#[test]
fn soak_reloads_without_growth() {
    let n: usize = std::env::var("DREAM_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let root = Root::new();
    root.release("a", STATIC);
    root.release("b", STATIC);
    root.switch("a");
    let mut sup = serve_on(
        &root,
        &["127.0.0.1:0"],
        &["--workers", "2", "--ready", "notify"],
    );
    let addr = sup.listening_addr();
    root.wait_live("a", 2);
    let pid = sup.pid();
    let referee = Referee::start(addr, true);
    referee.wait_responses(50);
    let (fds0, rss0) = (fd_count(pid), rss_kb(pid));
    for i in 0..n {
        root.switch(if i % 2 == 0 { "b" } else { "a" });
        let answer = root.control(r#"{"cmd":"reload"}"#);
        assert_eq!(answer["ok"], true, "reload {i}: {answer}");
    }
    referee.wait_responses(50);
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
    let status = wait_until(Duration::from_secs(20), "old generations to drain", || {
        let s = root.status();
        (s.pool.generations.len() == 1).then_some(s)
    });
    wait_until(Duration::from_secs(10), "children to settle", || {
        (children(pid).len() == 2).then_some(())
    });
    // A control client the supervisor has not yet seen hang up may hold
    // one descriptor for a moment.
    wait_until(Duration::from_secs(10), "descriptors to settle", || {
        (fd_count(pid) <= fds0).then_some(())
    });
    let (fds1, rss1) = (fd_count(pid), rss_kb(pid));
    eprintln!(
        "soak: {n} reloads, {} responses, 0 errors; supervisor fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} kB",
        report.responses
    );
    assert_eq!(fds1, fds0, "no descriptor leak");
    assert!(rss1 <= rss0 + 512, "RSS grew from {rss0} to {rss1} kB");
    assert!(
        children(pid)
            .iter()
            .all(|c| dream_testkit::state((*c).into()) != Some('Z')),
        "no zombies"
    );
    assert_eq!(status.pool.generations[0].id, n as u64 + 1);
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(Duration::from_secs(20)).success());
}

/// kill -9 of `dream deploy` at every phase boundary, and while it waits for
/// the reload, with a supervisor serving under load: `current` always names
/// a complete release, the next deploy succeeds, no client sees an error.
#[test]
fn killed_deploys_under_load_lose_nothing() {
    let tree = Tree::new();
    let a = stamped_site(&tree, "a", "");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let deploy = |extra: &[(&str, &str)]| {
        let mut cmd = Command::new(bin("dream"));
        cmd.args(["deploy", "--root"])
            .arg(&root)
            .arg(&a)
            .args(["--build", STAMP, "--keep", "3"]);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd
    };
    let (status, _, err) = run(&mut deploy(&[]), Duration::from_secs(60));
    assert!(status.success(), "{err}");
    let (mut sup, addr) =
        dream_testkit::serve_root(&root, &["--workers", "2", "--ready", "notify"]);
    let referee = Referee::start(addr, true);
    for phase in ["locked", "staged", "built", "shared", "synced", "switched"] {
        referee.wait_responses(20);
        let g = Guard::spawn(&mut deploy(&[("DREAM_TEST_STOP_AFTER", phase)]));
        let pid = g.pid();
        wait_until(
            Duration::from_secs(20),
            &format!("deploy to stop after {phase}"),
            || stopped(pid).then_some(()),
        );
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        drop(g);
        let now = std::fs::read_link(root.join("current")).unwrap();
        assert!(
            root.join(&now).join("public/index.html").is_file(),
            "{phase}: {now:?} is complete"
        );
        let (status, _, err) = run(&mut deploy(&[]), Duration::from_secs(60));
        assert!(status.success(), "{phase}: {err}");
        assert_eq!(
            std::fs::read_dir(root.join(".dream/staging"))
                .unwrap()
                .count(),
            0,
            "{phase}"
        );
    }
    // Killed while waiting for the reload (a release whose workers take a
    // second to come up): the supervisor finishes the reload anyway.
    let slow = stamped_site(&tree, "slow", "");
    tree.write("slow/run", format!("#!/bin/sh\nsleep 1\n{STATIC}\n"));
    let g = Guard::spawn(
        Command::new(bin("dream"))
            .args(["deploy", "--root"])
            .arg(&root)
            .arg(&slow)
            .args(["--build", STAMP, "--keep", "3"]),
    );
    let pid = g.pid();
    let control = |v: &str| {
        dream_core::supervise::control::request(
            &root,
            &serde_json::from_str(v).unwrap(),
            Some(Duration::from_secs(10)),
        )
    };
    wait_until(
        Duration::from_secs(30),
        "the deploy's reload to be in progress",
        || {
            let s: Status = serde_json::from_value(control(r#"{"cmd":"status"}"#).ok()?).ok()?;
            s.pool
                .generations
                .iter()
                .any(|g| g.state == GenerationState::Starting)
                .then_some(())
        },
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    drop(g);
    wait_until(
        Duration::from_secs(30),
        "the reload to finish without its deploy",
        || {
            let s: Status = serde_json::from_value(control(r#"{"cmd":"status"}"#).ok()?).ok()?;
            s.pool
                .generations
                .iter()
                .all(|g| g.state != GenerationState::Starting)
                .then_some(())
        },
    );
    let (status, _, err) = run(&mut deploy(&[]), Duration::from_secs(60));
    assert!(
        status.success(),
        "after a kill during the reload wait: {err}"
    );
    referee.wait_responses(50);
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(Duration::from_secs(30)).success());
}

/// Many full deploys (stage, build, share, sync, switch, reload, prune)
/// alternating two sites under load. `DREAM_SOAK_DEPLOYS=N` sets N
/// (default 30 here; 1,000 for the report).
#[test]
fn soak_deploys_without_errors_or_leftovers() {
    let n: usize = std::env::var("DREAM_SOAK_DEPLOYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let tree = Tree::new();
    let sites = [stamped_site(&tree, "a", ""), stamped_site(&tree, "b", "")];
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let deploy = |site: &Path| {
        run(
            Command::new(bin("dream"))
                .args(["deploy", "-q", "--root"])
                .arg(&root)
                .arg(site)
                .args(["--build", STAMP, "--keep", "3"]),
            Duration::from_secs(60),
        )
    };
    assert!(deploy(&sites[0]).0.success());
    let (mut sup, addr) =
        dream_testkit::serve_root(&root, &["--workers", "2", "--ready", "notify"]);
    let pid = sup.pid();
    let referee = Referee::start(addr, true);
    referee.wait_responses(20);
    let fds0 = fd_count(pid);
    for i in 0..n {
        let (status, _, err) = deploy(&sites[(i + 1) % 2]);
        assert!(status.success(), "deploy {i}: {err}");
    }
    referee.wait_responses(20);
    let report = referee.finish();
    wait_until(Duration::from_secs(10), "descriptors to settle", || {
        (fd_count(pid) <= fds0).then_some(())
    });
    let releases = std::fs::read_dir(root.join("releases")).unwrap().count();
    eprintln!(
        "soak: {n} deploys, {} responses, {} errors, {} mixed; {releases} releases kept; supervisor fds {fds0} -> {}",
        report.responses,
        report.error_total,
        report.mixed,
        fd_count(pid)
    );
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
    assert!(releases <= 5, "pruned: {releases}");
    assert_eq!(
        std::fs::read_dir(root.join(".dream/staging"))
            .unwrap()
            .count(),
        0
    );
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(Duration::from_secs(30)).success());
}

/// A release whose workers run out of descriptors at start fails its
/// reload; the old generation keeps serving without a client error.
#[test]
fn workers_out_of_descriptors_fail_the_reload_not_the_service() {
    let root = Root::new();
    root.release("good", STATIC);
    root.release("starved", r#"ulimit -n 5; exec "$DREAM_BIN" static"#);
    root.switch("good");
    let mut sup = serve_on(
        &root,
        &["127.0.0.1:0"],
        &["--workers", "2", "--ready", "notify"],
    );
    let addr = sup.listening_addr();
    root.wait_live("good", 2);
    let referee = Referee::start(addr, true);
    referee.wait_responses(20);
    root.switch("starved");
    let answer = root.control(r#"{"cmd":"reload"}"#);
    assert_eq!(answer["ok"], false, "{answer}");
    let reason = answer["error"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains("Too many open files") || reason.contains("exited"),
        "{reason}"
    );
    referee.wait_responses(50);
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.releases.keys().collect::<Vec<_>>(), vec!["good"]);
}

/// The notify socket's name is visible to every local process: only the
/// worker's user (or root, or the supervisor's) may make a worker ready.
#[test]
fn readiness_from_another_uid_is_ignored() {
    if !nix::unistd::geteuid().is_root() {
        dream_testkit::prerequisite(false, "needs root and setpriv to send as another user");
        return;
    }
    let root = Root::new();
    let reports = root.tree.path().join("reports");
    std::fs::create_dir(&reports).unwrap();
    root.release(
        "a",
        &format!(
            r#"exec "$PROBE_BIN" --serve --never-ready --report-dir {}"#,
            reports.display()
        ),
    );
    root.switch("a");
    let mut sup = serve_on(
        &root,
        &["127.0.0.1:0"],
        // An abstract socket: anyone may send to it, and only the uid
        // decides (a socket file in a root others cannot enter is
        // refused by the kernel first).
        &[
            "--workers",
            "1",
            "--ready",
            "notify",
            "-v",
            "--notify-socket",
            "abstract",
        ],
    );
    let status = root.status();
    let pid = live_pids(&status)[0];
    let r = read_report(&reports.join(format!("{pid}.json")));
    let socket = r["env"]["NOTIFY_SOCKET"].as_str().unwrap().to_string();
    let send = |as_nobody: bool| {
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(probe());
            c
        } else {
            Command::new(probe())
        };
        let (status, _, err) = run(
            cmd.args(["--send-notify", &socket, "READY=1"]),
            Duration::from_secs(20),
        );
        assert!(status.success(), "{err}");
    };
    send(true);
    sup.wait_stderr("ignored: sent by uid Some(65534)", Duration::from_secs(10));
    let s = root.status();
    assert_eq!(
        s.pool.generations[0].workers[0].state,
        WorkerPhase::Starting,
        "{s:?}"
    );
    send(false);
    root.wait_live("a", 1);
}

/// On a filesystem with reflinks (XFS made by the test on a loop device),
/// unchanged files are copy-on-write clones: separate inodes, so even root
/// writing into the new release cannot change the old one.
#[test]
fn reflinks_where_the_filesystem_has_them() {
    let have = Command::new("mkfs.xfs")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !nix::unistd::geteuid().is_root() || !have {
        dream_testkit::prerequisite(
            false,
            "needs root and mkfs.xfs (xfsprogs) to make a reflink filesystem",
        );
        return;
    }
    let tree = Tree::new();
    let image = tree.path().join("xfs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        mkfs.status.success(),
        "{}",
        String::from_utf8_lossy(&mkfs.stderr)
    );
    let mnt = tree.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let image_arg = image.to_str().unwrap();
    let Some(_mount) = Mount::new(&["-o", "loop", image_arg], &mnt) else {
        dream_testkit::prerequisite(false, "cannot mount a loop device here");
        return;
    };
    let src = mnt.join("src");
    for i in 0..20 {
        std::fs::create_dir_all(src.join("public")).unwrap();
        std::fs::write(src.join(format!("public/{i}.txt")), format!("file {i}\n")).unwrap();
    }
    let root = mnt.join("root");
    std::fs::create_dir(&root).unwrap();
    let deploy = || {
        let (status, out, err) = run(
            Command::new(bin("dream"))
                .args(["deploy", "--json", "--root"])
                .arg(&root)
                .arg(&src),
            Duration::from_secs(60),
        );
        assert!(status.success(), "{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    let first = deploy();
    std::fs::write(src.join("public/0.txt"), "changed\n").unwrap();
    let second = deploy();
    assert_eq!(second["shared_files"], 19, "{second}");
    assert_eq!(second["reflinked_files"], 19, "{second}");
    let old = root
        .join("releases")
        .join(first["release"].as_str().unwrap())
        .join("public/5.txt");
    let new = root
        .join("releases")
        .join(second["release"].as_str().unwrap())
        .join("public/5.txt");
    use std::os::unix::fs::MetadataExt;
    assert_ne!(
        std::fs::metadata(&old).unwrap().ino(),
        std::fs::metadata(&new).unwrap().ino()
    );
    // Root ignores the read-only bits; the clone still protects the old release.
    std::fs::write(&new, "scribbled\n").unwrap();
    assert_eq!(std::fs::read_to_string(&old).unwrap(), "file 5\n");
}

/// Binding a privileged port without the right to says how to get it.
#[test]
fn a_privileged_port_without_privileges_explains_the_way_out() {
    if !nix::unistd::geteuid().is_root() {
        dream_testkit::prerequisite(
            false,
            "needs root to act as an unprivileged user with setpriv",
        );
        return;
    }
    let port = (900..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1000");
    let unprivileged_from: u16 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1024);
    if unprivileged_from <= port {
        eprintln!("skipped: ports from {unprivileged_from} up need no privilege here");
        return;
    }
    let (status, _, err) = run(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--",
            ])
            .arg(bin("dream"))
            .args(["listen", &format!("127.0.0.1:{port}"), "true"]),
        Duration::from_secs(20),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(
        err.contains("--user") && err.contains("cap_net_bind_service"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

/// 64 idle control connections made `deploy` fail with "too many control
/// clients" and mark a good release bad; a reload whose client hung up at
/// once was never carried out.
#[test]
fn idle_control_clients_make_room_and_a_taken_reload_is_carried_out() {
    let root = Root::new();
    for id in ["a", "b", "c"] {
        root.release(id, STATIC);
    }
    root.switch("a");
    let _sup = serve_on(&root, &["127.0.0.1:0"], &["--workers", "1"]);
    root.wait_live("a", 1);
    let sock = root.path().join(".dream/control.sock");
    let idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let s = root.control(r#"{"cmd":"status"}"#);
    assert_eq!(s["ok"], true, "{s}");
    // Taken, then its client is gone before the answer: still carried out.
    for id in ["b", "c"] {
        root.switch(id);
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(b"{\"cmd\":\"reload\"}\n").unwrap();
        drop(c);
        root.wait_live(id, 1);
    }
    drop(idle);
}

/// A supervisor that refuses to take a request ("busy") says nothing about
/// the release: `deploy` exits 111, switches `current` back, marks nothing
/// bad; `status` fails instead of printing `supervisor pid null`.
#[test]
fn a_supervisor_that_cannot_be_asked_marks_nothing_bad() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    tree.write("a/public/index.html", "a\n");
    tree.write("b/public/index.html", "b\n");
    let dream = |args: &[&str]| {
        run(
            Command::new(bin("dream"))
                .args(args)
                .arg("--root")
                .arg(&root),
            Duration::from_secs(60),
        )
    };
    let (st, _, err) = dream(&[
        "deploy",
        tree.path().join("a").to_str().unwrap(),
        "--id",
        "a",
    ]);
    assert!(st.success(), "{err}");
    // A peer that speaks the control protocol and refuses everything.
    let listener =
        std::os::unix::net::UnixListener::bind(root.join(".dream/control.sock")).unwrap();
    let refuser = std::thread::spawn(move || {
        for _ in 0..3 {
            let (mut c, _) = listener.accept().unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(&c), &mut line).unwrap();
            c.write_all(b"{\"ok\":false,\"refused\":\"busy\",\"error\":\"too many control clients, all waiting for an answer; try again\"}\n").unwrap();
        }
    });
    let (st, _, err) = dream(&[
        "deploy",
        tree.path().join("b").to_str().unwrap(),
        "--id",
        "b",
    ]);
    assert_eq!(st.code(), Some(111), "{err}");
    assert!(err.contains("not marked bad"), "{err}");
    assert_eq!(
        std::fs::read_link(root.join("current")).unwrap(),
        Path::new("releases/a")
    );
    let (st, out, err) = dream(&["status", "--json"]);
    assert_eq!(st.code(), Some(111), "{out} {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    refuser.join().unwrap();
    let (st, out, _) = dream(&["releases", "--json"]);
    assert!(st.success());
    let v: serde_json::Value =
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["releases"].take();
    let b = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "b")
        .expect("b kept");
    assert_eq!(b["state"], "ok", "{v}");
}

/// `dream serve … | cat` with `cat` stopped: a worker writing megabytes to
/// stderr blocked the supervisor in `write`, so `status` hung and a deploy
/// waited forever holding the lock. Output now goes through a bounded
/// queue; what the stalled reader cannot take is dropped and counted.
#[test]
fn a_stalled_output_reader_never_stalls_the_supervisor() {
    let root = Root::new();
    root.release(
        "noisy",
        &format!("head -c 3000000 /dev/zero | tr '\\0' x >&2\n{STATIC}"),
    );
    root.release("quiet", STATIC);
    root.switch("noisy");
    // stderr into a pipe that nobody reads (64 kB of room).
    // The read end stays open (and unread) until the test ends.
    let (_read_end, write_end) = nix::unistd::pipe().unwrap();
    let child = Command::new(bin("dream"))
        .args(["serve", "--root"])
        .arg(root.path())
        .args(["--listen", "127.0.0.1:0", "--workers", "1", "--", "./run"])
        .env("DREAM_BIN", bin("dream"))
        .stderr(std::process::Stdio::from(write_end))
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _sup = Kill(child);
    root.wait_supervisor();
    root.wait_live("noisy", 1);
    let s = wait_until(
        Duration::from_secs(20),
        "output dropped and counted",
        || {
            let s = root.control(r#"{"cmd":"status"}"#);
            (s["output_dropped_bytes"].as_u64()? > 0).then_some(s)
        },
    );
    assert_eq!(s["ok"], true);
    root.switch("quiet");
    let v = root.control(r#"{"cmd":"reload"}"#);
    assert_eq!(v["ok"], true, "{v}");
    root.wait_live("quiet", 1);
}

/// A free TCP port on 127.0.0.1 below the kernel's ephemeral range, to
/// bind explicitly (a socket bound to port 0 loses its port when it stops
/// listening). Below that range no other test's `bind(port 0)` can take it
/// between this check and the supervisor's bind.
/// `dream static` set O_NONBLOCK on the listener every worker shares, so a
/// later release whose server does a plain blocking `accept` (the seed's
/// own) crash-looped with EAGAIN. dream's workers leave the flags alone;
/// the supervisor names a worker's change when a worker fails with it.
#[test]
fn a_blocking_accept_server_follows_dream_static_and_flag_changes_are_named() {
    let root = Root::new();
    root.release("static", STATIC);
    root.release("seed", r#"exec "$PROBE_BIN" --seed-server"#);
    root.release("probe", r#"exec "$PROBE_BIN" --serve"#);
    root.switch("static");
    let spec = format!("127.0.0.1:{}", free_port());
    let mut sup = serve_on(&root, &[&spec], &["--workers", "2", "--ready", "notify"]);
    let addr: std::net::SocketAddr = spec.parse().unwrap();
    root.wait_live("static", 2);
    for _ in 0..10 {
        assert_eq!(get(addr, "/", &[]).status, 200);
    }
    root.switch("seed");
    let v = root.control(r#"{"cmd":"reload"}"#);
    assert_eq!(v["ok"], true, "{v}");
    // Once the old generation has drained, only the seed-style server
    // accepts (until then a dream static worker may still take one).
    root.wait_drained();
    for _ in 0..20 {
        let r = get(addr, "/", &[]);
        assert_eq!((r.status, r.text().trim()), (200, "release seed"));
    }
    assert_eq!(root.status().pool.restarts, 0);
    // The probe sets O_NONBLOCK on the listener every worker shares. That
    // alone harms no one (most runtimes do it): nothing is said at the
    // default verbosity. The seed-style server after it fails on EAGAIN:
    // then the change is named, with the failure it explains.
    root.switch("probe");
    let v = root.control(r#"{"cmd":"reload"}"#);
    assert_eq!(v["ok"], true, "{v}");
    root.wait_drained();
    assert!(
        !sup.stderr_now().contains("O_NONBLOCK"),
        "{}",
        sup.stderr_now()
    );
    // The seed-style server says READY=1 before its first accept: its
    // generation fails the reload, or goes live and is reverted by
    // probation when its workers crash, as the timing falls. Either way
    // the change is named, and the probe serves again.
    root.switch("seed");
    root.control(r#"{"cmd":"reload"}"#);
    let line = sup.wait_stderr("failed while listening socket", Duration::from_secs(10));
    assert!(
        line.contains("non-blocking (a worker set O_NONBLOCK on it)") && line.contains("EAGAIN"),
        "{line}"
    );
    root.wait_live("probe", 2);
    assert_eq!(get(addr, "/", &[]).status, 200, "the probe serves");
    // dream static on the listener left non-blocking (its accept thread
    // polls, then accepts; a lost race is EAGAIN) serves as on a blocking
    // one.
    root.switch("static");
    let v = root.control(r#"{"cmd":"reload"}"#);
    assert_eq!(v["ok"], true, "{v}");
    root.wait_drained();
    for _ in 0..20 {
        assert_eq!(get(addr, "/", &[]).status, 200);
    }
}

/// A worker's `shutdown(SHUT_RDWR)` on its inherited listener killed it
/// for every worker and every later generation. The supervisor notices
/// the hang-up and makes the socket listen again; no release is blamed.
#[test]
fn a_listener_shut_down_by_a_worker_listens_again() {
    let root = Root::new();
    root.release("good", STATIC);
    root.release(
        "rogue",
        &format!("\"$PROBE_BIN\" --shutdown-listener\n{STATIC}"),
    );
    root.switch("good");
    let spec = format!("127.0.0.1:{}", free_port());
    // One worker: each shutdown(2) also drops the connections queued at
    // that moment (the kernel's doing), so the test makes exactly one.
    let mut sup = serve_on(&root, &[&spec], &["--workers", "1"]);
    let addr: std::net::SocketAddr = spec.parse().unwrap();
    root.wait_live("good", 1);
    root.switch("rogue");
    let v = root.control(r#"{"cmd":"reload"}"#);
    assert_eq!(v["ok"], true, "{v}");
    sup.wait_stderr("listening again", Duration::from_secs(10));
    root.wait_drained();
    for _ in 0..20 {
        let r = get(addr, "/", &[]);
        assert_eq!((r.status, r.text().trim()), (200, "<p>release rogue</p>"));
    }
    root.switch("good");
    let v = root.control(r#"{"cmd":"reload"}"#);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(get(addr, "/", &[]).status, 200);
}

/// A process that escapes its worker's process group with `setsid` kept
/// serving the old release after a deploy and held the port after the
/// supervisor stopped. Nothing a generation started outlives it.
#[test]
fn processes_that_escape_with_setsid_end_with_their_generation() {
    let root = Root::new();
    let pids = root.tree.path().join("pids");
    std::fs::create_dir(&pids).unwrap();
    // Whatever happens, the escapees this test started are ended.
    struct EndEscapees(std::path::PathBuf);
    impl Drop for EndEscapees {
        fn drop(&mut self) {
            for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
                if let Some(pid) = std::fs::read_to_string(e.path())
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok())
                {
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
    let _end = EndEscapees(pids.clone());
    // Each release starts two: one that leaves its group with setsid, and
    // one that also clears its environment (so nothing of it says which
    // generation it came from).
    for id in ["a", "b"] {
        root.release(
            id,
            &format!(
                "setsid sh -c 'echo $$ > {dir}/{id}; exec sleep 1000' </dev/null >/dev/null 2>&1 &\n\
                 env -i /usr/bin/setsid /bin/sh -c 'echo $$ > {dir}/{id}-bare; exec /bin/sleep 1000' </dev/null >/dev/null 2>&1 &\n{STATIC}",
                dir = pids.display()
            ),
        );
    }
    root.switch("a");
    let port = free_port();
    let spec = format!("127.0.0.1:{port}");
    let mut sup = serve_on(&root, &[&spec], &["--workers", "1"]);
    root.wait_live("a", 1);
    let escapee = |id: &str| -> i64 {
        wait_until(Duration::from_secs(10), "the escapee's pid", || {
            std::fs::read_to_string(pids.join(id))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
    };
    let a = escapee("a");
    let a_bare = escapee("a-bare");
    assert!(alive(a) && alive(a_bare));
    root.switch("b");
    let v = root.control(r#"{"cmd":"reload"}"#);
    assert_eq!(v["ok"], true, "{v}");
    wait_until(
        Duration::from_secs(20),
        "generation 1's escapees to die",
        || (!alive(a) && !alive(a_bare)).then_some(()),
    );
    sup.wait_stderr("left its process group", Duration::from_secs(10));
    let b = escapee("b");
    let b_bare = escapee("b-bare");
    assert!(alive(b) && alive(b_bare));
    // The supervisor stops: the live generation's escapee goes too, and the
    // port is free again.
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(Duration::from_secs(20)).success());
    wait_until(
        Duration::from_secs(10),
        "generation 2's escapees to die",
        || (!alive(b) && !alive(b_bare)).then_some(()),
    );
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
}
