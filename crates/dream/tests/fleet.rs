//! `dream fleet` against real OpenSSH, on real (namespaced) networks.
//!
//! Each host is a network namespace joined to this one by a veth pair,
//! with its own address, its own `sshd` (key login, its own host key), its
//! own deploy root and its own `dream serve`. Traffic goes only to the
//! addresses inside the namespaces the test made; everything is torn down
//! when the test ends, failed or not. Needs root, `ip` and `sshd`: without
//! them the tests skip, except under CI, where they fail.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dream_testkit::{
    Guard, Referee, STAMP, Tree, bin, prerequisite, run, stamped_site, wait_until,
};

const SSHD: &str = "/usr/sbin/sshd";

fn can_run() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tools = Path::new(SSHD).is_file()
        && Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
        && Command::new("ssh-keygen").arg("-?").output().is_ok();
    prerequisite(
        root && tools,
        "root, iproute2 (ip netns) and openssh-server (sshd) for the fleet tests",
    )
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One host: a namespace, its veth pair, its sshd, its root.
struct Host {
    name: String,
    ns: String,
    veth: String,
    addr: String,
    root: PathBuf,
    sshd: Option<Guard>,
    serve: Option<Guard>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.serve.take();
        self.sshd.take();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A fleet of namespaced hosts reachable over ssh from this namespace.
struct Lab {
    tree: Tree,
    hosts: Vec<Host>,
    ssh: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Lab {
    fn new(n: usize) -> Lab {
        let tree = Tree::new();
        let dir = tree.path();
        std::fs::create_dir_all("/run/sshd").unwrap();
        sh(&format!(
            "ssh-keygen -q -t ed25519 -N '' -f {}/id",
            dir.display()
        ));
        std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
        let lab_id = (std::process::id() % 1000) * 8 + NEXT.fetch_add(1, Ordering::SeqCst) % 8;
        let mut known = String::new();
        let mut hosts = Vec::new();
        for i in 0..n {
            let name = format!("h{i}");
            let ns = format!("dreamt{lab_id}-{i}");
            let veth = format!("dv{lab_id}x{i}");
            // 10.W.X.0/30 per host, W.X from the lab and the host.
            let k = lab_id * 8 + i as u32;
            let (w, x) = (100 + (k / 250) % 100, k % 250);
            let (ours, theirs) = (format!("10.{w}.{x}.1"), format!("10.{w}.{x}.2"));
            sh(&format!("ip netns add {ns}"));
            let mut host = Host {
                name: name.clone(),
                ns: ns.clone(),
                veth: veth.clone(),
                addr: theirs.clone(),
                root: dir.join(&name).join("root"),
                sshd: None,
                serve: None,
            };
            sh(&format!(
                "ip link add {veth} type veth peer name {veth}p && ip link set {veth}p netns {ns} \
                 && ip addr add {ours}/30 dev {veth} && ip link set {veth} up \
                 && ip netns exec {ns} ip addr add {theirs}/30 dev {veth}p \
                 && ip netns exec {ns} ip link set {veth}p up && ip netns exec {ns} ip link set lo up"
            ));
            let hdir = dir.join(&name);
            std::fs::create_dir_all(&hdir).unwrap();
            sh(&format!(
                "ssh-keygen -q -t ed25519 -N '' -f {}/hostkey",
                hdir.display()
            ));
            let config = format!(
                "ListenAddress {theirs}\nPort 22\nHostKey {h}/hostkey\nPidFile {h}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nLogLevel ERROR\n",
                h = hdir.display(),
                d = dir.display()
            );
            std::fs::write(hdir.join("sshd_config"), config).unwrap();
            host.sshd = Some(Guard::spawn(
                Command::new("ip")
                    .args(["netns", "exec", &ns, SSHD, "-D", "-e", "-f"])
                    .arg(hdir.join("sshd_config")),
            ));
            let key = std::fs::read_to_string(hdir.join("hostkey.pub")).unwrap();
            known.push_str(&format!("{theirs} {key}"));
            hosts.push(host);
        }
        std::fs::write(dir.join("known_hosts"), known).unwrap();
        let ssh = format!(
            "ssh -F /dev/null -i {d}/id -o UserKnownHostsFile={d}/known_hosts -o StrictHostKeyChecking=yes -o ConnectTimeout=5 -o ServerAliveInterval=1 -o ServerAliveCountMax=3",
            d = dir.display()
        );
        let lab = Lab { tree, hosts, ssh };
        for h in &lab.hosts {
            wait_until(Duration::from_secs(20), "sshd to listen", || {
                std::net::TcpStream::connect_timeout(
                    &format!("{}:22", h.addr).parse().unwrap(),
                    Duration::from_millis(200),
                )
                .ok()
            });
        }
        lab
    }

    /// `dream fleet ARGS --hosts … --ssh …` with each host's root in a
    /// dream.toml; returns the exit code, stdout and stderr.
    fn fleet(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let (status, out, err) = run(&mut self.fleet_cmd(args), Duration::from_secs(120));
        (status.code(), out, err)
    }

    fn fleet_cmd(&self, args: &[&str]) -> Command {
        self.fleet_cmd_with(args, &bin("dream").to_string_lossy())
    }

    fn fleet_cmd_with(&self, args: &[&str], remote_dream: &str) -> Command {
        let mut config = String::from("[fleet]\nhosts = [\n");
        for h in &self.hosts {
            config.push_str(&format!(
                "  {{ host = \"root@{}\", root = \"{}\" }},\n",
                h.addr,
                h.root.display()
            ));
        }
        config.push_str(&format!(
            "]\nssh = \"{}\"\nremote_dream = \"{remote_dream}\"\n",
            self.ssh,
        ));
        let path = self.tree.path().join("fleet.toml");
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(bin("dream"));
        cmd.arg("fleet").args(args).arg("--config").arg(&path);
        cmd
    }

    /// Starts `dream serve` on every host, inside its namespace, on :8080.
    fn serve(&mut self) {
        for h in &mut self.hosts {
            let mut g = Guard::spawn(
                Command::new("ip")
                    .args(["netns", "exec", &h.ns])
                    .arg(bin("dream"))
                    .args(["serve", "--root"])
                    .arg(&h.root)
                    .arg("--listen")
                    .arg(format!("{}:8080", h.addr))
                    .args(["--workers", "2", "--ready", "notify", "--", "./run"])
                    .env("DREAM_BIN", bin("dream"))
                    .env("PROBE_BIN", dream_testkit::probe())
                    .env("HOST_NAME", &h.name),
            );
            g.wait_stderr("generation 1 ready", Duration::from_secs(20));
            h.serve = Some(g);
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        format!("{}:8080", self.hosts[i].addr).parse().unwrap()
    }

    fn current(&self, i: usize) -> String {
        std::fs::read_link(self.hosts[i].root.join("current"))
            .map(|l| l.file_name().unwrap().to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// A site whose `run` serves `public/` with `dream static`, except on the
/// host named `fail_on` (by `$HOST_NAME`), where it exits at once.
fn site(tree: &Tree, name: &str, fail_on: Option<&str>) -> PathBuf {
    let guard = fail_on
        .map(|h| format!("[ \"$HOST_NAME\" = {h} ] && {{ echo 'refusing on {h}' >&2; exit 1; }}\n"))
        .unwrap_or_default();
    stamped_site(tree, name, &guard)
}

#[test]
fn a_fleet_deploy_ends_new_everywhere_or_old_everywhere() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new(3);
    let v1 = site(&lab.tree, "v1", None);
    let (code, _, err) = lab.fleet(&[
        "deploy",
        v1.to_str().unwrap(),
        "--id",
        "one",
        "--build",
        STAMP,
    ]);
    assert_eq!(code, Some(0), "{err}");
    lab.serve();
    let referees: Vec<Referee> = (0..3).map(|i| Referee::start(lab.addr(i), false)).collect();
    for r in &referees {
        r.wait_responses(20);
    }
    // Everywhere.
    let v2 = site(&lab.tree, "v2", None);
    let (code, _, err) = lab.fleet(&[
        "deploy",
        v2.to_str().unwrap(),
        "--id",
        "two",
        "--build",
        STAMP,
    ]);
    assert_eq!(code, Some(0), "{err}");
    for i in 0..3 {
        assert_eq!(lab.current(i), "two", "host {i}");
    }
    for r in &referees {
        r.wait_responses(20);
    }
    // A release that cannot start on h1: every host stays on two.
    let v3 = site(&lab.tree, "v3", Some("h1"));
    let (code, out, err) = lab.fleet(&[
        "deploy",
        v3.to_str().unwrap(),
        "--id",
        "three",
        "--build",
        STAMP,
        "--json",
    ]);
    assert_eq!(code, Some(1), "{out} {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ok"], false);
    assert!(
        v["error"].as_str().unwrap().contains("refusing on h1"),
        "{v}"
    );
    for i in 0..3 {
        assert_eq!(lab.current(i), "two", "host {i}: {v}");
    }
    // A release that answers badly on its hosts' own sockets: reverted.
    let (code, _, err) = lab.fleet(&[
        "deploy",
        v2.to_str().unwrap(),
        "--id",
        "four",
        "--build",
        STAMP,
        "--verify",
        "/healthz",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("GET /healthz answered 404"), "{err}");
    for i in 0..3 {
        assert_eq!(lab.current(i), "two", "host {i}");
    }
    let (code, out, _) = lab.fleet(&["status"]);
    assert_eq!(code, Some(0), "{out}");
    for r in &referees {
        r.wait_responses(20);
    }
    for r in referees {
        let report = r.finish();
        assert_eq!(report.error_total, 0, "{}", report.human());
        // (The canary, and hosts switched beside h1, may have served
        // three for the moment before the fleet reverted: whole responses.)
        assert_eq!(report.mixed, 0, "{}", report.human());
    }
    // Sent once: a deploy of content the hosts have sends almost nothing.
    let (code, out, err) = lab.fleet(&["deploy", v2.to_str().unwrap(), "--build", STAMP, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for h in v["hosts"].as_array().unwrap() {
        assert!(h["sent_bytes"].as_u64().unwrap() < 200, "{v}");
    }
}

/// The events `.dream/history` on host `i` records for `release`.
fn events(lab: &Lab, i: usize, release: &str) -> Vec<String> {
    dream_testkit::history(&lab.hosts[i].root, release)
        .into_iter()
        .map(|(event, _)| event)
        .collect()
}

#[test]
fn a_judged_canary_host_decides_before_any_other_host_switches() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new(2);
    let v1 = site(&lab.tree, "v1", None);
    let deploy = |lab: &Lab, dir: &Path, id: &str| {
        lab.fleet(&[
            "deploy",
            dir.to_str().unwrap(),
            "--id",
            id,
            "--build",
            STAMP,
            "--canary",
            "1",
            "--judge-for",
            "6s",
            "--judge-path",
            "/index.html",
            "--judge-min-requests",
            "10",
        ])
    };
    let (code, _, err) = lab.fleet(&[
        "deploy",
        v1.to_str().unwrap(),
        "--id",
        "one",
        "--build",
        STAMP,
    ]);
    assert_eq!(code, Some(0), "{err}");
    lab.serve();
    let referees: Vec<Referee> = (0..2).map(|i| Referee::start(lab.addr(i), false)).collect();
    for r in &referees {
        r.wait_responses(20);
    }
    // A healthy release: judged on h0, promoted there, then h1 switches.
    let v2 = site(&lab.tree, "v2", None);
    let (code, _, err) = deploy(&lab, &v2, "two");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("a canary of two"), "{err}");
    for i in 0..2 {
        assert_eq!(lab.current(i), "two", "host {i}");
    }
    assert!(events(&lab, 0, "two").contains(&"promoted".to_string()));
    assert!(!events(&lab, 1, "two").contains(&"canary".to_string()));
    // A release failing half its requests: reverted on h0 by its judge;
    // h1 never switches.
    let bad = lab.tree.path().join("bad");
    lab.tree
        .write("bad/public/index.html", "<p>release @R@</p>\n");
    lab.tree.write(
        "bad/run",
        "#!/bin/sh\nexec \"$PROBE_BIN\" --serve --fail-percent 50\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bad.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, _, err) = deploy(&lab, &bad, "three");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("error rate"), "{err}");
    for i in 0..2 {
        assert_eq!(lab.current(i), "two", "host {i}");
    }
    assert!(events(&lab, 0, "three").contains(&"reverted".to_string()));
    assert!(
        !events(&lab, 1, "three").contains(&"switched".to_string()),
        "{:?}",
        events(&lab, 1, "three")
    );
    for r in referees {
        let report = r.finish();
        assert_eq!(
            report.error_total - report.errors.bad_status,
            0,
            "{}",
            report.human()
        );
        assert_eq!(report.mixed, 0, "{}", report.human());
    }
}

#[test]
fn locks_are_never_waited_on_and_never_left_behind() {
    if !can_run() {
        return;
    }
    let lab = Lab::new(2);
    let v1 = site(&lab.tree, "v1", None);
    // Nothing deployed yet (as with a wrong --root): not "consistent".
    let (code, out, err) = lab.fleet(&["status", "--json"]);
    assert_eq!(code, Some(1), "{out} {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (&v["ok"], &v["consistent"], &v["exit"]),
        (&false.into(), &false.into(), &1.into()),
        "{v}"
    );
    assert!(
        v["error"].as_str().unwrap().contains("is --root right?"),
        "{v}"
    );
    // A manual hold: refused at once, naming it.
    let (code, _, err) = lab.fleet(&["lock", "-m", "database migration"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = lab.fleet(&["deploy", v1.to_str().unwrap()]);
    assert_eq!(code, Some(111), "{err}");
    assert!(err.contains("database migration"), "{err}");
    let (code, _, err) = lab.fleet(&["unlock"]);
    assert_eq!(code, Some(0), "{err}");
    // A deploy in progress (a slow build): a second one exits 111 naming
    // the holder; the first, killed, leaves no lock.
    let mut first =
        Guard::spawn(&mut lab.fleet_cmd(&["deploy", v1.to_str().unwrap(), "--build", "sleep 30"]));
    first.wait_stderr("locked every host", Duration::from_secs(30));
    let (code, _, err) = lab.fleet(&["deploy", v1.to_str().unwrap()]);
    assert_eq!(code, Some(111), "{err}");
    assert!(err.contains("held by pid"), "{err}");
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10));
    drop(first);
    // The agents see their input close, end their build, release the locks.
    let (code, _, err) = wait_until(Duration::from_secs(60), "the locks to be released", || {
        let r = lab.fleet(&["deploy", v1.to_str().unwrap(), "--id", "after"]);
        (r.0 != Some(111)).then_some(r)
    });
    assert_eq!(code, Some(0), "{err}");
    for i in 0..2 {
        assert_eq!(lab.current(i), "after");
        let staging = lab.hosts[i].root.join(".dream/staging");
        assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
    }
}

/// Runs `dream fleet deploy` until it is not refused for a lock that a
/// killed run's agents are still letting go of; returns its outcome.
fn deploy_when_free(lab: &Lab, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["deploy"];
    all.extend_from_slice(args);
    wait_until(
        Duration::from_secs(60),
        "the fleet's locks to be free",
        || {
            let r = lab.fleet(&all);
            (r.0 != Some(111)).then_some(r)
        },
    )
}

#[test]
fn a_host_cut_off_during_its_switch_reverts_itself_and_the_next_run_converges() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new(3);
    let v1 = site(&lab.tree, "v1", None);
    let (code, _, err) = lab.fleet(&[
        "deploy",
        v1.to_str().unwrap(),
        "--id",
        "one",
        "--build",
        STAMP,
    ]);
    assert_eq!(code, Some(0), "{err}");
    lab.serve();
    let referees: Vec<Referee> = [0, 2]
        .iter()
        .map(|i| Referee::start(lab.addr(*i), false))
        .collect();
    // h1 takes two seconds to come up: its link goes down meanwhile.
    let v2 = stamped_site(&lab.tree, "v2", "[ \"$HOST_NAME\" = h1 ] && sleep 2\n");
    let mut run = Guard::spawn(&mut lab.fleet_cmd(&[
        "deploy",
        v2.to_str().unwrap(),
        "--id",
        "two",
        "--build",
        STAMP,
        "--confirm-within",
        "4s",
    ]));
    wait_until(Duration::from_secs(60), "h1 to switch", || {
        (lab.current(1) == "two").then_some(())
    });
    sh(&format!("ip link set {} down", lab.hosts[1].veth));
    let status = run.wait_exit(Duration::from_secs(90));
    let said = run.stderr_now();
    assert_eq!(status.code(), Some(2), "{said}");
    assert!(said.contains(&lab.hosts[1].addr), "names the host: {said}");
    // Cut off, h1's supervisor reverts it at its deadline; the others were
    // reverted by the run.
    wait_until(Duration::from_secs(30), "h1 to revert itself", || {
        (lab.current(1) == "one").then_some(())
    });
    assert_eq!(lab.current(0), "one");
    assert_eq!(lab.current(2), "one");
    // The link back: the same deploy converges.
    sh(&format!("ip link set {} up", lab.hosts[1].veth));
    let (code, _, err) = deploy_when_free(
        &lab,
        &[v2.to_str().unwrap(), "--id", "two", "--build", STAMP],
    );
    assert_eq!(code, Some(0), "{err}");
    for i in 0..3 {
        assert_eq!(lab.current(i), "two", "host {i}");
    }
    for r in referees {
        let report = r.finish();
        assert_eq!(report.error_total, 0, "{}", report.human());
        assert_eq!(report.mixed, 0, "{}", report.human());
    }
}

#[test]
fn a_coordinator_killed_in_any_phase_leaves_a_consistent_fleet() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new(3);
    let v1 = site(&lab.tree, "v1", None);
    let (code, _, err) = lab.fleet(&[
        "deploy",
        v1.to_str().unwrap(),
        "--id",
        "one",
        "--build",
        STAMP,
    ]);
    assert_eq!(code, Some(0), "{err}");
    lab.serve();
    let referees: Vec<Referee> = (0..3).map(|i| Referee::start(lab.addr(i), false)).collect();
    // Slow to build (killed while preparing), slow to come up on the
    // hosts after the canary (killed while switching).
    let slow = stamped_site(&lab.tree, "slow", "[ \"$HOST_NAME\" != h0 ] && sleep 2\n");
    for (n, (phase, build)) in [
        ("locked every host", "sleep 30"),
        ("prepared in", "sleep 1"),
        ("switched in", STAMP),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("killed{n}");
        let mut run = Guard::spawn(&mut lab.fleet_cmd(&[
            "deploy",
            slow.to_str().unwrap(),
            "--id",
            &id,
            "--build",
            build,
            "--confirm-within",
            "3s",
        ]));
        run.wait_stderr(phase, Duration::from_secs(60));
        run.signal(nix::sys::signal::Signal::SIGKILL);
        run.wait_exit(Duration::from_secs(10));
        drop(run);
        // Whatever was switched reverts at its deadline; the next deploy
        // runs without anyone's help.
        let next = format!("after{n}");
        let (code, _, err) = deploy_when_free(
            &lab,
            &[v1.to_str().unwrap(), "--id", &next, "--build", STAMP],
        );
        assert_eq!(code, Some(0), "after a kill at {phase}: {err}");
        for i in 0..3 {
            assert_eq!(lab.current(i), next, "after a kill at {phase}: host {i}");
            let staging = lab.hosts[i].root.join(".dream/staging");
            assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0, "{phase}");
        }
    }
    // A rollout much longer than the provisional window (two waits of 4 s
    // against 3 s): the hosts stay provisional while the run is heard
    // from, none reverts, the deploy is whole.
    let (code, _, err) = deploy_when_free(
        &lab,
        &[
            v1.to_str().unwrap(),
            "--id",
            "leased",
            "--build",
            STAMP,
            "--confirm-within",
            "3s",
            "--group",
            "1",
            "--wait",
            "4s",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    for i in 0..3 {
        assert_eq!(lab.current(i), "leased", "host {i}: {err}");
    }
    assert!(!err.contains("revert"), "{err}");
    // Stopped (then killed) just before the commit: every host switched,
    // none confirmed. Each reverts itself 3 s after it last heard from
    // the run: old everywhere.
    let before = lab.current(0);
    let mut run = Guard::spawn(
        lab.fleet_cmd(&[
            "deploy",
            v1.to_str().unwrap(),
            "--id",
            "uncommitted",
            "--build",
            STAMP,
            "--confirm-within",
            "3s",
        ])
        .env("DREAM_TEST_STOP_AFTER", "fleet-commit"),
    );
    let pid = run.pid();
    wait_until(
        Duration::from_secs(60),
        "the run to stop before its commit",
        || dream_testkit::stopped(pid).then_some(()),
    );
    for i in 0..3 {
        assert_eq!(
            lab.current(i),
            "uncommitted",
            "switched, unconfirmed: host {i}"
        );
    }
    run.signal(nix::sys::signal::Signal::SIGKILL);
    run.wait_exit(Duration::from_secs(10));
    drop(run);
    for i in 0..3 {
        wait_until(Duration::from_secs(30), "the host to revert itself", || {
            (lab.current(i) == before).then_some(())
        });
    }
    let (code, _, err) = deploy_when_free(
        &lab,
        &[v1.to_str().unwrap(), "--id", "final", "--build", STAMP],
    );
    assert_eq!(code, Some(0), "{err}");
    for r in referees {
        let report = r.finish();
        assert_eq!(report.error_total, 0, "{}", report.human());
        assert_eq!(report.mixed, 0, "{}", report.human());
    }
}

#[test]
fn install_brings_a_host_without_dream_to_a_working_state() {
    if !can_run() {
        return;
    }
    let lab = Lab::new(1);
    let v1 = site(&lab.tree, "v1", None);
    let (status, _, err) = run(
        &mut lab.fleet_cmd_with(
            &["deploy", v1.to_str().unwrap(), "--id", "one"],
            "/nowhere/dream",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(111), "without --install: {err}");
    let (status, _, err) = run(
        &mut lab.fleet_cmd_with(
            &["deploy", v1.to_str().unwrap(), "--id", "one", "--install"],
            "/nowhere/dream",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("installing this dream"), "{err}");
    let installed = lab.hosts[0].root.join(".dream/bin/dream");
    assert!(installed.is_file(), "{}", installed.display());
    assert_eq!(lab.current(0), "one");
}

/// `--build-on local`: the build runs once, here, and every host gets the
/// built tree (the hosts build nothing).
#[test]
fn build_on_local_builds_once_and_ships_the_result() {
    if !can_run() {
        return;
    }
    let lab = Lab::new(2);
    let v1 = site(&lab.tree, "v1", None);
    let count = lab.tree.path().join("builds");
    let build = format!("echo built >> {}; {STAMP}", count.display());
    let (code, _, err) = lab.fleet(&[
        "deploy",
        v1.to_str().unwrap(),
        "--id",
        "local1",
        "--build",
        &build,
        "--build-on",
        "local",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        std::fs::read_to_string(&count).unwrap(),
        "built\n",
        "built once"
    );
    for i in 0..2 {
        assert_eq!(lab.current(i), "local1");
        let page =
            std::fs::read_to_string(lab.hosts[i].root.join("current/public/index.html")).unwrap();
        assert_eq!(
            page, "<p>release local1</p>\n",
            "host {i} got the built tree"
        );
    }
}
