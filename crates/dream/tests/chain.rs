//! The seed's chain rebuilt from dream's small tools,
//! `dream listen → dream loop → dream static`, with worker restarts (HUP)
//! under load from the referee: not one client may see an error.

use std::process::Command;
use std::time::Duration;

use dream_testkit::{Guard, Referee, Tree, bin, children, get, wait_until};
use nix::sys::signal::Signal;

const RESTARTS: usize = 20;

fn chain_under_load(keep_alive: bool) {
    let tree = Tree::new();
    tree.write("public/index.html", "<p>release a</p>\n");
    let dream = bin("dream");
    let mut chain = Guard::spawn(
        Command::new(&dream)
            .args(["listen", "127.0.0.1:0", "--"])
            .arg(&dream)
            .args(["loop", "0.1"])
            .arg(&dream)
            .args(["static", "--drain-grace", "300ms"])
            .env("DREAM_RELEASE", "a")
            .current_dir(tree.path()),
    );
    let addr = chain.listening_addr();
    assert_eq!(get(addr, "/", &[]).status, 200);
    let loop_pid = chain.pid();

    let referee = Referee::start(addr, keep_alive);
    let mut seen = Vec::new();
    for i in 0..RESTARTS {
        let worker = wait_until(Duration::from_secs(10), "a worker", || {
            children(loop_pid).first().copied()
        });
        seen.push(worker);
        // Let the referee see this worker answer before replacing it.
        referee.wait_responses(20);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(loop_pid), Signal::SIGHUP).unwrap();
        wait_until(Duration::from_secs(10), &format!("restart {i}"), || {
            children(loop_pid)
                .first()
                .filter(|p| **p != worker)
                .map(|_| ())
        });
    }
    referee.wait_responses(20);
    let report = referee.finish();
    seen.dedup();
    assert_eq!(seen.len(), RESTARTS, "each HUP replaced the worker");
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
    assert!(
        report.responses > 20 * RESTARTS as u64,
        "{}",
        report.human()
    );
    chain.signal(Signal::SIGTERM);
    assert!(chain.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn chain_restarts_without_errors_new_connection_per_request() {
    chain_under_load(false);
}

#[test]
fn chain_restarts_without_errors_keep_alive() {
    chain_under_load(true);
}
