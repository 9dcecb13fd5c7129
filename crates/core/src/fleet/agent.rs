//! `dream agent --root ROOT`: a host's side of a fleet run. It treats its
//! coordinator as untrusted: one gate ([`Agent::refusal`]) requires the
//! session's own lock and valid ids for every change; what it inflates is
//! bounded; it takes blobs only as offered. It prepares with the deploy
//! pipeline (`go_live: false`), switches provisionally, and keeps the
//! switched generation's lease while it hears from its coordinator.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::deploy::{self, DeployOptions, Provisional};
use crate::store::lock::{Holder, Lock, LockError, Wait};
use crate::store::manifest::{self, Manifest};
use crate::store::release::{self, Store};
use crate::store::stage::Source;

use super::delta;
use super::wire::*;

/// The manual hold on the primary: `ROOT/.dream/fleet-hold`.
fn hold_path(store: &Store) -> PathBuf {
    store.state().join("fleet-hold")
}

/// One agent session: `dream agent --root ROOT` on a host.
pub struct Agent {
    store: Store,
    lock: Option<Lock>,
    offered: Option<(String, PathBuf)>,
    /// The blobs the offered release lacks here, by hash: their sizes.
    wanted: std::collections::HashMap<String, u64>,
    /// Where received objects and the offered manifest wait.
    incoming: PathBuf,
    prepared: Option<String>,
    /// What `current` named before this session switched it.
    previous: Option<String>,
    generation: Option<u64>,
    /// The lease on a switched, unconfirmed generation: renewed to
    /// `confirm_within` from now each time the coordinator is heard from
    /// (at most every [`LEASE_EVERY`]), so the host reverts that long
    /// after its coordinator went silent, however long the rollout.
    lease: Option<Lease>,
}

struct Lease {
    generation: u64,
    within: Duration,
    renewed: std::time::Instant,
}

/// How often an agent renews its lease at most (the coordinator pings at
/// least this often while it waits).
pub const LEASE_EVERY: Duration = Duration::from_millis(500);

impl Agent {
    pub fn new(root: &Path) -> Agent {
        let store = Store::new(root);
        // Not under staging/: the deploy pipeline clears that when it
        // starts, and the objects must outlive its start.
        let incoming = store
            .state()
            .join("incoming")
            .join(std::process::id().to_string());
        // What agents that were killed left behind.
        if let Ok(dir) = std::fs::read_dir(store.state().join("incoming")) {
            for e in dir.flatten() {
                let pid = e.file_name().to_string_lossy().parse::<i32>().ok();
                let alive = pid.is_some_and(|p| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok()
                });
                if !alive {
                    let _ = release::remove_tree(&e.path());
                }
            }
        }
        Agent {
            store,
            lock: None,
            offered: None,
            wanted: std::collections::HashMap::new(),
            incoming,
            prepared: None,
            previous: None,
            generation: None,
            lease: None,
        }
    }

    /// The coordinator was heard from: a switched, unconfirmed generation
    /// stays provisional for another `confirm_within`.
    fn renew(&mut self) {
        let Some(lease) = &mut self.lease else {
            return;
        };
        if lease.renewed.elapsed() < LEASE_EVERY {
            return;
        }
        lease.renewed = std::time::Instant::now();
        if let Err(e) = deploy::extend_generation(&self.store.root, lease.generation, lease.within)
        {
            // Reverted, replaced, or no supervisor: nothing left to renew.
            eprintln!(
                "dream agent: generation {} stays provisional no longer: {}",
                lease.generation, e.message
            );
            self.lease = None;
        }
    }

    /// Serves one session on stdin/stdout until `bye`, EOF or silence.
    ///
    /// A coordinator that dies while this agent is busy (a build) closes
    /// the session's input: a watcher thread sees the hang-up and raises
    /// SIGHUP, which the deploy pipeline reads from its signalfd and
    /// answers by ending the build's process group and its staging. (INT,
    /// TERM and HUP are blocked first, so the signal is read, never
    /// delivered to a thread.)
    pub fn serve(mut self) -> io::Result<()> {
        use nix::sys::signal::{SigSet, Signal};
        let mut set = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(s);
        }
        set.thread_block()?;
        std::thread::spawn(|| {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            let stdin = io::stdin();
            // No events asked: poll reports only a hang-up or an error.
            let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::empty())];
            loop {
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) if fds[0].revents().is_some_and(|r| !r.is_empty()) => break,
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return,
                }
            }
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGHUP);
        });
        // The descriptor itself, not Stdin's buffer: the silence deadline
        // must see what the pipe holds.
        let stdin = std::fs::File::from(io::stdin().as_fd().try_clone_to_owned()?);
        let mut input = io::BufReader::with_capacity(CHUNK, Patient::new(stdin, "coordinator"));
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(io::stdout()));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // `alive` frames while this agent works (a build can take long):
        // the coordinator's own deadline then only ends a session whose
        // agent is stopped or gone.
        let beat = {
            let (stdout, done) = (stdout.clone(), done.clone());
            std::thread::spawn(move || {
                let mut w = SharedWriter(stdout);
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::park_timeout(heartbeat());
                    if done.load(std::sync::atomic::Ordering::SeqCst)
                        || write_alive(&mut w).is_err()
                    {
                        return;
                    }
                }
            })
        };
        let result = self.session(&mut input, &mut SharedWriter(stdout));
        if let Err(e) = &result
            && e.kind() == io::ErrorKind::TimedOut
        {
            eprintln!("dream agent: {e}: it is gone");
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        beat.thread().unpark();
        self.abandon();
        result
    }

    /// [`Agent::session`], then what [`Agent::serve`] does when its
    /// session ends: for an agent that is not a process of its own.
    pub fn serve_stream(mut self, input: &mut impl Read, out: &mut impl Write) -> io::Result<()> {
        let result = self.session(input, out);
        self.abandon();
        result
    }

    /// One session over any byte stream (`serve` gives it stdin and
    /// stdout): requests in, one reply each out, until `bye` or EOF.
    pub fn session(&mut self, input: &mut impl Read, out: &mut impl Write) -> io::Result<()> {
        loop {
            let Some(frame) = read_frame(input)? else {
                return Ok(());
            };
            self.renew();
            let Frame::Message(body) = frame else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a chunk outside a blob",
                ));
            };
            let msg: ToAgent = match serde_json::from_slice(&body) {
                Ok(m) => m,
                Err(e) => {
                    write_message(out, &Reply::failed(format!("bad request: {e}")))?;
                    continue;
                }
            };
            let refused = self.refusal(&msg);
            let reply = match msg {
                ToAgent::Ping => continue,
                ToAgent::Bye => {
                    write_message(out, &Reply::ok())?;
                    return Ok(());
                }
                // A payload is read (bounded) even when the request is
                // refused, so the next frame is a request again.
                ToAgent::Blob { hash } => {
                    let reply = self.receive_blob(&hash, input, refused.is_none())?;
                    refused.unwrap_or(reply)
                }
                // A payload over its bounds breaks the framing: the
                // session ends (`?`), nothing of it kept.
                ToAgent::Offer { id, base, digest } => match (read_manifest(input)?, refused) {
                    (_, Some(refused)) => refused,
                    (Ok(text), None) => match self.rebuilt(text, base, digest) {
                        Ok(text) => self.offer(&id, &text),
                        Err(e) => Reply::failed(format!("the manifest delta: {e}")),
                    },
                    (Err(e), None) => Reply::failed(format!("the manifest: {e}")),
                },
                // The only reply with a payload of its own.
                ToAgent::Base => {
                    match self.base() {
                        Some((digest, text)) => {
                            let reply = Reply::saying(Said::Base { digest }, self.store.current());
                            write_with_payload(out, &reply, &delta::fingerprints(&text))?;
                        }
                        None => {
                            write_message(out, &Reply::saying(Said::Nothing, self.store.current()))?
                        }
                    }
                    continue;
                }
                ToAgent::Plan => match read_manifest(input)? {
                    Ok(text) => match Manifest::parse(&text) {
                        Ok(m) => Reply::saying(
                            Said::Offer {
                                lacks: self.lacking(&m),
                                present: false,
                            },
                            self.store.current(),
                        ),
                        Err(e) => Reply::failed(format!("the manifest: {e}")),
                    },
                    Err(e) => Reply::failed(format!("the manifest: {e}")),
                },
                other => self.handle(other),
            };
            write_message(out, &reply)?;
        }
    }

    /// The one gate every request passes: whatever changes this host needs
    /// the lock taken by this very session, and every id it names is a
    /// valid release id. `Some` is the refusal.
    fn refusal(&self, msg: &ToAgent) -> Option<Reply> {
        let what = msg.mutation()?;
        if self.lock.is_none() {
            return Some(Reply::failed(format!(
                "{what} refused: this session holds no lock (send lock first)"
            )));
        }
        let bad = msg
            .ids()
            .into_iter()
            .find_map(|id| release::check_id(id).err());
        bad.map(|e| Reply::failed(format!("{what} refused: {e}")))
    }

    fn handle(&mut self, msg: ToAgent) -> Reply {
        if let Some(refused) = self.refusal(&msg) {
            return refused;
        }
        match msg {
            ToAgent::Hello { protocol, version } => {
                if protocol != PROTOCOL {
                    return Reply::failed(format!(
                        "the coordinator (dream {version}) speaks fleet protocol {protocol}; this host's agent (dream {}) speaks {PROTOCOL}: install a matching dream here, or run the coordinator with --install",
                        crate::supervise::version()
                    ));
                }
                Reply::saying(
                    Said::Hello {
                        protocol: PROTOCOL,
                        version: crate::supervise::version(),
                    },
                    self.store.current(),
                )
            }
            ToAgent::Lock {
                command,
                fleet,
                wait_ms,
            } => self.take_lock(&command, fleet, wait_ms.map(Duration::from_millis)),

            ToAgent::Prepare { id, build, bridge } => self.prepare(&id, build, bridge),
            ToAgent::Switch {
                id,
                confirm_within_ms,
                canary,
                verify,
                settle_ms,
            } => self.switch(&id, confirm_within_ms, &verify, settle_ms, canary),
            ToAgent::Confirm { keep: Some(0), .. } => Reply::failed("keep 0: at least 1"),
            ToAgent::Confirm { generation, keep } => {
                match deploy::confirm_generation(&self.store.root, generation.or(self.generation)) {
                    Ok(()) => {
                        // Releases beyond `keep` go once the run has
                        // committed, never before: until then the one this
                        // host ran before is its way back.
                        if let Some(keep) = keep {
                            deploy::prune_beyond(
                                &self.store,
                                keep as usize,
                                self.previous.as_deref(),
                            );
                        }
                        self.previous = None;
                        self.lease = None;
                        Reply::ok()
                    }
                    Err(e) => Reply::failed(e.message),
                }
            }
            ToAgent::Revert { from, to, reason } => {
                self.lease = None;
                match deploy::revert_to(&self.store.root, &from, &to, &reason) {
                    Ok(()) => Reply {
                        current: self.store.current(),
                        ..Reply::ok()
                    },
                    Err(e) => Reply::failed(e.message),
                }
            }
            ToAgent::Commit { id, hosts } => {
                let mut commit = release::Event::new(release::EventKind::FleetCommitted, &id);
                let hosts: Vec<String> = hosts
                    .iter()
                    .take(1000)
                    .map(|h| crate::logtext::value(h))
                    .collect();
                commit.reason = Some(format!("live on {}", hosts.join(", ")));
                match self.store.append(&commit) {
                    Ok(()) => Reply::ok(),
                    Err(e) => Reply::failed(format!("recording the commit: {e}")),
                }
            }
            ToAgent::Status => Reply {
                previous: self.store.previous_good(),
                ..Reply::saying(
                    Said::Status {
                        version: crate::supervise::version(),
                        hold: std::fs::read_to_string(hold_path(&self.store)).ok(),
                    },
                    self.store.current(),
                )
            },
            ToAgent::Hold { message } if message.as_ref().is_some_and(|m| m.len() > 4096) => {
                Reply::failed("hold refused: a message over 4096 bytes")
            }
            ToAgent::Hold { message } => {
                let path = hold_path(&self.store);
                let done = match message {
                    Some(m) => self.store.prepare().and_then(|()| std::fs::write(&path, m)),
                    None => match std::fs::remove_file(&path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                        _ => Ok(()),
                    },
                };
                match done {
                    Ok(()) => Reply::ok(),
                    Err(e) => Reply::failed(format!("{}: {e}", path.display())),
                }
            }
            ToAgent::Ping
            | ToAgent::Bye
            | ToAgent::Blob { .. }
            | ToAgent::Offer { .. }
            | ToAgent::Base
            | ToAgent::Plan => Reply::ok(),
        }
    }

    fn take_lock(&mut self, command: &str, fleet: bool, wait: Option<Duration>) -> Reply {
        if self.lock.is_some() {
            return Reply {
                current: self.store.current(),
                ..Reply::ok()
            };
        }
        if let Err(e) = self.store.prepare() {
            return Reply::failed(format!("{}: {e}", self.store.root.display()));
        }
        if fleet && let Ok(message) = std::fs::read_to_string(hold_path(&self.store)) {
            return Reply {
                temporary: true,
                ..Reply::failed(format!(
                    "the fleet is held by hand: {} (dream fleet unlock releases it)",
                    message.trim()
                ))
            };
        }
        let wait = wait.map_or(Wait::No, Wait::For);
        let holder = Holder::me(crate::logtext::value(command));
        match Lock::acquire(&self.store.lock_path(), &holder, wait) {
            Ok(lock) => {
                self.lock = Some(lock);
                Reply {
                    current: self.store.current(),
                    ..Reply::ok()
                }
            }
            Err(e @ LockError::Held { .. }) => Reply {
                temporary: true,
                ..Reply::failed(e.to_string())
            },
            Err(e) => Reply::failed(e.to_string()),
        }
    }

    fn offer(&mut self, id: &str, text: &str) -> Reply {
        if let Err(e) = release::check_id(id) {
            return Reply::failed(e);
        }
        if self.lock.is_none() {
            return Reply::failed("offer before lock");
        }
        if self.store.release_dir(id).is_dir() {
            self.prepared = Some(id.to_string());
            return Reply::saying(
                Said::Offer {
                    lacks: Vec::new(),
                    present: true,
                },
                self.store.current(),
            );
        }
        let m = match Manifest::parse(text) {
            Ok(m) => m,
            Err(e) => return Reply::failed(format!("the manifest: {e}")),
        };
        let lacks = self.lacking(&m);
        let objects = self.incoming.join("objects");
        let saved = std::fs::create_dir_all(&objects)
            .and_then(|()| m.save(&self.incoming.join("manifest")));
        if let Err(e) = saved {
            return Reply::failed(format!("{}: {e}", self.incoming.display()));
        }
        self.wanted = m
            .entries()
            .iter()
            .filter_map(|e| match &e.kind {
                manifest::Kind::File { hash, size, .. } => Some((manifest::hex(hash), *size)),
                _ => None,
            })
            .filter(|(h, _)| lacks.binary_search(h).is_ok())
            .collect();
        self.offered = Some((id.to_string(), self.incoming.join("manifest")));
        Reply::saying(
            Said::Offer {
                lacks,
                present: false,
            },
            self.store.current(),
        )
    }

    /// The content hashes of `m` this host's current release lacks.
    /// The manifest of the release this host runs: its digest and text.
    fn base(&self) -> Option<(String, String)> {
        let current = self.store.current()?;
        let m = Manifest::load(&self.store.manifest_path(&current)).ok()?;
        Some((m.digest(), m.to_text()))
    }

    /// An offer's manifest text: as sent, or rebuilt from a delta against
    /// this host's current manifest and checked against the digest named.
    fn rebuilt(
        &self,
        text: String,
        base: Option<String>,
        digest: Option<String>,
    ) -> Result<String, String> {
        let Some(base) = base else {
            return Ok(text);
        };
        let Some((_, base_text)) = self.base().filter(|(d, _)| *d == base) else {
            return Err(
                "this host's current manifest is not the base it was written against".into(),
            );
        };
        let rebuilt = delta::apply(&base_text, &text)?;
        if digest.as_deref() != Some(blake3::hash(rebuilt.as_bytes()).to_hex().as_str()) {
            return Err("the rebuilt manifest is not the one named".into());
        }
        Ok(rebuilt)
    }

    fn lacking(&self, m: &Manifest) -> Vec<String> {
        // What the current release holds need not be sent.
        let have: std::collections::HashSet<manifest::Hash> = self
            .store
            .current()
            .and_then(|c| Manifest::load(&self.store.manifest_path(&c)).ok())
            .map(|pm| {
                pm.entries()
                    .iter()
                    .filter_map(|e| match &e.kind {
                        manifest::Kind::File { hash, .. } => Some(*hash),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut lacks: Vec<String> = m
            .entries()
            .iter()
            .filter_map(|e| match &e.kind {
                manifest::Kind::File { hash, .. } if !have.contains(hash) => {
                    Some(manifest::hex(hash))
                }
                _ => None,
            })
            .collect();
        lacks.sort();
        lacks.dedup();
        lacks
    }

    /// Reads a blob's chunks, checks its hash, stores it by name. Only a
    /// blob the offered manifest names and this host lacks is stored, and
    /// never more of it than the manifest's size for it: each chunk is
    /// inflated to at most [`CHUNK`] bytes, so neither memory nor disk
    /// grows with what a peer claims. `Err` ends the session (the peer
    /// broke the framing or sent more than it offered).
    fn receive_blob(
        &mut self,
        hash: &str,
        input: &mut impl Read,
        allowed: bool,
    ) -> io::Result<Reply> {
        let expected = self.wanted.get(hash).copied().filter(|_| allowed);
        let objects = self.incoming.join("objects");
        let tmp = objects.join(format!("{hash}.part"));
        let mut file = match expected {
            Some(_) => Some(std::fs::File::create(&tmp)?),
            None => None,
        };
        let mut hasher = blake3::Hasher::new();
        let mut got = 0u64;
        let mut failure = None;
        let mut data = Vec::with_capacity(CHUNK);
        loop {
            let c = match read_frame(input)? {
                Some(Frame::Chunk(c)) if c.is_empty() => break,
                Some(Frame::Chunk(c)) => c,
                _ => {
                    return Err(protocol_error(format!(
                        "blob {hash}: ended without its end"
                    )));
                }
            };
            data.clear();
            if let Err(e) = inflate_chunk(&c, &mut data) {
                failure.get_or_insert(format!("blob {hash}: {e}"));
                continue;
            }
            got += data.len() as u64;
            if let Some(size) = expected
                && got > size
            {
                let _ = std::fs::remove_file(&tmp);
                return Err(protocol_error(format!(
                    "blob {hash}: more than the {size} bytes its manifest offered"
                )));
            }
            hasher.update(&data);
            if let Some(f) = file.as_mut()
                && let Err(e) = f.write_all(&data)
            {
                failure.get_or_insert(format!("blob {hash}: {e}"));
            }
        }
        if expected.is_none() {
            return Ok(Reply::failed(format!(
                "blob {}: not offered or not lacking",
                crate::logtext::value(hash)
            )));
        }
        if let Some(f) = failure {
            let _ = std::fs::remove_file(&tmp);
            return Ok(Reply::failed(f));
        }
        if hasher.finalize().to_hex().as_str() != hash {
            let _ = std::fs::remove_file(&tmp);
            return Ok(Reply::failed(format!(
                "blob {hash}: its content has another hash"
            )));
        }
        match std::fs::rename(&tmp, objects.join(hash)) {
            Ok(()) => {
                self.wanted.remove(hash);
                Ok(Reply::ok())
            }
            Err(e) => Ok(Reply::failed(format!("blob {hash}: {e}"))),
        }
    }

    fn prepare(&mut self, id: &str, build: Option<String>, bridge: Vec<PathBuf>) -> Reply {
        if self.prepared.as_deref() == Some(id) {
            return Reply {
                current: self.store.current(),
                ..Reply::ok()
            };
        }
        let Some((offered, manifest)) = self.offered.clone() else {
            return Reply::failed("prepare before offer");
        };
        if offered != id {
            return Reply::failed(format!("prepare {id}, but {offered} was offered"));
        }
        let Some(lock) = self.lock.as_mut() else {
            return Reply::failed("prepare before lock");
        };
        let opts = DeployOptions {
            id: Some(id.to_string()),
            build,
            reload: false,
            go_live: false,
            keep_git: true,
            bridge,
            quiet: true,
            interruptible: true,
            ..DeployOptions::new(
                &self.store.root,
                Source::Objects {
                    manifest,
                    objects: self.incoming.join("objects"),
                },
                &format!("dream fleet deploy {id}"),
            )
        };
        let result = deploy::deploy_locked(&opts, lock, &mut |_| {});
        let _ = release::remove_tree(&self.incoming);
        match result {
            Ok(_) => {
                self.prepared = Some(id.to_string());
                Reply {
                    current: self.store.current(),
                    ..Reply::ok()
                }
            }
            Err(e) => Reply {
                temporary: e.kind == deploy::Kind::Temporary,
                ..Reply::failed(e.message)
            },
        }
    }

    fn switch(
        &mut self,
        id: &str,
        confirm_within_ms: u64,
        verify: &[String],
        settle_ms: u64,
        canary: Option<crate::supervise::canary::judge::Spec>,
    ) -> Reply {
        if self.lock.is_none() {
            return Reply::failed("switch before lock");
        }
        let provisional = Provisional {
            within: Duration::from_millis(confirm_within_ms),
            confirm_now: false,
        };
        let before = self.store.current();
        let settle = Duration::from_millis(settle_ms);
        match deploy::go_live_prepared(
            &self.store.root,
            id,
            Some(provisional),
            verify,
            settle,
            canary,
            &mut |_| {},
        ) {
            Ok(report) => {
                self.previous = before.clone();
                self.generation = report.generation;
                self.lease = report.generation.map(|generation| Lease {
                    generation,
                    within: Duration::from_millis(confirm_within_ms),
                    renewed: std::time::Instant::now(),
                });
                Reply {
                    previous: before,
                    current: self.store.current(),
                    generation: report.generation,
                    ..Reply::ok()
                }
            }
            Err(e) => Reply {
                previous: before,
                current: self.store.current(),
                temporary: e.kind == deploy::Kind::Temporary,
                ..Reply::failed(e.message)
            },
        }
    }

    /// The session ended (bye, EOF, silence): what was staged goes; a
    /// prepared release that never went live stays for the next run to
    /// reuse; a switched one is the supervisor's to confirm or revert; the
    /// lock goes with this process.
    fn abandon(&mut self) {
        let _ = release::remove_tree(&self.incoming);
        self.lock = None;
    }
}

/// A manifest's text from the chunks after an `offer` or a `plan`: `Err`
/// when the payload broke the protocol (the session cannot go on),
/// `Ok(Err)` when it is only not text.
fn read_manifest(input: &mut impl Read) -> io::Result<Result<String, String>> {
    let bytes = read_chunks(input, MAX_MANIFEST)?;
    Ok(String::from_utf8(bytes).map_err(|_| "not UTF-8".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incompatible_coordinator_is_refused_with_both_versions_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = Agent::new(dir.path());
        let r = agent.handle(ToAgent::Hello {
            protocol: PROTOCOL + 1,
            version: "9.9.9".into(),
        });
        assert!(!r.ok);
        let e = r.error.unwrap();
        assert!(
            e.contains("9.9.9") && e.contains(&crate::supervise::version()),
            "{e}"
        );
        assert!(e.contains(&format!("protocol {}", PROTOCOL + 1)), "{e}");
        let r = agent.handle(ToAgent::Hello {
            protocol: PROTOCOL,
            version: "x".into(),
        });
        assert!(r.ok, "{r:?}");
        // Nothing before a lock: an offer or a switch is refused.
        assert!(!agent.offer("one", "dream-manifest 1\n").ok);
        assert!(!agent.switch("one", 1000, &[], 0, None).ok);
    }
}
