//! The socket hand-off through `dream listen` (and `dream loop`), checked
//! by the probe worker: exactly the expected descriptors, `LISTEN_PID`
//! equal to the worker's own pid, nothing else inherited.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dream_testkit::{Guard, Tree, bin, probe, read_report, run};
use serde_json::Value;

fn dream() -> std::path::PathBuf {
    bin("dream")
}

/// Runs `dream listen SPECS -- probe --report R --exit-after-report`.
fn listen_report(specs: &[String]) -> Value {
    let tree = Tree::new();
    let report = tree.path().join("report.json");
    let mut cmd = Command::new(dream());
    cmd.arg("listen")
        .args(specs)
        .arg("--")
        .arg(probe())
        .arg("--report")
        .arg(&report)
        .arg("--exit-after-report");
    let (status, _, err) = run(&mut cmd, Duration::from_secs(20));
    assert!(status.success(), "dream listen failed: {err}");
    read_report(&report)
}

fn fd_numbers(report: &Value) -> Vec<i64> {
    report["fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["fd"].as_i64().unwrap())
        .collect()
}

fn fd(report: &Value, n: i64) -> &Value {
    report["fds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fd"] == n)
        .unwrap_or_else(|| panic!("no fd {n} in {report:#}"))
}

/// Asserts the whole protocol for `specs` bound as `domains`.
fn assert_handoff(report: &Value, domains: &[&str]) {
    let n = domains.len() as i64;
    let expected: Vec<i64> = (0..3).chain(3..3 + n).collect();
    assert_eq!(
        fd_numbers(report),
        expected,
        "exactly 0,1,2 and the sockets: {report:#}"
    );
    let env = &report["env"];
    assert_eq!(env["LISTEN_PID"], report["pid"].to_string().as_str());
    assert_eq!(env["LISTEN_FDS"], n.to_string().as_str());
    let names = env["LISTEN_FDNAMES"].as_str().unwrap();
    assert_eq!(names.split(':').count() as i64, n, "{names}");
    // fd 0 is the first socket (the same open socket as fd 3).
    assert_eq!(fd(report, 0)["target"], fd(report, 3)["target"]);
    for (i, domain) in domains.iter().enumerate() {
        let f = fd(report, 3 + i as i64);
        assert_eq!(f["kind"], "socket");
        assert_eq!(f["listening"], true);
        assert_eq!(f["domain"], *domain);
        assert_eq!(
            f["cloexec"], false,
            "an inherited socket must survive exec: {f}"
        );
    }
    assert_eq!(fd(report, 0)["cloexec"], false);
}

fn ipv6_available() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

#[test]
fn tcp_v4_on_fd0_and_listen_fds() {
    let r = listen_report(&["127.0.0.1:0".into()]);
    assert_handoff(&r, &["ipv4"]);
    assert!(
        fd(&r, 3)["local"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
}

#[test]
fn tcp_v6_on_fd0_and_listen_fds() {
    if !ipv6_available() {
        dream_testkit::prerequisite(false, "no IPv6 loopback on this machine");
        return;
    }
    let r = listen_report(&["[::1]:0".into()]);
    assert_handoff(&r, &["ipv6"]);
    assert!(fd(&r, 3)["local"].as_str().unwrap().starts_with("[::1]:"));
}

#[test]
fn unix_on_fd0_and_listen_fds() {
    let tree = Tree::new();
    let sock = tree.path().join("app.sock");
    let r = listen_report(&[format!("unix:{}", sock.display())]);
    assert_handoff(&r, &["unix"]);
    // Bound under a temporary name in the same directory, then renamed into
    // place: getsockname still reports the name it was bound under.
    let local = fd(&r, 3)["local"].as_str().unwrap().to_string();
    assert!(
        local.starts_with(&format!("unix:{}/.app.sock.dream-", tree.path().display())),
        "{local}"
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&sock).unwrap().file_type().is_socket());
}

#[test]
fn several_sockets_in_order() {
    let tree = Tree::new();
    let sock = tree.path().join("b.sock");
    let mut specs = vec![
        "127.0.0.1:0".to_string(),
        format!("unix:{}", sock.display()),
    ];
    let mut domains = vec!["ipv4", "unix"];
    if ipv6_available() {
        specs.push("[::1]:0".into());
        domains.push("ipv6");
    }
    let r = listen_report(&specs);
    assert_handoff(&r, &domains);
}

#[test]
fn loop_stamps_each_child_with_its_own_pid() {
    let tree = Tree::new();
    let report = tree.path().join("report.json");
    let mut g = Guard::spawn(
        Command::new(dream())
            .args(["listen", "127.0.0.1:0", "--"])
            .arg(dream())
            .args(["loop", "1"])
            .arg(probe())
            .arg("--report")
            .arg(&report),
    );
    let r = read_report(&report);
    // dream listen exec'd dream loop (same pid); the probe is its child.
    assert_eq!(r["ppid"], g.pid());
    assert_ne!(r["pid"], g.pid());
    assert_handoff(&r, &["ipv4"]);
    g.signal(nix::sys::signal::Signal::SIGTERM);
    let status = g.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "loop exits 0 on TERM: {status:?}");
}

#[test]
fn malformed_spec_is_a_usage_error() {
    for spec in ["127.0.0.1:99999", "[::1:80", "1.2.3:80"] {
        let (status, _, err) = run(
            Command::new(dream()).args(["listen", spec, "true"]),
            Duration::from_secs(10),
        );
        assert_eq!(status.code(), Some(100), "{spec}: {err}");
        assert!(err.contains("malformed listen spec"), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn address_in_use_names_the_holder_and_is_temporary() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let (status, _, err) = run(
        Command::new(dream()).args(["listen", &addr, "true"]),
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(111), "{err}");
    assert!(err.contains("address already in use"), "{err}");
    assert!(err.contains(&addr), "{err}");
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
}

#[test]
fn missing_program_is_reported() {
    let (status, _, err) = run(
        Command::new(dream()).args(["listen", "127.0.0.1:0", "--", "/nonexistent/program"]),
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(111), "{err}");
    assert!(err.contains("/nonexistent/program"), "{err}");
}

#[test]
fn live_unix_socket_is_not_stolen() {
    let tree = Tree::new();
    let path = tree.path().join("live.sock");
    let _live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (status, _, err) = run(
        Command::new(dream())
            .arg("listen")
            .arg(format!("unix:{}", path.display()))
            .arg("true"),
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(111), "{err}");
    assert!(err.contains("a live server already answers there"), "{err}");
    assert!(Path::new(&path).exists());
}

#[test]
fn stale_listen_fds_do_not_leak_to_a_program_without_sockets() {
    // dream lock runs PROGRAM with no sockets: LISTEN_* meant for someone
    // else must not reach it.
    let tree = Tree::new();
    let report = tree.path().join("r.json");
    let (status, _, err) = run(
        Command::new(dream())
            .arg("lock")
            .arg(tree.path().join("lock"))
            .arg(probe())
            .arg("--report")
            .arg(&report)
            .arg("--exit-after-report")
            .env("LISTEN_FDS", "1")
            .env("LISTEN_PID", "1"),
        Duration::from_secs(10),
    );
    assert!(status.success(), "{err}");
    let r = read_report(&report);
    assert!(r["env"].get("LISTEN_FDS").is_none(), "{r:#}");
}
