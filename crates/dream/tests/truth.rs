//! dream's word against what is on disk and what serves: a manifest names
//! exactly the bytes its release holds, even when the source is being
//! rewritten while it is staged.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dream_testkit::{Guard, Tree, bin, dream, run};

/// Bytes that differ on every call (a xorshift over a seed from the clock).
fn random_bytes(seed: &mut u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            b'A' + (*seed % 26) as u8
        })
        .collect()
}

#[test]
fn a_source_rewritten_while_staged_is_never_recorded_wrong() {
    let tree = Tree::new();
    let src = tree.path().join("src");
    let root = tree.path().join("root");
    std::fs::create_dir(&src).unwrap();
    std::fs::create_dir(&root).unwrap();
    let hot = src.join("hot.txt");
    std::fs::write(&hot, vec![b'A'; 4096]).unwrap();
    std::fs::write(src.join("index.html"), "<p>steady</p>").unwrap();
    let (code, _, err) = dream(&[
        "deploy",
        "--root",
        root.to_str().unwrap(),
        src.to_str().unwrap(),
        "--no-reload",
    ]);
    assert_eq!(code, Some(0), "{err}");
    // A writer rewrites the file in place, same size, new bytes, as an
    // editor or a build tool still writing would.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, hot) = (stop.clone(), hot.clone());
        std::thread::spawn(move || {
            use std::io::{Seek, Write};
            let mut seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1;
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let mut f = std::fs::OpenOptions::new().write(true).open(&hot).unwrap();
                for _ in 0..4 {
                    f.write_all(&random_bytes(&mut seed, 1024)).unwrap();
                }
                f.rewind().unwrap();
                rounds += 1;
                // Bursts with quiet gaps of random length (a load
                // pattern, not a synchronisation), so some deploys see a
                // settled file and some a file mid-rewrite.
                if rounds % 64 == 0 {
                    std::thread::sleep(Duration::from_micros(seed % 20_000));
                }
            }
            rounds
        })
    };
    let (mut deployed, mut refused) = (0, 0);
    for _ in 0..40 {
        let (code, out, err) = dream(&[
            "deploy",
            "--root",
            root.to_str().unwrap(),
            src.to_str().unwrap(),
            "--no-reload",
            "--keep",
            "50",
        ]);
        match code {
            Some(0) => deployed += 1,
            Some(1) if err.contains("hot.txt: changed while staging; try again") => refused += 1,
            other => panic!("exit {other:?}: {out}{err}"),
        }
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = writer.join().unwrap();
    assert!(rounds > 40, "the writer hardly ran ({rounds} rewrites)");
    eprintln!("{deployed} deployed, {refused} refused as changed while staging, {rounds} rewrites");
    // Every release holds exactly what its manifest names.
    let (code, out, err) = dream(&["releases", "--root", root.to_str().unwrap(), "--verify"]);
    assert_eq!(
        code,
        Some(0),
        "after {deployed} deploys and {refused} refusals: {out}{err}"
    );
    // And the settled source, deployed once more, is what goes live.
    let settled = random_bytes(&mut 0x9e37_79b9_7f4a_7c15, 4096);
    std::fs::write(&hot, &settled).unwrap();
    let (code, _, err) = dream(&[
        "deploy",
        "--root",
        root.to_str().unwrap(),
        src.to_str().unwrap(),
        "--no-reload",
        "--keep",
        "50",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        std::fs::read(root.join("current/hot.txt")).unwrap(),
        settled
    );
}

/// A release whose workers die at once, deployed while both cores are
/// saturated and clients keep the site busy, under a timed readiness: the
/// deploy fails every time (it used to report "deployed", exit 0, for a
/// worker starved of the CPU that had not yet run, and probation reverted
/// it a moment later).
#[test]
fn a_timed_readiness_never_fires_for_a_worker_starved_of_the_cpu() {
    let tree = Tree::new();
    let root = dream_testkit::Root::new();
    let good = dream_testkit::stamped_site(&tree, "good", "");
    let bad = dream_testkit::stamped_site(&tree, "bad", "echo starting; exit 1\n");
    let deploy = |src: &std::path::Path| {
        run(
            Command::new(bin("dream"))
                .arg("deploy")
                .arg(src)
                .arg("--root")
                .arg(root.path())
                .args(["--build", dream_testkit::STAMP]),
            Duration::from_secs(120),
        )
    };
    let (status, _, err) = deploy(&good);
    assert!(status.success(), "{err}");
    let (_sup, addr) =
        dream_testkit::serve_root(root.path(), &["--ready", "delay:200ms", "--workers", "2"]);
    let live = std::fs::read_link(root.path().join("current")).unwrap();
    let referee = dream_testkit::Referee::start(addr, true);
    referee.wait_responses(50);
    let _busy = dream_testkit::Saturate::cores();
    for round in 0..5 {
        let (status, out, err) = deploy(&bad);
        assert_eq!(
            status.code(),
            Some(1),
            "round {round}: a release whose workers exit at once was reported as: {out}{err}"
        );
        assert_eq!(
            std::fs::read_link(root.path().join("current")).unwrap(),
            live
        );
    }
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
}

/// `dream deploy --root ROOT SRC ARGS…` within a deadline.
fn deploy_to(
    root: &std::path::Path,
    src: &std::path::Path,
    args: &[&str],
) -> (Option<i32>, String, String) {
    let (status, out, err) = run(
        Command::new(bin("dream"))
            .arg("deploy")
            .arg(src)
            .arg("--root")
            .arg(root)
            .args(["--build", dream_testkit::STAMP])
            .args(args),
        Duration::from_secs(120),
    );
    (status.code(), out, err)
}

fn current_id(root: &std::path::Path) -> String {
    std::fs::read_link(root.join("current"))
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// A release that serves, says it is ready, and crashes (exit 4) 300 ms
/// later: the probe in place of the worker, so nothing it starts can
/// outlive the test.
const CRASHES_SOON: &str = r#"exec "$PROBE_BIN" --serve --exit-after-ms 300
"#;

#[test]
fn a_release_that_crashes_after_going_live_fails_the_deploy_inside_its_settle_window() {
    let tree = Tree::new();
    let root = dream_testkit::Root::new();
    let good = dream_testkit::stamped_site(&tree, "good", "");
    tree.write("bad/public/index.html", "<p>release @R@</p>\n");
    let bad_run = tree.write("bad/run", format!("#!/bin/sh\n{CRASHES_SOON}"));
    std::fs::set_permissions(
        &bad_run,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (code, _, err) = deploy_to(root.path(), &good, &[]);
    assert_eq!(code, Some(0), "{err}");
    let live = current_id(root.path());
    let (_sup, addr) =
        dream_testkit::serve_root(root.path(), &["--ready", "notify", "--workers", "2"]);
    let referee = dream_testkit::Referee::start(addr, false);
    referee.wait_responses(20);
    let (code, out, err) = deploy_to(root.path(), &tree.path().join("bad"), &[]);
    assert_eq!(
        code,
        Some(1),
        "a release reverted 0.3 s after going live: {out}{err}"
    );
    assert!(err.contains("did not settle"), "{err}");
    assert!(!out.contains("deployed"), "{out}");
    assert_eq!(current_id(root.path()), live);
    let report = referee.finish();
    assert_eq!(report.mixed, 0, "{}", report.human());
    // The same release with the window turned off is reported at once,
    // as before (the supervisor still reverts it on probation).
    let (code, out, err) = deploy_to(root.path(), &tree.path().join("bad"), &["--settle", "0s"]);
    assert_eq!(code, Some(0), "{out}{err}");
}

#[test]
fn an_unconfirmed_reload_of_the_live_release_marks_nothing_bad() {
    let tree = Tree::new();
    let root = dream_testkit::Root::new();
    let a = dream_testkit::stamped_site(&tree, "a", "");
    let b = dream_testkit::stamped_site(&tree, "b", "echo b >/dev/null\n");
    for src in [&a, &b] {
        let (code, _, err) = deploy_to(root.path(), src, &[]);
        assert_eq!(code, Some(0), "{err}");
    }
    let live = current_id(root.path());
    let (_sup, _addr) =
        dream_testkit::serve_root(root.path(), &["--ready", "notify", "--workers", "1"]);
    let (status, out, err) = run(
        Command::new(bin("dream"))
            .args([
                "reload",
                "--confirm-within",
                "300ms",
                "--settle",
                "0s",
                "--root",
            ])
            .arg(root.path()),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{out}{err}");
    // Not confirmed: the supervisor replaces the generation with a new one
    // of the same release.
    dream_testkit::wait_until(Duration::from_secs(30), "the revert", || {
        let s = root.status();
        (s.pool.reverts >= 1 && s.pool.generations.len() == 1 && s.live().is_some()).then_some(())
    });
    assert_eq!(current_id(root.path()), live);
    let history = std::fs::read_to_string(root.path().join(".dream/history")).unwrap();
    assert!(
        !history
            .lines()
            .any(|l| l.contains("\"reverted\"") && l.contains(&live)),
        "{history}"
    );
    let (status, out, _) = run(
        Command::new(bin("dream"))
            .args(["releases", "--json", "--root"])
            .arg(root.path()),
        Duration::from_secs(30),
    );
    assert!(status.success());
    let rows: serde_json::Value =
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["releases"].take();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == live.as_str())
        .unwrap();
    assert_ne!(row["state"], "bad", "{row}");
}

#[test]
fn verify_without_a_supervisor_fails_instead_of_being_skipped() {
    let tree = Tree::new();
    let root = dream_testkit::Root::new();
    let a = dream_testkit::stamped_site(&tree, "a", "");
    let b = dream_testkit::stamped_site(&tree, "b", "echo b >/dev/null\n");
    let (code, _, err) = deploy_to(root.path(), &a, &[]);
    assert_eq!(code, Some(0), "{err}");
    let live = current_id(root.path());
    let (code, out, err) = deploy_to(root.path(), &b, &["--verify", "/"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("--verify needs a running supervisor"), "{err}");
    assert_eq!(current_id(root.path()), live);
}

#[test]
fn keep_counts_good_releases_so_failures_never_push_rollback_targets_out() {
    let tree = Tree::new();
    let root = dream_testkit::Root::new();
    let mut good = Vec::new();
    for i in 0..3 {
        let src =
            dream_testkit::stamped_site(&tree, &format!("g{i}"), &format!("echo {i} >/dev/null\n"));
        let (code, _, err) = deploy_to(root.path(), &src, &["--keep", "3"]);
        assert_eq!(code, Some(0), "{err}");
        good.push(current_id(root.path()));
    }
    // Three deploys that fail their pre-switch hook: built, marked bad.
    let hook = tree.write(
        ".hook",
        "#!/bin/sh\n[ -e \"$HOOK_FAIL\" ] && exit 1\nexit 0\n",
    );
    let _ = hook;
    let hooks = root.path().join(".dream/hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    let fail_flag = tree.path().join("fail");
    std::fs::write(
        hooks.join("pre-switch"),
        format!(
            "#!/bin/sh\n[ -e {} ] && exit 1\nexit 0\n",
            fail_flag.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        hooks.join("pre-switch"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(&fail_flag, "").unwrap();
    for i in 0..3 {
        let src = dream_testkit::stamped_site(
            &tree,
            &format!("b{i}"),
            &format!("echo bad {i} >/dev/null\n"),
        );
        let (code, out, err) = deploy_to(root.path(), &src, &["--keep", "3"]);
        assert_eq!(code, Some(1), "{out}{err}");
    }
    std::fs::remove_file(&fail_flag).unwrap();
    let last = dream_testkit::stamped_site(&tree, "g3", "echo 3 >/dev/null\n");
    let (code, _, err) = deploy_to(root.path(), &last, &["--keep", "3"]);
    assert_eq!(code, Some(0), "{err}");
    let releases = root.path().join("releases");
    assert!(
        !releases.join(&good[0]).exists(),
        "the oldest good release is pruned"
    );
    for id in &good[1..] {
        assert!(
            releases.join(id).is_dir(),
            "good release {id} was pruned by failures"
        );
    }
}

/// Ctrl-C while the deploy waits for the supervisor: exit 130, and the
/// root left as `--help` says (current back on the previous release, the
/// supervisor going back to it).
#[test]
fn an_interrupt_while_waiting_for_the_reload_ends_the_deploy_with_130() {
    let tree = Tree::new();
    let root = dream_testkit::Root::new();
    let a = dream_testkit::stamped_site(&tree, "a", "");
    // Its workers take long to be ready: the deploy waits in the reload.
    let slow = dream_testkit::stamped_site(&tree, "slow", "sleep 20\n");
    let (code, _, err) = deploy_to(root.path(), &a, &[]);
    assert_eq!(code, Some(0), "{err}");
    let live = current_id(root.path());
    let (_sup, addr) =
        dream_testkit::serve_root(root.path(), &["--ready", "notify", "--workers", "1"]);
    for (sig, code) in [
        (nix::sys::signal::Signal::SIGINT, 130),
        (nix::sys::signal::Signal::SIGTERM, 143),
    ] {
        let mut deploy = Guard::spawn(
            Command::new(bin("dream"))
                .arg("deploy")
                .arg(&slow)
                .arg("--root")
                .arg(root.path())
                .args(["--build", dream_testkit::STAMP])
                .env("DREAM_BIN", bin("dream")),
        );
        deploy.wait_stderr("switched", Duration::from_secs(60));
        // The reload has been asked for once the supervisor starts it.
        dream_testkit::wait_until(Duration::from_secs(20), "the reload to start", || {
            (root.status().pool.generations.len() >= 2).then_some(())
        });
        deploy.signal(sig);
        let status = deploy.wait_exit(Duration::from_secs(20));
        assert_eq!(status.code(), Some(code), "{}", deploy.stderr_now());
        deploy.wait_stderr("not marked bad", Duration::from_secs(10));
        assert_eq!(current_id(root.path()), live);
        dream_testkit::wait_until(
            Duration::from_secs(60),
            "the previous release to serve alone",
            || {
                let s = root.status();
                (s.pool.generations.len() == 1 && s.live().is_some_and(|g| g.release == live))
                    .then_some(())
            },
        );
        assert_eq!(dream_testkit::get(addr, "/", &[]).status, 200);
    }
}

/// The id `--dry-run` announces carries the digest the deploy then uses
/// (only the time in front of it, and a -N after it when another release
/// was made in the same second, can differ), for a writable source whose
/// modes the release freezes.
#[test]
fn a_dry_run_names_the_content_digest_the_deploy_makes() {
    use std::os::unix::fs::PermissionsExt;
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let src = tree.path().join("src");
    tree.write("src/index.html", "<p>hi</p>\n");
    tree.write("src/odd name %.txt", "x");
    let script = tree.write("src/bin/run", "#!/bin/sh\n");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o775)).unwrap();
    std::fs::set_permissions(src.join("bin"), std::fs::Permissions::from_mode(0o777)).unwrap();
    // TIME-DIGEST[-N]: the digest is the content's; TIME and a collision
    // suffix -N (another release made in the same second) depend on when.
    let suffix = |id: &str| id.split('-').nth(1).unwrap().to_string();
    let release_of = |how: &str| {
        let (code, out, err) = dream(&[
            "deploy",
            "--root",
            root.to_str().unwrap(),
            src.to_str().unwrap(),
            how,
            "--json",
        ]);
        assert_eq!(code, Some(0), "{how}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["release"].as_str().unwrap().to_string()
    };
    for round in 0..2 {
        let planned = release_of("--dry-run");
        let made = release_of("--no-reload");
        assert_eq!(
            suffix(&planned),
            suffix(&made),
            "round {round}: planned {planned}, made {made}"
        );
    }
}
