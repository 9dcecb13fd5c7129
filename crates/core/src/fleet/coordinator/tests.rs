//! The fleet's policy against real agents (in this process, over socket
//! pairs, on real release stores in temporary directories), some of them
//! behind a relay that makes them misbehave. No root, no sshd.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use super::*;
use crate::fleet::transport::{Link, Local};
use crate::fleet::wire::write_frame_as_read;
use crate::fleet::{Group, Host};
use crate::store::lock::{Holder, Lock, Wait};
use crate::store::release::Store;

/// How a host misbehaves.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Its session cannot be opened.
    Unreachable,
    /// Its switch is refused (as a host whose new release cannot start).
    RefuseSwitch,
    /// The link drops when the switch is asked: switched or not, unknown.
    CutAtSwitch,
    /// It claims to lack content the release does not have.
    LacksUnknown,
    /// An offer written as a delta reaches it naming another base (as
    /// when its current release changed since it sent its own).
    OtherBase,
    /// Its answers to blobs are held back until [`HOLD`] blobs have gone
    /// by (or 3 s have passed): a link with a long round trip, where a
    /// coordinator that waits for each answer before the next blob stalls.
    HoldAcks,
    /// It refuses the third blob (a full disk), temporarily.
    RefuseBlob,
}

/// Blobs a [`Fault::HoldAcks`] relay waits for before it passes answers.
const HOLD: usize = 8;
/// How many blobs a [`Fault::HoldAcks`] relay had passed when it let the
/// first answer through (0 until it did; it gives up after 3 s).
static AHEAD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// [`Local`] agents, some behind a misbehaving relay.
struct Faulty {
    faults: HashMap<String, Fault>,
}

impl Transport for Faulty {
    fn open(&self, host: &Host, installed: bool) -> Result<Link, String> {
        match self.faults.get(&host.name).copied() {
            None => Local.open(host, installed),
            Some(Fault::Unreachable) => Err(format!("{}: no route to host", host.name)),
            Some(fault) => relay(Local.open(host, installed)?, fault),
        }
    }
}

/// A relay between the coordinator and a real agent that applies `fault`.
fn relay(agent: Link, fault: Fault) -> Result<Link, String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
    let to_coordinator = std::sync::Arc::new(Mutex::new(theirs.try_clone().unwrap()));
    let Link {
        mut input,
        mut output,
        peer,
    } = agent;
    // Blobs passed to the agent; whether answers are still held back.
    let blobs = std::sync::Arc::new((
        Mutex::new((0usize, fault == Fault::HoldAcks)),
        std::sync::Condvar::new(),
    ));
    // The agent's frames, forwarded whole.
    {
        let to = to_coordinator.clone();
        let blobs = blobs.clone();
        std::thread::spawn(move || {
            while let Ok(Some(frame)) = wire::read_frame(&mut input) {
                let (count, wake) = &*blobs;
                let mut held = count.lock().unwrap();
                let until = std::time::Instant::now() + Duration::from_secs(3);
                while held.1 && held.0 > 0 && held.0 < HOLD {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        held.1 = false;
                        break;
                    }
                    held = wake.wait_timeout(held, left).unwrap().0;
                }
                if held.1 && held.0 >= HOLD {
                    AHEAD.store(held.0, std::sync::atomic::Ordering::SeqCst);
                    held.1 = false;
                }
                drop(held);
                let mut w = to.lock().unwrap();
                if write_frame_as_read(&mut *w, &frame).is_err() {
                    return;
                }
            }
        });
    }
    // The coordinator's frames: forwarded, answered here, or the end.
    std::thread::spawn(move || {
        let mut from = std::io::BufReader::new(theirs);
        let answer = |r: &Reply| {
            let mut w = to_coordinator.lock().unwrap();
            let _ = wire::write_message(&mut *w, r);
        };
        while let Ok(Some(frame)) = wire::read_frame(&mut from) {
            let msg = match &frame {
                Frame::Message(body) => serde_json::from_slice::<ToAgent>(body).ok(),
                _ => None,
            };
            if let Some(ToAgent::Blob { hash }) = &msg {
                let (count, wake) = &*blobs;
                let mut n = count.lock().unwrap();
                n.0 += 1;
                wake.notify_all();
                if fault == Fault::RefuseBlob && n.0 == 3 {
                    drop(n);
                    while let Ok(Some(Frame::Chunk(c))) = wire::read_frame(&mut from) {
                        if c.is_empty() {
                            break;
                        }
                    }
                    answer(&Reply {
                        temporary: true,
                        ..Reply::failed(format!("blob {hash}: No space left on device"))
                    });
                    continue;
                }
            }
            match (fault, msg) {
                (Fault::RefuseSwitch, Some(ToAgent::Switch { .. })) => {
                    answer(&Reply::failed("generation 2 failed to start"));
                    continue;
                }
                (Fault::CutAtSwitch, Some(ToAgent::Switch { .. })) => {
                    let _ = from.get_ref().shutdown(std::net::Shutdown::Both);
                    return;
                }
                (
                    Fault::OtherBase,
                    Some(ToAgent::Offer {
                        id,
                        base: Some(_),
                        digest,
                    }),
                ) => {
                    let forged = ToAgent::Offer {
                        id,
                        base: Some("00".repeat(32)),
                        digest,
                    };
                    if wire::write_message(&mut output, &forged).is_err() {
                        return;
                    }
                    continue;
                }
                (Fault::LacksUnknown, Some(ToAgent::Offer { .. })) => {
                    // The manifest's chunks, read and dropped.
                    while let Ok(Some(Frame::Chunk(c))) = wire::read_frame(&mut from) {
                        if c.is_empty() {
                            break;
                        }
                    }
                    answer(&Reply::saying(
                        wire::Said::Offer {
                            lacks: vec!["00".repeat(32)],
                            present: false,
                        },
                        None,
                    ));
                    continue;
                }
                _ => {}
            }
            if write_frame_as_read(&mut output, &frame).is_err() {
                return;
            }
        }
    });
    Ok(Link {
        input: Box::new(ours.try_clone().unwrap()),
        output: Box::new(ours),
        peer,
    })
}

/// Hosts `h0`, `h1`, … each with its own release store.
struct Hosts {
    _dir: tempfile::TempDir,
    hosts: Vec<Host>,
}

impl Hosts {
    fn new(n: usize) -> Hosts {
        let dir = tempfile::tempdir().unwrap();
        let hosts = (0..n)
            .map(|i| {
                let root = dir.path().join(format!("host {i}"));
                Host::parse(&format!("h{i}"), &root.to_string_lossy()).unwrap()
            })
            .collect();
        Hosts { _dir: dir, hosts }
    }

    fn current(&self, i: usize) -> Option<String> {
        Store::new(std::path::Path::new(&self.hosts[i].root)).current()
    }

    fn fleet(&self, rollout: Rollout) -> Fleet {
        Fleet {
            hosts: self.hosts.clone(),
            rollout,
            install: false,
            wait_lock: None,
            settle: Duration::ZERO,
            verify: Vec::new(),
            parallel: 4,
            judge: None,
        }
    }
}

/// A release of `files` random files under odd names.
fn release(id: &str, files: usize) -> (tempfile::TempDir, Release) {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..files {
        let name = dir.path().join(format!("f {i} é'\"$x"));
        let mut f = std::fs::File::create(name).unwrap();
        let bytes: Vec<u8> = (0..(1000 + i * 37)).map(|_| rand_byte()).collect();
        f.write_all(&bytes).unwrap();
    }
    let manifest = Manifest::of_tree(dir.path()).unwrap();
    let r = Release {
        id: id.into(),
        manifest,
        dir: dir.path().to_path_buf(),
        build: None,
        bridge: Vec::new(),
        confirm_within: Duration::from_secs(30),
        keep: 5,
    };
    (dir, r)
}

fn rand_byte() -> u8 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish() as u8
}

/// Runs `f` with a coordinator over `transport`; the progress lines too.
fn run<T>(
    fleet: &Fleet,
    transport: &dyn Transport,
    f: impl FnOnce(&Coordinator<'_>) -> T,
) -> (T, Vec<String>) {
    let lines = Mutex::new(Vec::new());
    let say = |l: &str| lines.lock().unwrap().push(l.to_string());
    let c = Coordinator {
        fleet,
        transport,
        say: &say,
    };
    let out = f(&c);
    (out, lines.into_inner().unwrap())
}

fn deploy(fleet: &Fleet, transport: &dyn Transport, r: &Release) -> (Outcome, Vec<String>) {
    run(fleet, transport, |c| c.deploy(c.connect_to_deploy(), r))
}

fn everyone() -> Rollout {
    Rollout {
        canary: 1,
        ..Rollout::default()
    }
}

#[test]
fn a_release_goes_live_everywhere_and_each_host_gets_only_what_it_lacks() {
    let hosts = Hosts::new(3);
    let fleet = hosts.fleet(everyone());
    let (_a, one) = release("one", 5);
    let (out, _) = deploy(&fleet, &Local, &one);
    assert_eq!(out.verdict, Verdict::Done, "{out:?}");
    for i in 0..3 {
        assert_eq!(hosts.current(i).as_deref(), Some("one"));
        assert!(out.hosts[i].sent_bytes > 0);
        assert_eq!(out.hosts[i].current.as_deref(), Some("one"));
    }
    // The second release shares four files with the first: only one file's
    // content travels.
    let (b, two) = release("two", 4);
    for e in one.manifest.entries() {
        if let manifest::Kind::File { .. } = e.kind {
            std::fs::copy(one.dir.join(&e.path), b.path().join(&e.path)).unwrap();
        }
    }
    let two = Release {
        manifest: Manifest::of_tree(b.path()).unwrap(),
        ..two
    };
    let (out, lines) = deploy(&fleet, &Local, &two);
    assert_eq!(out.verdict, Verdict::Done, "{out:?}");
    for i in 0..3 {
        assert_eq!(hosts.current(i).as_deref(), Some("two"));
        assert_eq!(out.hosts[i].previous.as_deref(), Some("one"));
    }
    assert!(
        lines.iter().filter(|l| l.contains("(0 of ")).count() == 3,
        "every host already had every file: {lines:#?}"
    );
}

/// The second release's manifest travels as a delta against the one each
/// host runs (a small part of the whole); a host that cannot rebuild it
/// from its own gets it whole; every host ends with exactly the manifest
/// the coordinator hashed.
#[test]
fn a_manifest_travels_as_a_delta_against_what_a_host_runs_and_whole_when_that_fails() {
    let hosts = Hosts::new(3);
    let fleet = hosts.fleet(everyone());
    let faults = Faulty {
        faults: HashMap::from([("h2".to_string(), Fault::OtherBase)]),
    };
    let (a, one) = release("one", 400);
    let (out, _) = deploy(&fleet, &faults, &one);
    assert_eq!(out.verdict, Verdict::Done, "{out:?}");
    // Two: three small files rewritten, one removed, one added.
    for i in 0..3 {
        let name = a.path().join(format!("f {i} é'\"$x"));
        std::fs::write(name, format!("new bytes {i} {}", rand_byte())).unwrap();
    }
    std::fs::remove_file(a.path().join("f 7 é'\"$x")).unwrap();
    std::fs::write(a.path().join("added\nname"), b"added").unwrap();
    let two = Release {
        id: "two".into(),
        manifest: Manifest::of_tree(a.path()).unwrap(),
        ..one
    };
    let (out, lines) = deploy(&fleet, &faults, &two);
    assert_eq!(out.verdict, Verdict::Done, "{out:?} {lines:#?}");
    let store = |i: usize| Store::new(std::path::Path::new(&hosts.hosts[i].root));
    for i in 0..3 {
        assert_eq!(hosts.current(i).as_deref(), Some("two"));
        let kept = Manifest::load(&store(i).manifest_path("two")).unwrap();
        assert_eq!(kept.to_text(), two.manifest.frozen().to_text(), "host {i}");
    }
    let whole = {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(two.manifest.to_text().as_bytes()).unwrap();
        z.finish().unwrap().len() as u64
    };
    let sent: Vec<u64> = out.hosts.iter().map(|h| h.sent_bytes).collect();
    for i in 0..2 {
        assert!(
            sent[i] * 4 < whole,
            "host {i} sent {} bytes for 4 small files, the whole manifest is {whole}: {sent:?}",
            sent[i]
        );
    }
    assert!(
        sent[2] > whole,
        "the host that refused the delta got it whole: {sent:?}"
    );
}

#[test]
fn the_canary_switches_alone_then_each_group_in_order() {
    let hosts = Hosts::new(5);
    let fleet = hosts.fleet(Rollout {
        canary: 1,
        group: Some(Group::Hosts(2)),
        ..Rollout::default()
    });
    let (_a, one) = release("one", 2);
    let (out, lines) = deploy(&fleet, &Local, &one);
    assert_eq!(out.verdict, Verdict::Done, "{out:?}");
    let switched: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains(": switched in"))
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert_eq!(switched.len(), 5, "{lines:#?}");
    assert_eq!(switched[0], "h0", "the canary first: {switched:?}");
    let rank = |h: &str| switched.iter().position(|s| *s == h).unwrap();
    assert!(
        rank("h1").max(rank("h2")) < rank("h3").min(rank("h4")),
        "{switched:?}"
    );
}

#[test]
fn a_failed_switch_beyond_max_fail_reverts_every_switched_host() {
    let hosts = Hosts::new(4);
    let rollout = Rollout {
        canary: 1,
        group: Some(Group::Hosts(1)),
        ..Rollout::default()
    };
    let (_a, one) = release("one", 3);
    assert_eq!(
        deploy(&hosts.fleet(rollout.clone()), &Local, &one)
            .0
            .verdict,
        Verdict::Done
    );
    let faulty = Faulty {
        faults: HashMap::from([("h2".to_string(), Fault::RefuseSwitch)]),
    };
    let (_b, two) = release("two", 3);
    let (out, lines) = deploy(&hosts.fleet(rollout.clone()), &faulty, &two);
    let Verdict::Reverted(why) = &out.verdict else {
        panic!("{out:?}")
    };
    assert!(why.contains("h2: generation 2 failed to start"), "{why}");
    for i in 0..4 {
        assert_eq!(
            hosts.current(i).as_deref(),
            Some("one"),
            "host {i}: {lines:#?}"
        );
    }
    assert!(
        !lines.iter().any(|l| l.starts_with("h3: switched")),
        "the wave after the failure never started: {lines:#?}"
    );
    // Within --max-fail 1 the others go on; the run says the fleet differs.
    let (_c, three) = release("three", 3);
    let tolerant = Rollout {
        max_fail: 1,
        ..rollout
    };
    let (out, _) = deploy(&hosts.fleet(tolerant), &faulty, &three);
    let Verdict::Inconsistent(why) = &out.verdict else {
        panic!("{out:?}")
    };
    assert!(
        why.contains("h2") && why.contains("still on its previous release"),
        "{why}"
    );
    let now: Vec<_> = (0..4).map(|i| hosts.current(i)).collect();
    assert_eq!(
        now,
        [Some("three"), Some("three"), Some("one"), Some("three")].map(|s| s.map(String::from)),
    );
}

#[test]
fn a_host_cut_off_at_its_switch_leaves_an_outcome_that_says_the_fleet_may_differ() {
    let hosts = Hosts::new(3);
    let (_a, one) = release("one", 2);
    assert_eq!(
        deploy(&hosts.fleet(everyone()), &Local, &one).0.verdict,
        Verdict::Done
    );
    let faulty = Faulty {
        faults: HashMap::from([("h1".to_string(), Fault::CutAtSwitch)]),
    };
    let (_b, two) = release("two", 2);
    let (out, _) = deploy(&hosts.fleet(everyone()), &faulty, &two);
    let Verdict::Inconsistent(why) = &out.verdict else {
        panic!("an unknown switch is never reported as reverted: {out:?}")
    };
    assert!(why.contains("could not revert: h1"), "{why}");
    // Every host the coordinator could reach is back.
    assert_eq!(hosts.current(0).as_deref(), Some("one"));
    assert_eq!(hosts.current(2).as_deref(), Some("one"));
}

#[test]
fn nothing_changes_when_a_host_is_unreachable_locked_or_held() {
    let hosts = Hosts::new(3);
    let fleet = hosts.fleet(everyone());
    let (_a, one) = release("one", 2);
    let unreachable = Faulty {
        faults: HashMap::from([("h2".to_string(), Fault::Unreachable)]),
    };
    let (out, _) = deploy(&fleet, &unreachable, &one);
    assert!(
        matches!(&out.verdict, Verdict::Unchanged(e) if e.contains("h2: no route to host")),
        "{out:?}"
    );
    // A deploy lock held on one host, by another process's kind of holder.
    let store = Store::new(std::path::Path::new(&hosts.hosts[1].root));
    store.prepare().unwrap();
    let held = Lock::acquire(&store.lock_path(), &Holder::me("a test"), Wait::No).unwrap();
    let (out, _) = deploy(&fleet, &Local, &one);
    assert!(
        matches!(&out.verdict, Verdict::Unchanged(e) if e.contains("h1") && e.contains("a test")),
        "{out:?}"
    );
    drop(held);
    // The manual hold on the primary.
    let (held, _) = run(&fleet, &Local, |c| c.hold(Some("incident 42".into())));
    held.unwrap();
    let (out, _) = deploy(&fleet, &Local, &one);
    assert!(
        matches!(&out.verdict, Verdict::Unchanged(e) if e.contains("incident 42")),
        "{out:?}"
    );
    for i in 0..3 {
        assert_eq!(hosts.current(i), None, "nothing was switched on host {i}");
    }
    // Released: every lock went with its session, so the next run goes.
    run(&fleet, &Local, |c| c.hold(None)).0.unwrap();
    assert_eq!(deploy(&fleet, &Local, &one).0.verdict, Verdict::Done);
}

/// Content goes out without waiting for each blob's answer: over a link
/// whose answers come late, the blobs keep flowing.
#[test]
fn blobs_travel_ahead_of_their_answers() {
    let hosts = Hosts::new(2);
    let faulty = Faulty {
        faults: HashMap::from([("h1".to_string(), Fault::HoldAcks)]),
    };
    let (_a, one) = release("one", 3 * HOLD);
    let (out, lines) = deploy(&hosts.fleet(everyone()), &faulty, &one);
    assert_eq!(out.verdict, Verdict::Done, "{out:?} {lines:#?}");
    assert!(
        AHEAD.load(std::sync::atomic::Ordering::SeqCst) >= HOLD,
        "the coordinator waited for the first blob's answer before sending the next"
    );
    assert_eq!(hosts.current(1).as_deref(), Some("one"));
}

/// A blob refused among others sent ahead: the run stops before any switch
/// with that refusal, and the session stays in step (every answer read, the
/// lock released as the session ends), so the next run goes.
#[test]
fn a_blob_refused_among_those_sent_ahead_stops_the_run_in_step() {
    let hosts = Hosts::new(2);
    let fleet = hosts.fleet(everyone());
    let faulty = Faulty {
        faults: HashMap::from([("h1".to_string(), Fault::RefuseBlob)]),
    };
    let (_a, one) = release("one", 12);
    let (out, lines) = deploy(&fleet, &faulty, &one);
    assert!(
        matches!(&out.verdict, Verdict::NotSwitched(e) if e.contains("h1: blob") && e.contains("No space left on device")),
        "{out:?} {lines:#?}"
    );
    assert_eq!(hosts.current(0), None);
    assert_eq!(hosts.current(1), None);
    let (out, lines) = deploy(&fleet, &Local, &one);
    assert_eq!(out.verdict, Verdict::Done, "{out:?} {lines:#?}");
}

#[test]
fn a_host_that_asks_for_content_the_release_lacks_stops_the_run_before_any_switch() {
    let hosts = Hosts::new(2);
    let faulty = Faulty {
        faults: HashMap::from([("h1".to_string(), Fault::LacksUnknown)]),
    };
    let (_a, one) = release("one", 2);
    let (out, _) = deploy(&hosts.fleet(everyone()), &faulty, &one);
    assert!(
        matches!(&out.verdict, Verdict::NotSwitched(e) if e.contains("h1: asked for unknown content")),
        "{out:?}"
    );
    assert_eq!(hosts.current(0), None);
}

/// Each host prunes to `keep` once the run has committed: a fleet that
/// deploys every day does not keep every release it ever ran.
#[test]
fn every_host_keeps_only_keep_releases_once_the_run_committed() {
    let hosts = Hosts::new(2);
    let fleet = hosts.fleet(everyone());
    let ids = ["one", "two", "three", "four"];
    let _dirs: Vec<_> = ids
        .iter()
        .map(|id| {
            let (dir, r) = release(id, 3);
            let r = Release { keep: 2, ..r };
            let (out, lines) = deploy(&fleet, &Local, &r);
            assert_eq!(out.verdict, Verdict::Done, "{out:?} {lines:#?}");
            dir
        })
        .collect();
    for h in &hosts.hosts {
        let store = Store::new(std::path::Path::new(&h.root));
        let mut kept: Vec<String> = std::fs::read_dir(store.releases())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        kept.sort();
        assert_eq!(kept, ["four", "three"], "{}", h.name);
        assert!(!store.manifest_path("two").exists(), "{}", h.name);
        let history = std::fs::read_to_string(store.history_path()).unwrap();
        assert_eq!(history.matches("\"pruned\"").count(), 2, "{history}");
    }
    // The way back is still there.
    let (out, _) = run(&fleet, &Local, |c| {
        c.rollback(None, Duration::from_secs(30))
    });
    assert_eq!(out.verdict, Verdict::Done, "{out:?}");
    assert_eq!(hosts.current(1).as_deref(), Some("three"));
}

#[test]
fn a_rollback_goes_back_to_the_previous_release_everywhere() {
    let hosts = Hosts::new(3);
    let fleet = hosts.fleet(everyone());
    let (_a, one) = release("one", 2);
    let (_b, two) = release("two", 2);
    assert_eq!(deploy(&fleet, &Local, &one).0.verdict, Verdict::Done);
    assert_eq!(deploy(&fleet, &Local, &two).0.verdict, Verdict::Done);
    let (out, _) = run(&fleet, &Local, |c| {
        c.rollback(None, Duration::from_secs(30))
    });
    assert_eq!(out.verdict, Verdict::Done, "{out:?}");
    assert_eq!(out.release, "one");
    for i in 0..3 {
        assert_eq!(hosts.current(i).as_deref(), Some("one"));
    }
    let (rows, _) = run(&fleet, &Local, |c| c.status());
    let rows = rows.unwrap();
    assert!(
        rows.iter()
            .all(|r| r.current.as_deref() == Some("one") && r.error.is_none())
    );
}
