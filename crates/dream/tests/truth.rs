//! dream's word against what is on disk and what serves: a manifest names
//! exactly the bytes its release holds, even when the source is being
//! rewritten while it is staged.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dream_testkit::{Tree, bin, run};

fn dream(args: &[&str]) -> (Option<i32>, String, String) {
    let (status, out, err) = run(
        Command::new(bin("dream")).args(args),
        Duration::from_secs(60),
    );
    (status.code(), out, err)
}

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
