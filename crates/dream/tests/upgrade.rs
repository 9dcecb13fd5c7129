//! `dream upgrade`: the supervisor replaces its own program in place.
//! Same pid, same listening socket, same workers (not restarted, not
//! reloaded), under load, with nothing refused, reset or mixed; and when
//! the new program cannot take over, the old one keeps serving.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dream_core::supervise::control::Status;
use dream_testkit::{Guard, Referee, Root, bin, live_pids, run, stopped, wait_until};
use nix::sys::signal::Signal;

const STATIC: &str = r#"exec "$DREAM_BIN" static --drain-grace 300ms"#;

/// `dream serve` on 127.0.0.1:0 with `extra` flags and `env`, once it serves.
fn serve(root: &Root, extra: &[&str], env: &[(&str, &str)]) -> (Guard, SocketAddr) {
    root.serve(&[&["--ready", "notify"], extra].concat(), env)
}

/// `dream upgrade --root ROOT ARGS --json`: exit code and answer.
fn upgrade(root: &Root, args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let (status, out, err) = run(
        Command::new(bin("dream"))
            .args(["upgrade", "--json", "--root"])
            .arg(root.path())
            .args(args),
        Duration::from_secs(60),
    );
    let v = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("upgrade answered no JSON ({e}): {out:?} {err}"));
    (status.code(), v, err)
}

/// A copy of the dream binary under another name: the "new" program.
fn copy_of_dream(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(bin("dream"), &to).expect("copy dream");
    to
}

/// What each of a process's descriptors points at, by number.
fn fds(pid: i64) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), target)
        })
        .collect();
    v.sort();
    v
}

/// The inode of the socket listening on `addr` (from /proc/net/tcp).
fn listener_inode(addr: SocketAddr) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port = format!(":{:04X}", addr.port());
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 9 && f[1].ends_with(&port) && f[3] == "0A")
        .and_then(|f| f[9].parse().ok())
        .expect("a listening socket on the port")
}

/// The supervisor's status, typed.
fn status(root: &Root) -> Status {
    root.status()
}

#[test]
fn ten_upgrades_between_two_builds_keep_the_pid_the_socket_and_every_worker() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let b = copy_of_dream(root.tree.path(), "dream-b");
    let a = bin("dream");
    let versions = format!("{}=1.0.0-a;{}=2.0.0-b", a.display(), b.display());
    let (sup, addr) = serve(
        &root,
        &["--workers", "2"],
        &[("DREAM_TEST_VERSIONS", &versions)],
    );
    let pid = sup.pid() as i64;
    let before = root.wait_live("a", 2);
    let workers = live_pids(&before);
    let handed = |v: Vec<(String, String)>| -> Vec<(String, String)> {
        v.into_iter()
            .filter(|(n, _)| ["0", "1", "2", "3"].contains(&n.as_str()))
            .collect()
    };
    let worker_fds: Vec<_> = workers.iter().map(|w| handed(fds(*w))).collect();
    assert!(worker_fds.iter().all(|f| f.len() == 4), "{worker_fds:?}");
    let inode = listener_inode(addr);
    // The program's own O_PATH descriptor names whichever build runs.
    let program = |v: Vec<(String, String)>| -> Vec<(String, String)> {
        v.into_iter()
            .map(|(n, t)| {
                let ours = t == a.to_string_lossy() || t == b.to_string_lossy();
                (n, if ours { "the program".into() } else { t })
            })
            .collect()
    };
    let supervisor_fds = program(fds(pid));
    let new_conns = Referee::start(addr, false);
    let keep_alive = Referee::start(addr, true);
    let mut expect_from = "1.0.0-a";
    for round in 1..=10 {
        let (to, to_version) = if round % 2 == 1 {
            (&b, "2.0.0-b")
        } else {
            (&a, "1.0.0-a")
        };
        new_conns.wait_responses(20);
        let (code, v, err) = upgrade(&root, &["--binary", to.to_str().unwrap()]);
        assert_eq!(code, Some(0), "round {round}: {v} {err}");
        assert_eq!(v["previous_version"], expect_from, "round {round}: {v}");
        assert_eq!(v["version"], to_version, "round {round}: {v}");
        expect_from = to_version;
        let s = status(&root);
        assert_eq!(s.pid as i64, pid, "round {round}: same pid");
        assert_eq!(s.upgrades, round, "round {round}: {s:?}");
        assert_eq!(s.version, to_version);
        assert_eq!(live_pids(&s), workers, "round {round}: the same workers");
        assert_eq!(s.pool.generations.len(), 1);
        assert_eq!(
            listener_inode(addr),
            inode,
            "round {round}: the same socket"
        );
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
            *to,
            "round {round}: the new program runs"
        );
        // Each worker still holds what the supervisor handed it (the
        // listener at fds 0 and 3, its output at 1 and 2; what it opened
        // itself, connections and files, comes and goes), and never the
        // state.
        for (w, before) in workers.iter().zip(&worker_fds) {
            let now = fds(*w);
            for fd in before {
                assert!(now.contains(fd), "round {round}: worker {w} lost {fd:?}");
            }
            assert!(
                now.iter().all(|(_, t)| !t.contains("memfd")),
                "round {round}: worker {w}: {now:?}"
            );
        }
        // No descriptor leaked: once the control clients of this round
        // have hung up, the supervisor holds what it held at first.
        let settled = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = program(fds(pid));
            assert!(
                now.iter().all(|(_, t)| !t.contains("memfd")),
                "round {round}: the state memfd is closed: {now:?}"
            );
            if now == supervisor_fds {
                break;
            }
            assert!(
                std::time::Instant::now() < settled,
                "round {round}: descriptors {now:?}, at first {supervisor_fds:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    keep_alive.wait_responses(50);
    new_conns.wait_responses(50);
    for report in [new_conns.finish(), keep_alive.finish()] {
        assert!(report.responses > 0);
        assert_eq!(report.error_total, 0, "{}", report.human());
        assert_eq!(report.mixed, 0, "{}", report.human());
    }
}

#[test]
fn a_failed_preflight_changes_nothing_and_exits_1() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let (sup, _addr) = serve(&root, &["--workers", "2"], &[]);
    let workers = live_pids(&root.wait_live("a", 2));
    let dir = root.tree.path();
    let script = |name: &str, body: &str| {
        let p = root.tree.write(name, format!("#!/bin/sh\n{body}\n"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    };
    let failing = script("exits-1", "echo 'no such luck' >&2; exit 1");
    let silent = script("says-nothing", "exit 0");
    let other_version = script(
        "reads-v2",
        "echo 'dream 9.0.0 reads upgrade state 2'; exit 0",
    );
    let missing = dir.join("not-there");
    for (binary, why) in [
        (missing.as_path(), "No such file"),
        (failing.as_path(), "exited with status 1: no such luck"),
        (silent.as_path(), "did not say it reads upgrade state"),
        (
            other_version.as_path(),
            "did not say it reads upgrade state",
        ),
    ] {
        let (code, v, err) = upgrade(&root, &["--binary", binary.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{}: {v} {err}", binary.display());
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains("pre-flight failed") && msg.contains(why),
            "{msg}"
        );
        let s = status(&root);
        assert_eq!(s.pid as i32, sup.pid());
        assert_eq!(s.upgrades, 0);
        assert_eq!(live_pids(&s), workers);
    }
}

#[test]
fn a_new_program_that_cannot_take_over_hands_back_to_the_old_one() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let b = copy_of_dream(root.tree.path(), "dream-refuses");
    let (sup, addr) = serve(
        &root,
        &["--workers", "2"],
        &[("DREAM_TEST_UPGRADE_REFUSE", b.to_str().unwrap())],
    );
    let workers = live_pids(&root.wait_live("a", 2));
    let referee = Referee::start(addr, true);
    referee.wait_responses(20);
    let (code, v, err) = upgrade(&root, &["--binary", b.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{v} {err}");
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("could not take over") && msg.contains("DREAM_TEST_UPGRADE_REFUSE"),
        "{msg}"
    );
    let s = status(&root);
    assert_eq!(s.pid as i32, sup.pid());
    assert_eq!(s.upgrades, 0, "{s:?}");
    assert_eq!(live_pids(&s), workers, "the workers were kept");
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", sup.pid())).unwrap(),
        bin("dream"),
        "the old program runs again"
    );
    // The old program is whole: it upgrades (to itself) the next time.
    let (code, v, _) = upgrade(&root, &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(status(&root).upgrades, 1);
    referee.wait_responses(20);
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
}

/// A new program that passes the pre-flight and then dies of SIGSEGV, or
/// hangs, before it resumes: the upgrade's guardian answers `dream upgrade`
/// (exit 1, the reason) and starts the old program again on the same
/// socket; a client opening a connection per request meanwhile is never
/// refused (the backlog holds it), and the new supervisor stops cleanly.
#[test]
fn a_new_program_that_dies_or_hangs_before_it_resumes_leaves_the_old_one_serving() {
    let _busy = dream_testkit::Saturate::cores();
    for (hook, why) in [
        ("DREAM_TEST_UPGRADE_CRASH", "ended before it resumed"),
        (
            "DREAM_TEST_UPGRADE_HANG",
            "did not resume within 3s; it was killed",
        ),
    ] {
        let root = Root::new();
        root.release("a", STATIC);
        root.switch("a");
        let b = copy_of_dream(root.tree.path(), "dream-dies");
        let (mut sup, addr) = serve(
            &root,
            &["--workers", "2"],
            &[
                (hook, b.to_str().unwrap()),
                ("DREAM_TEST_GUARD_LIMIT_MS", "3000"),
            ],
        );
        let old = sup.pid() as i64;
        let inode = listener_inode(addr);
        let before = status(&root);
        root.wait_live("a", 2);
        let referee = Referee::start(addr, false);
        referee.wait_responses(20);

        let (code, v, err) = upgrade(&root, &["--binary", b.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{hook}: {v} {err}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(why) && msg.contains("takes over with the same sockets"),
            "{hook}: {msg}"
        );
        let s = wait_until(
            Duration::from_secs(30),
            "a supervisor serving again",
            || {
                let s = dream_core::supervise::control::request(
                    root.path(),
                    &serde_json::json!({"cmd": "status"}),
                    Some(Duration::from_secs(5)),
                )
                .ok()?;
                let s: Status = serde_json::from_value(s).ok()?;
                (s.pid as i64 != old && live_pids(&s).len() == 2).then_some(s)
            },
        );
        let new = s.pid as i64;
        assert!(
            dream_testkit::gone(old),
            "{hook}: the upgraded process is gone"
        );
        assert_eq!(s.version, before.version, "{hook}: the old program");
        assert_eq!(
            std::fs::read_link(format!("/proc/{new}/exe")).unwrap(),
            bin("dream"),
            "{hook}: the old program runs"
        );
        assert_eq!(listener_inode(addr), inode, "{hook}: the same socket");
        sup.wait_stderr("taking over from a failed upgrade", Duration::from_secs(10));

        referee.wait_responses(50);
        let report = referee.finish();
        // The workers drain when the program that held them dies (their
        // parent-death signal is the drain signal): the requests they were
        // serving are answered, nothing is refused, cut or left waiting,
        // and the connections that queued meanwhile are all answered.
        assert_eq!(report.errors.total(), 0, "{hook}: {}", report.human());
        assert_eq!(report.mixed, 0, "{hook}: {}", report.human());

        nix::sys::signal::kill(nix::unistd::Pid::from_raw(new as i32), Signal::SIGTERM).unwrap();
        wait_until(Duration::from_secs(20), "the new supervisor to end", || {
            dream_testkit::gone(new).then_some(())
        });
    }
}

/// After a new program dies before it resumes, what its workers left that
/// ignores the drain signal (a shell and the server it started) is killed
/// by the supervisor that takes over, at its drain deadline, and named.
#[test]
fn what_ignores_the_drain_signal_after_a_failed_upgrade_is_killed_at_the_deadline() {
    let _busy = dream_testkit::Saturate::cores();
    let root = Root::new();
    root.release(
        "a",
        r#"trap '' TERM
"$DREAM_BIN" static --drain-grace 300ms <&3 &
wait"#,
    );
    root.switch("a");
    let b = copy_of_dream(root.tree.path(), "dream-dies");
    // The shell is the worker; the server it starts says READY=1, not it.
    let (mut sup, _addr) = root.serve(
        &[
            "--workers",
            "2",
            "--ready",
            "delay:300ms",
            "--drain-timeout",
            "1s",
        ],
        &[
            ("DREAM_TEST_UPGRADE_CRASH", b.to_str().unwrap()),
            ("DREAM_TEST_GUARD_LIMIT_MS", "3000"),
        ],
    );
    let old = sup.pid();
    let shells = live_pids(&root.wait_live("a", 2));
    let servers: Vec<i64> = shells
        .iter()
        .flat_map(|w| dream_testkit::children(*w as i32))
        .map(i64::from)
        .collect();
    assert_eq!(servers.len(), 2, "one server per worker shell");

    let (code, v, err) = upgrade(&root, &["--binary", b.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{v} {err}");
    sup.wait_stderr(
        &format!("supervisor pid {old} is gone and left 4 process(es) running"),
        Duration::from_secs(30),
    );
    sup.wait_stderr(
        "killed 4 process(es) a supervisor that is gone left running, past the drain deadline",
        Duration::from_secs(30),
    );
    for pid in shells.iter().chain(&servers) {
        wait_until(Duration::from_secs(10), "the strays to be gone", || {
            dream_testkit::gone(*pid).then_some(())
        });
    }
    // The supervisor that took over (not this test's child) ends its own.
    let new = root.wait_live("a", 2).pid as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), Signal::SIGQUIT).unwrap();
    wait_until(Duration::from_secs(20), "the new supervisor to end", || {
        dream_testkit::gone(new as i64).then_some(())
    });
}

/// Starts `dream upgrade` and waits until the supervisor has stopped itself
/// at its last step before the exec (the `upgrade-exec` test point).
fn upgrade_to_the_window(root: &Root, sup: i32) -> Guard {
    let g = Guard::spawn(
        Command::new(bin("dream"))
            .args(["upgrade", "--json", "--root"])
            .arg(root.path()),
    );
    wait_until(
        Duration::from_secs(20),
        "the supervisor to stop before its exec",
        || stopped(sup).then_some(()),
    );
    g
}

fn resume(sup: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sup), Signal::SIGCONT).unwrap();
}

#[test]
fn signals_and_exits_in_the_exec_window_are_handled_after_it() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let (mut sup, addr) = serve(
        &root,
        &["--workers", "2"],
        &[("DREAM_TEST_STOP_AFTER", "upgrade-exec")],
    );
    let pid = sup.pid();
    let workers = live_pids(&root.wait_live("a", 2));

    // A worker dies while the supervisor is between programs: the new one
    // reaps it and starts another in its place. (No load yet: a worker
    // killed mid-request resets its connections, by the test's doing.)
    let mut up = upgrade_to_the_window(&root, pid);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(workers[0] as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    resume(pid);
    assert!(up.wait_exit(Duration::from_secs(30)).success());
    let s = wait_until(Duration::from_secs(20), "the dead worker replaced", || {
        let s = status(&root);
        let now = live_pids(&s);
        (now.len() == 2 && !now.contains(&workers[0]) && now.contains(&workers[1])).then_some(s)
    });
    assert_eq!(s.pool.restarts, 1, "{s:?}");
    assert_eq!(s.upgrades, 1);

    // A HUP in the window is a reload once the new program runs, under
    // load, with nothing refused, reset or mixed.
    let referee = Referee::start(addr, false);
    referee.wait_responses(20);
    // A HUP in the window is a reload once the new program runs.
    let up = upgrade_to_the_window(&root, pid);
    sup.signal(Signal::SIGHUP);
    resume(pid);
    drop(up);
    wait_until(Duration::from_secs(20), "the HUP's reload", || {
        let s = status(&root);
        (s.upgrades == 2 && s.live().is_some_and(|g| g.id == 2)).then_some(())
    });
    root.wait_drained();
    referee.wait_responses(20);
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());

    // A TERM in the window is a graceful stop, not a death by signal.
    let up = upgrade_to_the_window(&root, pid);
    sup.signal(Signal::SIGTERM);
    resume(pid);
    let status = sup.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status:?}: {}", sup.stderr_now());
    drop(up);
}

#[test]
fn an_upgrade_during_a_reload_waits_for_it_and_a_second_is_refused() {
    let root = Root::new();
    root.release("a", STATIC);
    // Release b takes a second to be ready.
    root.release(
        "b",
        r#"sleep 1; exec "$DREAM_BIN" static --drain-grace 300ms"#,
    );
    root.switch("a");
    let (mut sup, _addr) = serve(&root, &["--workers", "1"], &[]);
    root.wait_live("a", 1);
    root.switch("b");
    let reload = Guard::spawn(
        Command::new(bin("dream"))
            .args(["reload", "--root"])
            .arg(root.path()),
    );
    wait_until(Duration::from_secs(10), "the reload to start", || {
        status(&root).pool.reloading.then_some(())
    });
    let mut first = Guard::spawn(
        Command::new(bin("dream"))
            .args(["upgrade", "--json", "--root"])
            .arg(root.path()),
    );
    sup.wait_stderr(
        "waiting for the reload in progress",
        Duration::from_secs(10),
    );
    let (code, v, _) = upgrade(&root, &[]);
    assert_eq!(code, Some(1), "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("already in progress")),
        "{v}"
    );
    assert!(first.wait_exit(Duration::from_secs(30)).success());
    drop(reload);
    sup.wait_stderr("upgraded in place", Duration::from_secs(10));
    let log = sup.stderr_now();
    let finished = log.find("reload finished").expect("the reload finished");
    let upgraded = log.find("upgrading in place").expect("the upgrade ran");
    assert!(
        finished < upgraded,
        "the upgrade waited for the reload:\n{log}"
    );
    let s = status(&root);
    assert_eq!(s.upgrades, 1);
    assert!(s.live().is_some_and(|g| g.release == "b"), "{s:?}");
}

/// Receives sd_notify datagrams until one stores a descriptor
/// (`FDSTORE=1`); returns its `FDNAME` and the descriptor.
fn receive_stored_fd(sock: &std::os::unix::net::UnixDatagram) -> (String, std::os::fd::OwnedFd) {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg};
    use std::os::fd::AsRawFd;
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    loop {
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let msg = recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("an sd_notify message within 20 s");
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(v) = c {
                fds.extend(v);
            }
        }
        let n = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.lines().any(|l| l == "FDSTORE=1") {
            assert_eq!(fds.len(), 1, "{text}");
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .expect("FDNAME")
                .to_string();
            // The descriptor the kernel just gave this process: owned once.
            let fd = dream_core::protocol::sys::claim_inherited_fd(fds[0]).expect("open");
            return (name, fd);
        }
    }
}

/// Under systemd (`NOTIFY_SOCKET`), the supervisor hands its listening
/// sockets to the service's descriptor store. If it dies, clients wait in
/// the stored socket's backlog, and a restart given the stored socket
/// (`LISTEN_FDS`, by name) serves them all: nobody is refused.
#[test]
fn under_systemd_the_sockets_are_stored_and_a_restart_with_them_refuses_no_one() {
    use std::os::unix::net::UnixDatagram;
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let notify_path = root.tree.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let port = dream_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let supervisor = |extra_env: &str| {
        // `sh` puts an inherited socket (stdin) at fd 3 and names it, as
        // systemd does for a restarted service; `exec` keeps its pid.
        let script = format!(
            "{extra_env} exec \"$DREAM\" serve --root \"$ROOT\" --listen {listen} --workers 2 --ready notify -- ./run"
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .env("DREAM", bin("dream"))
            .env("ROOT", root.path())
            .env("DREAM_BIN", bin("dream"))
            .env("NOTIFY_SOCKET", &notify_path);
        cmd
    };
    let mut first = Guard::spawn(&mut supervisor(""));
    root.wait_supervisor();
    root.wait_live("a", 2);
    let (name, stored) = receive_stored_fd(&notify);
    assert_eq!(name, format!("127.0.0.1_{port}"));
    // The supervisor dies hard; its workers go with it. Clients arriving
    // now wait in the backlog of the socket the store holds.
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10));
    let addr: SocketAddr = listen.parse().unwrap();
    let referee = Referee::start(addr, false);
    let mut cmd = supervisor(&format!(
        "exec 3<&0 0</dev/null; LISTEN_FDS=1 LISTEN_PID=$$ LISTEN_FDNAMES={name}"
    ));
    cmd.stdin(std::process::Stdio::from(stored));
    let mut second = Guard::spawn(&mut cmd);
    second.wait_stderr("the socket systemd kept", Duration::from_secs(10));
    root.wait_supervisor();
    root.wait_live("a", 2);
    referee.wait_responses(100);
    let report = referee.finish();
    assert!(report.responses >= 100);
    assert_eq!(report.error_total, 0, "{}", report.human());
}

/// A new program that hangs in its pre-flight never holds the supervisor:
/// status is answered and a killed worker replaced meanwhile; the upgrade
/// is refused when the pre-flight's limit passes. And the pre-flight is
/// handed the real state, so a program that cannot parse it is refused
/// before the exec.
#[test]
fn a_preflight_runs_beside_the_event_loop_and_reads_the_real_state() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let (sup, _addr) = serve(&root, &["--workers", "1"], &[]);
    let workers = live_pids(&root.wait_live("a", 1));
    let script = |name: &str, body: &str| {
        let p = root.tree.write(name, format!("#!/bin/sh\n{body}\n"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    };
    let started = root.tree.path().join("preflight-started");
    let hangs = script(
        "hangs",
        &format!("touch {}; exec sleep 60", started.display()),
    );
    let mut asking = Guard::spawn(
        Command::new(bin("dream"))
            .args(["upgrade", "--json", "--root"])
            .arg(root.path())
            .args(["--binary", hangs.to_str().unwrap()]),
    );
    wait_until(Duration::from_secs(10), "the pre-flight to start", || {
        started.exists().then_some(())
    });
    // While it hangs: answered, and a killed worker is replaced.
    let s = status(&root);
    assert_eq!(s.pid as i32, sup.pid());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(workers[0] as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(5), "the worker to be replaced", || {
        let s = status(&root);
        let now = live_pids(&s);
        (now.len() == 1 && now != workers && asking.child.try_wait().ok().flatten().is_none())
            .then_some(())
    });
    let code = asking.wait_exit(Duration::from_secs(30)).code();
    assert_eq!(code, Some(1), "{}", asking.stderr_now());
    // A program that reads the state on stdin and cannot take it over.
    let strict = script(
        "strict",
        "grep -q '\"this_field_is_not_there\"' || { echo 'missing field `this_field_is_not_there`' >&2; exit 1; }\necho 'dream 9.9.9 reads upgrade state 1'",
    );
    let (code, v, err) = upgrade(&root, &["--binary", strict.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{v} {err}");
    assert!(
        v["error"].as_str().unwrap().contains("missing field"),
        "{v}"
    );
    assert_eq!(status(&root).upgrades, 0);
}

/// Every setting survives an upgrade: the pool's settings as status shows
/// them, and the log format (the new program resumes before it parses its
/// arguments).
#[test]
fn every_setting_survives_an_upgrade() {
    let root = Root::new();
    root.release("a", STATIC);
    root.switch("a");
    let (mut sup, _addr) = serve(
        &root,
        &[
            "--workers",
            "2",
            "--log-format",
            "json",
            "--ready-timeout",
            "37s",
            "--drain-timeout",
            "13s",
            "--probation",
            "7s",
            "--drain-signal",
            "HUP",
            "--start-priority",
            "normal",
        ],
        &[],
    );
    root.wait_live("a", 2);
    // As JSON: every key status shows, typed or not, must survive.
    let before = root.control(r#"{"cmd":"status"}"#);
    let (code, v, err) = upgrade(&root, &[]);
    assert_eq!(code, Some(0), "{v} {err}");
    let after = root.control(r#"{"cmd":"status"}"#);
    let settings = &before["pool"]["settings"];
    assert_eq!(settings["probation"]["secs"], 7, "{before}");
    assert_eq!(settings["background_start"], false, "{before}");
    assert_eq!(settings, &after["pool"]["settings"], "{before} {after}");
    for key in ["verbosity", "binary"] {
        assert_eq!(before[key], after[key], "{key}");
    }
    // A line logged after the upgrade is still JSON.
    root.release("b", STATIC);
    root.switch("b");
    root.control(r#"{"cmd":"reload"}"#);
    let line = sup.wait_stderr("reload_finished", Duration::from_secs(20));
    let json = line.trim_start_matches("[child] ");
    let v: serde_json::Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("not JSON after the upgrade ({e}): {line}"));
    assert_eq!(v["event"], "reload_finished");
}
