//! `dream serve` with real workers: reloads under load, failing releases,
//! stubborn workers, crashes, storms, descriptor hygiene, the control
//! socket, systemd's protocols, and `dream pool`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};

use dream_testkit::{
    Guard, Referee, Root, alive, bin, get, live_pids, read_report, run, wait_until,
};
use nix::sys::signal::Signal;
use serde_json::Value;

const STATIC: &str = r#"exec "$DREAM_BIN" static --drain-grace 300ms"#;

/// Starts `dream serve` on `root` with `./run` as the command.
fn serve(root: &Root, extra: &[&str]) -> (Guard, std::net::SocketAddr) {
    root.serve(extra, &[])
}

/// `dream reload`, answered as soon as the new generation is live: these
/// tests are about the pool's own steps (the settle window after it is
/// `truth.rs`'s).
fn reload(root: &Root) -> (bool, String) {
    let (status, out, err) = run(
        Command::new(bin("dream"))
            .args(["reload", "--settle", "0s"])
            .arg("--root")
            .arg(root.path()),
        Duration::from_secs(120),
    );
    (status.success(), format!("{out}{err}"))
}

fn reloads_under_load(keep_alive: bool) {
    let root = Root::new();
    root.release("a", STATIC);
    root.release("b", STATIC);
    root.switch("a");
    let (mut sup, addr) = serve(&root, &["--workers", "2", "--ready", "notify"]);
    root.wait_live("a", 2);
    let referee = Referee::start(addr, keep_alive);
    for i in 0..20 {
        referee.wait_responses(20);
        let next = if i % 2 == 0 { "b" } else { "a" };
        root.switch(next);
        let (ok, out) = reload(&root);
        assert!(ok, "reload {i}: {out}");
        assert!(out.contains(&format!("release {next}")), "{out}");
    }
    referee.wait_responses(20);
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
    assert!(
        report.releases.len() == 2,
        "both releases served: {}",
        report.human()
    );
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(Duration::from_secs(20)).success());
    assert!(
        !root.path().join(".dream/control.sock").exists(),
        "removed at shutdown"
    );
}

#[test]
fn twenty_reloads_under_load_new_connections() {
    reloads_under_load(false);
}

#[test]
fn twenty_reloads_under_load_keep_alive() {
    reloads_under_load(true);
}

#[test]
fn a_crashing_release_fails_the_reload_and_the_old_keeps_serving() {
    let root = Root::new();
    root.release("good", STATIC);
    root.release(
        "bad",
        r#"echo "boom: config/database.yml is missing" >&2; exit 3"#,
    );
    root.switch("good");
    let (_sup, addr) = serve(&root, &["--workers", "2", "--ready", "notify"]);
    root.wait_live("good", 2);
    let referee = Referee::start(addr, true);
    referee.wait_responses(20);
    root.switch("bad");
    let (ok, out) = reload(&root);
    assert!(!ok, "the reload must fail: {out}");
    assert!(out.contains("exited with status 3"), "{out}");
    assert!(
        out.contains("boom: config/database.yml is missing"),
        "the stderr tail: {out}"
    );
    referee.wait_responses(50);
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.releases.keys().collect::<Vec<_>>(), vec!["good"]);
    assert_eq!(get(addr, "/", &[]).text(), "<p>release good</p>\n");
    let status = root.status();
    assert!(
        status.live().is_some_and(|g| g.release == "good"),
        "{status:?}"
    );
}

#[test]
fn a_never_ready_release_times_out_and_the_old_keeps_serving() {
    let root = Root::new();
    root.release("good", STATIC);
    root.release("mute", r#"exec "$PROBE_BIN" --serve --never-ready"#);
    root.switch("good");
    let (_sup, addr) = serve(
        &root,
        &[
            "--workers",
            "1",
            "--ready",
            "notify",
            "--ready-timeout",
            "1s",
        ],
    );
    root.wait_live("good", 1);
    root.switch("mute");
    let started = Instant::now();
    let (ok, out) = reload(&root);
    assert!(!ok);
    assert!(out.contains("not ready within 1s"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(get(addr, "/", &[]).text(), "<p>release good</p>\n");
}

#[test]
fn a_worker_that_ignores_the_drain_signal_is_killed_at_the_deadline() {
    let root = Root::new();
    root.release("stubborn", r#"exec "$PROBE_BIN" --serve --ignore-term"#);
    root.release("next", STATIC);
    root.switch("stubborn");
    let (_sup, _addr) = serve(
        &root,
        &[
            "--workers",
            "1",
            "--drain-timeout",
            "500ms",
            // READY=1 comes once the probe ignores TERM; readiness by time
            // could drain it before it had, and TERM would kill it.
            "--ready",
            "notify",
        ],
    );
    let old = live_pids(&root.wait_live("stubborn", 1))[0];
    root.switch("next");
    let (ok, out) = reload(&root);
    assert!(ok, "{out}");
    assert!(alive(old), "still draining right after the switch");
    let t = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the stubborn worker to be killed",
        || (!alive(old)).then_some(()),
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_killed_worker_is_replaced() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let (_sup, addr) = serve(&root, &["--workers", "2", "--ready", "notify"]);
    let pids = live_pids(&root.wait_live("a", 2));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0] as i32), Signal::SIGKILL).unwrap();
    let status = wait_until(Duration::from_secs(10), "a replacement worker", || {
        let s = root.status();
        let now = live_pids(&s);
        (now.len() == 2 && !now.contains(&pids[0]) && s.pool.restarts == 1).then_some(s)
    });
    assert!(
        live_pids(&status).contains(&pids[1]),
        "the other worker was left alone"
    );
    root.wait_live("a", 2);
    assert_eq!(get(addr, "/", &[]).status, 200);
}

#[test]
fn a_reload_storm_converges_to_one_live_generation() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let (sup, addr) = serve(&root, &["--workers", "1", "--ready", "notify"]);
    root.wait_live("a", 1);
    for _ in 0..50 {
        sup.signal(Signal::SIGHUP);
    }
    let status = wait_until(Duration::from_secs(30), "the storm to settle", || {
        let s = root.status();
        (s.pool.generations.len() == 1 && s.live().is_some() && !s.pool.reloading).then_some(s)
    });
    let id = status.pool.generations[0].id;
    assert!(id >= 2, "at least one reload ran: {status:?}");
    assert!(id <= 51, "{status:?}");
    assert_eq!(get(addr, "/", &[]).status, 200);
}

#[test]
fn workers_get_exactly_the_protocol_and_nothing_else() {
    let root = Root::new();
    let reports = root.tree.path().join("reports");
    std::fs::create_dir(&reports).unwrap();
    let dir = root.release(
        "a",
        &format!(
            r#"exec "$PROBE_BIN" --serve --report-dir {}"#,
            reports.display()
        ),
    );
    root.switch("a");
    let (_sup, _addr) = serve(&root, &["--workers", "3", "--ready", "notify"]);
    let status = root.wait_live("a", 3);
    let mut pids = live_pids(&status);
    pids.sort();
    let mut workers_seen = Vec::new();
    for pid in &pids {
        let r = read_report(&reports.join(format!("{pid}.json")));
        let fds: Vec<i64> = r["fds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["fd"].as_i64().unwrap())
            .collect();
        assert_eq!(fds, vec![0, 1, 2, 3], "{r:#}");
        assert_eq!(r["env"]["LISTEN_PID"], pid.to_string().as_str());
        assert_eq!(r["env"]["LISTEN_FDS"], "1");
        assert_eq!(r["env"]["DREAM_RELEASE"], "a");
        assert_eq!(
            r["env"]["DREAM_RELEASE_DIR"],
            dir.canonicalize().unwrap().to_str().unwrap()
        );
        assert_eq!(r["env"]["DREAM_GENERATION"], "1");
        // A socket file of its own in the root (what every client can use).
        let notify = r["env"]["NOTIFY_SOCKET"].as_str().unwrap();
        assert!(
            notify.starts_with(root.path().join(".dream/notify/").to_str().unwrap())
                && notify.ends_with(".sock"),
            "{notify}"
        );
        assert_eq!(r["cwd"], dir.canonicalize().unwrap().to_str().unwrap());
        assert_eq!(r["pgid"], *pid, "a process group of its own");
        assert_eq!(r["fds"][3]["listening"], true);
        assert_eq!(
            r["fds"][2]["kind"], "pipe",
            "stderr goes through the supervisor"
        );
        workers_seen.push(r["env"]["DREAM_WORKER"].as_str().unwrap().to_string());
    }
    workers_seen.sort();
    assert_eq!(workers_seen, vec!["0", "1", "2"]);
}

#[test]
fn the_control_socket_survives_garbage() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let (_sup, _addr) = serve(&root, &["--workers", "1"]);
    let sock = root.path().join(".dream/control.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let ask = |bytes: &[u8]| -> String {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !out.ends_with(b"\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    for bad in [
        &b"not json\n"[..],
        b"{\"cmd\":\"explode\"}\n",
        b"{\"cmd\":\"scale\",\"workers\":0}\n",
        b"{\"cmd\":\"scale\",\"workers\":5000}\n",
        b"\xff\xfe\x00\x01\n",
        b"[1,2,3]\n",
        // An unknown field: refused, and the reload is not carried out.
        b"{\"cmd\":\"reload\",\"bogus\":1}\n",
        b"{\"cmd\":\"stop\",\"now\":true}\n",
    ] {
        let answer = ask(bad);
        let v: Value = serde_json::from_str(answer.trim()).unwrap_or_else(|_| panic!("{answer:?}"));
        assert_eq!(v["ok"], false, "{answer}");
    }
    let s = root.status();
    assert_eq!(s.pool.generations.len(), 1, "{s:?}");
    assert_eq!(s.pool.generations[0].id, 1, "no reload, no stop: {s:?}");
    // A 100 MB line: refused once it passes the limit, without reading the rest.
    let huge = vec![b'x'; 100 << 20];
    assert!(ask(&huge).contains("longer than"));
    // Half a request, then a hang-up; and a client that never sends.
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"{\"cmd\":").unwrap();
    }
    let _silent = UnixStream::connect(&sock).unwrap();
    let status = root.status();
    assert!(status.ok);
    assert_eq!(status.pool.generations[0].release, "a");
    let scaled = root.control(r#"{"cmd":"scale","workers":2}"#);
    assert_eq!(scaled["ok"], true);
    root.wait_live("a", 2);
}

#[test]
fn status_and_reload_without_a_supervisor_say_so() {
    let root = Root::new();
    for cmd in ["status", "reload"] {
        let (status, _, err) = run(
            Command::new(bin("dream"))
                .arg(cmd)
                .arg("--root")
                .arg(root.path()),
            Duration::from_secs(10),
        );
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(err.contains("no supervisor is running"), "{err}");
    }
}

#[test]
fn serve_without_current_or_sockets_explains() {
    let root = Root::new();
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .arg("serve")
            .arg("--root")
            .arg(root.path())
            .args(["--listen", "127.0.0.1:0", "--", "true"]),
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("current does not exist"), "{err}");
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .arg("serve")
            .arg("--root")
            .arg(root.path())
            .args(["--", "true"])
            .env_remove("LISTEN_FDS"),
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(100), "{err}");
    assert!(err.contains("no --listen given"), "{err}");
}

/// The supervisor started by a socket holder with systemd's protocol, and
/// itself reporting to a systemd-like notify socket.
#[test]
fn inherited_listen_fds_and_systemd_notifications() {
    let root = Root::new();
    root.release("a", STATIC);
    root.release("b", STATIC);
    root.switch("a");
    let notify_path = root.tree.path().join("systemd.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut sup = Guard::spawn(
        Command::new(bin("dream"))
            .args(["listen", "127.0.0.1:0", "--"])
            .arg(bin("dream"))
            .arg("serve")
            .arg("--root")
            .arg(root.path())
            .args(["--workers", "1", "--ready", "notify", "--", "./run"])
            .env("DREAM_BIN", bin("dream"))
            .env("NOTIFY_SOCKET", &notify_path),
    );
    let addr = sup.listening_addr();
    let stored = std::cell::Cell::new(0);
    let recv = || {
        loop {
            let mut buf = [0u8; 1024];
            let n = notify.recv(&mut buf).expect("a notification");
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            // The listening socket handed to the fd store (tested with
            // the upgrade); here only the state changes are followed.
            if text.starts_with("FDSTORE=1\n") {
                stored.set(stored.get() + 1);
                continue;
            }
            return text;
        }
    };
    assert_eq!(recv(), "READY=1");
    assert_eq!(stored.get(), 1, "the one socket went to the fd store");
    assert_eq!(get(addr, "/", &[]).text(), "<p>release a</p>\n");
    root.switch("b");
    sup.signal(Signal::SIGHUP);
    let reloading = recv();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(recv(), "READY=1");
    // The old worker may take a connection until it has drained.
    root.wait_drained();
    assert_eq!(get(addr, "/", &[]).text(), "<p>release b</p>\n");
    sup.signal(Signal::SIGTERM);
    assert_eq!(recv(), "STOPPING=1");
    assert!(sup.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn pool_keeps_n_children_on_the_inherited_socket() {
    let tree = dream_testkit::Tree::new();
    let reports = tree.path().join("reports");
    std::fs::create_dir(&reports).unwrap();
    let mut pool = Guard::spawn(
        Command::new(bin("dream"))
            .args(["listen", "127.0.0.1:0", "--"])
            .arg(bin("dream"))
            .args(["pool", "-n", "3", "--ready", "delay:0s"])
            .arg(dream_testkit::probe())
            .args(["--serve", "--report-dir"])
            .arg(&reports)
            .env("DREAM_RELEASE", "p"),
    );
    let addr = pool.listening_addr();
    let files = wait_until(Duration::from_secs(10), "three reports", || {
        let f: Vec<_> = std::fs::read_dir(&reports)
            .ok()?
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .collect();
        (f.len() == 3).then_some(f)
    });
    for f in files {
        let r = read_report(&f.path());
        assert_eq!(r["env"]["LISTEN_PID"], r["pid"].to_string().as_str());
        assert_eq!(r["ppid"], pool.pid());
    }
    assert_eq!(get(addr, "/", &[]).text(), "release p\n");
    pool.signal(Signal::SIGQUIT);
    assert!(pool.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn ttin_ttou_scale_and_usr1_prints_status() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let (mut sup, addr) = serve(&root, &["--workers", "1", "--ready", "notify"]);
    root.wait_live("a", 1);
    // Identical pending signals coalesce: one at a time.
    sup.signal(Signal::SIGTTIN);
    root.wait_live("a", 2);
    sup.signal(Signal::SIGTTIN);
    root.wait_live("a", 3);
    sup.signal(Signal::SIGTTOU);
    let status = wait_until(Duration::from_secs(10), "two workers", || {
        let s = root.status();
        (live_pids(&s).len() == 2 && s.pool.workers_target == 2).then_some(s)
    });
    assert_eq!(status.pool.restarts, 0);
    sup.signal(Signal::SIGUSR1);
    sup.wait_stderr("generation 1 live: release a", Duration::from_secs(10));
    assert_eq!(get(addr, "/", &[]).status, 200);
}

#[test]
fn dream_toml_configures_serve_and_flags_win() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    root.tree.write(
        "dream.toml",
        "[serve]\nlisten = [\"127.0.0.1:0\"]\nworkers = 3\nready = \"notify\"\ncommand = [\"./run\"]\n",
    );
    let mut sup = Guard::spawn(
        Command::new(bin("dream"))
            .arg("serve")
            .arg("--root")
            .arg(root.path())
            .args(["--workers", "2"])
            .env("DREAM_BIN", bin("dream")),
    );
    let addr = sup.listening_addr();
    root.wait_supervisor();
    root.wait_live("a", 2);
    assert_eq!(
        root.status().pool.workers_target,
        2,
        "the flag wins over the file"
    );
    assert_eq!(get(addr, "/", &[]).status, 200);
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(Duration::from_secs(20)).success());

    root.tree.write("dream.toml", "[serve]\nworkrs = 3\n");
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .arg("serve")
            .arg("--root")
            .arg(root.path()),
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(100), "{err}");
    assert!(
        err.contains("workrs") && err.contains("dream.toml"),
        "{err}"
    );
}

#[test]
fn readiness_by_a_line_on_an_inherited_fd() {
    let root = Root::new();
    root.release(
        "a",
        r#"exec "$PROBE_BIN" --serve --never-ready --ready-fd 5"#,
    );
    root.release("mute", r#"exec "$PROBE_BIN" --serve --never-ready"#);
    root.switch("a");
    let (_sup, addr) = serve(
        &root,
        &["--workers", "2", "--ready", "fd:5", "--ready-timeout", "2s"],
    );
    root.wait_live("a", 2);
    assert_eq!(get(addr, "/", &[]).text(), "release a\n");
    root.switch("mute");
    let (ok, out) = reload(&root);
    assert!(!ok && out.contains("not ready within 2s"), "{out}");
    // fd 3 is the socket: the notification fd must come after it. (Another
    // root: this one's supervisor would be named first.)
    let other = Root::new();
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .arg("serve")
            .arg("--root")
            .arg(other.path())
            .args(["--listen", "127.0.0.1:0", "--ready", "fd:3", "--", "true"]),
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("collide"), "{err}");
}

#[test]
fn a_second_supervisor_for_the_same_root_is_refused() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let (_sup, _addr) = serve(&root, &["--workers", "1"]);
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .arg("serve")
            .arg("--root")
            .arg(root.path())
            .args(["--listen", "127.0.0.1:0", "--", "./run"]),
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("already running"), "{err}");
    // Refused before anything was bound: nothing said it was listening.
    assert!(!err.contains("listening"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(
        root.control(r#"{"cmd":"status"}"#)["ok"],
        true,
        "the first one is untouched"
    );
}

#[test]
fn status_warns_when_current_and_the_live_generation_disagree() {
    let root = Root::new();
    root.release("a", STATIC);
    root.release("b", STATIC);
    root.switch("a");
    let (_sup, _addr) = serve(&root, &["--workers", "1"]);
    root.wait_supervisor();
    let status = |json: bool| {
        let mut cmd = Command::new(bin("dream"));
        cmd.arg("status").arg("--root").arg(root.path());
        if json {
            cmd.arg("--json");
        }
        let (s, out, err) = run(&mut cmd, Duration::from_secs(10));
        assert!(s.success(), "{err}");
        out
    };
    assert!(!status(false).contains("warning"));
    root.switch("b");
    let text = status(false);
    assert!(
        text.contains("warning: current is b, but the live generation runs a"),
        "{text}"
    );
    let v: Value = serde_json::from_str(status(true).trim()).unwrap();
    assert_eq!(v["current"], "b");
}

/// A first generation that never becomes ready (`false`, a missing
/// program) made `serve` restart it forever. Now it gives up after the
/// ready timeout and exits 1 with the reason.
#[test]
fn a_first_generation_that_never_comes_up_ends_serve_with_the_reason() {
    for (script, says) in [
        ("exec false", "exited with status 1"),
        ("exec ./no-such-server", "exited with status 127"),
    ] {
        let root = Root::new();
        root.release("a", script);
        root.switch("a");
        let mut sup = Guard::spawn(
            Command::new(bin("dream"))
                .args(["serve", "--root"])
                .arg(root.path())
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--ready-timeout",
                    "1s",
                    "--",
                    "./run",
                ])
                .env_remove("NOTIFY_SOCKET"),
        );
        let status = sup.wait_exit(Duration::from_secs(20));
        assert_eq!(status.code(), Some(1), "{script}");
        let line = sup.wait_stderr("giving up", Duration::from_secs(5));
        assert!(line.contains("not ready within 1s"), "{line}");
        assert!(
            sup.stderr_seen.iter().any(|l| l.contains(says)),
            "{script}: {:?}",
            sup.stderr_seen
        );
    }
}

/// Events print as typed (`ready auto:1s`), with a timestamp on every line
/// and the right plurals; a worker drained with exit 0 does not have its
/// last words repeated as a failure would.
#[test]
fn serve_tells_the_truth_once() {
    let root = Root::new();
    for id in ["a", "b"] {
        root.release(
            id,
            &format!("trap 'echo LAST-WORDS-{id} >&2; exit 0' TERM\nwhile :; do sleep 0.05; done"),
        );
    }
    root.switch("a");
    let (mut sup, _addr) = serve(&root, &["--workers", "1"]);
    root.wait_live("a", 1);
    sup.wait_stderr("ready auto:1s", Duration::from_secs(5));
    root.switch("b");
    let (ok, out) = reload(&root);
    assert!(ok, "{out}");
    sup.wait_stderr("LAST-WORDS-a", Duration::from_secs(10));
    sup.wait_stderr("generation 1 drained", Duration::from_secs(10));
    sup.signal(Signal::SIGTERM);
    sup.wait_exit(Duration::from_secs(20));
    sup.wait_stderr("all workers gone", Duration::from_secs(5));
    let seen = &sup.stderr_seen;
    let words = seen.iter().filter(|l| l.contains("LAST-WORDS-a")).count();
    assert_eq!(words, 1, "{seen:#?}");
    assert!(
        seen.iter()
            .any(|l| l.contains("1 socket, 1 worker, ready auto:1s")),
        "{seen:#?}"
    );
    for l in seen.iter().filter(|l| l.contains("dream serve")) {
        assert!(l.starts_with("20"), "no timestamp: {l}");
    }
}

/// `-q` keeps warnings and failures: a crash-looping worker and a failed
/// reload are still reported; routine events are not.
#[test]
fn quiet_keeps_warnings_and_failures() {
    let root = Root::new();
    root.release("a", r#"exec "$PROBE_BIN" --serve --exit-after-ms 300"#);
    root.release("bad", "echo broken >&2; exit 3");
    root.switch("a");
    let (mut sup, _addr) = serve(&root, &["-q", "--workers", "1", "--ready", "notify"]);
    sup.wait_stderr("exited with status 4", Duration::from_secs(20));
    root.switch("bad");
    let (ok, _) = reload(&root);
    assert!(!ok);
    sup.wait_stderr("reload failed", Duration::from_secs(20));
    assert!(
        !sup.stderr_seen
            .iter()
            .any(|l| l.contains("worker 1.0 started")),
        "-q printed routine events: {:#?}",
        sup.stderr_seen
    );
}

/// `--log-format json`: every line of the supervisor's is one JSON object
/// with time, level, event and msg (the first, `listening`, included);
/// what a worker writes passes through untouched.
#[test]
fn json_logs_are_one_object_per_line_and_workers_pass_through() {
    let root = Root::new();
    root.release(
        "a",
        &format!("echo 'worker says hi, in its own format' >&2\n{STATIC}"),
    );
    root.switch("a");
    let mut sup = Guard::spawn(
        Command::new(bin("dream"))
            .args(["serve", "--root"])
            .arg(root.path())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--workers",
                "1",
                "--ready",
                "notify",
                // Its line too (it is bound first).
                "--metrics",
                "127.0.0.1:0",
            ])
            .args(["--log-format", "json", "--", "./run"])
            .env("DREAM_BIN", bin("dream")),
    );
    sup.wait_stderr("\"event\":\"generation_ready\"", Duration::from_secs(20));
    assert_eq!(root.control(r#"{"cmd":"reload"}"#)["ok"], true);
    sup.wait_stderr("\"event\":\"generation_drained\"", Duration::from_secs(20));
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(Duration::from_secs(20)).success());
    sup.wait_stderr("\"event\":\"exiting\"", Duration::from_secs(10));
    let lines = sup.stderr_now();
    let mut worker_lines = 0;
    let mut events = Vec::new();
    for line in lines.lines() {
        if line.starts_with("worker says hi") {
            worker_lines += 1;
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line:?}"));
        for key in ["time", "level", "event", "msg"] {
            assert!(v[key].is_string(), "{key} in {line}");
        }
        events.push(v["event"].as_str().unwrap().to_string());
    }
    assert_eq!(
        worker_lines, 2,
        "the workers' own lines, untouched:\n{lines}"
    );
    assert_eq!(
        events.first().map(String::as_str),
        Some("listening"),
        "{events:?}"
    );
    assert!(lines.contains("metrics on http://127.0.0.1:"), "{lines}");
    for e in [
        "worker_started",
        "worker_ready",
        "reload_finished",
        "stopping",
    ] {
        assert!(events.iter().any(|x| x == e), "{e} in {events:?}");
    }
}

/// `--metrics ADDR`: Prometheus text from the supervisor itself, across a
/// reload and an upgrade.
#[test]
fn metrics_count_workers_reloads_and_the_accept_queue() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let port = dream_testkit::free_port();
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _sup = Guard::spawn(
        Command::new(bin("dream"))
            .args(["serve", "--root"])
            .arg(root.path())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--workers",
                "2",
                "--ready",
                "notify",
            ])
            .args(["--metrics", &maddr.to_string(), "--", "./run"])
            .env("DREAM_BIN", bin("dream")),
    );
    root.wait_supervisor();
    root.wait_live("a", 2);
    // Another supervisor asking for the same metrics port is told which
    // of its addresses is taken, before it binds or says anything else.
    let other = Root::new();
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .args(["serve", "--root"])
            .arg(other.path())
            .args(["--listen", "127.0.0.1:0", "--metrics", &maddr.to_string()])
            .args(["--", "./run"]),
        Duration::from_secs(20),
    );
    assert_ne!(status.code(), Some(0), "{err}");
    assert!(
        err.contains("--metrics:") && err.contains(&maddr.to_string()),
        "{err}"
    );
    assert!(!err.contains("listening on"), "{err}");
    let scrape = || {
        let r = get(maddr, "/metrics", &[]);
        assert_eq!(r.status, 200);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
            "{:?}",
            r.header("content-type")
        );
        r.text()
    };
    let value = |text: &str, series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} in:\n{text}"))
    };
    let m = scrape();
    assert_eq!(value(&m, r#"dream_workers{state="ready"}"#), 2.0);
    assert_eq!(value(&m, r#"dream_generations{state="live"}"#), 1.0);
    assert_eq!(value(&m, r#"dream_reloads_total{outcome="ok"}"#), 0.0);
    assert!(
        value(&m, r#"dream_listen_queue_limit{socket="127.0.0.1_0"}"#) >= 128.0,
        "{m}"
    );
    assert_eq!(
        value(&m, r#"dream_listen_queue{socket="127.0.0.1_0"}"#),
        0.0
    );
    assert!(
        m.contains("# TYPE dream_reload_duration_seconds histogram"),
        "{m}"
    );
    assert_eq!(root.control(r#"{"cmd":"reload"}"#)["ok"], true);
    root.wait_drained();
    let m = scrape();
    assert_eq!(value(&m, r#"dream_reloads_total{outcome="ok"}"#), 1.0);
    assert_eq!(value(&m, "dream_reload_duration_seconds_count"), 1.0);
    // Per generation, labelled; no canary, not paused.
    assert_eq!(
        value(
            &m,
            r#"dream_generation_workers{generation="2",release="a",role="live",state="ready"}"#
        ),
        2.0
    );
    assert_eq!(value(&m, "dream_canary_share"), 0.0);
    assert_eq!(value(&m, "dream_paused"), 0.0);
    assert_eq!(
        value(&m, r#"dream_reload_duration_seconds_bucket{le="+Inf"}"#),
        1.0
    );
    assert_eq!(get(maddr, "/", &[]).status, 404);
    // Workers that stop accepting (stopped): clients wait in the backlog,
    // and the accept queue shows them.
    let s = root.status();
    let pids = live_pids(&s);
    for p in &pids {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p as i32), Signal::SIGSTOP).unwrap();
    }
    // (kill returns before the stop takes effect: until then a worker
    // could still accept.)
    for p in &pids {
        wait_until(Duration::from_secs(10), "the worker to stop", || {
            dream_testkit::stopped(*p as i32).then_some(())
        });
    }
    let addr: std::net::SocketAddr = s.sockets[0].address.parse().unwrap();
    let waiting: Vec<std::net::TcpStream> = (0..5)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape();
        if value(&m, r#"dream_listen_queue{socket="127.0.0.1_0"}"#) >= 5.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queue never showed the 5 waiting clients ({pids:?} stopped):\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in &pids {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p as i32), Signal::SIGCONT).unwrap();
    }
    drop(waiting);
    // The metrics listener crosses an upgrade with the rest.
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .args(["upgrade", "--root"])
            .arg(root.path()),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    let m = scrape();
    assert_eq!(value(&m, "dream_upgrades_total"), 1.0);
    assert_eq!(value(&m, r#"dream_reloads_total{outcome="ok"}"#), 1.0);
}

/// The scheduling policy of thread `tid` of `pid` (field 41 of its stat:
/// 0 SCHED_OTHER, 5 SCHED_IDLE).
fn policy(pid: i64, tid: &str) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // After the command name in parentheses, fields start at 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(41 - 3)?.parse().ok()
}

/// Every thread's policy of `pid`.
fn policies(pid: i64) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| policy(pid, e.file_name().to_str()?))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn reload_workers_start_in_the_background_until_ready() {
    if !dream_testkit::prerequisite(
        nix::unistd::geteuid().is_root(),
        "root (CAP_SYS_NICE) to put workers back at normal priority",
    ) {
        return;
    }
    let root = Root::new();
    // Each worker writes down the policy it started under; `slow` takes
    // longer than the 0.5 s a background start may last, and writes down
    // its policy again before it starts serving.
    let note = r#"cut -d' ' -f41 /proc/$$/stat > "$DREAM_RELEASE_DIR/policy-$DREAM_GENERATION-$DREAM_WORKER""#;
    root.release("a", &format!("{note}\n{STATIC}"));
    // b's worker forks a process of its own before it is ready, as a
    // master process forks its workers: it inherited SCHED_IDLE too.
    root.release("b", &format!("{note}\nsleep 60 &\n{STATIC}"));
    root.release(
        "slow",
        &format!(
            "{note}\nsleep 1.5\ncut -d' ' -f41 /proc/$$/stat > \"$DREAM_RELEASE_DIR/later-$DREAM_WORKER\"\n{STATIC}"
        ),
    );
    root.switch("a");
    let (mut sup, _addr) = serve(&root, &["--workers", "2", "--ready", "notify"]);
    root.wait_live("a", 2);
    let read = |path: &str| {
        std::fs::read_to_string(root.path().join("releases").join(path))
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .to_string()
    };
    // The first generation: no one serves yet, so full speed.
    assert_eq!(read("a/policy-1-0"), "0");
    root.switch("b");
    let (ok, out) = reload(&root);
    assert!(ok, "{out}");
    // Reloaded while a served: started under SCHED_IDLE, every thread
    // back under SCHED_OTHER once ready.
    assert_eq!(read("b/policy-2-0"), "5");
    assert_eq!(read("b/policy-2-1"), "5");
    let status = root.wait_live("b", 2);
    for pid in live_pids(&status) {
        let p = policies(pid);
        assert!(p.len() > 1, "a dream static worker has threads: {p:?}");
        assert!(p.iter().all(|&x| x == 0), "pid {pid}: {p:?}");
        let children = dream_testkit::children(pid as i32);
        assert_eq!(children.len(), 1, "the worker's own child: {children:?}");
        assert_eq!(policies(children[0].into()), vec![0], "its child too");
    }
    // A worker not ready within 0.5 s goes on at normal priority.
    root.switch("slow");
    let (ok, out) = reload(&root);
    assert!(ok, "{out}");
    assert_eq!(read("slow/policy-3-0"), "5");
    assert_eq!(read("slow/later-0"), "0");
    assert_eq!(read("slow/later-1"), "0");
    // With --start-priority normal nothing starts in the background.
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(Duration::from_secs(30)).success());
    let (mut sup, _addr) = serve(
        &root,
        &[
            "--workers",
            "1",
            "--ready",
            "notify",
            "--start-priority",
            "normal",
        ],
    );
    root.wait_live("slow", 1);
    std::fs::remove_file(root.path().join("releases/b/policy-2-0")).unwrap();
    root.switch("b");
    let (ok, out) = reload(&root);
    assert!(ok, "{out}");
    root.wait_live("b", 1);
    assert_eq!(read("b/policy-2-0"), "0", "generation 2 of this supervisor");
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(Duration::from_secs(30)).success());
}

/// A Python worker on fd 0 that runs `before` (with the socket as `s`),
/// sends `READY=1` to the address `to` (an expression of `n`, the
/// `NOTIFY_SOCKET`), then answers every connection with one short response.
fn python_worker(before: &str, to: &str) -> String {
    format!(
        r#"exec python3 -c '
import os, socket
s = socket.socket(fileno=0)
{before}
n = os.environ["NOTIFY_SOCKET"]
u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
u.sendto(b"READY=1", {to})
while True:
    c, _ = s.accept()
    c.recv(4096)
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    c.close()
'"#
    )
}

/// Node, gunicorn and uvicorn call listen(2) again on the socket they are
/// given, with their own backlog: the supervisor sets its own back (the
/// metric shows it) and says so once per generation.
#[test]
fn a_backlog_a_worker_shrinks_is_set_back() {
    let root = Root::new();
    // As those runtimes do: listen(2) on the inherited socket, then serve.
    let worker = python_worker(
        "s.listen(16)",
        r#""\0" + n[1:] if n.startswith("@") else n"#,
    );
    root.release("a", &worker);
    root.release("b", &worker);
    root.switch("a");
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{}", dream_testkit::free_port())
        .parse()
        .unwrap();
    let (mut sup, addr) = root.serve(
        &[
            "--workers",
            "2",
            "--ready",
            "notify",
            "--metrics",
            &maddr.to_string(),
        ],
        &[],
    );
    root.wait_live("a", 2);
    let told = |sup: &mut Guard| {
        sup.stderr_now()
            .matches("with a backlog of 16; set back to")
            .count()
    };
    wait_until(Duration::from_secs(20), "the backlog set back", || {
        (told(&mut sup) >= 1).then_some(())
    });
    let limit = || -> f64 {
        let text = get(maddr, "/metrics", &[]).text();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(r#"dream_listen_queue_limit{socket="127.0.0.1_0"}"#)?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no queue limit in:\n{text}"))
    };
    assert!(limit() > 16.0, "{}", limit());
    assert_eq!(get(addr, "/", &[]).status, 200);
    // The next generation does it again: set back again, told again.
    root.switch("b");
    assert_eq!(root.control(r#"{"cmd":"reload"}"#)["ok"], true);
    wait_until(
        Duration::from_secs(20),
        "the backlog set back again",
        || (told(&mut sup) >= 2).then_some(()),
    );
    assert!(limit() > 16.0, "{}", limit());
}

/// A client that takes `NOTIFY_SOCKET` as a file path only (as Ruby's
/// sd_notify gem does, which puma uses): with the default it becomes ready;
/// the socket files go with their workers. `--notify-socket abstract`
/// gives `@…` (which that client cannot use: the reload fails, nothing
/// else changes).
#[test]
fn notify_sockets_are_files_that_every_client_can_use() {
    let root = Root::new();
    let worker = python_worker("", "n");
    root.release("a", &worker);
    root.release("b", &worker);
    root.switch("a");
    let (sup, addr) = serve(&root, &["--workers", "2", "--ready", "notify"]);
    root.wait_live("a", 2);
    assert_eq!(get(addr, "/", &[]).status, 200);
    let dir = root.path().join(".dream/notify");
    let socks = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(socks().len(), 2, "{:?}", socks());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o711, "the directory is not listable by others");
    let first = socks();
    root.switch("b");
    let (ok, out) = reload(&root);
    assert!(ok, "{out}");
    root.wait_drained();
    // Generation 1's files went with its workers.
    wait_until(
        Duration::from_secs(10),
        "generation 1's sockets removed",
        || {
            let now = socks();
            (now.len() == 2 && now.iter().all(|s| !first.contains(s))).then_some(())
        },
    );
    drop(sup);

    // Asked for abstract sockets: this client cannot use them.
    let other = Root::new();
    other.release("a", &worker);
    other.switch("a");
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .args(["serve", "--root"])
            .arg(other.path())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--ready",
                "notify",
                "--ready-timeout",
                "3s",
                "--notify-socket",
                "abstract",
                "--",
                "./run",
            ]),
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("not ready within 3s"), "{err}");
}

/// A root whose notify directory cannot be made (a file stands there):
/// the supervisor says so once and gives its workers abstract sockets,
/// which a client that takes either form uses to become ready.
#[test]
fn without_a_notify_directory_workers_get_abstract_sockets() {
    let root = Root::new();
    let worker = python_worker("", r#""\0" + n[1:] if n.startswith("@") else n"#);
    root.release("a", &worker);
    root.switch("a");
    let dir = root.path().join(".dream/notify");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    std::fs::write(&dir, "not a directory").unwrap();
    let (mut sup, addr) = serve(&root, &["--workers", "2", "--ready", "notify"]);
    let said = sup.wait_stderr("abstract sockets instead", Duration::from_secs(20));
    assert!(said.contains("notify sockets: cannot use"), "{said}");
    root.wait_live("a", 2);
    assert_eq!(get(addr, "/", &[]).status, 200);
    assert_eq!(
        std::fs::read_to_string(&dir).unwrap(),
        "not a directory",
        "the file is left as it was"
    );
}
