//! A pause: nothing accepts, and connections wait in the backlog instead
//! of failing, while something old and new code cannot both run against
//! happens (a migration in the `pre-switch` hook); then the new release
//! takes everything that waited. Clients are real (`dream check`), the
//! supervisor and the workers are real processes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dream_testkit::{
    Referee, Saturate, Tree, current, dream_at as dream, run, serve_root, stamped_site, wait_until,
};

/// A site and an empty root, with `pre-switch` sleeping `hook_s` seconds.
fn setup(hook_s: u32) -> (Tree, PathBuf, PathBuf) {
    let tree = Tree::new();
    let site = stamped_site(&tree, "site", "");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    tree.write(
        "root/.dream/hooks/pre-switch",
        format!("#!/bin/sh\nsleep {hook_s}\n"),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join(".dream/hooks/pre-switch"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    (tree, site, root)
}

fn deploy(root: &Path, site: &Path, id: &str, extra: &[&str]) -> (Option<i32>, String) {
    let (status, out, err) = run(
        dream_testkit::deploy_stamped(root, site, id).args(extra),
        Duration::from_secs(90),
    );
    (status.code(), format!("{out}{err}"))
}

#[test]
fn a_paused_deploy_holds_every_client_through_a_migration_and_fails_none() {
    let (_tree, site, root) = setup(5);
    let (code, out) = deploy(&root, &site, "one", &["--no-hooks"]);
    assert_eq!(code, Some(0), "{out}");
    let (_sup, addr) = serve_root(&root, &["--workers", "2", "--ready", "notify"]);
    let _busy = Saturate::cores();
    let new_conns = Referee::start(addr, false);
    let keep_alive = Referee::start(addr, true);
    new_conns.wait_responses(50);
    keep_alive.wait_responses(50);
    let (code, out) = deploy(&root, &site, "two", &["--pause"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("paused") && out.contains("pre-switch"),
        "{out}"
    );
    assert_eq!(current(&root).as_deref(), Some("two"));
    new_conns.wait_responses(100);
    keep_alive.wait_responses(100);
    for report in [new_conns.finish(), keep_alive.finish()] {
        dream_testkit::assert_clean(&report);
        assert!(report.releases.contains_key("two"), "{}", report.human());
        // They waited through the 5 s migration, no longer.
        let worst = Duration::from_micros(report.latency.max_us);
        assert!(
            worst >= Duration::from_secs(4),
            "someone waited: {}",
            report.human()
        );
        assert!(
            worst <= Duration::from_secs(6),
            "at most the pause and a second: {}",
            report.human()
        );
    }
}

#[test]
fn a_pause_ends_by_itself_at_its_limit_and_answers_what_waited() {
    let (_tree, site, root) = setup(0);
    let (code, out) = deploy(&root, &site, "one", &["--no-hooks"]);
    assert_eq!(code, Some(0), "{out}");
    let (mut sup, addr) = serve_root(&root, &["--workers", "2", "--ready", "notify"]);
    let (code, _, err) = dream(&root, &["resume"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not paused"), "{err}");
    let (code, out, err) = dream(&root, &["pause", "--max", "2s"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("paused"), "{out}");
    let clients = Referee::start(addr, false);
    // Connections wait in the backlog, and status says so.
    wait_until(Duration::from_secs(10), "connections queued", || {
        let (_, out, _) = dream(&root, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v["pool"]["paused"].is_object() && v["sockets"][0]["queued"].as_u64()? > 0).then_some(())
    });
    sup.wait_stderr("the pause reached its limit", Duration::from_secs(20));
    clients.wait_responses(50);
    let report = clients.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    let worst = Duration::from_micros(report.latency.max_us);
    assert!(worst <= Duration::from_secs(4), "{}", report.human());
}

#[test]
fn a_paused_deploy_whose_release_does_not_start_goes_back_to_the_paused_one() {
    let (tree, site, root) = setup(1);
    let (code, out) = deploy(&root, &site, "one", &["--no-hooks"]);
    assert_eq!(code, Some(0), "{out}");
    let (_sup, addr) = serve_root(
        &root,
        &[
            "--workers",
            "2",
            "--ready",
            "notify",
            "--ready-timeout",
            "3s",
        ],
    );
    let clients = Referee::start(addr, false);
    clients.wait_responses(50);
    let broken = stamped_site(&tree, "broken", "echo cannot start >&2; exit 3\n");
    let (code, out) = deploy(&root, &broken, "two", &["--pause"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(current(&root).as_deref(), Some("one"));
    clients.wait_responses(100);
    let report = clients.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert!(!report.releases.contains_key("two"), "{}", report.human());
}

#[test]
fn a_backlog_that_would_overflow_during_a_pause_is_named() {
    let (_tree, site, root) = setup(0);
    let (code, out) = deploy(&root, &site, "one", &["--no-hooks"]);
    assert_eq!(code, Some(0), "{out}");
    let (mut sup, addr) = serve_root(
        &root,
        &["--workers", "1", "--ready", "notify", "--backlog", "64"],
    );
    let (code, _, err) = dream(&root, &["pause", "--max", "20s"]);
    assert_eq!(code, Some(0), "{err}");
    // 40 connections in the first second: at that rate 64 fill long
    // before the pause's 20 s are over.
    let waiting: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(addr).expect("the kernel completes the handshake"))
        .collect();
    let line = sup.wait_stderr("connections wait in a backlog of", Duration::from_secs(10));
    assert!(line.contains("a deeper --backlog"), "{line}");
    let (code, _, err) = dream(&root, &["resume"]);
    assert_eq!(code, Some(0), "{err}");
    drop(waiting);
}
