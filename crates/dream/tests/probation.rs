//! The supervisor owns the revert: a reload that crashes on probation, or
//! a provisional one that is not confirmed in time, goes back to the
//! release it replaced by itself, with `current` and the history to match,
//! and no client refused, reset or served a mix.

use std::path::Path;
use std::time::Duration;

use dream_core::supervise::control::Status;
use dream_core::supervise::pool::GenerationState;
use dream_testkit::{
    Guard, Referee, Root, Tree, current, dream_at as dream, run, stamped_site, stopped, wait_until,
};

/// `dream serve` with two workers that say READY=1.
fn serve(root: &Root, extra: &[&str]) -> (Guard, std::net::SocketAddr) {
    let mut flags = vec!["--ready", "notify", "--workers", "2"];
    flags.extend_from_slice(extra);
    root.serve(&flags, &[])
}
use nix::sys::signal::Signal;

const STATIC: &str = r#"exec "$DREAM_BIN" static --drain-grace 300ms"#;

/// A release whose server comes up, says READY=1, and two seconds later
/// stops (gracefully: it finishes what it holds, so its clients see no
/// error) and exits 1, as if it had crashed. (`0<&3`: sh gives a
/// background job /dev/null as stdin, so the listener is handed to it
/// from fd 3, where LISTEN_FDS put it too; the server takes it on fd 0.)
/// Like any wrapper that does not exec its server, it hands the drain
/// signal on: otherwise a drain that reaches it during its `sleep` ends
/// the shell and leaves the server serving, until its generation is over
/// and it is killed with the clients it holds.
const CRASHES_AFTER_2S: &str = r#""$DREAM_BIN" static --drain-grace 300ms 0<&3 & pid=$!
trap 'kill -TERM $pid; wait $pid; exit 0' TERM
sleep 2 & wait $!
kill -TERM $pid; wait $pid
exit 1"#;

/// The history's events for `release`, as `event` names.
fn history(root: &Path, release: &str) -> Vec<String> {
    dream_testkit::history(root, release)
        .into_iter()
        .map(|(event, _)| event)
        .collect()
}

/// Waits until release `to` is live again after a revert of `from`, and
/// the failing generation has drained.
fn wait_reverted(root: &Root, from: &str, to: &str) -> Status {
    let s = wait_until(
        Duration::from_secs(30),
        &format!("{from} reverted to {to}"),
        || {
            let s = root.status();
            let gens = &s.pool.generations;
            (s.pool.reverts == 1
                && gens.len() == 1
                && gens[0].release == to
                && gens[0].state == GenerationState::Live)
                .then_some(s)
        },
    );
    assert_eq!(current(root.path()).as_deref(), Some(to));
    assert!(
        history(root.path(), from).contains(&"reverted".to_string()),
        "{:?}",
        history(root.path(), from)
    );
    s
}

#[test]
fn a_release_that_crashes_after_ready_is_reverted_and_no_client_notices() {
    let root = Root::new();
    root.release("a", STATIC);
    root.release("b", CRASHES_AFTER_2S);
    root.switch("a");
    let (_sup, addr) = serve(&root, &[]);
    root.wait_live("a", 2);
    let new_conns = Referee::start(addr, false);
    let keep_alive = Referee::start(addr, true);
    new_conns.wait_responses(50);
    root.switch("b");
    let answer = root.control(r#"{"cmd":"reload"}"#);
    assert_eq!(answer["ok"], true, "b goes live first: {answer}");
    let s = wait_reverted(&root, "b", "a");
    assert_eq!(s.pool.generations[0].probation_s, None, "{s:?}");
    new_conns.wait_responses(200);
    keep_alive.wait_responses(200);
    for report in [new_conns.finish(), keep_alive.finish()] {
        assert_eq!(report.error_total, 0, "{}", report.human());
        assert_eq!(report.mixed, 0, "{}", report.human());
        assert!(report.releases.contains_key("b"), "b served for a while");
    }
    // b is bad: a rollback never goes back to it.
    let (code, out, err) = dream(root.path(), &["releases", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let list: serde_json::Value =
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["releases"].take();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == "b" && r["state"] == "bad"),
        "{list}"
    );
}

#[test]
fn a_release_that_crashes_once_and_then_stays_up_is_kept() {
    let root = Root::new();
    let mark = root.tree.path().join("crashed-once");
    root.release("a", STATIC);
    root.release(
        "b",
        // mkdir succeeds once: exactly one worker, once, crashes.
        &format!(
            "mkdir {mark} 2>/dev/null || {STATIC}\n{CRASHES_AFTER_2S}",
            mark = mark.display()
        ),
    );
    root.switch("a");
    let (_sup, addr) = serve(&root, &["--probation", "4s"]);
    root.wait_live("a", 2);
    let referee = Referee::start(addr, false);
    root.switch("b");
    assert_eq!(root.control(r#"{"cmd":"reload"}"#)["ok"], true);
    // One crash, respawned; probation then ends with b still live.
    let s = wait_until(Duration::from_secs(30), "b's probation to end", || {
        let s = root.status();
        let g = s.pool.generations.first()?;
        (g.release == "b" && g.probation_s.is_none() && s.pool.restarts == 1).then_some(s)
    });
    assert_eq!(s.pool.reverts, 0, "{s:?}");
    assert_eq!(root.current().as_deref(), Some("b"));
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
}

#[test]
fn a_provisional_reload_reverts_at_its_deadline_unless_confirmed() {
    let root = Root::new();
    root.release("a", STATIC);
    root.release("b", STATIC);
    root.release("c", STATIC);
    root.switch("a");
    let (_sup, addr) = serve(&root, &[]);
    root.wait_live("a", 2);
    let referee = Referee::start(addr, false);
    // Unconfirmed: live for 1.5 s, then back to a.
    root.switch("b");
    let (code, _, err) = dream(root.path(), &["reload", "--confirm-within", "1500ms"]);
    assert_eq!(code, Some(0), "{err}");
    let s = root.status();
    let live = s
        .pool
        .generations
        .iter()
        .find(|g| g.state == GenerationState::Live)
        .expect("a live generation");
    assert!(live.confirm_in_s.is_some_and(|c| c > 0.0), "{s:?}");
    let (code, out, _) = dream(root.path(), &["status"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("unconfirmed: reverts in"), "{out}");
    wait_reverted(&root, "b", "a");
    // Confirming it now says why not.
    let (code, _, err) = dream(root.path(), &["confirm", "2"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not confirmed within 1.5s"), "{err}");
    // Confirmed in time: it stays past its deadline.
    root.switch("c");
    let (code, _, err) = dream(root.path(), &["reload", "--confirm-within", "1500ms"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = dream(root.path(), &["confirm"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("release c) stays"), "{out}");
    referee.wait_responses(50);
    wait_until(Duration::from_secs(10), "past c's deadline", || {
        let gens = root.status().pool.generations;
        (gens.len() == 1 && gens[0].confirm_in_s.is_none()).then_some(())
    });
    // Nothing is due any more; a moment past the old deadline shows it.
    std::thread::sleep(Duration::from_millis(1600));
    let s = root.status();
    assert_eq!(s.pool.reverts, 1, "{s:?}");
    assert_eq!(root.current().as_deref(), Some("c"));
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
}

/// A deploy with --confirm-within killed between its reload and its
/// confirmation: the supervisor reverts at the deadline, and the host ends
/// consistent (current, history, lock) with no client noticing.
#[test]
fn a_deploy_killed_before_it_confirms_is_reverted_by_the_supervisor() {
    let tree = Tree::new();
    let site = stamped_site(&tree, "site", "");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let deploy = |id: &str| {
        let mut cmd = dream_testkit::deploy_stamped(&root, &site, id);
        cmd.args(["--confirm-within", "2s"]);
        cmd
    };
    let (status, _, err) = run(&mut deploy("one"), Duration::from_secs(60));
    assert!(status.success(), "{err}");
    let (_sup, addr) = dream_testkit::serve_root(&root, &["--workers", "2", "--ready", "notify"]);
    let referee = Referee::start(addr, true);
    referee.wait_responses(20);
    // A confirmed deploy stays.
    let (status, _, err) = run(&mut deploy("two"), Duration::from_secs(60));
    assert!(status.success(), "{err}");
    assert!(err.contains("confirmed"), "{err}");
    let g = Guard::spawn(deploy("three").env("DREAM_TEST_STOP_AFTER", "reloaded"));
    let pid = g.pid();
    wait_until(
        Duration::from_secs(20),
        "the deploy to stop after its reload",
        || stopped(pid).then_some(()),
    );
    assert_eq!(current(&root).as_deref(), Some("three"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    drop(g);
    let v = wait_until(Duration::from_secs(30), "the supervisor's revert", || {
        let v = dream_core::supervise::control::request(
            &root,
            &serde_json::json!({"cmd": "status"}),
            Some(Duration::from_secs(5)),
        )
        .ok()?;
        let s: Status = serde_json::from_value(v).ok()?;
        let gens = &s.pool.generations;
        (s.pool.reverts == 1 && gens.len() == 1 && gens[0].release == "two").then_some(s)
    });
    assert_eq!(current(&root).as_deref(), Some("two"), "{v:?}");
    assert!(history(&root, "three").contains(&"reverted".to_string()));
    // Nothing is left locked: the next deploy runs at once.
    let (status, _, err) = run(&mut deploy("four"), Duration::from_secs(60));
    assert!(status.success(), "{err}");
    referee.wait_responses(20);
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
}
