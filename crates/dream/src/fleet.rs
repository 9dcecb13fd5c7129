//! `dream fleet`: one release onto many hosts over OpenSSH, ending on the
//! new release everywhere or on the old one everywhere.
//!
//! The coordinator runs the system's `ssh` once per host (a private
//! ControlMaster per host, `BatchMode=yes`, the user's `~/.ssh/config`,
//! agent and `known_hosts` as they are) with `dream agent --root ROOT` on
//! the other end, and speaks `dream_core::fleet`'s protocol over it. The
//! phases: connect and lock (the first host's lock is the fleet's), offer
//! the manifest and send each host only the content it lacks, prepare
//! everywhere, switch (canary first) with provisional reloads, then record
//! the decision on the primary and confirm everywhere. A failure before
//! the commit reverts every switched host to the release it recorded as
//! previous; a host that cannot be confirmed reverts itself at its
//! supervisor's deadline, and the run says so (exit 2).

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dream_core::fleet::{self, Frame, Reply, ToAgent};
use dream_core::store::manifest::{self, Manifest};

use crate::exit::{self, Failure, Result};

/// Where and how to reach the hosts.
pub struct Fleet {
    pub hosts: Vec<HostSpec>,
    /// How the switch rolls out.
    pub rollout: Rollout,
    /// Copy this program to hosts whose dream is missing or speaks
    /// another protocol (into `ROOT/.dream/bin/dream`).
    pub install: bool,
    /// How long each host's agent waits for its deploy lock.
    pub wait_lock: Option<Duration>,
    /// How long each host's new generation must stay up after its switch.
    pub settle: Duration,
    /// Paths each host requests through its own socket after its switch.
    pub verify: Vec<String>,
    /// The ssh command and its own options (`--ssh`).
    pub ssh: Vec<String>,
    pub remote_dream: String,
    pub parallel: usize,
    pub json: bool,
}

/// The switch's order: `canary` hosts alone first, then groups of
/// `group` (all the rest when `None`; a number, or a percentage of the
/// hosts), `wait` between groups; up to `max_fail` hosts may fail their
/// switch before the fleet reverts.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub canary: usize,
    pub group: Option<Group>,
    pub wait: Duration,
    pub max_fail: usize,
}

#[derive(Debug, Clone, Copy)]
pub enum Group {
    Hosts(usize),
    Percent(u32),
}

impl std::str::FromStr for Group {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Group, String> {
        let bad = || format!("{s:?}: a number of hosts (3) or a percentage (25%)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u32>() {
                Ok(p) if (1..=100).contains(&p) => Ok(Group::Percent(p)),
                _ => Err(bad()),
            },
            None => match s.parse::<usize>() {
                Ok(n) if n > 0 => Ok(Group::Hosts(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl Rollout {
    /// The hosts' indexes, wave by wave.
    fn waves(&self, hosts: usize) -> Vec<std::ops::Range<usize>> {
        let canary = self.canary.min(hosts);
        let mut waves = Vec::new();
        if canary > 0 {
            waves.push(0..canary);
        }
        let size = match self.group {
            None => hosts.saturating_sub(canary).max(1),
            Some(Group::Hosts(n)) => n,
            Some(Group::Percent(p)) => (hosts * p as usize).div_ceil(100).max(1),
        };
        let mut at = canary;
        while at < hosts {
            waves.push(at..(at + size).min(hosts));
            at += size;
        }
        waves
    }
}

#[derive(Debug, Clone)]
pub struct HostSpec {
    /// As given: `[user@]host[:port]`.
    pub name: String,
    pub root: String,
}

impl HostSpec {
    /// `[user@]host[:port]` with the fleet's root.
    pub fn parse(s: &str, root: &str) -> std::result::Result<HostSpec, String> {
        let s = s.trim();
        let host = s.rsplit_once('@').map_or(s, |(_, h)| h);
        let bad = host.is_empty()
            || s.starts_with('-')
            || s.chars().any(|c| c.is_whitespace() || c.is_control());
        if bad {
            return Err(format!("invalid host {s:?} (expected [user@]host[:port])"));
        }
        if let Some((_, port)) = host.rsplit_once(':')
            && !host.contains('[')
            && port.parse::<u16>().is_err()
        {
            return Err(format!("invalid port in host {s:?}"));
        }
        Ok(HostSpec {
            name: s.to_string(),
            root: root.to_string(),
        })
    }

    /// The ssh destination and port arguments.
    fn ssh_args(&self) -> Vec<String> {
        match self.name.rsplit_once(':') {
            Some((dest, port)) if port.parse::<u16>().is_ok() => {
                vec!["-p".into(), port.into(), dest.into()]
            }
            _ => vec![self.name.clone()],
        }
    }
}

/// One host's agent session.
struct Conn {
    host: HostSpec,
    child: Child,
    writer: Arc<Mutex<ChildStdin>>,
    reader: BufReader<fleet::Patient<ChildStdout>>,
    stop: Arc<AtomicBool>,
    /// What the host ran before this run switched it.
    previous: Option<String>,
    switched: bool,
    generation: Option<u64>,
    /// Bytes of content sent to it.
    sent: u64,
}

impl Conn {
    fn ask(&mut self, msg: &ToAgent) -> std::result::Result<Reply, String> {
        let written = {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            fleet::write_message(&mut *w, msg)
        };
        written.map_err(|e| self.gone(e))?;
        self.reply()
    }

    /// The next answer, `alive` frames skipped; a host silent for
    /// [`fleet::silence`] is gone. Every string in it is escaped and
    /// bounded here, once, before anything prints it: a host's words
    /// never reach a terminal raw.
    fn reply(&mut self) -> std::result::Result<Reply, String> {
        loop {
            return match fleet::read_frame(&mut self.reader) {
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
    fn must(&mut self, msg: &ToAgent) -> std::result::Result<Reply, (String, bool)> {
        let reply = self.ask(msg);
        self.accepted(reply)
    }

    /// A reply that is not `ok` as an error naming the host (and whether
    /// trying again may work); a lost session is temporary.
    fn accepted(
        &self,
        reply: std::result::Result<Reply, String>,
    ) -> std::result::Result<Reply, (String, bool)> {
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

    /// [`Conn::must`] for a request whose payload follows it (a manifest).
    fn must_with(
        &mut self,
        msg: &ToAgent,
        payload: &[u8],
    ) -> std::result::Result<Reply, (String, bool)> {
        let written = {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            fleet::write_with_payload(&mut *w, msg, payload)
        };
        match written {
            Ok(n) => self.sent += n,
            Err(e) => return Err((self.gone(e), true)),
        }
        let reply = self.reply();
        self.accepted(reply)
    }

    /// The session is over: what ssh (or the agent) said last on stderr,
    /// read for at most two seconds, and the ssh process ended, so that a
    /// silent or hostile peer can hold nothing of this run.
    fn gone(&mut self, e: impl std::fmt::Display) -> String {
        let mut stderr = String::new();
        if let Some(s) = self.child.stderr.take() {
            stderr = read_for(s, Duration::from_secs(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let said = dream_core::logtext::value(stderr.trim().lines().last().unwrap_or(""));
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
        let _ = self.child.wait();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What `r` says until it closes or `limit` passes, whichever is first
/// (at most 64 KiB).
fn read_for(mut r: std::process::ChildStderr, limit: Duration) -> String {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < 64 << 10 {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left.as_millis() as i32).unwrap_or(PollTimeout::ZERO);
        match poll(&mut fds, ms) {
            Ok(0) => break,
            Ok(_) => match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            },
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Prints a progress line (stderr), unless `--json`.
fn say(json: bool, line: &str) {
    if dream_core::logtext::json() {
        dream_core::logtext::say(
            dream_core::logtext::Level::Info,
            "fleet",
            line,
            &[("from", "fleet".into())],
        );
    } else if !json {
        eprintln!("dream fleet: {line}");
    }
}

impl Fleet {
    /// Opens a session on every host (at most `parallel` starting at once),
    /// each with its own ControlMaster under `control`.
    fn connect(&self, control: &Path) -> std::result::Result<Vec<Conn>, Vec<String>> {
        let mut conns = Vec::new();
        let mut errors = Vec::new();
        for batch in self.hosts.chunks(self.parallel.max(1)) {
            let results: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = batch
                    .iter()
                    .map(|h| s.spawn(move || self.open(h, control)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("connect thread"))
                    .collect()
            });
            for r in results {
                match r {
                    Ok(c) => conns.push(c),
                    Err(e) => errors.push(e),
                }
            }
        }
        if errors.is_empty() {
            Ok(conns)
        } else {
            for c in conns {
                c.bye();
            }
            Err(errors)
        }
    }

    /// Opens a session; with `--install`, a host whose dream is missing
    /// or speaks another protocol gets this program first.
    fn open(&self, host: &HostSpec, control: &Path) -> std::result::Result<Conn, String> {
        match self.open_with(host, control, &self.remote_dream) {
            Ok(c) => Ok(c),
            Err(e) if self.install => {
                let installed = format!("{}/.dream/bin/dream", host.root.trim_end_matches('/'));
                say(
                    self.json,
                    &format!("{}: installing this dream as {installed} ({e})", host.name),
                );
                self.install_on(host, control, &installed)?;
                self.open_with(host, control, &installed)
            }
            Err(e) => Err(e),
        }
    }

    /// Copies this program to `path` on the host, through its master.
    fn install_on(
        &self,
        host: &HostSpec,
        control: &Path,
        path: &str,
    ) -> std::result::Result<(), String> {
        let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
        let file = std::fs::File::open(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
        let part = format!("{path}.part");
        let dir = Path::new(path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| ".".into());
        let script = format!(
            "mkdir -p {d} && cat > {p} && chmod 755 {p} && mv -f {p} {f}",
            d = shell_quote(&dir),
            p = shell_quote(&part),
            f = shell_quote(path)
        );
        let out = Command::new(&self.ssh[0])
            .args(&self.ssh[1..])
            .args(["-o", "BatchMode=yes", "-o", "ControlMaster=auto"])
            .arg("-o")
            .arg(format!("ControlPath={}/%C", control.display()))
            .args(["-o", "ControlPersist=60"])
            .args(host.ssh_args())
            .arg("--")
            .arg(script)
            .stdin(Stdio::from(file))
            .output()
            .map_err(|e| format!("{}: cannot run {}: {e}", host.name, self.ssh[0]))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}: installing dream failed: {}",
                host.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn open_with(
        &self,
        host: &HostSpec,
        control: &Path,
        remote_dream: &str,
    ) -> std::result::Result<Conn, String> {
        let started = Instant::now();
        let mut cmd = Command::new(&self.ssh[0]);
        cmd.args(&self.ssh[1..])
            .args(["-o", "BatchMode=yes"])
            .args(["-o", "ControlMaster=auto"])
            .arg("-o")
            .arg(format!("ControlPath={}/%C", control.display()))
            .args(["-o", "ControlPersist=60"])
            .args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"])
            .args(host.ssh_args())
            .arg("--")
            .arg(format!(
                "{} agent --root {}",
                shell_quote(remote_dream),
                shell_quote(&host.root)
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("{}: cannot run {}: {e}", host.name, self.ssh[0]))?;
        let writer = Arc::new(Mutex::new(child.stdin.take().expect("piped")));
        let reader = BufReader::new(fleet::Patient::new(
            child.stdout.take().expect("piped"),
            "host's agent",
        ));
        let stop = Arc::new(AtomicBool::new(false));
        // Pings keep the agent's patience while other hosts are busy, and
        // renew the lease on its switched generation (at least as often as
        // the agent renews it).
        {
            let (writer, stop) = (writer.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::park_timeout(fleet::heartbeat().min(fleet::LEASE_EVERY));
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                    if fleet::write_message(&mut *w, &ToAgent::Ping).is_err() {
                        break;
                    }
                }
            });
        }
        let mut conn = Conn {
            host: host.clone(),
            child,
            writer,
            reader,
            stop,
            previous: None,
            switched: false,
            generation: None,
            sent: 0,
        };
        let hello = conn.ask(&ToAgent::Hello {
            protocol: fleet::PROTOCOL,
            version: dream_core::supervise::version(),
        })?;
        if !hello.ok {
            return Err(format!(
                "{}: {}",
                host.name,
                hello.error.unwrap_or_else(|| "refused".into())
            ));
        }
        conn.previous = hello.current;
        say(
            self.json,
            &format!(
                "{}: connected in {} (dream {}, current {})",
                host.name,
                dream_core::fmt_duration(started.elapsed()),
                hello.version.as_deref().unwrap_or("?"),
                conn.previous.as_deref().unwrap_or("none")
            ),
        );
        Ok(conn)
    }
}

/// Single quotes for the remote shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `f` on every connection at once; the errors, by host.
fn each<T: Send>(
    conns: &mut [Conn],
    f: impl Fn(&mut Conn) -> std::result::Result<T, (String, bool)> + Sync,
) -> Vec<std::result::Result<T, (String, bool)>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = conns.iter_mut().map(|c| s.spawn(|| f(c))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("host thread"))
            .collect()
    })
}

/// What `dream fleet deploy` is asked to do.
pub struct DeployPlan {
    pub source: String,
    pub id: Option<String>,
    pub build: Option<String>,
    pub dry_run: bool,
    pub exclude: Vec<String>,
    pub keep_git: bool,
    pub bridge: Vec<PathBuf>,
    /// Run `build` once here rather than on every host.
    pub build_on_local: bool,
    pub confirm_within: Duration,
}

#[derive(serde::Serialize, Default)]
struct HostReport {
    host: String,
    previous: Option<String>,
    current: Option<String>,
    sent_bytes: u64,
}

#[derive(serde::Serialize, Default)]
struct FleetReport {
    ok: bool,
    release: String,
    hosts: Vec<HostReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    exit: i32,
    duration_s: f64,
}

/// This run's ControlMasters: their sockets live in a private directory,
/// short (a Unix socket path has ~100 bytes), owned by us, mode 0700; each
/// master is told to exit when the run ends.
struct Masters {
    dir: tempfile::TempDir,
    ssh: Vec<String>,
    hosts: Vec<HostSpec>,
}

impl Masters {
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Masters {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new(&self.ssh[0])
                .args(&self.ssh[1..])
                .arg("-o")
                .arg(format!("ControlPath={}/%C", self.dir.path().display()))
                .args(["-O", "exit"])
                .args(h.ssh_args())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn control_dir(f: &Fleet) -> Result<Masters> {
    let dir = tempfile::Builder::new()
        .prefix("dream-f")
        .tempdir_in("/tmp")
        .map_err(|e| Failure::failed(format!("a directory for ssh's control sockets: {e}")))?;
    Ok(Masters {
        dir,
        ssh: f.ssh.clone(),
        hosts: f.hosts.clone(),
    })
}

/// Stages the source locally (a directory as it is; a tarball or git
/// revision into a temporary directory) and hashes it.
fn stage_source(
    source: &str,
    exclude: &[String],
    keep_git: bool,
) -> Result<(PathBuf, Manifest, Option<tempfile::TempDir>)> {
    use dream_core::store::stage::Source;
    let src = Source::parse(source).map_err(Failure::usage)?;
    let (dir, tmp) = match src {
        Source::Dir(d) => {
            if !d.is_dir() {
                return Err(Failure::usage(format!("{}: not a directory", d.display())));
            }
            (d, None)
        }
        Source::Tar(t) => {
            let tmp = tempfile::tempdir().map_err(Failure::failed)?;
            let dir = tmp.path().join("src");
            dream_core::store::stage::extract_tar(&t, &dir, u64::MAX)
                .map_err(|e| Failure::failed(format!("{}: {e}", t.display())))?;
            (dir, Some(tmp))
        }
        Source::Git { url, rev } => {
            let tmp = tempfile::tempdir().map_err(Failure::failed)?;
            let dir = tmp.path().join("src");
            dream_core::store::stage::git_checkout(&url, rev.as_deref(), &dir, u64::MAX, None)
                .map_err(|e| Failure::failed(e.to_string()))?;
            (dir, Some(tmp))
        }
        Source::Objects { .. } => return Err(Failure::usage("not a source")),
    };
    // What a directory source leaves out, as for dream deploy.
    let left_out = dream_core::store::stage::Exclude::new(&dir, exclude, keep_git || tmp.is_some())
        .map_err(Failure::usage)?;
    let m = Manifest::of_tree_but(&dir, &|rel, is_dir| left_out.leaves_out(rel, is_dir))
        .map_err(|e| Failure::failed(format!("hashing {}: {e}", dir.display())))?;
    Ok((dir, m, tmp))
}

/// `--build-on local`: copies the source (as hashed: its exclusions
/// applied) into a temporary directory, runs the build there with the
/// release's id in `DREAM_RELEASE`, and hashes the result.
fn build_locally(
    src: &Path,
    manifest: &Manifest,
    id: &str,
    cmd: &str,
    json: bool,
) -> Result<(PathBuf, Manifest, tempfile::TempDir)> {
    let tmp = tempfile::tempdir().map_err(Failure::failed)?;
    let dir = tmp.path().join("build");
    for e in manifest.entries() {
        let (from, to) = (src.join(&e.path), dir.join(&e.path));
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(Failure::failed)?;
        }
        match &e.kind {
            manifest::Kind::Dir { .. } => std::fs::create_dir_all(&to).map_err(Failure::failed)?,
            manifest::Kind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &to).map_err(Failure::failed)?
            }
            manifest::Kind::File { .. } => {
                std::fs::copy(&from, &to)
                    .map_err(|e| Failure::failed(format!("{}: {e}", from.display())))?;
            }
        }
    }
    say(json, &format!("building here: {cmd}"));
    let status = Command::new("/bin/sh")
        .args(["-c", cmd])
        .current_dir(&dir)
        .env("DREAM_RELEASE", id)
        .env("DREAM_BUILD_DIR", &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .map_err(Failure::failed)?,
        ))
        .status()
        .map_err(|e| Failure::failed(format!("cannot run the build: {e}")))?;
    if !status.success() {
        return Err(Failure::failed(format!(
            "the build {} here; nothing was sent anywhere",
            dream_core::exit::Exit::from_std(status)
        )));
    }
    let built =
        Manifest::of_tree(&dir).map_err(|e| Failure::failed(format!("hashing the build: {e}")))?;
    Ok((dir, built, tmp))
}

/// Ends the run: a report on stdout with `--json`, the exit code.
fn finish(f: &Fleet, started: Instant, mut report: FleetReport) -> Result {
    report.duration_s = started.elapsed().as_secs_f64();
    if f.json {
        crate::print_line(&serde_json::to_string(&report).expect("a report serializes"));
    } else {
        for h in &report.hosts {
            eprintln!(
                "  {:<24} now {:<36} was {}",
                h.host,
                h.current.as_deref().unwrap_or("-"),
                h.previous.as_deref().unwrap_or("-")
            );
        }
    }
    match report.exit {
        0 => Ok(()),
        code if f.json => Err(Failure::silent(code)),
        code => Err(Failure {
            code,
            message: report.error.unwrap_or_default(),
        }),
    }
}

/// Takes the fleet's lock (the primary's, first, so two fleet runs never
/// both get as far as the other hosts), then every other host's.
fn lock_everywhere(
    f: &Fleet,
    conns: &mut [Conn],
    command: &str,
) -> std::result::Result<(), String> {
    let lock = |c: &mut Conn, fleet: bool| {
        c.must(&ToAgent::Lock {
            command: command.to_string(),
            fleet,
            wait_ms: f.wait_lock.map(|d| d.as_millis() as u64),
        })
        .map(|_| ())
        .map_err(|(e, _)| e)
    };
    let (primary, others) = conns.split_at_mut(1);
    lock(&mut primary[0], true)?;
    each(others, |c| lock(c, false).map_err(|e| (e, true)))
        .into_iter()
        .find_map(|r| r.err())
        .map_or(Ok(()), |(e, _)| Err(e))
}

fn fail(report: &mut FleetReport, code: i32, message: String) {
    report.ok = false;
    report.exit = code;
    report.error = Some(message);
}

/// `dream fleet deploy SOURCE`.
pub fn deploy(f: &Fleet, plan: &DeployPlan) -> Result {
    let started = Instant::now();
    let control = control_dir(f)?;
    // The source is hashed here while the ssh sessions start.
    let (staged, connected) = std::thread::scope(|s| {
        let connecting = s.spawn(|| f.connect(control.path()));
        let staged = stage_source(&plan.source, &plan.exclude, plan.keep_git);
        (staged, connecting.join().expect("connect thread"))
    });
    let hang_up = |connected: std::result::Result<Vec<Conn>, Vec<String>>| {
        for c in connected.into_iter().flatten() {
            c.bye();
        }
    };
    let (dir, manifest, _tmp) = match staged {
        Ok(s) => s,
        Err(e) => {
            hang_up(connected);
            return Err(e);
        }
    };
    let id = match &plan.id {
        Some(id) => match dream_core::store::release::check_id(id) {
            Ok(()) => id.clone(),
            Err(e) => {
                hang_up(connected);
                return Err(Failure::usage(e));
            }
        },
        None => dream_core::deploy::new_release_id(&manifest),
    };
    // --build-on local: built once here, and the built tree is what the
    // hosts get (they build nothing).
    let (dir, manifest, _built, build) = match (&plan.build, plan.build_on_local) {
        (Some(cmd), true) => match build_locally(&dir, &manifest, &id, cmd, f.json) {
            Ok((d, m, t)) => (d, m, Some(t), None),
            Err(e) => {
                hang_up(connected);
                return Err(e);
            }
        },
        _ => (dir, manifest, None, plan.build.clone()),
    };
    let by_hash: HashMap<String, PathBuf> = manifest
        .entries()
        .iter()
        .filter_map(|e| match &e.kind {
            manifest::Kind::File { hash, .. } => Some((manifest::hex(hash), dir.join(&e.path))),
            _ => None,
        })
        .collect();
    say(
        f.json,
        &format!(
            "release {id}: {} entries, {} hosts",
            manifest.entries().len(),
            f.hosts.len()
        ),
    );
    let mut report = FleetReport {
        release: id.clone(),
        ..FleetReport::default()
    };
    if plan.dry_run {
        return dry_run(f, connected, &id, &manifest);
    }
    let mut conns = match connected {
        Ok(c) => c,
        Err(errors) => {
            fail(
                &mut report,
                exit::TEMPORARY,
                format!("nothing changed; unreachable: {}", errors.join("; ")),
            );
            return finish(f, started, report);
        }
    };
    let command = format!("dream fleet deploy {id}");
    if let Err(e) = lock_everywhere(f, &mut conns, &command) {
        fail(
            &mut report,
            exit::TEMPORARY,
            format!("nothing changed; {e}"),
        );
        return end(f, started, report, conns);
    }
    say(f.json, "locked every host");
    // Prepare: the manifest, the content each host lacks, the release
    // built everywhere; nothing is switched if any host fails.
    let text = manifest.to_text();
    let results = each(&mut conns, |c| {
        let t = Instant::now();
        let offer = c.must_with(&ToAgent::Offer { id: id.clone() }, text.as_bytes())?;
        let lacking = offer.lacks.len();
        for hash in &offer.lacks {
            let path = by_hash.get(hash).ok_or_else(|| {
                (
                    format!("{}: asked for unknown content {hash}", c.host.name),
                    false,
                )
            })?;
            let file = std::fs::File::open(path)
                .map_err(|e| (format!("{}: {e}", path.display()), false))?;
            let sent = {
                let mut w = c.writer.lock().unwrap_or_else(|e| e.into_inner());
                fleet::write_blob(&mut *w, hash, file)
            };
            c.sent += sent.map_err(|e| (c.gone(e), true))?;
            let reply = c.reply();
            c.accepted(reply)?;
        }
        c.must(&ToAgent::Prepare {
            id: id.clone(),
            build: build.clone(),
            bridge: plan.bridge.clone(),
        })?;
        say(
            f.json,
            &format!(
                "{}: prepared in {} ({} of {} files sent, {})",
                c.host.name,
                dream_core::fmt_duration(t.elapsed()),
                lacking,
                by_hash.len(),
                dream_core::deploy::human_bytes(c.sent)
            ),
        );
        Ok(())
    });
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.0))
        .collect();
    if !failed.is_empty() {
        fail(
            &mut report,
            exit::FAILED,
            format!(
                "nothing was switched; prepare failed: {}",
                failed.join("; ")
            ),
        );
        return end(f, started, report, conns);
    }
    switch_commit(f, started, report, conns, &id, plan.confirm_within)
}

/// `--dry-run`: the plan, from each host's answer to what it lacks; no
/// lock taken, nothing written anywhere.
fn dry_run(
    f: &Fleet,
    connected: std::result::Result<Vec<Conn>, Vec<String>>,
    id: &str,
    manifest: &Manifest,
) -> Result {
    let sizes: HashMap<String, u64> = manifest
        .entries()
        .iter()
        .filter_map(|e| match &e.kind {
            manifest::Kind::File { hash, size, .. } => Some((manifest::hex(hash), *size)),
            _ => None,
        })
        .collect();
    let mut conns = connected
        .map_err(|errors| Failure::temporary(format!("unreachable: {}", errors.join("; "))))?;
    let text = manifest.to_text();
    let answers = each(&mut conns, |c| c.must_with(&ToAgent::Plan, text.as_bytes()));
    let mut rows = Vec::new();
    for (c, a) in conns.iter().zip(answers) {
        let (files, bytes, error) = match &a {
            Ok(r) => (
                r.lacks.len(),
                r.lacks.iter().filter_map(|h| sizes.get(h)).sum::<u64>(),
                None,
            ),
            Err((e, _)) => (0, 0, Some(e.clone())),
        };
        rows.push(serde_json::json!({
            "host": c.host.name,
            "current": a.as_ref().ok().and_then(|r| r.current.clone()),
            "lacks_files": files,
            "lacks_bytes": bytes,
            "error": error,
        }));
    }
    let waves: Vec<Vec<String>> = f
        .rollout
        .waves(conns.len())
        .into_iter()
        .map(|w| conns[w].iter().map(|c| c.host.name.clone()).collect())
        .collect();
    for c in conns {
        c.bye();
    }
    let failed = rows.iter().any(|r| !r["error"].is_null());
    if f.json {
        crate::print_line(
            &serde_json::json!({"ok": !failed, "dry_run": true, "release": id, "groups": waves, "hosts": rows})
                .to_string(),
        );
    } else {
        crate::print_line(&format!(
            "plan for {id} ({} entries); nothing is changed",
            manifest.entries().len()
        ));
        for (n, w) in waves.iter().enumerate() {
            crate::print_line(&format!(
                "  {} {}: {}",
                if n == 0 && f.rollout.canary > 0 {
                    "canary"
                } else {
                    "group "
                },
                n + 1,
                w.join(", ")
            ));
        }
        for r in &rows {
            crate::print_line(&format!(
                "  {:<24} on {:<36} lacks {} files, {}{}",
                r["host"].as_str().unwrap_or("?"),
                r["current"].as_str().unwrap_or("nothing"),
                r["lacks_files"],
                dream_core::deploy::human_bytes(r["lacks_bytes"].as_u64().unwrap_or(0)),
                r["error"]
                    .as_str()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            ));
        }
    }
    if failed {
        Err(Failure::silent(exit::TEMPORARY))
    } else {
        Ok(())
    }
}

/// Switches every host (the first alone, as a canary), then commits and
/// confirms; on a failure before the commit, reverts every switched host.
fn switch_commit(
    f: &Fleet,
    started: Instant,
    mut report: FleetReport,
    mut conns: Vec<Conn>,
    id: &str,
    confirm_within: Duration,
) -> Result {
    let switch = |c: &mut Conn| {
        let t = Instant::now();
        let r = c.ask(&ToAgent::Switch {
            id: id.to_string(),
            confirm_within_ms: confirm_within.as_millis() as u64,
            verify: f.verify.clone(),
            settle_ms: f.settle.as_millis() as u64,
        });
        match r {
            Ok(r) if r.ok => {
                c.switched = r.previous.as_deref() != Some(id);
                c.previous = r.previous;
                c.generation = r.generation;
                say(
                    f.json,
                    &format!(
                        "{}: switched in {} (generation {}, provisional for {})",
                        c.host.name,
                        dream_core::fmt_duration(t.elapsed()),
                        r.generation.map_or("-".into(), |g| g.to_string()),
                        dream_core::fmt_duration(confirm_within)
                    ),
                );
                Ok(())
            }
            Ok(r) => {
                // It may have switched and then failed its reload (it then
                // switched back by itself).
                Err((
                    format!("{}: {}", c.host.name, r.error.unwrap_or_default()),
                    r.temporary,
                ))
            }
            Err(e) => {
                // Unknown: it may be switched; its supervisor reverts it at
                // the deadline if so.
                c.switched = true;
                Err((e, true))
            }
        }
    };
    let waves = f.rollout.waves(conns.len());
    let mut failures: Vec<String> = Vec::new();
    for (n, wave) in waves.iter().enumerate() {
        if n > 0 && !f.rollout.wait.is_zero() {
            say(
                f.json,
                &format!(
                    "waiting {} before the next group",
                    dream_core::fmt_duration(f.rollout.wait)
                ),
            );
            std::thread::sleep(f.rollout.wait);
        }
        failures.extend(
            each(&mut conns[wave.clone()], switch)
                .into_iter()
                .filter_map(|r| r.err().map(|e| e.0)),
        );
        if failures.len() > f.rollout.max_fail {
            break;
        }
    }
    let tolerated = failures.len() <= f.rollout.max_fail;
    if !failures.is_empty() && tolerated {
        say(
            f.json,
            &format!(
                "{} failed, within --max-fail {}: going on",
                failures.join("; "),
                f.rollout.max_fail
            ),
        );
    }
    if !tolerated {
        let reason = format!("fleet deploy of {id} failed: {}", failures.join("; "));
        let reverted = each(&mut conns, |c| {
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
            say(f.json, &format!("{}: reverted to {to}", c.host.name));
            Ok(())
        });
        let stuck: Vec<String> = reverted
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.0))
            .collect();
        if stuck.is_empty() {
            fail(
                &mut report,
                exit::FAILED,
                format!("{reason}; every host is back on its previous release"),
            );
        } else {
            fail(
                &mut report,
                2,
                format!(
                    "{reason}; could not revert: {} (their supervisors revert them at their confirmation deadline)",
                    stuck.join("; ")
                ),
            );
        }
        return end(f, started, report, conns);
    }
    // The decision, recorded on the primary, then confirmed everywhere.
    dream_core::test_point("fleet-commit");
    let hosts: Vec<String> = conns.iter().map(|c| c.host.name.clone()).collect();
    if let Err((e, _)) = conns[0].must(&ToAgent::Commit {
        id: id.to_string(),
        hosts,
    }) {
        say(f.json, &format!("recording the commit: {e}"));
    }
    let confirmed = each(&mut conns, |c| {
        if !c.switched {
            return Ok(());
        }
        c.must(&ToAgent::Confirm {
            generation: c.generation,
        })
        .map(|_| ())
    });
    let unconfirmed: Vec<String> = confirmed
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.0))
        .collect();
    let mut unconfirmed = unconfirmed;
    if tolerated {
        unconfirmed.extend(
            failures
                .iter()
                .map(|f| format!("{f} (still on its previous release)")),
        );
    }
    if unconfirmed.is_empty() {
        report.ok = true;
        say(
            f.json,
            &format!(
                "{id} is live on every host ({} in all)",
                dream_core::fmt_duration(started.elapsed())
            ),
        );
    } else {
        fail(
            &mut report,
            2,
            format!(
                "the fleet is inconsistent: not confirmed on {} (they revert at their deadline); run the same deploy again to converge",
                unconfirmed.join("; ")
            ),
        );
    }
    end(f, started, report, conns)
}

/// Says goodbye to every agent and finishes.
fn end(f: &Fleet, started: Instant, mut report: FleetReport, conns: Vec<Conn>) -> Result {
    report.hosts = conns
        .iter()
        .map(|c| HostReport {
            host: c.host.name.clone(),
            previous: c.previous.clone(),
            current: None,
            sent_bytes: c.sent,
        })
        .collect();
    let mut currents = Vec::new();
    for mut c in conns {
        currents.push(c.ask(&ToAgent::Status).ok().and_then(|r| r.current));
        c.bye();
    }
    for (h, cur) in report.hosts.iter_mut().zip(currents) {
        h.current = cur;
    }
    finish(f, started, report)
}

/// `dream fleet rollback [ID]`: every host to ID (default: the release
/// each host recorded as previous), with the same switch and commit.
pub fn rollback(f: &Fleet, id: Option<&str>, confirm_within: Duration) -> Result {
    let started = Instant::now();
    let control = control_dir(f)?;
    let mut report = FleetReport::default();
    let mut conns = match f.connect(control.path()) {
        Ok(c) => c,
        Err(errors) => {
            fail(
                &mut report,
                exit::TEMPORARY,
                format!("nothing changed; unreachable: {}", errors.join("; ")),
            );
            return finish(f, started, report);
        }
    };
    if let Err(e) = lock_everywhere(f, &mut conns, "dream fleet rollback") {
        fail(
            &mut report,
            exit::TEMPORARY,
            format!("nothing changed; {e}"),
        );
        return end(f, started, report, conns);
    }
    let target = match id {
        Some(id) => id.to_string(),
        None => match conns[0].must(&ToAgent::Status) {
            Ok(r) => match r.previous {
                Some(p) => p,
                None => {
                    fail(
                        &mut report,
                        exit::FAILED,
                        "no previous release recorded on the primary; name one".into(),
                    );
                    return end(f, started, report, conns);
                }
            },
            Err((e, _)) => {
                fail(&mut report, exit::TEMPORARY, e);
                return end(f, started, report, conns);
            }
        },
    };
    report.release = target.clone();
    switch_commit(f, started, report, conns, &target, confirm_within)
}

/// `dream fleet status`: what each host runs, and the manual hold.
pub fn status(f: &Fleet) -> Result {
    let control = control_dir(f)?;
    let conns = f
        .connect(control.path())
        .map_err(|errors| Failure::temporary(format!("unreachable: {}", errors.join("; "))))?;
    let mut rows = Vec::new();
    let mut unanswered = Vec::new();
    for mut c in conns {
        let r = c.ask(&ToAgent::Status);
        if let Err(e) = &r {
            unanswered.push(e.clone());
        }
        rows.push(serde_json::json!({
            "host": c.host.name,
            "current": r.as_ref().ok().and_then(|r| r.current.clone()),
            "version": r.as_ref().ok().and_then(|r| r.version.clone()),
            "hold": r.as_ref().ok().and_then(|r| r.hold.clone()),
            "error": r.as_ref().err(),
        }));
        c.bye();
    }
    let currents: std::collections::BTreeSet<String> = rows
        .iter()
        .map(|r| r["current"].as_str().unwrap_or("-").to_string())
        .collect();
    if f.json {
        crate::print_line(
            &serde_json::json!({"ok": unanswered.is_empty(), "consistent": unanswered.is_empty() && currents.len() == 1, "hosts": rows})
                .to_string(),
        );
    } else {
        for r in &rows {
            crate::print_line(&format!(
                "{:<24} {:<36} dream {}{}",
                r["host"].as_str().unwrap_or("?"),
                r["current"].as_str().unwrap_or("-"),
                r["version"].as_str().unwrap_or("?"),
                r["hold"]
                    .as_str()
                    .map(|h| format!("  held: {}", h.trim()))
                    .unwrap_or_default()
            ));
        }
    }
    if !unanswered.is_empty() {
        // What a host runs is unknown: never reported as consistent.
        Err(Failure::temporary(format!(
            "no answer: {}",
            unanswered.join("; ")
        )))
    } else if currents.len() == 1 {
        Ok(())
    } else if f.json {
        Err(Failure::silent(2))
    } else {
        Err(Failure {
            code: 2,
            message: "the hosts run different releases".into(),
        })
    }
}

/// `dream fleet lock -m MSG` / `dream fleet unlock`: a manual hold on the
/// primary that automatic deploys refuse at once (never wait on).
pub fn hold(f: &Fleet, message: Option<String>) -> Result {
    let primary = Fleet {
        hosts: f.hosts[..1].to_vec(),
        ssh: f.ssh.clone(),
        remote_dream: f.remote_dream.clone(),
        parallel: 1,
        json: f.json,
        rollout: f.rollout.clone(),
        install: f.install,
        wait_lock: f.wait_lock,
        settle: f.settle,
        verify: Vec::new(),
    };
    let control = control_dir(&primary)?;
    let mut conns = primary
        .connect(control.path())
        .map_err(|errors| Failure::temporary(format!("unreachable: {}", errors.join("; "))))?;
    let mut c = conns.remove(0);
    let set = message.is_some();
    // Like every change on a host, the hold is set under its lock.
    let r = c
        .must(&ToAgent::Lock {
            command: format!("dream fleet {}", if set { "lock" } else { "unlock" }),
            fleet: false,
            wait_ms: f.wait_lock.map(|d| d.as_millis() as u64),
        })
        .and_then(|_| c.must(&ToAgent::Hold { message }));
    c.bye();
    r.map_err(|(e, _)| Failure::failed(e))?;
    if f.json {
        crate::print_line(&serde_json::json!({"ok": true, "held": set}).to_string());
    } else {
        crate::print_line(if set {
            "the fleet is held: deploys refuse until dream fleet unlock"
        } else {
            "the fleet is no longer held"
        });
    }
    Ok(())
}
