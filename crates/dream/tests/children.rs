//! Nothing a deploy starts (a build, a hook, git) outlives it or runs
//! beside the next deploy: each child starts with an empty signal mask and
//! default dispositions, in its own process group, with the parent-death
//! signal; its end is its exit, not the end of its output; an interrupt
//! ends it at any wait; and a deploy killed with -9 has its children's
//! leftovers ended by the next deploy before it touches anything.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dream_testkit::{Guard, Tree, bin, gone, run, wait_until};
use nix::sys::signal::Signal;

/// Kills, by pid, a process a test's child left behind (if a test fails
/// before the deploy under test does it).
struct Reap(Vec<i64>);

impl Drop for Reap {
    fn drop(&mut self) {
        for pid in &self.0 {
            if !gone(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    Signal::SIGKILL,
                );
            }
        }
    }
}

fn read_pid(path: &Path) -> i64 {
    let text = wait_until(Duration::from_secs(20), "a pid file", || {
        std::fs::read_to_string(path)
            .ok()
            .filter(|t| t.ends_with('\n'))
    });
    text.trim().parse().unwrap()
}

fn site(tree: &Tree, name: &str) -> PathBuf {
    tree.write(&format!("{name}/index.html"), format!("<p>{name}</p>\n"));
    tree.path().join(name)
}

fn hook(root: &Path, name: &str, body: &str) {
    let dir = root.join(".dream/hooks");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(
        dir.join(name),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
}

fn deploy(root: &Path, src: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let (status, out, err) = run(
        Command::new(bin("dream"))
            .arg("deploy")
            .arg(src)
            .arg("--root")
            .arg(root)
            .args(args),
        Duration::from_secs(90),
    );
    (status.code(), out, err)
}

/// The signal mask and ignored set of a hook and of a build, read from
/// their own /proc/self/status.
#[test]
fn hooks_and_builds_start_with_no_signal_blocked_or_ignored() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let seen = tree.path().join("seen");
    hook(
        &root,
        "pre-switch",
        &format!(
            "grep -E '^Sig(Blk|Ign)' /proc/self/status >> {}\n",
            seen.display()
        ),
    );
    let build = format!(
        "grep -E '^Sig(Blk|Ign)' /proc/self/status >> {}",
        seen.display()
    );
    let (code, out, err) = deploy(&root, &site(&tree, "a"), &["--build", &build]);
    assert_eq!(code, Some(0), "{out}{err}");
    let text = std::fs::read_to_string(&seen).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    for l in lines {
        let mask = u64::from_str_radix(l.split_whitespace().nth(1).unwrap(), 16).unwrap();
        // HUP (1), INT (2), QUIT (3), PIPE (13), TERM (15): none.
        let ours = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 12) | (1 << 14);
        assert_eq!(mask & ours, 0, "{l}");
        if l.starts_with("SigBlk") {
            assert_eq!(mask, 0, "{l}");
        }
    }
}

/// A hook that leaves a process holding its output: the deploy goes on
/// when the hook exits, and the process goes with the hook.
#[test]
fn a_hook_is_done_when_it_exits_and_what_it_left_running_ends() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let pidfile = tree.path().join("bg.pid");
    hook(
        &root,
        "post-switch",
        &format!(
            "nohup sleep 600 & echo $! > {}\nexit 0\n",
            pidfile.display()
        ),
    );
    let (code, out, err) = deploy(&root, &site(&tree, "a"), &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    let bg = read_pid(&pidfile);
    let _reap = Reap(vec![bg]);
    wait_until(
        Duration::from_secs(10),
        "the hook's background process to end",
        || gone(bg).then_some(()),
    );
}

/// `kill -9` of a deploy while its build runs: the build's shell dies with
/// it, and what the build started is ended by the next deploy before that
/// one stages anything.
#[test]
fn the_next_deploy_ends_what_a_killed_deploys_build_left_running() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let pidfile = tree.path().join("writer.pid");
    let build = format!(
        "( while :; do date >> built.log; sleep 0.05; done ) & echo $! > {}; wait",
        pidfile.display()
    );
    let mut first = Guard::spawn(
        Command::new(bin("dream"))
            .arg("deploy")
            .arg(site(&tree, "a"))
            .arg("--root")
            .arg(&root)
            .args(["--build", &build]),
    );
    let writer = read_pid(&pidfile);
    let _reap = Reap(vec![writer]);
    let sh = dream_testkit::children(first.pid());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.pid()), Signal::SIGKILL).unwrap();
    first.wait_exit(Duration::from_secs(10));
    for pid in sh {
        wait_until(
            Duration::from_secs(10),
            "the build's shell to die with the deploy",
            || gone(pid as i64).then_some(()),
        );
    }
    assert!(
        !gone(writer),
        "the writer the build started is still there (as a real build's would be)"
    );
    let (code, out, err) = deploy(&root, &site(&tree, "b"), &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.contains("group"), "the leftovers are named: {err}");
    assert!(
        gone(writer),
        "the killed deploy's build still runs beside the next"
    );
    // The staging it wrote into is gone, and stays gone.
    let staging = root.join(".dream/staging");
    assert_eq!(
        std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0),
        0
    );
}

/// A deploy stuck in `git clone` (a server that accepts and says nothing)
/// ends at once on INT and TERM with 130 and 143.
#[test]
fn an_interrupt_ends_a_deploy_waiting_on_a_stalled_git_server() {
    if !dream_testkit::prerequisite(Command::new("git").arg("--version").output().is_ok(), "git") {
        return;
    }
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    // Connections complete in the backlog and are never answered.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("git:http://{}/repo.git", server.local_addr().unwrap());
    for (sig, code) in [(Signal::SIGINT, 130), (Signal::SIGTERM, 143)] {
        let mut d = Guard::spawn(
            Command::new(bin("dream"))
                .args(["deploy", &url, "--root"])
                .arg(&root),
        );
        let git = wait_until(Duration::from_secs(20), "git to run", || {
            dream_testkit::children(d.pid()).first().copied()
        });
        let _reap = Reap(vec![git as i64]);
        d.signal(sig);
        let status = d.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(code), "{}", d.stderr_now());
        wait_until(Duration::from_secs(10), "git to be ended", || {
            gone(git as i64).then_some(())
        });
    }
    drop(server);
}
