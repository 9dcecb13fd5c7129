//! The fleet's policy: one release onto many hosts, ending on the new
//! release everywhere or on the old one everywhere.
//!
//! The phases: connect and lock (the first host's lock is the fleet's),
//! offer the manifest and send each host only the content it lacks,
//! prepare everywhere, switch in waves (canary first) with provisional
//! reloads, then record the decision on the primary and confirm
//! everywhere. More than `max_fail` failed switches revert every switched
//! host to the release it recorded as previous; a host that cannot be
//! confirmed reverts itself at its supervisor's deadline, and the outcome
//! says so ([`Verdict::Inconsistent`]).
//!
//! The coordinator reaches hosts through a [`Transport`] and reports
//! through a progress callback and a typed [`Outcome`]: it prints nothing
//! and knows no exit codes.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::transport::{Incoming, Peer, Transport};
use super::wire::{self, Frame, Patient, Reply, ToAgent};
use super::{Host, Rollout};
use crate::store::manifest::{self, Manifest};

/// How the fleet is run, whatever it is asked to do.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub hosts: Vec<Host>,
    /// How the switch rolls out.
    pub rollout: Rollout,
    /// Put this program on hosts whose dream is missing or speaks another
    /// protocol ([`Transport::install`]).
    pub install: bool,
    /// How long each host's agent waits for its deploy lock.
    pub wait_lock: Option<Duration>,
    /// How long each host's new generation must stay up after its switch.
    pub settle: Duration,
    /// Paths each host requests through its own socket after its switch.
    pub verify: Vec<String>,
    /// Sessions opened at once.
    pub parallel: usize,
    /// The canary hosts' switches are judged on each of them
    /// (`--judge-*`): a canary generation beside the old one, promoted or
    /// reverted by the host's supervisor before any other host switches.
    pub judge: Option<crate::supervise::canary::judge::Spec>,
}

/// A release ready to send: its id, its manifest, and where each of its
/// files' content is here.
pub struct Release {
    pub id: String,
    pub manifest: Manifest,
    pub dir: PathBuf,
    /// The build each host runs (none when built here).
    pub build: Option<String>,
    pub bridge: Vec<PathBuf>,
    /// Each host's provisional window, renewed while it hears from us.
    pub confirm_within: Duration,
    /// Releases each host keeps once the run has committed (as `dream
    /// deploy --keep`).
    pub keep: usize,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Live (or left as it was, for a rollback) on every host.
    Done,
    /// Nothing changed anywhere; trying again may work (a host
    /// unreachable, locked, held).
    Unchanged(String),
    /// Nothing was switched: a host refused or failed before the switch.
    NotSwitched(String),
    /// More switches failed than `max_fail`: every host is back on its
    /// previous release.
    Reverted(String),
    /// Hosts may differ: some could not be reverted or confirmed (their
    /// supervisors revert them at their deadline; running the same
    /// deploy again converges).
    Inconsistent(String),
}

impl Verdict {
    /// What went wrong, in one line.
    pub fn error(&self) -> Option<&str> {
        match self {
            Verdict::Done => None,
            Verdict::Unchanged(e)
            | Verdict::NotSwitched(e)
            | Verdict::Reverted(e)
            | Verdict::Inconsistent(e) => Some(e),
        }
    }
}

/// One host at the end of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HostOutcome {
    pub host: String,
    /// What it ran before this run switched it.
    pub previous: Option<String>,
    /// What it runs now, as it answered at the end (none: no answer).
    pub current: Option<String>,
    pub sent_bytes: u64,
}

/// What a deploy or rollback did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub release: String,
    pub hosts: Vec<HostOutcome>,
    pub verdict: Verdict,
}

/// One host's answer to a dry run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanRow {
    pub host: String,
    pub current: Option<String>,
    pub lacks_files: usize,
    pub lacks_bytes: u64,
    pub error: Option<String>,
}

/// A dry run: the waves by host name, and what each host lacks.
#[derive(Debug, Clone)]
pub struct Plan {
    pub waves: Vec<Vec<String>>,
    pub hosts: Vec<PlanRow>,
}

/// One host's answer to `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostStatus {
    pub host: String,
    pub current: Option<String>,
    pub version: Option<String>,
    pub hold: Option<String>,
    pub error: Option<String>,
}

/// A failure of one request to one host: the message naming the host,
/// and whether trying again may work.
type HostError = (String, bool);

/// Blobs sent to a host ahead of their acknowledgements. Waiting for each
/// one's answer made a deploy of many small changes as slow as the number
/// of files times the link's round trip (100 files over a 50 ms link: 5 s);
/// the bound keeps what the agent has answered and this side not yet read
/// (tens of bytes a blob) far below what the way back holds, so the agent
/// never blocks writing an answer while this side blocks writing a blob.
const BLOBS_AHEAD: usize = 32;

/// One host's agent session.
pub struct Session {
    host: Host,
    peer: Box<dyn Peer>,
    writer: Arc<Mutex<Box<dyn std::io::Write + Send>>>,
    reader: BufReader<Patient<Box<dyn Incoming>>>,
    stop: Arc<AtomicBool>,
    /// What the host ran before this run switched it.
    previous: Option<String>,
    switched: bool,
    generation: Option<u64>,
    /// Bytes of content sent to it.
    sent: u64,
    /// The digest of the manifest it runs and its lines' fingerprints
    /// (asked for while the release is staged, for a deploy).
    base: Option<(String, Vec<u8>)>,
}

impl Session {
    fn new(host: &Host, link: super::transport::Link) -> Session {
        let writer = Arc::new(Mutex::new(link.output));
        let stop = Arc::new(AtomicBool::new(false));
        // Pings keep the agent's patience while other hosts are busy, and
        // renew the lease on its switched generation (at least as often as
        // the agent renews it).
        {
            let (writer, stop) = (writer.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::park_timeout(wire::heartbeat().min(super::LEASE_EVERY));
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                    if wire::write_message(&mut *w, &ToAgent::Ping).is_err() {
                        break;
                    }
                }
            });
        }
        Session {
            host: host.clone(),
            peer: link.peer,
            writer,
            reader: BufReader::new(Patient::new(link.input, "host's agent")),
            stop,
            previous: None,
            switched: false,
            generation: None,
            sent: 0,
            base: None,
        }
    }

    fn ask(&mut self, msg: &ToAgent) -> Result<Reply, String> {
        let written = {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            wire::write_message(&mut *w, msg)
        };
        written.map_err(|e| self.gone(e))?;
        self.reply()
    }

    /// The next answer, `alive` frames skipped; a host silent for
    /// [`wire::silence`] is gone. Every string in it is escaped and
    /// bounded here, once, before anything prints it: a host's words
    /// never reach a terminal raw.
    fn reply(&mut self) -> Result<Reply, String> {
        loop {
            return match wire::read_frame(&mut self.reader) {
                Ok(Some(Frame::Message(body))) => serde_json::from_slice::<Reply>(&body)
                    .map(Reply::escaped)
                    .map_err(|e| format!("{}: an answer that is not one ({e})", self.host.name)),
                Ok(Some(Frame::Alive)) => continue,
                Ok(Some(Frame::Chunk(_))) => Err(format!("{}: a stray chunk", self.host.name)),
                Ok(None) => Err(self.gone("the session ended")),
                Err(e) => Err(self.gone(e)),
            };
        }
    }

    /// Asks, and turns a refusal into an error naming the host.
    fn must(&mut self, msg: &ToAgent) -> Result<Reply, HostError> {
        let reply = self.ask(msg);
        self.accepted(reply)
    }

    /// A reply that is not `ok` as an error naming the host (and whether
    /// trying again may work); a lost session is temporary.
    fn accepted(&self, reply: Result<Reply, String>) -> Result<Reply, HostError> {
        match reply {
            Ok(r) if r.ok => Ok(r),
            Ok(r) => Err((
                format!(
                    "{}: {}",
                    self.host.name,
                    r.error.unwrap_or_else(|| "failed".into())
                ),
                r.temporary,
            )),
            Err(e) => Err((e, true)),
        }
    }

    /// [`Session::must`] for a request whose payload follows it.
    fn must_with(&mut self, msg: &ToAgent, payload: &[u8]) -> Result<Reply, HostError> {
        let reply = self.ask_with(msg, payload);
        self.accepted(reply)
    }

    /// [`Session::ask`] for a request whose payload follows it.
    fn ask_with(&mut self, msg: &ToAgent, payload: &[u8]) -> Result<Reply, String> {
        let written = {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            wire::write_with_payload(&mut *w, msg, payload)
        };
        self.sent += written.map_err(|e| self.gone(e))?;
        self.reply()
    }

    /// Asks for the host's base (the manifest it runs, as fingerprints);
    /// a host without one answers without.
    fn ask_base(&mut self) -> Result<(), String> {
        let reply = self.ask(&ToAgent::Base)?;
        if let wire::Said::Base { digest } = reply.said {
            let prints = wire::read_chunks(&mut self.reader, wire::MAX_MANIFEST)
                .map_err(|e| self.gone(e))?;
            self.base = Some((digest, prints));
        }
        Ok(())
    }

    /// Offers the release, its manifest's `text`: as a delta against the
    /// host's base where there is one and a `digest` of the text is given
    /// (the delta may be used), else (or if the host cannot rebuild it)
    /// whole.
    fn offer(&mut self, id: &str, text: &str, digest: Option<&str>) -> Result<Reply, HostError> {
        if let (Some((base, prints)), Some(digest)) = (self.base.take(), digest) {
            let delta = super::delta::encode(text, &prints);
            let msg = ToAgent::Offer {
                id: id.to_string(),
                base: Some(base),
                digest: Some(digest.to_string()),
            };
            match self.ask_with(&msg, delta.as_bytes()) {
                Ok(r) if r.ok => return Ok(r),
                Ok(_) => {}
                Err(e) => return Err((e, true)),
            }
        }
        let msg = ToAgent::Offer {
            id: id.to_string(),
            base: None,
            digest: None,
        };
        self.must_with(&msg, text.as_bytes())
    }

    /// Sends blobs, up to [`BLOBS_AHEAD`] of them ahead of their
    /// acknowledgements, and reads every acknowledgement of what it sent,
    /// so the session stays in step after a refusal: the first refusal
    /// (or local read failure) stops the sending and is the error.
    fn send_blobs(&mut self, blobs: &[(&str, &std::path::Path)]) -> Result<(), HostError> {
        let mut unread = 0;
        let mut failed: Option<HostError> = None;
        for (hash, path) in blobs {
            if unread == BLOBS_AHEAD {
                unread -= 1;
                if let Err(e) = self.acknowledged()? {
                    failed = Some(e);
                    break;
                }
            }
            let file = match std::fs::File::open(path) {
                Ok(f) => f,
                Err(e) => {
                    failed = Some((format!("{}: {e}", path.display()), false));
                    break;
                }
            };
            let sent = {
                let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
                wire::write_blob(&mut *w, hash, file)
            };
            self.sent += sent.map_err(|e| (self.gone(e), true))?;
            unread += 1;
        }
        for _ in 0..unread {
            match self.acknowledged() {
                // A lost session answers nothing more.
                Err(lost) => return Err(failed.unwrap_or(lost)),
                Ok(Err(refused)) => {
                    failed.get_or_insert(refused);
                }
                Ok(Ok(())) => {}
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// The next blob's acknowledgement: `Ok(Err)` a refusal, `Err` a lost
    /// session (nothing more will come).
    fn acknowledged(&mut self) -> Result<Result<(), HostError>, HostError> {
        match self.reply() {
            Ok(r) => Ok(self.accepted(Ok(r)).map(|_| ())),
            Err(lost) => Err((lost, true)),
        }
    }

    /// The session is over: the far side ended, what it said last kept.
    fn gone(&mut self, e: impl std::fmt::Display) -> String {
        let said = self.peer.end();
        format!(
            "{}: the connection failed ({e}){}",
            self.host.name,
            if said.is_empty() {
                String::new()
            } else {
                format!(": {said}")
            }
        )
    }

    fn bye(mut self) {
        let _ = self.ask(&ToAgent::Bye);
        self.stop.store(true, Ordering::SeqCst);
        self.peer.wait();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Runs `f` on every session at once; the results, in order.
fn each<T: Send>(
    sessions: &mut [Session],
    f: impl Fn(&mut Session) -> Result<T, HostError> + Sync,
) -> Vec<Result<T, HostError>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = sessions.iter_mut().map(|c| s.spawn(|| f(c))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("host thread"))
            .collect()
    })
}

/// The errors of a batch of results.
fn errors<T>(results: Vec<Result<T, HostError>>) -> Vec<String> {
    results
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.0))
        .collect()
}

/// Sessions with every host, or why some could not be opened.
pub type Connected = Result<Vec<Session>, Vec<String>>;

/// A fleet run's driver: the fleet, how to reach it, where progress goes.
pub struct Coordinator<'a> {
    pub fleet: &'a Fleet,
    pub transport: &'a dyn Transport,
    /// A line of progress (`host: switched in 1.2s …`).
    pub say: &'a (dyn Fn(&str) + Sync),
}

impl Coordinator<'_> {
    /// Opens a session on every host (at most `parallel` starting at once).
    pub fn connect(&self) -> Connected {
        self.connect_to(&self.fleet.hosts, false)
    }

    /// [`Coordinator::connect`] for a deploy: each host also says what it
    /// runs, so that its manifest can travel as a delta.
    pub fn connect_to_deploy(&self) -> Connected {
        self.connect_to(&self.fleet.hosts, true)
    }

    fn connect_to(&self, hosts: &[Host], base: bool) -> Connected {
        let mut sessions = Vec::new();
        let mut failures = Vec::new();
        for batch in hosts.chunks(self.fleet.parallel.max(1)) {
            let results: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = batch
                    .iter()
                    .map(|h| {
                        s.spawn(move || {
                            let mut c = self.open(h)?;
                            if base && let Err(e) = c.ask_base() {
                                c.bye();
                                return Err(e);
                            }
                            Ok(c)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("connect thread"))
                    .collect()
            });
            for r in results {
                match r {
                    Ok(c) => sessions.push(c),
                    Err(e) => failures.push(e),
                }
            }
        }
        if failures.is_empty() {
            Ok(sessions)
        } else {
            hang_up(Ok(sessions));
            Err(failures)
        }
    }

    /// Opens a session; with `install`, a host whose dream is missing or
    /// speaks another protocol gets this program first.
    fn open(&self, host: &Host) -> Result<Session, String> {
        match self.open_with(host, false) {
            Ok(c) => Ok(c),
            Err(e) if self.fleet.install => {
                (self.say)(&format!("{}: installing this dream ({e})", host.name));
                let path = self.transport.install(host)?;
                (self.say)(&format!("{}: installed as {path}", host.name));
                self.open_with(host, true)
            }
            Err(e) => Err(e),
        }
    }

    fn open_with(&self, host: &Host, installed: bool) -> Result<Session, String> {
        let started = Instant::now();
        let mut c = Session::new(host, self.transport.open(host, installed)?);
        let hello = c.ask(&ToAgent::Hello {
            protocol: wire::PROTOCOL,
            version: crate::supervise::version(),
        })?;
        if !hello.ok {
            let e = hello.error.unwrap_or_else(|| "refused".into());
            c.peer.end();
            return Err(format!("{}: {e}", host.name));
        }
        c.previous = hello.current.clone();
        (self.say)(&format!(
            "{}: connected in {} (dream {}, current {})",
            host.name,
            crate::fmt_duration(started.elapsed()),
            hello.version().unwrap_or("?"),
            c.previous.as_deref().unwrap_or("none")
        ));
        Ok(c)
    }

    /// Takes the fleet's lock (the primary's, first, so two fleet runs
    /// never both get as far as the other hosts), then every other host's.
    fn lock_everywhere(&self, sessions: &mut [Session], command: &str) -> Result<(), String> {
        let lock = |c: &mut Session, fleet: bool| {
            c.must(&ToAgent::Lock {
                command: command.to_string(),
                fleet,
                wait_ms: self.fleet.wait_lock.map(|d| d.as_millis() as u64),
            })
            .map(|_| ())
        };
        let (primary, others) = sessions.split_at_mut(1);
        lock(&mut primary[0], true).map_err(|e| e.0)?;
        match errors(each(others, |c| lock(c, false))).into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// `dream fleet deploy`: `connected` (opened while the release was
    /// staged) locked, the release prepared everywhere, then switched and
    /// committed.
    pub fn deploy(&self, connected: Connected, release: &Release) -> Outcome {
        let id = &release.id;
        let mut sessions = match connected {
            Ok(c) => c,
            Err(failures) => return unreachable(id, &failures),
        };
        if let Err(e) = self.lock_everywhere(&mut sessions, &format!("dream fleet deploy {id}")) {
            let verdict = Verdict::Unchanged(format!("nothing changed; {e}"));
            return self.end(id, sessions, verdict);
        }
        (self.say)("locked every host");
        let failed = self.prepare(&mut sessions, release);
        if !failed.is_empty() {
            let verdict = Verdict::NotSwitched(format!(
                "nothing was switched; prepare failed: {}",
                failed.join("; ")
            ));
            return self.end(id, sessions, verdict);
        }
        self.switch_commit(sessions, id, release.confirm_within, Some(release.keep))
    }

    /// The manifest, the content each host lacks, the release built
    /// everywhere; the errors, by host.
    fn prepare(&self, sessions: &mut [Session], release: &Release) -> Vec<String> {
        let by_hash = files_by_hash(&release.manifest, &release.dir);
        // A host keeps each release's manifest frozen (write bits off, as
        // the release is), so the next one is offered frozen too and shares
        // its lines: the release built from it is the same. A build on the
        // hosts gets the source's own modes, whole.
        let delta = release.build.is_none();
        let text = if delta {
            release.manifest.frozen().to_text()
        } else {
            release.manifest.to_text()
        };
        // The digest the hosts check a rebuilt manifest against, once.
        let digest = delta.then(|| blake3::hash(text.as_bytes()).to_hex().to_string());
        let id = &release.id;
        errors(each(sessions, |c| {
            let t = Instant::now();
            let offer = c.offer(id, &text, digest.as_deref())?;
            let blobs = offer
                .lacks()
                .iter()
                .map(|hash| match by_hash.get(hash) {
                    Some((path, _)) => Ok((hash.as_str(), path.as_path())),
                    None => Err((
                        format!("{}: asked for unknown content {hash}", c.host.name),
                        false,
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            c.send_blobs(&blobs)?;
            c.must(&ToAgent::Prepare {
                id: id.clone(),
                build: release.build.clone(),
                bridge: release.bridge.clone(),
            })?;
            (self.say)(&format!(
                "{}: prepared in {} ({} of {} files sent, {})",
                c.host.name,
                crate::fmt_duration(t.elapsed()),
                offer.lacks().len(),
                by_hash.len(),
                crate::deploy::human_bytes(c.sent)
            ));
            Ok(())
        }))
    }

    /// `--dry-run`: what each host lacks and the waves; no lock taken,
    /// nothing written anywhere.
    pub fn plan(&self, connected: Connected, manifest: &Manifest) -> Result<Plan, Vec<String>> {
        let mut sessions = connected?;
        let sizes = files_by_hash(manifest, std::path::Path::new(""));
        let text = manifest.to_text();
        let answers = each(&mut sessions, |c| {
            c.must_with(&ToAgent::Plan, text.as_bytes())
        });
        let hosts = sessions
            .iter()
            .zip(answers)
            .map(|(c, a)| PlanRow {
                host: c.host.name.clone(),
                current: a.as_ref().ok().and_then(|r| r.current.clone()),
                lacks_files: a.as_ref().map_or(0, |r| r.lacks().len()),
                lacks_bytes: a.as_ref().map_or(0, |r| {
                    r.lacks()
                        .iter()
                        .filter_map(|h| sizes.get(h))
                        .map(|s| s.1)
                        .sum()
                }),
                error: a.err().map(|e| e.0),
            })
            .collect();
        let waves = self
            .fleet
            .rollout
            .waves(sessions.len())
            .into_iter()
            .map(|w| sessions[w].iter().map(|c| c.host.name.clone()).collect())
            .collect();
        hang_up(Ok(sessions));
        Ok(Plan { waves, hosts })
    }

    /// Switches one host; what it reported is kept on the session.
    fn switch_one(
        &self,
        c: &mut Session,
        id: &str,
        confirm_within: Duration,
        canary: Option<&crate::supervise::canary::judge::Spec>,
    ) -> Result<(), HostError> {
        let t = Instant::now();
        if let Some(spec) = canary {
            (self.say)(&format!(
                "{}: a canary of {} with {} of its connections, judged for {}",
                c.host.name,
                id,
                spec.share,
                crate::fmt_duration(Duration::from_millis(spec.judge_ms))
            ));
        }
        let r = c.ask(&ToAgent::Switch {
            id: id.to_string(),
            confirm_within_ms: confirm_within.as_millis() as u64,
            verify: self.fleet.verify.clone(),
            settle_ms: self.fleet.settle.as_millis() as u64,
            canary: canary.cloned(),
        });
        match r {
            Ok(r) if r.ok => {
                c.switched = r.previous.as_deref() != Some(id);
                c.previous = r.previous;
                c.generation = r.generation;
                (self.say)(&format!(
                    "{}: switched in {} (generation {}, provisional for {})",
                    c.host.name,
                    crate::fmt_duration(t.elapsed()),
                    r.generation.map_or("-".into(), |g| g.to_string()),
                    crate::fmt_duration(confirm_within)
                ));
                Ok(())
            }
            // It may have switched and then failed its reload (it then
            // switched back by itself).
            Ok(r) => Err((
                format!("{}: {}", c.host.name, r.error.unwrap_or_default()),
                r.temporary,
            )),
            Err(e) => {
                // Unknown: it may be switched; its supervisor reverts it at
                // the deadline if so.
                c.switched = true;
                Err((e, true))
            }
        }
    }

    /// Switches every host wave by wave (the canary alone first), then
    /// commits and confirms; more than `max_fail` failures revert every
    /// switched host.
    fn switch_commit(
        &self,
        mut sessions: Vec<Session>,
        id: &str,
        within: Duration,
        keep: Option<usize>,
    ) -> Outcome {
        let rollout = &self.fleet.rollout;
        let mut failures: Vec<String> = Vec::new();
        for (n, wave) in rollout.waves(sessions.len()).into_iter().enumerate() {
            if n > 0 && !rollout.wait.is_zero() {
                (self.say)(&format!(
                    "waiting {} before the next group",
                    crate::fmt_duration(rollout.wait)
                ));
                std::thread::sleep(rollout.wait);
            }
            // The first wave is the canary hosts: judged there, if asked.
            let judge = self.fleet.judge.as_ref().filter(|_| n == 0);
            failures.extend(errors(each(&mut sessions[wave], |c| {
                self.switch_one(c, id, within, judge)
            })));
            if failures.len() > rollout.max_fail {
                let verdict = self.revert(&mut sessions, id, &failures);
                return self.end(id, sessions, verdict);
            }
        }
        if !failures.is_empty() {
            (self.say)(&format!(
                "{} failed, within --max-fail {}: going on",
                failures.join("; "),
                rollout.max_fail
            ));
        }
        // The decision, recorded on the primary, then confirmed everywhere.
        crate::test_point("fleet-commit");
        let hosts: Vec<String> = sessions.iter().map(|c| c.host.name.clone()).collect();
        if let Err((e, _)) = sessions[0].must(&ToAgent::Commit {
            id: id.to_string(),
            hosts,
        }) {
            (self.say)(&format!("recording the commit: {e}"));
        }
        let mut unconfirmed = errors(each(&mut sessions, |c| {
            if !c.switched {
                return Ok(());
            }
            c.must(&ToAgent::Confirm {
                generation: c.generation,
                keep: keep.map(|k| k.min(u32::MAX as usize) as u32),
            })
            .map(|_| ())
        }));
        unconfirmed.extend(
            failures
                .iter()
                .map(|f| format!("{f} (still on its previous release)")),
        );
        let verdict = if unconfirmed.is_empty() {
            Verdict::Done
        } else {
            Verdict::Inconsistent(format!(
                "the fleet is inconsistent: not confirmed on {} (they revert at their deadline); run the same deploy again to converge",
                unconfirmed.join("; ")
            ))
        };
        self.end(id, sessions, verdict)
    }

    /// Every switched host back to the release it ran before.
    fn revert(&self, sessions: &mut [Session], id: &str, failures: &[String]) -> Verdict {
        let reason = format!("fleet deploy of {id} failed: {}", failures.join("; "));
        let stuck = errors(each(sessions, |c| {
            if !c.switched {
                return Ok(());
            }
            let Some(to) = c.previous.clone() else {
                return Err((
                    format!("{}: no previous release to go back to", c.host.name),
                    false,
                ));
            };
            c.must(&ToAgent::Revert {
                from: id.to_string(),
                to: to.clone(),
                reason: reason.clone(),
            })?;
            (self.say)(&format!("{}: reverted to {to}", c.host.name));
            Ok(())
        }));
        if stuck.is_empty() {
            Verdict::Reverted(format!(
                "{reason}; every host is back on its previous release"
            ))
        } else {
            Verdict::Inconsistent(format!(
                "{reason}; could not revert: {} (their supervisors revert them at their confirmation deadline)",
                stuck.join("; ")
            ))
        }
    }

    /// Asks every host what it runs now, says goodbye, and sums up.
    fn end(&self, release: &str, sessions: Vec<Session>, verdict: Verdict) -> Outcome {
        let mut hosts = Vec::new();
        for mut c in sessions {
            let current = c.ask(&ToAgent::Status).ok().and_then(|r| r.current);
            hosts.push(HostOutcome {
                host: c.host.name.clone(),
                previous: c.previous.clone(),
                current,
                sent_bytes: c.sent,
            });
            c.bye();
        }
        Outcome {
            release: release.to_string(),
            hosts,
            verdict,
        }
    }

    /// `dream fleet rollback [ID]`: every host to ID (default: the release
    /// the primary recorded as previous), with the same switch and commit.
    pub fn rollback(&self, id: Option<&str>, confirm_within: Duration) -> Outcome {
        let mut sessions = match self.connect() {
            Ok(c) => c,
            Err(failures) => return unreachable(id.unwrap_or(""), &failures),
        };
        if let Err(e) = self.lock_everywhere(&mut sessions, "dream fleet rollback") {
            let verdict = Verdict::Unchanged(format!("nothing changed; {e}"));
            return self.end(id.unwrap_or(""), sessions, verdict);
        }
        let target = match id {
            Some(id) => id.to_string(),
            None => match sessions[0].must(&ToAgent::Status) {
                Ok(Reply {
                    previous: Some(p), ..
                }) => p,
                Ok(_) => {
                    let verdict = Verdict::NotSwitched(
                        "no previous release recorded on the primary; name one".into(),
                    );
                    return self.end("", sessions, verdict);
                }
                Err((e, _)) => return self.end("", sessions, Verdict::Unchanged(e)),
            },
        };
        self.switch_commit(sessions, &target, confirm_within, None)
    }

    /// `dream fleet status`: what each host runs, and the manual hold.
    pub fn status(&self) -> Result<Vec<HostStatus>, Vec<String>> {
        let mut rows = Vec::new();
        for mut c in self.connect()? {
            let r = c.ask(&ToAgent::Status);
            rows.push(HostStatus {
                host: c.host.name.clone(),
                current: r.as_ref().ok().and_then(|r| r.current.clone()),
                version: r.as_ref().ok().and_then(|r| r.version().map(String::from)),
                hold: r.as_ref().ok().and_then(|r| match &r.said {
                    wire::Said::Status { hold, .. } => hold.clone(),
                    _ => None,
                }),
                error: r.err(),
            });
            c.bye();
        }
        Ok(rows)
    }

    /// `dream fleet lock -m MSG` / `unlock` (`None`): a manual hold on the
    /// primary that automatic deploys refuse at once (never wait on). Like
    /// every change on a host, it is set under the host's lock.
    pub fn hold(&self, message: Option<String>) -> Result<(), String> {
        let mut c = self
            .connect_to(&self.fleet.hosts[..1], false)
            .map_err(|e| format!("unreachable: {}", e.join("; ")))?
            .remove(0);
        let set = message.is_some();
        let r = c
            .must(&ToAgent::Lock {
                command: format!("dream fleet {}", if set { "lock" } else { "unlock" }),
                fleet: false,
                wait_ms: self.fleet.wait_lock.map(|d| d.as_millis() as u64),
            })
            .and_then(|_| c.must(&ToAgent::Hold { message }));
        c.bye();
        r.map(|_| ()).map_err(|e| e.0)
    }
}

/// Ends sessions that will not be used.
pub fn hang_up(connected: Connected) {
    for c in connected.into_iter().flatten() {
        c.bye();
    }
}

fn unreachable(release: &str, failures: &[String]) -> Outcome {
    Outcome {
        release: release.to_string(),
        hosts: Vec::new(),
        verdict: Verdict::Unchanged(format!(
            "nothing changed; unreachable: {}",
            failures.join("; ")
        )),
    }
}

/// Each file's content by hash: where it is under `dir`, and its size.
fn files_by_hash(m: &Manifest, dir: &std::path::Path) -> HashMap<String, (PathBuf, u64)> {
    m.entries()
        .iter()
        .filter_map(|e| match &e.kind {
            manifest::Kind::File { hash, size, .. } => {
                Some((manifest::hex(hash), (dir.join(&e.path), *size)))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests;
