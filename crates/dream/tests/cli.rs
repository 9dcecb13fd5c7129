//! Command-line conventions: help, completions, man page, exit codes,
//! and `dream.toml` for deploy.

use std::process::Command;
use std::time::Duration;

use dream_testkit::{Tree, bin, dream, run};

#[test]
fn help_completions_and_man_page() {
    let (code, out, _) = dream(&["--help"]);
    assert_eq!(code, Some(0));
    for cmd in [
        "serve", "deploy", "rollback", "releases", "status", "reload", "check", "static", "demo",
        "listen", "loop", "pool", "lock",
    ] {
        assert!(out.contains(cmd), "--help lists {cmd}");
    }
    assert!(out.contains("111"), "exit codes are documented: {out}");
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = dream(&["completions", shell]);
        assert_eq!(code, Some(0), "{err}");
        assert!(
            out.contains("deploy") && out.contains("rollback"),
            "{shell}"
        );
    }
    let (code, out, _) = dream(&["man"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains(".TH dream 1"),
        "{}",
        &out[..200.min(out.len())]
    );
    let (code, _, err) = dream(&["completions", "tcsh"]);
    assert_eq!(code, Some(100), "{err}");
}

#[test]
fn dream_toml_configures_deploy() {
    let tree = Tree::new();
    tree.write("site/public/index.html", "x");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(
        root.join("dream.toml"),
        "[deploy]\nbuild = \"echo from-toml > built.txt\"\nkeep = 2\n",
    )
    .unwrap();
    let site = tree.path().join("site");
    // Deploys with `extra` flags; returns what the build wrote.
    let built = |extra: &[&str]| {
        let mut args = vec![
            "deploy",
            "--root",
            root.to_str().unwrap(),
            site.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = dream(&args);
        assert_eq!(code, Some(0), "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let rel = root.join("releases").join(v["release"].as_str().unwrap());
        std::fs::read_to_string(rel.join("built.txt")).unwrap()
    };
    assert_eq!(built(&[]), "from-toml\n");
    // A flag wins over the file.
    assert_eq!(
        built(&["--build", "echo from-flag > built.txt"]),
        "from-flag\n"
    );
    // --config names a file that must exist.
    let (code, _, err) = dream(&[
        "deploy",
        "--root",
        root.to_str().unwrap(),
        site.to_str().unwrap(),
        "--config",
        "/nonexistent.toml",
    ]);
    assert_eq!(code, Some(100), "{err}");
}

/// The example units are valid for systemd, where `systemd-analyze` exists.
#[test]
fn systemd_units_verify() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        dream_testkit::prerequisite(false, "systemd-analyze is not installed");
        return;
    }
    // Type=notify-reload needs systemd 253; older ones get the documented
    // fallback (Type=notify with ExecReload sending HUP).
    let version: u32 = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let tree = Tree::new();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd");
    for unit in [
        "dream.service",
        "dream-socket.socket",
        "dream-socket.service",
    ] {
        // Point ExecStart at the binary under test: verify checks that it exists.
        let text = std::fs::read_to_string(repo.join(unit)).unwrap();
        let mut text = text.replace("/usr/bin/dream", bin("dream").to_str().unwrap());
        if version < 253 {
            text = text.replace(
                "Type=notify-reload",
                "Type=notify\nExecReload=/bin/kill -HUP $MAINPID",
            );
        }
        std::fs::write(tree.path().join(unit), text).unwrap();
    }
    let units: Vec<_> = [
        "dream.service",
        "dream-socket.socket",
        "dream-socket.service",
    ]
    .iter()
    .map(|u| tree.path().join(u))
    .collect();
    let (status, out, err) = run(
        Command::new("systemd-analyze")
            .arg("verify")
            .args(&units)
            .env("SYSTEMD_LOG_LEVEL", "warning"),
        Duration::from_secs(60),
    );
    let complaints: Vec<&str> = err
        .lines()
        .chain(out.lines())
        .filter(|l| l.contains("dream"))
        // verify runs without a booted systemd here; these are about the host, not the units.
        .filter(|l| !l.contains("www-data") && !l.contains("/srv/app"))
        .collect();
    assert!(status.success() || complaints.is_empty(), "{out}\n{err}");
    assert!(complaints.is_empty(), "{complaints:#?}");
}

/// Every command that takes --json answers on stdout when it fails too.
#[test]
fn json_answers_failures_too() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let r = root.to_str().unwrap();
    let missing = tree.path().join("missing");
    for (args, exit) in [
        (
            vec!["deploy", "--json", "--root", r, missing.to_str().unwrap()],
            100,
        ),
        (vec!["rollback", "--json", "--root", r], 1),
        (vec!["status", "--json", "--root", r], 1),
        (vec!["reload", "--json", "--root", r], 1),
        (
            vec!["releases", "--json", "--verify", "--root", r, "nope"],
            100,
        ),
        // Refused by the argument parser itself, before the command runs.
        (
            vec![
                "deploy",
                "--json",
                "--wait-lock",
                "soon",
                "--root",
                r,
                "src",
            ],
            100,
        ),
        (
            vec!["check", "--json", "--timeout", "-1", "http://127.0.0.1:1/"],
            100,
        ),
    ] {
        let (code, out, err) = dream(&args);
        assert_eq!(code, Some(exit), "{args:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON object ({e}): {out:?}"));
        assert_eq!(v["ok"], false, "{args:?}: {v}");
        assert_eq!(v["exit"], exit, "{args:?}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
}

/// And the same shape when they succeed: `ok` and `exit` beside the
/// command's own fields (a list under its name, never a bare array).
#[test]
fn json_answers_have_one_shape_on_success_too() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let r = root.to_str().unwrap();
    tree.write("site/index.html", "hello");
    let site = tree.path().join("site");
    let s = site.to_str().unwrap();
    for (args, field) in [
        (vec!["deploy", "--json", "--root", r, s], "release"),
        (
            vec!["deploy", "--json", "--dry-run", "--root", r, s],
            "release",
        ),
        (vec!["releases", "--json", "--root", r], "releases"),
        (
            vec!["releases", "--json", "--verify", "--root", r],
            "releases",
        ),
        (vec!["deploy", "--json", "--root", r, s], "release"),
        (
            vec!["rollback", "--json", "--dry-run", "--root", r],
            "release",
        ),
    ] {
        let (code, out, err) = dream(&args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON object ({e}): {out:?}"));
        assert_eq!(
            (&v["ok"], &v["exit"]),
            (&true.into(), &0.into()),
            "{args:?}: {v}"
        );
        assert!(!v[field].is_null(), "{args:?}: no {field:?} in {v}");
    }
}

/// `dream man` refers to one page per subcommand; each of them exists, and
/// `--dir` writes them all.
#[test]
fn man_pages_exist_for_every_subcommand_they_refer_to() {
    let (code, out, _) = dream(&["man"]);
    assert_eq!(code, Some(0));
    let referred: Vec<String> = out
        .split("dream\\-")
        .skip(1)
        .filter_map(|s| s.split_once("(1)").map(|(n, _)| n.to_string()))
        .filter(|n| n.chars().all(|c| c.is_ascii_lowercase()))
        .collect();
    assert!(referred.len() >= 10, "{referred:?}");
    for sub in &referred {
        let (code, page, err) = dream(&["man", sub]);
        assert_eq!(code, Some(0), "{sub}: {err}");
        assert!(
            page.contains(&format!(".TH dream-{sub} 1")),
            "{sub}: {page}"
        );
    }
    let tree = Tree::new();
    let dir = tree.path().join("man1");
    std::fs::create_dir(&dir).unwrap();
    let (code, _, err) = dream(&["man", "--dir", dir.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(dir.join("dream.1").is_file());
    for sub in &referred {
        assert!(dir.join(format!("dream-{sub}.1")).is_file(), "{sub}");
    }
    // Nested subcommands: the page `--dir` writes as dream-fleet-deploy.1.
    let (code, page, err) = dream(&["man", "fleet", "deploy"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(page.contains(".TH dream-fleet-deploy 1"), "{page}");
    assert!(dir.join("dream-fleet-deploy.1").is_file());
    let (code, _, err) = dream(&["man", "fleet", "deplo"]);
    assert_eq!(code, Some(100), "{err}");
    assert!(
        err.contains("\"deplo\"") && err.contains("dream fleet") && err.contains("deploy"),
        "{err}"
    );
}

#[test]
fn start_priority_values_are_checked_on_the_command_line_and_in_dream_toml() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let r = root.to_str().unwrap();
    let serve = ["serve", "--root", r, "--listen", "127.0.0.1:0"];
    let (code, _, err) = dream(&[&serve[..], &["--start-priority", "fast", "--", "true"]].concat());
    assert_eq!(code, Some(100), "{err}");
    assert!(err.contains("fast") && err.contains("idle"), "{err}");
    std::fs::write(
        root.join("dream.toml"),
        "[serve]\nstart_priority = \"fast\"\n",
    )
    .unwrap();
    let (code, _, err) = dream(&[&serve[..], &["--", "true"]].concat());
    assert_eq!(code, Some(100), "{err}");
    assert!(err.contains("start_priority"), "{err}");
    // Without the permission to restore a worker's priority, idle is
    // refused before anything starts (as root there is nothing to refuse).
    if !nix::unistd::geteuid().is_root() {
        std::fs::remove_file(root.join("dream.toml")).unwrap();
        let (code, _, err) =
            dream(&[&serve[..], &["--start-priority", "idle", "--", "true"]].concat());
        assert_eq!(code, Some(100), "{err}");
        assert!(err.contains("CAP_SYS_NICE"), "{err}");
    }
}

/// `dream --upgrade-guard` is dream's own (an upgrade starts it): run by
/// hand, it says so in one line and does nothing.
#[test]
fn the_upgrade_guardian_run_by_hand_says_what_it_is() {
    for args in [&["--upgrade-guard"][..], &["--upgrade-guard", "1", "x"]] {
        let (code, out, err) = dream(args);
        assert_eq!(code, Some(1), "{args:?}: {out} {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("dream's own"), "{err}");
    }
}
