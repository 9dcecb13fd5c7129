//! The fleet's two sides against a peer that misbehaves: an agent that
//! stops answering, a coordinator that goes silent, a host whose words
//! carry terminal escapes. No root or sshd needed: `--ssh` runs the peer
//! directly, and the agent is driven over its own stdin and stdout.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use dream_core::fleet::{self, ToAgent};
use dream_core::store::lock::{Holder, Lock, Wait};
use dream_testkit::{Guard, Tree, bin, run};

/// A fake agent: answers `hello` (with `version` and `current` as given)
/// and `lock`, then never answers again, though it reads on until EOF.
const FAKE_AGENT: &str = r#"
import json, struct, sys
version, current = sys.argv[1], sys.argv[2]
inp, out = sys.stdin.buffer, sys.stdout.buffer
def send(obj):
    body = json.dumps(obj).encode()
    out.write(struct.pack(">IB", len(body), 0) + body); out.flush()
while True:
    head = inp.read(5)
    if len(head) < 5: break
    n, kind = struct.unpack(">IB", head)
    body = inp.read(n)
    if kind != 0: continue
    msg = json.loads(body)["msg"]
    if msg == "hello":
        send({"ok": True, "protocol": 2, "version": version, "current": current})
    elif msg == "lock":
        send({"ok": False, "error": "held by " + version})
"#;

fn fake_ssh(tree: &Tree, version: &str, current: &str) -> String {
    let script = tree.write("fake_agent.py", FAKE_AGENT);
    // The coordinator adds ssh options, the host and the remote command
    // after this: a wrapper drops them.
    let wrapper = tree.write(
        "fake_ssh",
        format!(
            "#!/bin/sh\nexec python3 {} '{version}' '{current}'\n",
            script.display()
        ),
    );
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    wrapper.display().to_string()
}

fn python() -> bool {
    dream_testkit::prerequisite(
        Command::new("python3").arg("-V").output().is_ok(),
        "python3 for the fake fleet agent",
    )
}

#[test]
fn a_coordinator_gives_up_on_an_agent_that_stops_answering() {
    if !python() {
        return;
    }
    let tree = Tree::new();
    let ssh = fake_ssh(&tree, "1.0", "r1");
    let (status, out, err) = run(
        Command::new(bin("dream"))
            .args([
                "fleet", "status", "--hosts", "web1", "--root", "/srv/x", "--ssh", &ssh,
            ])
            .env("DREAM_FLEET_SILENCE", "1s"),
        Duration::from_secs(30),
    );
    assert_ne!(status.code(), Some(0), "{out}{err}");
    assert!(
        format!("{out}{err}").contains("no word from the host's agent in 1s"),
        "{out}{err}"
    );
}

#[test]
fn a_hosts_words_never_reach_the_terminal_raw() {
    if !python() {
        return;
    }
    let tree = Tree::new();
    let ssh = fake_ssh(&tree, "\x1b]0;owned\x07", "\x1b[2J");
    for args in [
        &["fleet", "status"][..],
        &["fleet", "rollback"][..],
        &["fleet", "lock", "-m", "x"][..],
    ] {
        let (_, out, err) = run(
            Command::new(bin("dream"))
                .args(args)
                .args(["--hosts", "web1", "--root", "/srv/x", "--ssh", &ssh])
                .env("DREAM_FLEET_SILENCE", "1s"),
            Duration::from_secs(30),
        );
        let all = format!("{out}{err}");
        assert!(
            !all.contains('\x1b') && !all.contains('\x07'),
            "{args:?}: raw escapes reached the terminal: {all:?}"
        );
        assert!(all.contains("\\u{1b}"), "{args:?}: {all:?}");
    }
}

#[test]
fn an_agent_whose_coordinator_goes_silent_releases_its_lock_and_exits() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for partial in [false, true] {
        let mut agent = Guard::spawn(
            Command::new(bin("dream"))
                .args(["agent", "--root"])
                .arg(&root)
                .env("DREAM_FLEET_SILENCE", "1s")
                .stdin(Stdio::piped())
                .stdout(Stdio::null()),
        );
        let mut stdin = agent.child.stdin.take().unwrap();
        let mut wire = Vec::new();
        fleet::write_message(
            &mut wire,
            &ToAgent::Hello {
                protocol: fleet::PROTOCOL,
                version: "test".into(),
            },
        )
        .unwrap();
        fleet::write_message(
            &mut wire,
            &ToAgent::Lock {
                command: "test".into(),
                fleet: false,
                wait_ms: None,
            },
        )
        .unwrap();
        if partial {
            // A frame's header, half of it, and then nothing.
            wire.extend_from_slice(&[0, 0]);
        }
        stdin.write_all(&wire).unwrap();
        // The lock is taken, then given up when the silence ends the
        // session, though stdin stays open.
        let lock = root.join(".dream/lock");
        dream_testkit::wait_until(Duration::from_secs(10), "the agent's lock", || {
            lock.exists().then_some(())
        });
        let status = agent.wait_exit(Duration::from_secs(15));
        assert!(!status.success() || !partial, "{status:?}");
        let err = agent.stderr_now();
        assert!(err.contains("no word from the coordinator"), "{err}");
        Lock::acquire(&lock, &Holder::me("test"), Wait::No).expect("the lock was left held");
        drop(stdin);
    }
}
