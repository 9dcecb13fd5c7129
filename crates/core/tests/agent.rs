//! `dream agent` against a hostile coordinator: whatever a peer sends,
//! nothing outside ROOT is created, changed or revealed, nothing changes
//! without the session's lock, and the agent's memory stays bounded.
//! Each test drives the agent's real session over a byte stream.

use std::path::{Path, PathBuf};

use dream_core::deploy::{self, DeployOptions};
use dream_core::fleet::{self, Agent, Frame, Reply, ToAgent};
use dream_core::store::manifest::{Entry, Kind, Manifest};
use dream_core::store::release::Store;
use dream_core::store::stage::Source;

/// A root with one release live (`a.txt` holding `content`), and a
/// directory outside it that the tests watch.
struct Host {
    _top: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    live: String,
}

impl Host {
    fn new(content: &[u8]) -> Host {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("root");
        let outside = top.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep.txt"), b"untouched").unwrap();
        let src = top.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.txt"), content).unwrap();
        let opts = DeployOptions {
            id: Some("live".into()),
            reload: false,
            quiet: true,
            ..DeployOptions::new(&root, Source::Dir(src), "test")
        };
        let report = deploy::deploy(&opts, &mut |_| {}).unwrap();
        Host {
            live: report.release,
            _top: top,
            root,
            outside,
        }
    }

    /// Everything below `outside`, with contents: what no session may change.
    fn outside_snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut all = Vec::new();
        let mut stack = vec![self.outside.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let meta = std::fs::symlink_metadata(&p).unwrap();
                if meta.is_dir() {
                    stack.push(p.clone());
                    all.push((p, Vec::new()));
                } else {
                    let body = std::fs::read(&p).unwrap_or_default();
                    all.push((p, body));
                }
            }
        }
        all.sort();
        all
    }

    fn current(&self) -> Option<String> {
        Store::new(&self.root).current()
    }
}

/// One request on the wire, with the payload that follows it (a manifest
/// after `offer`/`plan`, content after `blob`) as raw chunk frames.
fn request(wire: &mut Vec<u8>, msg: &ToAgent, chunks: &[Vec<u8>]) {
    fleet::write_message(wire, msg).unwrap();
    for c in chunks {
        fleet::write_chunk(wire, c).unwrap();
    }
    if matches!(
        msg,
        ToAgent::Offer { .. } | ToAgent::Plan | ToAgent::Blob { .. }
    ) {
        fleet::write_chunk(wire, &[]).unwrap();
    }
}

fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

/// Runs one session over `wire`; the replies, `alive` frames skipped.
fn converse(root: &Path, wire: &[u8]) -> (Vec<Reply>, std::io::Result<()>) {
    let mut agent = Agent::new(root);
    let mut out = Vec::new();
    let result = agent.session(&mut &wire[..], &mut out);
    let mut replies = Vec::new();
    let mut r = &out[..];
    while let Ok(Some(frame)) = fleet::read_frame(&mut r) {
        if let Frame::Message(body) = frame {
            replies.push(serde_json::from_slice(&body).unwrap());
        }
    }
    (replies, result)
}

fn hello() -> ToAgent {
    ToAgent::Hello {
        protocol: fleet::PROTOCOL,
        version: "test".into(),
    }
}

fn lock() -> ToAgent {
    ToAgent::Lock {
        command: "test".into(),
        fleet: false,
        wait_ms: None,
    }
}

fn file_entry(path: &str, content: &[u8]) -> Entry {
    Entry {
        path: PathBuf::from(path),
        kind: Kind::File {
            mode: 0o644,
            size: content.len() as u64,
            hash: *blake3::hash(content).as_bytes(),
        },
    }
}

#[test]
fn a_manifest_cannot_plant_a_file_outside_root_through_a_link() {
    let content = b"the live release holds this";
    let host = Host::new(content);
    let before = host.outside_snapshot();
    // `esc -> /`, then a file under esc/<the outside directory> whose
    // content the live release already holds (so it is shared, not sent).
    let through = format!("esc{}/planted", host.outside.to_str().unwrap());
    let m = Manifest::new(vec![
        Entry {
            path: "esc".into(),
            kind: Kind::Symlink { target: "/".into() },
        },
        file_entry(&through, content),
        file_entry("index.html", content),
    ]);
    let mut wire = Vec::new();
    request(&mut wire, &hello(), &[]);
    request(&mut wire, &lock(), &[]);
    request(
        &mut wire,
        &ToAgent::Offer {
            id: "evil".into(),
            base: None,
            digest: None,
        },
        &[deflate(m.to_text().as_bytes())],
    );
    request(
        &mut wire,
        &ToAgent::Prepare {
            id: "evil".into(),
            build: None,
            bridge: Vec::new(),
        },
        &[],
    );
    let (replies, _) = converse(&host.root, &wire);
    let prepare = replies.last().unwrap();
    assert!(
        !prepare.ok,
        "prepare of a release planting through a link: {prepare:?}"
    );
    assert!(
        !host.outside.join("planted").exists(),
        "a file was created outside ROOT through esc -> /"
    );
    assert_eq!(host.outside_snapshot(), before);
    assert!(!Store::new(&host.root).release_dir("evil").exists());
    assert_eq!(host.current().as_deref(), Some(host.live.as_str()));
}

#[test]
fn nothing_changes_without_the_sessions_lock_and_ids_are_checked() {
    let host = Host::new(b"x");
    let evil = host.outside.join("evilrel");
    std::fs::create_dir(&evil).unwrap();
    let to = evil.to_str().unwrap().to_string();
    let mutations = [
        ToAgent::Revert {
            from: host.live.clone(),
            to: to.clone(),
            reason: "hostile".into(),
        },
        ToAgent::Revert {
            from: host.live.clone(),
            to: host.live.clone(),
            reason: "hostile".into(),
        },
        ToAgent::Commit {
            id: "x".into(),
            hosts: vec!["h".into()],
        },
        ToAgent::Confirm {
            generation: None,
            keep: Some(1),
        },
        ToAgent::Hold {
            message: Some("held".into()),
        },
        ToAgent::Switch {
            id: host.live.clone(),
            confirm_within_ms: 1000,
            verify: Vec::new(),
            settle_ms: 0,
            canary: None,
        },
        ToAgent::Prepare {
            id: "p".into(),
            build: None,
            bridge: Vec::new(),
        },
    ];
    let history = std::fs::read(Store::new(&host.root).history_path()).unwrap();
    // Unlocked: every mutation is refused, naming the lock.
    let mut wire = Vec::new();
    request(&mut wire, &hello(), &[]);
    for m in &mutations {
        request(&mut wire, m, &[]);
    }
    request(
        &mut wire,
        &ToAgent::Offer {
            id: "o".into(),
            base: None,
            digest: None,
        },
        &[deflate(b"dream-manifest 1\n")],
    );
    let (replies, result) = converse(&host.root, &wire);
    result.unwrap();
    assert_eq!(replies.len(), mutations.len() + 2);
    for r in &replies[1..] {
        assert!(!r.ok, "{r:?}");
        assert!(r.error.as_deref().unwrap().contains("no lock"), "{r:?}");
    }
    assert_eq!(host.current().as_deref(), Some(host.live.as_str()));
    assert!(!Store::new(&host.root).state().join("fleet-hold").exists());
    assert_eq!(
        std::fs::read(Store::new(&host.root).history_path()).unwrap(),
        history,
        "an unlocked session wrote history"
    );
    // Locked: an id that is a path is refused by the one id check.
    let mut wire = Vec::new();
    request(&mut wire, &hello(), &[]);
    request(&mut wire, &lock(), &[]);
    for bad in [to.as_str(), "../outside/evilrel", "current", ""] {
        request(
            &mut wire,
            &ToAgent::Revert {
                from: host.live.clone(),
                to: bad.into(),
                reason: "hostile".into(),
            },
            &[],
        );
    }
    let (replies, _) = converse(&host.root, &wire);
    for r in &replies[2..] {
        assert!(!r.ok, "{r:?}");
    }
    assert_eq!(host.current().as_deref(), Some(host.live.as_str()));
    // And a `current` planted by hand to name a directory outside the
    // store starts nothing: the supervisor resolves it through the store.
    let cur = Store::new(&host.root).current_link();
    std::fs::remove_file(&cur).unwrap();
    std::os::unix::fs::symlink(&evil, &cur).unwrap();
    let e = dream_core::supervise::resolve_current(&host.root).unwrap_err();
    assert!(e.contains("not a release"), "{e}");
}

/// Peak resident memory of this process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_decompression_bomb_is_refused_with_memory_bounded() {
    let host = Host::new(b"x");
    // 64 MiB of zeros, deflated to well under a megabyte, in one chunk.
    let bomb = deflate(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 1 << 20);
    let small = b"0123456789";
    let hash = blake3::hash(small).to_hex().to_string();
    let m = Manifest::new(vec![file_entry("f", small)]);
    let before = peak_rss_kib();
    // Unlocked: the blob is refused and read past, bounded; the session
    // goes on. A manifest that inflates past its bound ends the session.
    let mut wire = Vec::new();
    request(&mut wire, &hello(), &[]);
    request(
        &mut wire,
        &ToAgent::Blob { hash: hash.clone() },
        std::slice::from_ref(&bomb),
    );
    request(&mut wire, &ToAgent::Status, &[]);
    request(&mut wire, &ToAgent::Plan, std::slice::from_ref(&bomb));
    request(&mut wire, &ToAgent::Status, &[]);
    let (replies, result) = converse(&host.root, &wire);
    assert!(!replies[1].ok, "{:?}", replies[1]);
    assert!(replies[2].ok, "{:?}", replies[2]);
    assert_eq!(
        replies.len(),
        3,
        "the session went on after a bomb: {replies:?}"
    );
    assert!(result.is_err());
    // Locked, the blob offered: the bomb is refused, nothing stored; more
    // bytes than the manifest offered for a blob end the session.
    let mut wire = Vec::new();
    request(&mut wire, &hello(), &[]);
    request(&mut wire, &lock(), &[]);
    request(
        &mut wire,
        &ToAgent::Offer {
            id: "b".into(),
            base: None,
            digest: None,
        },
        &[deflate(m.to_text().as_bytes())],
    );
    request(&mut wire, &ToAgent::Blob { hash: hash.clone() }, &[bomb]);
    request(&mut wire, &ToAgent::Blob { hash }, &[deflate(&[7u8; 4096])]);
    request(&mut wire, &ToAgent::Status, &[]);
    let (replies, result) = converse(&host.root, &wire);
    assert!(replies[1].ok && replies[2].ok, "{replies:?}");
    let e = replies[3].error.as_deref().unwrap_or_default();
    assert!(e.contains("inflates to more"), "{replies:?}");
    assert_eq!(replies.len(), 4, "{replies:?}");
    assert!(
        result
            .unwrap_err()
            .to_string()
            .contains("more than the 10 bytes")
    );
    let grown = peak_rss_kib().saturating_sub(before);
    assert!(
        grown < 32 << 10,
        "the agent grew by {grown} KiB on a 64 MiB bomb"
    );
    // A frame may not ask for more than the limit, and a short frame is
    // not taken on its word.
    let huge = [0x7fu8, 0xff, 0xff, 0xff, 1];
    assert!(fleet::read_frame(&mut &huge[..]).is_err());
    let short = [0x00u8, 0xff, 0xff, 0xff, 1, 1, 2, 3];
    assert!(fleet::read_frame(&mut &short[..]).is_err());
}

mod property {
    use super::*;
    use proptest::prelude::*;

    fn id() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("live".to_string()),
            Just("".to_string()),
            Just("..".to_string()),
            Just("current".to_string()),
            "[a-z0-9._-]{1,8}",
            "/[a-z/.]{0,12}",
            "[a-z./]{1,12}",
        ]
    }

    fn path() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z]{1,3}(/[a-z]{1,3}){0,2}",
            Just("esc/x".to_string()),
            Just("esc".to_string()),
            Just("../x".to_string()),
            Just("/abs".to_string()),
            "[a-z./]{1,10}",
        ]
    }

    fn entry() -> impl Strategy<Value = (u8, String, String, Vec<u8>)> {
        (
            0u8..3,
            path(),
            prop_oneof![Just("/".to_string()), Just("..".to_string()), path()],
            proptest::collection::vec(any::<u8>(), 0..16),
        )
    }

    fn manifest_text(entries: &[(u8, String, String, Vec<u8>)], outside: &str) -> String {
        let entries = entries
            .iter()
            .map(|(k, p, t, body)| {
                let p = p.replace("esc/x", &format!("esc{outside}/x"));
                match k {
                    0 => Entry {
                        path: p.into(),
                        kind: Kind::Dir { mode: 0o755 },
                    },
                    1 => Entry {
                        path: p.into(),
                        kind: Kind::Symlink { target: t.into() },
                    },
                    _ => file_entry(&p, body),
                }
            })
            .collect();
        Manifest::new(entries).to_text()
    }

    fn message() -> impl Strategy<Value = (u8, String, String)> {
        (0u8..11, id(), id())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

        /// Random manifests and message sequences, with or without the
        /// lock: nothing outside ROOT is created or changed, `current`
        /// only ever names a release of the store.
        #[test]
        fn a_hostile_session_never_reaches_outside_root(
            locked in any::<bool>(),
            entries in proptest::collection::vec(entry(), 0..8),
            msgs in proptest::collection::vec(message(), 1..10),
        ) {
            let host = Host::new(b"x");
            let before = host.outside_snapshot();
            let outside = host.outside.to_str().unwrap().to_string();
            let text = manifest_text(&entries, &outside);
            // A delta against the live release's manifest (its real digest):
            // its line or none, or a run past its end, then the hostile
            // manifest's lines; the digest named right, so what guards is
            // the rebuild and the offer's own checks.
            let live = Manifest::load(&Store::new(&host.root).manifest_path(&host.live)).unwrap();
            let mut delta = format!("= 0 {}\n", entries.len() % 3);
            for line in text.lines().skip(1) {
                delta.push_str(&format!("+ {line}\n"));
            }
            let rebuilt = fleet::delta::apply(&live.to_text(), &delta)
                .map(|t| blake3::hash(t.as_bytes()).to_hex().to_string())
                .unwrap_or_default();
            let mut wire = Vec::new();
            request(&mut wire, &hello(), &[]);
            if locked {
                request(&mut wire, &lock(), &[]);
            }
            for (kind, a, b) in &msgs {
                let a = a.replace("/", &format!("{outside}/"));
                let msg = match kind {
                    0 => ToAgent::Offer { id: a.clone(), base: None, digest: None },
                    1 => ToAgent::Prepare { id: a.clone(), build: None, bridge: vec![PathBuf::from(&b)] },
                    2 => ToAgent::Switch { id: a.clone(), confirm_within_ms: 10, verify: Vec::new(), settle_ms: 0, canary: None },
                    3 => ToAgent::Revert { from: b.clone(), to: a.clone(), reason: "r".into() },
                    4 => ToAgent::Commit { id: a.clone(), hosts: vec![b.clone()] },
                    5 => ToAgent::Hold { message: Some(b.clone()) },
                    6 => ToAgent::Plan,
                    7 => ToAgent::Blob { hash: blake3::hash(b"x").to_hex().to_string() },
                    8 => ToAgent::Offer { id: a.clone(), base: Some(live.digest()), digest: Some(rebuilt.clone()) },
                    9 => ToAgent::Base,
                    _ => ToAgent::Status,
                };
                let payload = match &msg {
                    ToAgent::Offer { base: Some(_), .. } => vec![deflate(delta.as_bytes())],
                    ToAgent::Offer { .. } | ToAgent::Plan => vec![deflate(text.as_bytes())],
                    ToAgent::Blob { .. } => vec![deflate(b"x")],
                    _ => Vec::new(),
                };
                request(&mut wire, &msg, &payload);
            }
            let _ = converse(&host.root, &wire);
            prop_assert_eq!(host.outside_snapshot(), before);
            let store = Store::new(&host.root);
            if let Ok(target) = std::fs::read_link(store.current_link()) {
                let id = target.strip_prefix("releases").unwrap().to_str().unwrap().to_string();
                prop_assert!(dream_core::store::release::check_id(&id).is_ok(), "{:?}", target);
                prop_assert!(store.release_dir(&id).is_dir());
            }
        }
    }

    #[test]
    fn reading_a_stream_of_random_bytes_never_panics_or_grows() {
        proptest!(ProptestConfig::with_cases(256), |(bytes in proptest::collection::vec(any::<u8>(), 0..512))| {
            let mut r = &bytes[..];
            while let Ok(Some(_)) = fleet::read_frame(&mut r) {}
            let mut r = &bytes[..];
            let _ = fleet::read_chunks(&mut r, 1 << 16);
        });
    }
}
