//! Every source is staged by the same rules: `--exclude` and
//! `.dreamignore` for a tarball and a git revision as for a directory;
//! a `git:` source is a clone of its own, whatever git environment the
//! deploy runs in, over allowed transports only, within `--max-size`.

use std::path::{Path, PathBuf};
use std::process::Command;

use dream_testkit::Tree;

/// `dream ARGS --root ROOT` with `env`.
fn dream(root: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let root = root.to_str().unwrap();
    dream_testkit::dream_with(&[args, &["--root", root]].concat(), env)
}

fn tarball(tree: &Tree, files: &[(&str, &str)]) -> PathBuf {
    let path = tree.path().join("site.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    for (name, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        h.set_cksum();
        b.append(&h, body.as_bytes()).unwrap();
    }
    b.finish().unwrap();
    path
}

fn git_available() -> bool {
    dream_testkit::prerequisite(
        Command::new("git").arg("--version").output().is_ok(),
        "git for the git: sources",
    )
}

/// A repository at `tree/repo` holding `files`, committed.
fn repo(tree: &Tree, files: &[(&str, &[u8])]) -> PathBuf {
    let repo = tree.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    for (name, body) in files {
        let p = repo.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    for args in [
        &["init", "-q"][..],
        &["add", "."],
        &["commit", "-qm", "one"],
    ] {
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
            .env_remove("GIT_DIR")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    repo
}

#[test]
fn exclude_and_dreamignore_apply_to_tarballs_as_to_directories() {
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let tar = tarball(
        &tree,
        &[
            ("index.html", "<p>hi</p>\n"),
            (".env", "SECRET=1\n"),
            (".dreamignore", "drafts/\n"),
            ("drafts/wip.html", "not yet\n"),
            ("assets/app.js", "x\n"),
        ],
    );
    let (code, out, err) = dream(
        &root,
        &[
            "deploy",
            tar.to_str().unwrap(),
            "--exclude",
            ".env",
            "--json",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let current = root.join("current");
    assert!(current.join("index.html").is_file());
    assert!(current.join("assets/app.js").is_file());
    assert!(!current.join(".env").exists(), "--exclude left it in");
    assert!(!current.join("drafts").exists(), ".dreamignore left it in");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let excluded: Vec<&str> = report["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        excluded.contains(&".env") && excluded.contains(&"drafts"),
        "{excluded:?}"
    );
    // The manifest names exactly what is there.
    let (code, out, err) = dream(&root, &["releases", "--verify"], &[]);
    assert_eq!(code, Some(0), "{out}{err}");
}

#[test]
fn git_sources_ignore_the_callers_git_environment_and_apply_exclude() {
    if !git_available() {
        return;
    }
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let repo = repo(&tree, &[("index.html", b"v1\n"), (".env", b"SECRET=1\n")]);
    // As a post-receive hook would run it: GIT_DIR and friends set.
    let elsewhere = tree.path().join("elsewhere.git");
    std::fs::create_dir(&elsewhere).unwrap();
    let url = format!("git:file://{}", repo.display());
    let (code, out, err) = dream(
        &root,
        &["deploy", &url, "--exclude", ".env"],
        &[
            ("GIT_DIR", "."),
            ("GIT_WORK_TREE", elsewhere.to_str().unwrap()),
            ("GIT_INDEX_FILE", "/nonexistent/index"),
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(root.join("current/index.html")).unwrap(),
        "v1\n"
    );
    assert!(!root.join("current/.env").exists());
}

#[test]
fn git_sources_use_allowed_transports_only_and_respect_max_size() {
    if !git_available() {
        return;
    }
    let tree = Tree::new();
    let root = tree.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for url in [
        "git:fd://3",
        "git:FD://3",
        "git:gopher://x/y",
        "git:ext::sh -c id",
    ] {
        let (code, _, err) = dream(&root, &["deploy", url], &[]);
        assert_eq!(code, Some(100), "{url}: {err}");
        assert!(err.contains("not allowed"), "{url}: {err}");
    }
    // A small repository whose tree holds a 4 MiB file: judged from the
    // tree before anything is checked out.
    let big = vec![7u8; 4 << 20];
    let repo = repo(&tree, &[("index.html", b"v1\n"), ("big.bin", &big)]);
    let url = format!("git:file://{}", repo.display());
    let (code, _, err) = dream(&root, &["deploy", &url, "--max-size", "1M"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("more than 1048576"), "{err}");
    let staging = root.join(".dream/staging");
    assert_eq!(
        std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0),
        0
    );
    assert!(!root.join("current").exists());
}
