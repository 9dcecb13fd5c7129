//! A canary reload: the new release serves a share of new connections
//! beside the live one, is judged against it by the supervisor, and is
//! promoted or reverted without a person; no client is refused, reset or
//! served a mix at any step. The cores are kept busy where a verdict could
//! depend on load.

use std::process::Command;
use std::time::{Duration, Instant};

use dream_core::supervise::pool::GenerationState;
use dream_testkit::{Guard, Referee, Root, Saturate, bin, history, run, wait_until};

const GOOD: &str = r#"exec "$PROBE_BIN" --serve"#;
const FAILS_A_FIFTH: &str = r#"exec "$PROBE_BIN" --serve --fail-percent 20"#;
/// About 5x the baseline's latency under load, 30x on an idle host.
const SLOW: &str = r#"exec "$PROBE_BIN" --serve --delay-ms 40"#;
const EXITS_AFTER_1S: &str = r#"exec "$PROBE_BIN" --serve --exit-after-ms 1000"#;

/// `dream serve` with four workers that say READY=1.
fn serve(root: &Root) -> (Guard, std::net::SocketAddr) {
    root.serve(&["--ready", "notify", "--workers", "4"], &[])
}

/// `dream reload --canary ARGS` for `root`: exit code, stdout, stderr, and
/// how long it took.
fn canary(root: &Root, args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let t = Instant::now();
    let (status, out, err) = run(
        Command::new(bin("dream"))
            .args(["reload", "--root"])
            .arg(root.path())
            .args(args),
        Duration::from_secs(120),
    );
    (status.code(), out, err, t.elapsed())
}

/// Waits until only `release`'s live generation is left, with 4 workers.
fn wait_only(root: &Root, release: &str) {
    wait_until(
        Duration::from_secs(30),
        &format!("only {release} left"),
        || {
            let s = root.status();
            let g = &s.pool.generations;
            (g.len() == 1 && g[0].release == release && g[0].state == GenerationState::Live)
                .then_some(())
        },
    );
    root.wait_live(release, 4);
}

/// Errors other than a status a release chose to answer.
fn connection_errors(r: &dream_check::Report) -> u64 {
    r.error_total - r.errors.bad_status
}

#[test]
fn a_canary_failing_a_fifth_of_its_requests_is_reverted_early_and_the_live_one_never_moves() {
    let root = Root::new();
    root.release("a", GOOD);
    root.release("b", FAILS_A_FIFTH);
    root.switch("a");
    let (_sup, addr) = serve(&root);
    let before = root.wait_live("a", 4);
    let live_pids = dream_testkit::live_pids(&before);
    let _busy = Saturate::cores();
    let clients = Referee::start(addr, false);
    clients.wait_responses(50);
    root.switch("b");
    let (code, out, err, took) = canary(
        &root,
        &[
            "--canary",
            "1",
            "--judge-for",
            "30s",
            "--judge-path",
            "/judge",
            "--judge-min-requests",
            "30",
        ],
    );
    assert_eq!(code, Some(1), "reverted is a failure: {out}{err}");
    assert!(
        err.contains("reverted") && err.contains("error rate"),
        "the reason, with figures: {err}"
    );
    // Decided as soon as both sides had their sample, not at the window's end.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(root.current().as_deref(), Some("a"), "current went back");
    wait_only(&root, "a");
    let after = root.status();
    assert_eq!(
        dream_testkit::live_pids(&after),
        live_pids,
        "the live generation was never touched"
    );
    let events = history(root.path(), "b");
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        kinds.contains(&"canary") && kinds.contains(&"reverted"),
        "{events:?}"
    );
    clients.wait_responses(100);
    let report = clients.finish();
    assert_eq!(connection_errors(&report), 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
    let from_b = report.releases.get("b").copied().unwrap_or(0);
    assert!(from_b > 0, "the canary took its share: {}", report.human());
    // Clients' errors came from the canary alone, bounded by its share.
    assert!(report.errors.bad_status <= from_b, "{}", report.human());
    assert!(
        (report.errors.bad_status as f64) <= 0.25 * 0.2 * 2.0 * report.responses as f64 + 5.0,
        "{}",
        report.human()
    );
}

#[test]
fn a_slow_canary_is_reverted_and_a_healthy_one_promoted_with_its_share() {
    let root = Root::new();
    root.release("a", GOOD);
    root.release("slow", SLOW);
    root.release("c", GOOD);
    root.switch("a");
    let (_sup, addr) = serve(&root);
    root.wait_live("a", 4);
    let _busy = Saturate::cores();
    let clients = Referee::start(addr, false);
    clients.wait_responses(50);
    let judge = [
        "--canary",
        "1",
        "--judge-for",
        "8s",
        "--judge-path",
        "/health",
        "--judge-min-requests",
        "20",
    ];

    root.switch("slow");
    let (code, out, err, _) = canary(&root, &judge);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("latency"), "judged on latency: {err}");
    assert_eq!(root.current().as_deref(), Some("a"));
    wait_only(&root, "a");

    root.switch("c");
    let (code, out, err, _) = canary(&root, &judge);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("canary promoted"), "{out}");
    assert_eq!(root.current().as_deref(), Some("c"));
    wait_only(&root, "c");
    let events = history(root.path(), "c");
    let promoted = events
        .iter()
        .find(|(k, _)| k == "promoted")
        .unwrap_or_else(|| panic!("{events:?}"));
    // "canary 0.0% errors (0 of N) ...; its twin 0.0% errors (0 of M) ...;
    // R from the rest of the live generation": the judge's own requests
    // measure the share (the twin takes as much as the canary).
    let counts: Vec<f64> = promoted
        .1
        .split(" of ")
        .skip(1)
        .filter_map(|s| s.split(')').next()?.parse().ok())
        .collect();
    assert_eq!(counts.len(), 2, "{promoted:?}");
    let rest: f64 = promoted
        .1
        .split("; ")
        .find_map(|s| s.strip_suffix(" from the rest of the live generation, not compared"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{promoted:?}"));
    assert!(
        (0.5..=2.0).contains(&(counts[1] / counts[0])),
        "the twin takes as much as the canary: {promoted:?}"
    );
    let share = counts[0] / (counts[0] + counts[1] + rest);
    assert!(
        (0.12..=0.40).contains(&share),
        "1 worker of 4 takes about 25% of new connections, measured {share:.2}: {promoted:?}"
    );
    clients.wait_responses(100);
    let report = clients.finish();
    dream_testkit::assert_clean(&report);
}

#[test]
fn a_canary_whose_worker_exits_is_reverted_at_once() {
    let root = Root::new();
    root.release("a", GOOD);
    root.release("b", EXITS_AFTER_1S);
    root.switch("a");
    let (_sup, _addr) = serve(&root);
    root.wait_live("a", 4);
    root.switch("b");
    let (code, out, err, took) = canary(&root, &["--canary", "25%", "--judge-for", "60s"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("exited"), "{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(root.current().as_deref(), Some("a"));
    wait_only(&root, "a");
}

#[test]
fn a_canary_is_refused_with_a_reason_where_it_cannot_be_judged() {
    let root = Root::new();
    root.release("a", GOOD);
    root.switch("a");
    let (_sup, _addr) = serve(&root);
    root.wait_live("a", 4);
    // Of the very release that is live: nothing to compare.
    let (code, _, err, _) = canary(&root, &["--canary", "1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("already live"), "{err}");
    // As many workers as the live generation has: not a canary.
    let (code, _, err, _) = canary(&root, &["--canary", "4"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("would take all of it"), "{err}");
    for bad in [
        &["--canary", "0"][..],
        &["--canary", "150%"],
        &["--judge-for", "5s"],
    ] {
        let (code, _, err, _) = canary(&root, bad);
        assert_eq!(code, Some(100), "a usage error: {bad:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(root.status().pool.generations.len(), 1);
    // A supervisor that also listens on a Unix socket cannot share it.
    let unix = Root::new();
    unix.release("a", GOOD);
    unix.release("b", GOOD);
    unix.switch("a");
    let path = unix.path().join("app.sock");
    let (_sup, _addr) = unix.serve(
        &[
            "--ready",
            "notify",
            "--workers",
            "4",
            "--listen",
            &format!("unix:{}", path.display()),
        ],
        &[],
    );
    unix.wait_live("a", 4);
    unix.switch("b");
    let (code, _, err, _) = canary(&unix, &["--canary", "1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not a TCP socket"), "{err}");
    assert_eq!(unix.status().pool.generations.len(), 1, "nothing started");
}

#[test]
fn a_deploy_judged_as_dream_toml_says_and_a_hotfix_that_skips_it() {
    let tree = dream_testkit::Tree::new();
    let site = dream_testkit::stamped_site(&tree, "site", "");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(
        root.join("dream.toml"),
        "[deploy]\ncanary = \"25%\"\njudge_for = \"5s\"\njudge_path = \"/\"\njudge_min_requests = 5\n",
    )
    .unwrap();
    let deploy = |id: &str, extra: &[&str]| {
        let (status, out, err) = run(
            dream_testkit::deploy_stamped(&root, &site, id).args(extra),
            Duration::from_secs(90),
        );
        (status.code(), format!("{out}{err}"))
    };
    // No supervisor yet: nothing to judge against, nothing served.
    let (code, out) = deploy("one", &["--no-canary"]);
    assert_eq!(code, Some(0), "{out}");
    let (_sup, addr) = dream_testkit::serve_root(&root, &["--workers", "4", "--ready", "notify"]);
    let clients = Referee::start(addr, false);
    let keep_alive = Referee::start(addr, true);
    clients.wait_responses(30);
    keep_alive.wait_responses(30);
    let (code, out) = deploy("two", &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("canary") && out.contains("promoted"), "{out}");
    assert!(history(&root, "two").iter().any(|(k, _)| k == "promoted"));
    let (code, out) = deploy("three", &["--no-canary"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("promoted"), "{out}");
    assert!(!history(&root, "three").iter().any(|(k, _)| k == "canary"));
    // The judge's flags alone are a mistake, said in one line.
    let (code, out) = deploy("four", &["--no-canary", "--judge-for", "1s"]);
    assert_eq!(code, Some(100), "{out}");
    // A canary the supervisor cannot run is refused before anything starts:
    // the release is not at fault, and not marked bad.
    let (code, out) = deploy("five", &["--canary", "4"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("would take all of it") && out.contains("not marked bad"),
        "{out}"
    );
    assert_eq!(dream_testkit::current(&root).as_deref(), Some("three"));
    assert!(
        !history(&root, "five").iter().any(|(k, _)| k == "failed"),
        "{:?}",
        history(&root, "five")
    );
    clients.wait_responses(30);
    keep_alive.wait_responses(30);
    for report in [clients.finish(), keep_alive.finish()] {
        dream_testkit::assert_clean(&report);
    }
}

#[test]
fn an_interrupted_canary_deploy_withdraws_the_canary_and_marks_nothing_bad() {
    let tree = dream_testkit::Tree::new();
    let site = dream_testkit::stamped_site(&tree, "site", "");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let deploy = |id: &str| dream_testkit::deploy_stamped(&root, &site, id);
    let (status, _, err) = run(&mut deploy("one"), Duration::from_secs(60));
    assert!(status.success(), "{err}");
    let (_sup, addr) = dream_testkit::serve_root(&root, &["--workers", "4", "--ready", "notify"]);
    let clients = Referee::start(addr, false);
    clients.wait_responses(30);
    let status =
        || dream_core::supervise::control::status(&root, Some(Duration::from_secs(5))).ok();
    let live = dream_testkit::live_pids(&status().expect("status"));
    let mut d = Guard::spawn(deploy("two").args([
        "--canary",
        "1",
        "--judge-for",
        "60s",
        "--judge-path",
        "/",
    ]));
    wait_until(
        Duration::from_secs(30),
        "the canary to take its share",
        || {
            status()?
                .pool
                .generations
                .iter()
                .any(|g| g.state == GenerationState::Canary)
                .then_some(())
        },
    );
    d.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(d.wait_exit(Duration::from_secs(20)).code(), Some(130));
    assert_eq!(dream_testkit::current(&root).as_deref(), Some("one"));
    wait_until(Duration::from_secs(30), "only release one left", || {
        let s = status()?;
        (s.pool.generations.len() == 1 && s.pool.generations[0].release == "one").then_some(s)
    });
    assert_eq!(
        dream_testkit::live_pids(&status().expect("status")),
        live,
        "the live generation was not restarted"
    );
    let events: Vec<String> = history(&root, "two").into_iter().map(|(e, _)| e).collect();
    assert!(events.contains(&"canary".to_string()), "{events:?}");
    assert!(
        !events.contains(&"reverted".to_string()),
        "nothing marked bad: {events:?}"
    );
    clients.wait_responses(30);
    let report = clients.finish();
    dream_testkit::assert_clean(&report);
}

/// A live worker shuts the shared listener down in the middle of a canary's
/// window: the supervisor makes it listen again, which puts it at the end
/// of its `SO_REUSEPORT` group; the canary's and its twin's listeners are
/// put back after it, so each keeps its share (the twin would otherwise
/// have taken three quarters).
#[test]
fn a_listener_a_worker_shuts_down_during_a_canary_keeps_every_share() {
    let root = Root::new();
    root.release("a", GOOD);
    root.release("b", GOOD);
    root.switch("a");
    // A port of its own: one the kernel picked (port 0) is given up by a
    // shutdown(2), and could not be listened on again.
    let port = dream_testkit::free_port();
    let mut sup = Guard::spawn(
        Command::new(bin("dream"))
            .args(["serve", "--root"])
            .arg(root.path())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--ready", "notify", "--workers", "4", "--", "./run"])
            .env("PROBE_BIN", dream_testkit::probe()),
    );
    let addr = sup.listening_addr();
    root.wait_supervisor();
    let before = root.wait_live("a", 4);
    root.switch("b");
    let _judging = Guard::spawn(
        Command::new(bin("dream"))
            .args(["reload", "--root"])
            .arg(root.path())
            .args(["--canary", "1", "--judge-for", "60s", "--judge-path", "/"]),
    );
    let (canary, twin) = wait_until(Duration::from_secs(30), "the canary and its twin", || {
        let s = root.status();
        let judged: Vec<u64> = s
            .pool
            .generations
            .iter()
            .filter(|g| g.state == GenerationState::Canary)
            .map(|g| g.id)
            .collect();
        (judged.len() == 2).then(|| (judged[0], judged[1]))
    });
    let worker = dream_testkit::live_pids(&before)[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    sup.wait_stderr("listening again", Duration::from_secs(10));
    // No pause while a canary is judged: one line says why.
    let (code, _, err) = dream_testkit::dream_at(root.path(), &["pause"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot pause: a canary is being judged"),
        "{err}"
    );
    let mut counts = std::collections::HashMap::new();
    for _ in 0..400 {
        let r = dream_testkit::get(addr, "/", &[]);
        assert_eq!(r.status, 200);
        let g: u64 = r.header("x-dream-generation").unwrap().parse().unwrap();
        *counts.entry(g).or_insert(0u32) += 1;
    }
    let share = |g| counts.get(&g).copied().unwrap_or(0) as f64 / 400.0;
    // Status shows the canary, its share, its window and the judge so far.
    let s = root.status();
    let c = s
        .pool
        .generations
        .iter()
        .find(|g| g.id == canary)
        .and_then(|g| g.canary.clone())
        .expect("the canary in status");
    assert_eq!(c.share_basis, 2500);
    assert!(c.judged_s.is_some() && c.figures.is_some(), "{c:?}");
    assert!(c.verdict.is_some(), "{c:?}");
    assert!(s.human().contains("verdict so far"), "{}", s.human());
    assert!(
        (0.15..=0.35).contains(&share(canary)) && (0.15..=0.35).contains(&share(twin)),
        "canary {:.2} and twin {:.2} of 400 (25% each asked): {counts:?}",
        share(canary),
        share(twin)
    );
}
