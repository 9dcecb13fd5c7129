//! `dream deploy`, `rollback` and `releases` on real directories,
//! tarballs (hostile ones included), a real git repository, and a running
//! supervisor under load.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dream_testkit::{
    Guard, Referee, Tree, alive, bin, current, dream_at as dream, get, live_pids, run, stopped,
    wait_until,
};
use nix::sys::signal::Signal;
use serde_json::Value;

fn deploy_json(root: &Path, source: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["deploy", source.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = dream(root, &args);
    assert_eq!(code, Some(0), "{err}");
    serde_json::from_str(out.trim()).unwrap()
}

fn staging_is_empty(root: &Path) -> bool {
    std::fs::read_dir(root.join(".dream/staging"))
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}

/// A site whose pages say `release NAME`, served by `dream static` via ./run.
fn site(tree: &Tree, name: &str) -> PathBuf {
    tree.write(
        &format!("{name}/public/index.html"),
        format!("<p>release {name}</p>\n"),
    );
    tree.write(
        &format!("{name}/run"),
        "#!/bin/sh\nexec \"$DREAM_BIN\" static --drain-grace 300ms\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tree.path().join(name).join("run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    tree.path().join(name)
}

#[test]
fn a_one_file_change_shares_the_other_1999() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for i in 0..2000 {
        tree.write(
            &format!("src/f/{:02}/{i}.txt", i % 50),
            format!("file {i}\n"),
        );
    }
    let first = deploy_json(&root, &tree.path().join("src"), &[]);
    assert_eq!(first["files"], 2000);
    assert_eq!(first["shared_files"], 0);
    tree.write("src/f/07/7.txt", "changed\n");
    let second = deploy_json(&root, &tree.path().join("src"), &[]);
    assert_eq!(second["shared_files"], 1999, "{second}");
    assert_eq!(second["previous"], first["release"]);
    let rel = root
        .join("releases")
        .join(second["release"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(rel.join("f/07/7.txt")).unwrap(),
        "changed\n"
    );
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let old = root
        .join("releases")
        .join(first["release"].as_str().unwrap());
    assert_eq!(
        std::fs::metadata(rel.join("f/00/0.txt")).unwrap().ino(),
        std::fs::metadata(old.join("f/00/0.txt")).unwrap().ino()
    );
    for p in [rel.join("f/00/0.txt"), rel.join("f/00"), rel.clone()] {
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o222,
            0,
            "{} is frozen",
            p.display()
        );
    }
    assert_eq!(current(&root).as_deref(), second["release"].as_str());
    assert!(staging_is_empty(&root));
    // The history decides the order; ids are never reused.
    let (code, _, err) = dream(
        &root,
        &[
            "deploy",
            tree.path().join("src").to_str().unwrap(),
            "--id",
            first["release"].as_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(100), "{err}");
    assert!(err.contains("never reused"), "{err}");
    let (code, out, _) = dream(&root, &["releases", "--json"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((&v["ok"], &v["exit"]), (&true.into(), &0.into()), "{v}");
    let list = &v["releases"];
    assert_eq!(list[0]["id"], first["release"]);
    assert_eq!(list[1]["current"], true);
}

#[test]
fn a_failing_build_changes_nothing() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let src = site(&tree, "a");
    let first = deploy_json(&root, &src, &["--build", "echo ok > built.txt"]);
    let rel = root
        .join("releases")
        .join(first["release"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(rel.join("built.txt")).unwrap(),
        "ok\n"
    );
    let (code, _, err) = dream(
        &root,
        &[
            "deploy",
            src.to_str().unwrap(),
            "--build",
            "echo compiling; echo 'error: syntax' >&2; exit 2",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("exited with status 2") && err.contains("error: syntax"),
        "{err}"
    );
    assert_eq!(current(&root).as_deref(), first["release"].as_str());
    assert!(staging_is_empty(&root), "nothing left staged");
}

/// A tar entry: raw name, kind, and contents (or link target).
type Entry<'a> = (&'a str, tar::EntryType, &'a str);

/// A tar archive with raw (unchecked) entry names, as an attacker builds it.
fn hostile_tar(path: &Path, entries: &[Entry<'_>]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, kind, data_or_link) in entries {
        let mut h = tar::Header::new_gnu();
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        if *kind == tar::EntryType::Symlink || *kind == tar::EntryType::Link {
            h.as_old_mut().linkname[..data_or_link.len()].copy_from_slice(data_or_link.as_bytes());
            h.set_size(0);
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        } else {
            h.set_size(data_or_link.len() as u64);
            h.set_cksum();
            b.append(&h, data_or_link.as_bytes()).unwrap();
        }
    }
    b.finish().unwrap();
}

#[test]
fn hostile_tarballs_are_refused_and_nothing_lands_outside() {
    use tar::EntryType::*;
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let good = tree.path().join("good.tar");
    hostile_tar(
        &good,
        &[
            ("public/index.html", Regular, "release good\n"),
            ("public/link.html", Symlink, "index.html"),
        ],
    );
    let first = deploy_json(&root, &good, &[]);
    let cases: Vec<(&str, Vec<Entry<'_>>)> = vec![
        ("dotdot", vec![("../escaped.txt", Regular, "x")]),
        (
            "deep-dotdot",
            vec![("public/../../escaped.txt", Regular, "x")],
        ),
        (
            "absolute",
            vec![("/tmp/dream-escaped-abs.txt", Regular, "x")],
        ),
        (
            "symlink-out",
            vec![("public/passwd", Symlink, "/etc/passwd")],
        ),
        (
            "symlink-up",
            vec![("public/up", Symlink, "../../escaped.txt")],
        ),
        (
            "write-through-link",
            vec![
                ("public", Symlink, "."),
                ("public/../escaped.txt", Regular, "x"),
            ],
        ),
        ("hardlink-out", vec![("h", Link, "../../etc/passwd")]),
        ("device", vec![("dev", Char, "")]),
        ("fifo", vec![("pipe", Fifo, "")]),
    ];
    for (name, entries) in cases {
        let t = tree.path().join(format!("{name}.tar"));
        hostile_tar(&t, &entries);
        let (code, _, err) = dream(&root, &["deploy", t.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(
            err.contains("refused") || err.contains("outside"),
            "{name}: {err}"
        );
        assert_eq!(
            current(&root).as_deref(),
            first["release"].as_str(),
            "{name}"
        );
        assert!(staging_is_empty(&root), "{name}");
        assert!(!tree.path().join("escaped.txt").exists(), "{name}");
        assert!(!root.join("escaped.txt").exists(), "{name}");
    }
    assert!(!Path::new("/tmp/dream-escaped-abs.txt").exists());
    // Compressed tarballs work too.
    let tgz = tree.path().join("site.tgz");
    let gz = flate_tar(&good);
    std::fs::write(&tgz, gz).unwrap();
    deploy_json(&root, &tgz, &[]);
}

/// The probe's chains: each link harmless read alone (`l1 -> l0/..`), but
/// together they climb out of the staging directory to the tree that holds
/// ROOT. No entry may be written, hard-linked or served through them.
#[test]
fn chains_of_links_reach_nothing_outside_the_release() {
    use std::os::unix::fs::MetadataExt;
    use tar::EntryType::*;
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let victim = tree.write("victim.txt", "secret\n");
    std::fs::set_permissions(&victim, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let before = std::fs::metadata(&victim).unwrap();
    let good = tree.path().join("good.tar");
    hostile_tar(&good, &[("public/index.html", Regular, "good\n")]);
    let first = deploy_json(&root, &good, &[]);
    // Staging is ROOT/.dream/staging/<dir>: five `..` reach the tree.
    let chain: Vec<(String, String)> = (0..7)
        .map(|i| {
            let target = if i == 0 {
                ".".to_string()
            } else {
                format!("l{}/..", i - 1)
            };
            (format!("l{i}"), target)
        })
        .collect();
    let with_chain = |tail: Vec<Entry<'static>>| -> Vec<(String, tar::EntryType, String)> {
        let mut v: Vec<_> = chain
            .iter()
            .map(|(n, t)| (n.clone(), Symlink, t.clone()))
            .collect();
        v.extend(
            tail.into_iter()
                .map(|(n, k, d)| (n.to_string(), k, d.to_string())),
        );
        v
    };
    let cases = vec![
        (
            "overwrite",
            with_chain(vec![
                ("victim", Symlink, "l4/victim.txt"),
                ("victim", Regular, "pwned\n"),
            ]),
        ),
        (
            "write-through-dir",
            with_chain(vec![("l4/victim.txt", Regular, "pwned\n")]),
        ),
        ("hard-link", with_chain(vec![("h", Link, "l4/victim.txt")])),
        ("serve-outside", with_chain(vec![("public", Symlink, "l6")])),
        (
            "absolute-inside-text",
            vec![(
                "public".into(),
                Symlink,
                tree.path().to_str().unwrap().into(),
            )],
        ),
    ];
    for (name, entries) in cases {
        let t = tree.path().join(format!("{name}.tar"));
        let borrowed: Vec<Entry<'_>> = entries
            .iter()
            .map(|(n, k, d)| (n.as_str(), *k, d.as_str()))
            .collect();
        hostile_tar(&t, &borrowed);
        let (code, _, err) = dream(&root, &["deploy", t.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(err.contains("refused"), "{name}: {err}");
        assert_eq!(
            current(&root).as_deref(),
            first["release"].as_str(),
            "{name}"
        );
        assert!(staging_is_empty(&root), "{name}");
        let after = std::fs::metadata(&victim).unwrap();
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "secret\n",
            "{name}"
        );
        assert_eq!(after.mode(), before.mode(), "{name}: the freeze reached it");
        assert_eq!(after.nlink(), 1, "{name}: hard-linked into a release");
        assert_eq!(after.mtime(), before.mtime(), "{name}");
    }
}

/// A deploy root that someone else could have prepared is refused before
/// anything in it is touched: world- or group-writable, owned by another
/// user (as root), or with a symlink where dream keeps its state.
#[test]
fn a_root_someone_else_could_have_prepared_is_refused() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let tree = Tree::new();
    let src = site(&tree, "a");
    let mode =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();

    let open = tree.path().join("open");
    std::fs::create_dir(&open).unwrap();
    mode(&open, 0o777);
    let (code, _, err) = dream(&open, &["deploy", src.to_str().unwrap()]);
    assert_eq!(code, Some(100), "{err}");
    assert!(
        err.contains("writable by others") && err.contains("chmod go-w"),
        "{err}"
    );
    assert!(!open.join(".dream").exists() && !open.join("releases").exists());

    // Symlinks where dream keeps its state, each at a file or directory
    // that must stay exactly as it is.
    let precious = tree.write("precious/file", "keep me\n");
    mode(&precious, 0o600);
    for (name, target) in [
        (".dream/staging", precious.parent().unwrap()),
        (".dream/lock", precious.as_path()),
        (".dream/history", precious.as_path()),
        ("releases", precious.parent().unwrap()),
        (".dream", precious.parent().unwrap()),
    ] {
        let root = tree
            .path()
            .join(format!("root-{}", name.replace(['.', '/'], "")));
        std::fs::create_dir_all(root.join(".dream")).unwrap();
        if name == ".dream" {
            std::fs::remove_dir(root.join(".dream")).unwrap();
        }
        symlink(target, root.join(name)).unwrap();
        let (code, _, err) = dream(&root, &["deploy", src.to_str().unwrap()]);
        assert_ne!(code, Some(0), "{name}: {err}");
        assert!(
            err.contains("symlink") || err.contains("symbolic link"),
            "{name}: {err}"
        );
        assert_eq!(
            std::fs::read_to_string(&precious).unwrap(),
            "keep me\n",
            "{name}"
        );
        assert_eq!(
            std::fs::metadata(&precious).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = std::fs::read_dir(precious.parent().unwrap())
            .unwrap()
            .collect();
        assert_eq!(names.len(), 1, "{name}: the directory was written to");
    }

    if !dream_testkit::prerequisite(
        nix::unistd::geteuid().is_root(),
        "needs root to hand a deploy root to another user",
    ) {
        return;
    }
    let theirs = tree.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    nix::unistd::chown(&theirs, Some(65534.into()), Some(65534.into())).unwrap();
    let (code, _, err) = dream(&theirs, &["deploy", src.to_str().unwrap()]);
    assert_eq!(code, Some(100), "{err}");
    assert!(err.contains("owned by uid 65534"), "{err}");
    assert!(!theirs.join(".dream").exists());
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .args(["serve", "--listen", "127.0.0.1:0", "--root"])
            .arg(&theirs)
            .args(["--", "true"]),
        Duration::from_secs(20),
    );
    let code = status.code();
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("owned by uid 65534"), "{err}");
}

fn flate_tar(tar: &Path) -> Vec<u8> {
    let out = Command::new("gzip")
        .arg("-c")
        .arg(tar)
        .output()
        .expect("gzip");
    assert!(out.status.success());
    out.stdout
}

#[test]
fn git_sources_deploy_a_clean_tree_and_refuse_injection() {
    let tree = Tree::new();
    let repo = tree.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&repo)
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    git(&["init", "-q"]);
    std::fs::write(repo.join("index.html"), "v1\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "-qm", "v1"]);
    git(&["tag", "v1"]);
    std::fs::write(repo.join("index.html"), "v2\n").unwrap();
    git(&["commit", "-qam", "v2"]);
    let v1 = git(&["rev-parse", "--short=8", "v1"]);
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let r = deploy_json(&root, Path::new(&format!("git:{}#v1", repo.display())), &[]);
    let id = r["release"].as_str().unwrap();
    assert!(id.ends_with(&v1), "{id} includes the commit");
    let rel = root.join("releases").join(id);
    assert_eq!(
        std::fs::read_to_string(rel.join("index.html")).unwrap(),
        "v1\n"
    );
    assert!(!rel.join(".git").exists(), "a clean tree");
    let marker = tree.path().join("pwned");
    for evil in [
        format!("git:--upload-pack=touch {}", marker.display()),
        format!("git:{}#--output={}", repo.display(), marker.display()),
        format!("git:ext::sh -c touch% {}", marker.display()),
    ] {
        let (code, _, err) = dream(&root, &["deploy", &evil]);
        assert_eq!(code, Some(100), "{evil}: {err}");
        assert!(!marker.exists(), "{evil} ran something");
    }
}

#[test]
fn bad_ids_and_a_real_current_directory_are_usage_errors() {
    let tree = Tree::new();
    let src = site(&tree, "a");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for id in [
        "../x", "a/b", ".hidden", "a\u{1}b", "-rf", "--help", "current",
    ] {
        let arg = format!("--id={id}");
        let (code, _, err) = dream(&root, &["deploy", src.to_str().unwrap(), &arg]);
        assert_eq!(code, Some(100), "{id}: {err}");
        assert!(!root.join("releases").join(id).exists(), "{id}");
    }
    // A source that is, contains or lies inside the root (staging is in
    // it): refused at once, nothing created.
    let proj = tree.path().join("proj");
    tree.write("proj/public/index.html", "x\n");
    for (root, src, how) in [
        (proj.clone(), proj.clone(), "is"),
        (proj.join("deploy"), proj.clone(), "contains"),
        (
            tree.path().join("r2"),
            tree.path().join("r2/src"),
            "lies inside",
        ),
    ] {
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&src).unwrap();
        let (code, _, err) = dream(&root, &["deploy", src.to_str().unwrap()]);
        assert_eq!(code, Some(100), "{how}: {err}");
        assert!(err.contains(&format!("it {how} the deploy root")), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(!root.join(".dream").exists(), "{how}");
    }
    // No --root, no DREAM_ROOT, and the current directory is not a root.
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .args(["deploy", "."])
            .current_dir(&proj)
            .env_remove("DREAM_ROOT"),
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(100), "{err}");
    assert!(err.contains("no deploy root"), "{err}");
    assert!(!proj.join(".dream").exists());

    std::fs::create_dir(root.join("current")).unwrap();
    let (code, _, err) = dream(&root, &["deploy", src.to_str().unwrap()]);
    assert_eq!(code, Some(100), "{err}");
    assert!(err.contains("not a symlink"), "{err}");
}

#[test]
fn concurrent_deploys_exactly_one_wins_and_kill_9_at_every_phase_is_harmless() {
    let tree = Tree::new();
    let a = site(&tree, "a");
    let b = site(&tree, "b");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let first = deploy_json(&root, &a, &[]);
    for phase in ["locked", "staged", "built", "shared", "synced", "switched"] {
        let before = current(&root);
        let g = Guard::spawn(
            Command::new(bin("dream"))
                .args(["deploy", "--root"])
                .arg(&root)
                .arg(&b)
                .args(["--build", "true"])
                .env("DREAM_TEST_STOP_AFTER", phase),
        );
        let pid = g.pid();
        wait_until(
            Duration::from_secs(20),
            &format!("deploy to stop after {phase}"),
            || stopped(pid).then_some(()),
        );
        // The lock is held: a second deploy loses at once, naming the winner.
        let (code, _, err) = dream(&root, &["deploy", a.to_str().unwrap()]);
        assert_eq!(code, Some(111), "{phase}: {err}");
        assert!(
            err.contains(&format!("held by pid {pid}")),
            "{phase}: {err}"
        );
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        drop(g);
        // current always names a complete release.
        let now = current(&root).unwrap();
        let index = root.join("releases").join(&now).join("public/index.html");
        assert!(index.is_file(), "{phase}: current -> {now} is complete");
        if phase != "switched" {
            assert_eq!(Some(now), before, "{phase}: not switched yet");
        }
        // The next deploy cleans up and succeeds.
        let (code, _, err) = dream(&root, &["deploy", a.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{phase}: {err}");
        assert!(staging_is_empty(&root), "{phase}");
    }
    assert!(first["release"].is_string());
}

#[test]
fn deploys_rollbacks_and_a_crashing_release_under_load() {
    let tree = Tree::new();
    let a = site(&tree, "a");
    let b = site(&tree, "b");
    tree.write("crash/public/index.html", "<p>release crash</p>\n");
    tree.write(
        "crash/run",
        "#!/bin/sh\necho 'fatal: cannot open config' >&2\nexit 3\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tree.path().join("crash/run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    // Each release's page names its own id, as the referee expects.
    let stamp = r#"echo "<p>release $DREAM_RELEASE</p>" > public/index.html"#;
    deploy_json(&root, &a, &["--id", "a1", "--build", stamp]);
    let (mut sup, addr) =
        dream_testkit::serve_root(&root, &["--workers", "2", "--ready", "notify"]);
    let referee = Referee::start(addr, true);
    for i in 0..8 {
        let src = if i % 2 == 0 { &b } else { &a };
        let r = deploy_json(&root, src, &["--keep", "3", "--build", stamp]);
        assert!(r["generation"].as_u64().is_some(), "{r}");
    }
    let (code, out, err) = dream(&root, &["rollback"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = dream(
        &root,
        &[
            "deploy",
            tree.path().join("crash").to_str().unwrap(),
            "--id",
            "crash1",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("fatal: cannot open config"), "{err}");
    assert!(err.contains("switched back"), "{err}");
    assert_ne!(current(&root).as_deref(), Some("crash1"));
    let (_, out, _) = dream(&root, &["releases", "--json"]);
    let list: Value = serde_json::from_str::<Value>(out.trim()).unwrap()["releases"].take();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == "crash1" && r["state"] == "bad"),
        "{list}"
    );
    let (code, out, err) = dream(&root, &["rollback"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_ne!(
        current(&root).as_deref(),
        Some("crash1"),
        "a rollback skips bad releases"
    );
    referee.wait_responses(50);
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
    assert!(report.releases.len() >= 2, "{}", report.human());
    let dirs = std::fs::read_dir(root.join("releases")).unwrap().count();
    assert!(dirs <= 5, "pruned to --keep plus protected ones: {dirs}");
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn pruning_spares_a_release_still_served_by_a_draining_generation() {
    let tree = Tree::new();
    tree.write("old/public/index.html", "<p>release old</p>\n");
    tree.write(
        "old/run",
        "#!/bin/sh\nexec \"$PROBE_BIN\" --serve --ignore-term\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tree.path().join("old/run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let b = site(&tree, "b");
    let c = site(&tree, "c");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    deploy_json(&root, &tree.path().join("old"), &["--id", "old"]);
    let _sup = Guard::spawn(
        Command::new(bin("dream"))
            .args(["serve", "--root"])
            .arg(&root)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--workers",
                "1",
                // READY=1 comes once the probe ignores TERM (readiness by
                // time could drain it first, and TERM would kill it).
                "--ready",
                "notify",
                "--drain-timeout",
                "60s",
                "--",
                "./run",
            ])
            .env("DREAM_BIN", bin("dream"))
            .env("PROBE_BIN", dream_testkit::probe()),
    );
    let r = wait_until(Duration::from_secs(20), "the stubborn worker ready", || {
        let v = dream_core::supervise::control::request(
            &root,
            &serde_json::json!({"cmd":"status"}),
            Some(Duration::from_secs(5)),
        )
        .ok()?;
        let s: dream_core::supervise::control::Status = serde_json::from_value(v).ok()?;
        let ready = s.pool.generations.first()?.workers.first()?.state
            == dream_core::supervise::pool::WorkerPhase::Ready;
        ready.then_some(s)
    });
    let stubborn = live_pids(&r)[0];
    deploy_json(&root, &b, &["--id", "b1", "--keep", "1"]);
    deploy_json(&root, &c, &["--id", "c1", "--keep", "1"]);
    deploy_json(&root, &b, &["--id", "b2", "--keep", "1"]);
    assert!(alive(stubborn), "the old generation is still draining");
    assert!(root.join("releases/old").is_dir(), "in use: not pruned");
    assert!(!root.join("releases/b1").exists(), "b1 was prunable");
}

#[test]
fn wait_lock_waits_for_the_holder() {
    let tree = Tree::new();
    let a = site(&tree, "a");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    deploy_json(&root, &a, &[]);
    let holder = Guard::spawn(
        Command::new(bin("dream"))
            .args(["deploy", "--root"])
            .arg(&root)
            .arg(&a)
            .env("DREAM_TEST_STOP_AFTER", "staged"),
    );
    let pid = holder.pid();
    wait_until(Duration::from_secs(20), "the holder to stop", || {
        stopped(pid).then_some(())
    });
    let mut waiter = Guard::spawn(
        Command::new(bin("dream"))
            .args(["deploy", "--wait-lock", "30s", "--root"])
            .arg(&root)
            .arg(&a),
    );
    let waiter_pid = waiter.pid();
    // The waiter has opened the lock file and is polling it.
    let lock = root.join(".dream/lock");
    wait_until(
        Duration::from_secs(10),
        "the waiter to open the lock",
        || {
            std::fs::read_dir(format!("/proc/{waiter_pid}/fd"))
                .ok()?
                .flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == lock))
                .then_some(())
        },
    );
    assert!(waiter.child.try_wait().unwrap().is_none());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert!(waiter.wait_exit(Duration::from_secs(30)).success());
    assert!(staging_is_empty(&root));
}

#[test]
fn root_shared_is_linked_into_every_release() {
    let tree = Tree::new();
    let src = site(&tree, "a");
    tree.write("a/uploads/stale.txt", "from the source\n");
    let root = tree.path().join("root");
    std::fs::create_dir_all(root.join("shared/uploads")).unwrap();
    std::fs::write(
        root.join("shared/uploads/photo.txt"),
        "kept across releases\n",
    )
    .unwrap();
    let r1 = deploy_json(&root, &src, &[]);
    let r2 = deploy_json(&root, &src, &[]);
    for r in [&r1, &r2] {
        let rel = root.join("releases").join(r["release"].as_str().unwrap());
        assert_eq!(
            std::fs::read_link(rel.join("uploads")).unwrap(),
            Path::new("../../shared/uploads")
        );
        assert!(
            !rel.join("uploads/stale.txt").exists(),
            "the shared directory wins"
        );
    }
    assert_eq!(
        std::fs::read_to_string(root.join("current/uploads/photo.txt")).unwrap(),
        "kept across releases\n"
    );
    assert!(
        r2["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["phase"] == "linked")
    );
}

/// A small xorshift generator, seeded from the clock (or `DREAM_SEED`),
/// with the seed printed so that a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("DREAM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("DREAM_SEED={seed}");
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Sets a file's modification time to a fixed instant, as `touch -d` would.
fn pin_mtime(path: &Path) {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_704_067_200); // 2024-01-01
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Every file below `src` has the same bytes below `dst`.
fn assert_same_tree(src: &Path, dst: &Path, what: &str) {
    let mut stack = vec![PathBuf::new()];
    let mut files = 0;
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(src.join(&rel)).unwrap().flatten() {
            let rel = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(rel);
            } else {
                files += 1;
                let want = std::fs::read(src.join(&rel)).unwrap();
                let got = std::fs::read(dst.join(&rel))
                    .unwrap_or_else(|e| panic!("{what}: {}: {e}", rel.display()));
                assert!(want == got, "{what}: {} holds stale bytes", rel.display());
            }
        }
    }
    assert!(files > 0);
}

/// The issue's repro: two 8-byte files, the same mtime, different bytes.
#[test]
fn a_changed_file_with_the_same_size_and_time_is_never_replaced_by_the_old_one() {
    let tree = Tree::new();
    let root = tree.path().join("R");
    std::fs::create_dir(&root).unwrap();
    let a = tree.write("a/config", "DEBUG=0\n");
    let b = tree.write("b/config", "DEBUG=1\n");
    pin_mtime(&a);
    pin_mtime(&b);
    deploy_json(&root, &tree.path().join("a"), &[]);
    let second = deploy_json(&root, &tree.path().join("b"), &[]);
    assert_eq!(
        std::fs::read_to_string(root.join("current/config")).unwrap(),
        "DEBUG=1\n"
    );
    assert_eq!(second["shared_files"], 0, "{second}");
}

/// Randomized rounds over a few hundred files of one size and one mtime:
/// each round rewrites random files with new bytes of the same length and
/// restores their mtime, then deploys (a directory, a tarball, and a
/// directory whose build rewrites files); the release always holds exactly
/// the source's bytes, and unchanged files are still shared.
#[test]
fn randomized_same_size_same_time_rewrites_always_reach_the_release() {
    let mut rng = Rng::new();
    let tree = Tree::new();
    let src = tree.path().join("src");
    let names: Vec<String> = (0..300)
        .map(|i| format!("d{}/f {i}%{}.txt", i % 7, ["", "é", "\u{1}", "-x"][i % 4]))
        .collect();
    for n in &names {
        let p = tree.write(&format!("src/{n}"), rng.bytes(16));
        pin_mtime(&p);
    }
    for (kind, extra) in [("dir", None), ("tar", None), ("build", Some("built"))] {
        let root = tree.path().join(format!("root-{kind}"));
        std::fs::create_dir(&root).unwrap();
        for round in 0..6 {
            let changed: std::collections::BTreeSet<usize> = (0..1 + rng.below(20))
                .map(|_| rng.below(names.len()))
                .collect();
            for i in &changed {
                let p = src.join(&names[*i]);
                std::fs::write(&p, rng.bytes(16)).unwrap();
                pin_mtime(&p);
            }
            let mut args: Vec<String> = Vec::new();
            let source = match kind {
                "tar" => {
                    let t = tree.path().join(format!("src-{round}.tar"));
                    let mut b = tar::Builder::new(std::fs::File::create(&t).unwrap());
                    b.mode(tar::HeaderMode::Deterministic);
                    b.append_dir_all(".", &src).unwrap();
                    b.finish().unwrap();
                    t
                }
                _ => src.clone(),
            };
            if let Some(file) = extra {
                // The build rewrites one of the files with same-length bytes
                // that differ each round, and pins its mtime again.
                let name = &names[round % names.len()];
                let content: String = format!("{:016x}", rng.next());
                args.push("--build".into());
                args.push(format!(
                    "printf '%s' {content} > '{name}' && touch -d 2024-01-01 '{name}' && printf '%s' {content} > {file}"
                ));
            }
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let report = deploy_json(&root, &source, &argv);
            let what = format!("{kind} round {round} (changed {changed:?})");
            if kind == "build" {
                // The build's rewrite is what the release holds.
                let name = &names[round % names.len()];
                let built = std::fs::read(root.join("current/built")).unwrap();
                assert_eq!(
                    std::fs::read(root.join("current").join(name)).unwrap(),
                    built,
                    "{what}"
                );
            } else {
                assert_same_tree(&src, &root.join("current"), &what);
            }
            if round > 0 && kind != "build" {
                let shared = report["shared_files"].as_u64().unwrap();
                assert!(shared >= 300 - changed.len() as u64, "{what}: {report}");
            }
        }
    }
}

/// `releases --verify` passes on an intact store and names an edited file;
/// the same content gets the same id suffix.
#[test]
fn verify_names_edited_files_and_ids_follow_content() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    tree.write("a/public/index.html", "one\n");
    tree.write("a/public/other.html", "two\n");
    let first = deploy_json(&root, &tree.path().join("a"), &[]);
    let second = deploy_json(&root, &tree.path().join("a"), &[]);
    let suffix = |v: &Value| {
        // <timestamp>-<8 hex of the manifest digest>[-<n> when the second is taken]
        v["release"]
            .as_str()
            .unwrap()
            .split('-')
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(suffix(&first), suffix(&second), "{first} {second}");
    assert!(
        root.join(".dream/manifests")
            .join(first["release"].as_str().unwrap())
            .is_file()
    );
    let (code, out, err) = dream(&root, &["releases", "--verify"]);
    assert_eq!(code, Some(0), "{out}{err}");
    // Someone edits the live release (root can, through its permissions).
    let live = root.join("current/public/other.html");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&live, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&live, "TWO\n").unwrap();
    std::fs::set_permissions(&live, std::fs::Permissions::from_mode(0o444)).unwrap();
    let (code, out, err) = dream(&root, &["releases", "--verify"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("changed  public/other.html"), "{out}");
    let (code, out, _) = dream(&root, &["releases", "--verify", "--json"]);
    assert_eq!(code, Some(1));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    // Structured, not preformatted: what differs, and where (in each
    // release sharing the edited file).
    let mut differs: Vec<&Value> = v["releases"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["differences"].as_array().unwrap())
        .collect();
    differs.dedup();
    assert_eq!(
        differs,
        [&serde_json::json!({"what": "changed", "path": "public/other.html"})],
        "{v}"
    );
}

/// With v1, v2, v3 live in turn, two rollbacks went v3 -> v2 -> v3. The
/// release a rollback leaves is marked "rolled back" and skipped, so the
/// second goes to v1; a named rollback may still pick any good release.
#[test]
fn two_rollbacks_go_two_steps_back_never_forward() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for v in ["v1", "v2", "v3"] {
        tree.write(&format!("{v}/index.html"), format!("{v}\n"));
        deploy_json(&root, &tree.path().join(v), &["--id", v]);
    }
    let live = || std::fs::read_to_string(root.join("current/index.html")).unwrap();
    assert_eq!(live(), "v3\n");
    let (code, _, err) = dream(&root, &["rollback"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(live(), "v2\n");
    let (code, _, err) = dream(&root, &["rollback"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(live(), "v1\n", "the second rollback went forward");
    let (code, out, _) = dream(&root, &["releases"]);
    assert_eq!(code, Some(0));
    assert!(out.lines().next().unwrap().contains("STATE"), "{out}");
    let state = |id: &str| {
        out.lines()
            .find(|l| l.split_whitespace().any(|w| w == id))
            .unwrap_or_else(|| panic!("{id} in {out}"))
            .to_string()
    };
    assert!(state("v3").contains("rolled back"), "{out}");
    assert!(state("v2").contains("rolled back"), "{out}");
    // Named: any good release, the ones left by rollbacks included.
    let (code, _, err) = dream(&root, &["rollback", "v3"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(live(), "v3\n");
    // A named rollback marks nothing: the next automatic one goes back to
    // v1, which it left, and never to v2, which an automatic one left.
    let (code, _, err) = dream(&root, &["rollback"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(live(), "v1\n");
}

/// An interrupted deploy ends its build's whole process group, removes its
/// staging and exits 128 + the signal; the build's output streams as it
/// runs; a build that prints nothing says so; -q keeps only the tail.
#[test]
fn builds_stream_end_with_their_deploy_and_say_what_they_printed() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let src = site(&tree, "a");
    let first = deploy_json(&root, &src, &[]);
    for (sig, code) in [
        (Signal::SIGTERM, 143),
        (Signal::SIGINT, 130),
        (Signal::SIGHUP, 129),
    ] {
        let pidfile = tree.path().join(format!("bg-{code}"));
        let build = format!(
            "sleep 1000 & echo $! > {}; echo started building; wait",
            pidfile.display()
        );
        let mut d = Guard::spawn(
            Command::new(bin("dream"))
                .args(["deploy", "--root"])
                .arg(&root)
                .arg(&src)
                .args(["--build", &build]),
        );
        // Streamed while the build still runs.
        d.wait_stderr("build | started building", Duration::from_secs(20));
        let bg: i64 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(alive(bg));
        d.signal(sig);
        let status = d.wait_exit(Duration::from_secs(20));
        assert_eq!(status.code(), Some(code), "{sig:?}");
        wait_until(
            Duration::from_secs(10),
            "the build's background job to end",
            || (!alive(bg)).then_some(()),
        );
        assert!(staging_is_empty(&root), "{sig:?}");
        assert_eq!(current(&root).as_deref(), first["release"].as_str());
    }
    // A failing build that printed nothing says so.
    let (code, _, err) = dream(
        &root,
        &["deploy", src.to_str().unwrap(), "--build", "exit 3"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("exited with status 3") && err.contains("It printed nothing."),
        "{err}"
    );
    // -q: no streaming, but the failure shows the last 20 lines.
    let (code, _, err) = dream(
        &root,
        &[
            "deploy",
            "-q",
            src.to_str().unwrap(),
            "--build",
            "for i in $(seq 1 30); do echo line-$i; done; exit 2",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(!err.contains("build | line-30"), "{err}");
    assert!(
        err.contains("line-30") && err.contains("line-11") && !err.contains("line-10\n"),
        "{err}"
    );
}

/// `--verify PATH`: after the reload, the path is requested through the
/// supervisor's own socket; a release that does not answer it well is
/// marked bad and the previous one put back, and no client notices.
#[test]
fn verify_puts_the_previous_release_back_when_a_path_fails() {
    let tree = Tree::new();
    let good = site(&tree, "good");
    tree.write("good/public/healthz", "ok\n");
    let broken = site(&tree, "broken");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let stamp = r#"echo "<p>release $DREAM_RELEASE</p>" > public/index.html"#;
    deploy_json(&root, &good, &["--id", "g1", "--build", stamp]);
    let (_sup, addr) = dream_testkit::serve_root(&root, &["--workers", "2", "--ready", "notify"]);
    let referee = Referee::start(addr, true);
    referee.wait_responses(20);
    let (code, _, err) = dream(
        &root,
        &[
            "deploy",
            broken.to_str().unwrap(),
            "--id",
            "b1",
            "--build",
            stamp,
            "--verify",
            "/healthz",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("GET /healthz answered 404"), "{err}");
    assert_eq!(current(&root).as_deref(), Some("g1"));
    wait_until(Duration::from_secs(20), "g1 served again", || {
        (get(addr, "/", &[]).header("x-dream-release") == Some("g1")).then_some(())
    });
    let (code, out, _) = dream(&root, &["releases", "--json"]);
    assert_eq!(code, Some(0));
    let list: Value = serde_json::from_str::<Value>(&out).unwrap()["releases"].take();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == "b1" && r["state"] == "bad"),
        "{list}"
    );
    let (code, _, err) = dream(
        &root,
        &[
            "deploy",
            good.to_str().unwrap(),
            "--id",
            "g2",
            "--build",
            stamp,
            "--verify",
            "/healthz",
            "--verify",
            "/",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("verified"), "{err}");
    let (code, _, err) = dream(
        &root,
        &["deploy", good.to_str().unwrap(), "--verify", "healthz"],
    );
    assert_eq!(code, Some(100), "a path starts with /: {err}");
    referee.wait_responses(20);
    let report = referee.finish();
    assert_eq!(report.error_total, 0, "{}", report.human());
    assert_eq!(report.mixed, 0, "{}", report.human());
}

/// A directory source leaves out `.git/` (unless kept), what its
/// `.dreamignore` names, and `--exclude` patterns; the report and the dry
/// run name what was left out, and a dry run writes nothing.
#[test]
fn exclusions_and_dry_runs() {
    let tree = Tree::new();
    let src = site(&tree, "src");
    tree.write("src/.git/HEAD", "ref: refs/heads/main\n");
    tree.write("src/.dreamignore", "*.log\nnode_modules/\n");
    tree.write("src/app.log", "noise\n");
    tree.write("src/public/deep/debug.log", "more noise\n");
    tree.write("src/node_modules/x/index.js", "module.exports = 1\n");
    tree.write("src/secret.env", "TOKEN=1\n");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let s = src.to_str().unwrap();
    // A dry run: the plan, and nothing written.
    let (code, out, err) = dream(
        &root,
        &[
            "deploy",
            s,
            "--dry-run",
            "--json",
            "--exclude",
            "secret.env",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let plan: Value = serde_json::from_str(out.trim()).unwrap();
    let excluded: Vec<&str> = plan["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for left in [
        ".git",
        "app.log",
        "node_modules",
        "public/deep/debug.log",
        "secret.env",
    ] {
        assert!(excluded.contains(&left), "{left} in {excluded:?}");
    }
    assert_eq!(plan["previous"], Value::Null);
    assert!(plan["copied_files"].as_u64().unwrap() >= 3, "{plan}");
    assert!(
        !root.join("releases").exists()
            || std::fs::read_dir(root.join("releases")).unwrap().count() == 0,
        "a dry run writes no release"
    );
    assert!(!root.join(".dream/history").exists(), "nor history");
    // The deploy leaves the same out.
    let r = deploy_json(&root, &src, &["--id", "one", "--exclude", "secret.env"]);
    let rel = root.join("releases/one");
    for gone in [
        ".git",
        "app.log",
        "node_modules",
        "public/deep/debug.log",
        "secret.env",
    ] {
        assert!(!rel.join(gone).exists(), "{gone} was left out");
    }
    assert!(rel.join("public/index.html").is_file());
    assert!(rel.join(".dreamignore").is_file());
    assert!(r["excluded"].as_array().unwrap().len() >= 5, "{r}");
    let manifest = std::fs::read_to_string(root.join(".dream/manifests/one")).unwrap();
    assert!(
        !manifest.contains("secret.env") && !manifest.contains(".git"),
        "{manifest}"
    );
    let (code, _, err) = dream(&root, &["releases", "--verify", "one"]);
    assert_eq!(code, Some(0), "{err}");
    // Asked for, .git/ comes along; a dry run against a release compares.
    deploy_json(&root, &src, &["--id", "two", "--keep-git"]);
    assert!(root.join("releases/two/.git/HEAD").is_file());
    let before = snapshot(&root);
    let (code, out, _) = dream(&root, &["deploy", s, "--dry-run"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("shared with two"), "{out}");
    let (code, out, _) = dream(&root, &["rollback", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("two -> one"), "{out}");
    assert_eq!(
        snapshot(&root),
        before,
        "a dry run leaves the store byte-identical"
    );
}

/// Every path under `dir` with its type, mode, size, mtime and content.
fn snapshot(dir: &Path) -> Vec<(PathBuf, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let content = if m.is_file() {
                format!("{:?}", std::fs::read(&p).unwrap())
            } else if m.is_symlink() {
                format!("-> {:?}", std::fs::read_link(&p).unwrap())
            } else {
                stack.push(p.clone());
                String::new()
            };
            out.push((
                p,
                format!(
                    "{:o} {} {} {content}",
                    m.mode(),
                    m.size(),
                    m.mtime_nsec() + m.mtime() * 1_000_000_000
                ),
            ));
        }
    }
    out.sort();
    out
}

/// Hooks in ROOT/.dream/hooks run with the lock held and a JSON event on
/// stdin; a failing pre-switch aborts before anything is switched, and
/// deploy-failed hears why; --no-hooks skips them.
#[test]
fn hooks_run_around_the_switch_and_a_failing_pre_switch_switches_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let tree = Tree::new();
    let src = site(&tree, "src");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    deploy_json(&root, &src, &["--id", "one"]);
    let log = tree.path().join("hooks.log");
    let cwds = tree.path().join("cwd.log");
    let hooks = root.join(".dream/hooks");
    assert!(
        hooks.is_dir(),
        "a deploy makes .dream/hooks, to drop hooks into"
    );
    for name in ["pre-switch", "post-switch", "post-deploy", "deploy-failed"] {
        let path = hooks.join(name);
        // Each records its stdin and where it ran, and says hello.
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\n{{ cat; echo; }} >> {log}\necho \"{name} $(pwd -P) $DREAM_RELEASE_DIR\" >> {cwds}\necho \"{name} says hello\"\n[ -e \"$DREAM_ROOT/fail-{name}\" ] && exit 3\nexit 0\n",
                log = log.display(),
                cwds = cwds.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (code, _, err) = dream(&root, &["deploy", src.to_str().unwrap(), "--id", "two"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("dream: hook pre-switch | pre-switch says hello"),
        "{err}"
    );
    let events: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = events.iter().map(|e| e["hook"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["pre-switch", "post-switch", "post-deploy"],
        "{events:?}"
    );
    assert_eq!(events[0]["release"], "two");
    assert_eq!(events[0]["previous"], "one");
    // Each ran in the release's directory (its ./bin is the release's).
    let two = std::fs::canonicalize(root.join("releases/two")).unwrap();
    assert_eq!(
        events[0]["release_dir"],
        root.join("releases/two").to_str().unwrap()
    );
    let ran = std::fs::read_to_string(&cwds).unwrap();
    for line in ran.lines() {
        let (name, rest) = line.split_once(' ').unwrap();
        let (cwd, dir) = rest.split_once(' ').unwrap();
        assert_eq!(Path::new(cwd), two, "{name}: {ran}");
        assert_eq!(Path::new(dir), root.join("releases/two"), "{name}: {ran}");
    }
    assert!(events[0]["host"].as_str().is_some_and(|h| !h.is_empty()));
    // The lock is held while a hook runs: a concurrent deploy exits 111.
    let gate = root.join("open-gate");
    std::fs::write(
        hooks.join("post-deploy"),
        format!(
            "#!/bin/sh\ncat > /dev/null\ntouch {waiting}\nwhile [ ! -e {gate} ]; do sleep 0.05; done\n",
            waiting = root.join("hook-waiting").display(),
            gate = gate.display()
        ),
    )
    .unwrap();
    let mut slow = Guard::spawn(
        Command::new(bin("dream"))
            .args(["deploy", src.to_str().unwrap(), "--id", "held", "--root"])
            .arg(&root),
    );
    wait_until(
        Duration::from_secs(20),
        "the post-deploy hook to run",
        || root.join("hook-waiting").exists().then_some(()),
    );
    let (code, _, err) = dream(&root, &["deploy", src.to_str().unwrap(), "--id", "blocked"]);
    assert_eq!(
        code,
        Some(111),
        "the lock is held while the hook runs: {err}"
    );
    std::fs::write(&gate, "").unwrap();
    assert!(slow.wait_exit(Duration::from_secs(20)).success());
    std::fs::remove_file(hooks.join("post-deploy")).unwrap();
    // A failing pre-switch: nothing switched, deploy-failed told why.
    std::fs::write(root.join("fail-pre-switch"), "").unwrap();
    std::fs::remove_file(&log).unwrap();
    let (code, _, err) = dream(&root, &["deploy", src.to_str().unwrap(), "--id", "three"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("hook pre-switch exited with status 3"),
        "{err}"
    );
    assert!(err.contains("nothing was switched"), "{err}");
    assert_eq!(current(&root).as_deref(), Some("held"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("\"hook\":\"deploy-failed\""), "{text}");
    assert!(
        text.contains("hook pre-switch exited with status 3"),
        "{text}"
    );
    // It names the release that failed and the one that stays, without
    // an --id too.
    let failed = text.lines().find(|l| l.contains("deploy-failed")).unwrap();
    assert!(failed.contains("\"release\":\"three\""), "{failed}");
    assert!(failed.contains("\"previous\":\"held\""), "{failed}");
    std::fs::remove_file(&log).unwrap();
    let (code, _, err) = dream(&root, &["deploy", src.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    let failed = text.lines().find(|l| l.contains("deploy-failed")).unwrap();
    assert!(!failed.contains("\"release\":\"\""), "{failed}");
    assert!(failed.contains("\"previous\":\"held\""), "{failed}");
    // --no-hooks: none run.
    std::fs::remove_file(&log).unwrap();
    let (code, _, err) = dream(
        &root,
        &[
            "deploy",
            src.to_str().unwrap(),
            "--id",
            "four",
            "--no-hooks",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(!log.exists());
    assert_eq!(current(&root).as_deref(), Some("four"));
}

/// `--bridge DIR`: files under DIR that the previous release has and the
/// new one lacks are linked in, never over the new release's own, and the
/// manifest says which.
#[test]
fn bridge_links_the_previous_releases_assets_and_never_overwrites() {
    let tree = Tree::new();
    let v1 = site(&tree, "v1");
    tree.write("v1/public/assets/app-1111.js", "old app\n");
    tree.write("v1/public/assets/common.js", "old common\n");
    tree.write("v1/public/other/gone.txt", "not bridged\n");
    let v2 = site(&tree, "v2");
    tree.write("v2/public/assets/app-2222.js", "new app\n");
    tree.write("v2/public/assets/common.js", "new common\n");
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    deploy_json(&root, &v1, &["--id", "one"]);
    let (_sup, addr) = dream_testkit::serve_root(&root, &["--workers", "1", "--ready", "notify"]);
    let r = deploy_json(&root, &v2, &["--id", "two", "--bridge", "public/assets"]);
    assert_eq!(r["bridged"], 1, "{r}");
    // A page the old release rendered still finds its asset, from the new one.
    let asset = wait_until(Duration::from_secs(20), "two to serve", || {
        let r = get(addr, "/assets/app-1111.js", &[]);
        (r.header("x-dream-release") == Some("two")).then_some(r)
    });
    assert_eq!(asset.status, 200);
    assert_eq!(asset.text(), "old app\n");
    let two = root.join("releases/two/public");
    assert_eq!(
        std::fs::read_to_string(two.join("assets/app-1111.js")).unwrap(),
        "old app\n"
    );
    assert_eq!(
        std::fs::read_to_string(two.join("assets/app-2222.js")).unwrap(),
        "new app\n"
    );
    assert_eq!(
        std::fs::read_to_string(two.join("assets/common.js")).unwrap(),
        "new common\n",
        "the new release's own file is never overwritten"
    );
    assert!(!two.join("other/gone.txt").exists(), "only under --bridge");
    let manifest = std::fs::read_to_string(root.join(".dream/manifests/two")).unwrap();
    assert!(
        manifest.lines().any(|l| l == "b public/assets/app-1111.js"),
        "{manifest}"
    );
    let (code, _, err) = dream(&root, &["releases", "--verify", "two"]);
    assert_eq!(code, Some(0), "{err}");
    // Without it, the new release holds only its own.
    deploy_json(&root, &v2, &["--id", "three"]);
    assert!(
        !root
            .join("releases/three/public/assets/app-1111.js")
            .exists()
    );
    let (code, _, err) = dream(&root, &["deploy", v2.to_str().unwrap(), "--bridge", "../x"]);
    assert_eq!(code, Some(100), "{err}");
}

/// `--log-format json`: every line a deploy prints, on either stream, is a
/// JSON object, whether it succeeds or fails; a failure's last line says
/// so (`"level":"error"`, the exit code).
#[test]
fn with_log_format_json_every_line_a_deploy_prints_is_json() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let site = tree
        .write("site/index.html", "hello")
        .parent()
        .unwrap()
        .to_path_buf();
    let s = site.to_str().unwrap();
    let missing = tree.path().join("no such dir");
    let cases: [(Vec<&str>, i32); 3] = [
        (vec!["deploy", s], 0),
        (vec!["deploy", s, "--build", "exit 3"], 1),
        (vec!["deploy", missing.to_str().unwrap()], 100),
    ];
    for (args, want) in cases {
        let args = [&args[..], &["--log-format", "json"]].concat();
        let (code, out, err) = dream(&root, &args);
        assert_eq!(code, Some(want), "{args:?}: {out} {err}");
        let lines: Vec<Value> = out
            .lines()
            .chain(err.lines())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {l:?}"))
            })
            .collect();
        assert!(!lines.is_empty(), "{args:?}");
        if want == 0 {
            assert!(
                lines.iter().any(|l| l["event"] == "deployed"),
                "{args:?}: {lines:?}"
            );
        } else {
            let last = serde_json::from_str::<Value>(err.lines().last().unwrap()).unwrap();
            assert_eq!(last["level"], "error", "{last}");
            assert_eq!(last["exit"], want, "{last}");
        }
    }
}
