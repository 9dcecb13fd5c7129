//! How a coordinator reaches a host's agent: a [`Transport`] opens a
//! [`Link`] (bytes in, bytes out, and the far side as something that can
//! be ended). [`Ssh`] is the real one: the system's OpenSSH client, a
//! private ControlMaster per host. [`Local`] runs the agent in this
//! process over a socket pair, so the fleet's policy can be tested (and
//! driven by hostile peers) without root, sshd or network namespaces.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Host;
use super::agent::Agent;

/// What a link reads from: a byte stream with a descriptor, so that reads
/// can wait with a deadline (`wire::Patient`).
pub trait Incoming: Read + AsFd + Send {}
impl<T: Read + AsFd + Send> Incoming for T {}

/// The far side of a session, as something the coordinator can end.
pub trait Peer: Send {
    /// The session failed: end the far side now, and say what it said
    /// last (escaped, one line; empty when it said nothing).
    fn end(&mut self) -> String;
    /// The session ended by agreement: wait for the far side to finish.
    fn wait(&mut self);
}

/// One open session with a host's agent.
pub struct Link {
    pub input: Box<dyn Incoming>,
    pub output: Box<dyn Write + Send>,
    pub peer: Box<dyn Peer>,
}

/// A way to reach hosts' agents.
pub trait Transport: Sync {
    /// Starts `dream agent` for `host`: the installed copy when
    /// `installed` (see [`Transport::install`]).
    fn open(&self, host: &Host, installed: bool) -> Result<Link, String>;

    /// Puts this program on `host`, where `open(host, true)` runs it;
    /// returns where.
    fn install(&self, host: &Host) -> Result<String, String> {
        Err(format!(
            "{}: this transport cannot install dream",
            host.name
        ))
    }
}

/// The system's OpenSSH client: `BatchMode=yes`, the user's
/// `~/.ssh/config`, agent and `known_hosts` as they are, and one
/// ControlMaster per host whose socket lives in a private directory
/// (short: a socket path has ~100 bytes; mode 0700). Each master is told
/// to exit when this value is dropped.
pub struct Ssh {
    /// The ssh command and its own options (`--ssh`).
    ssh: Vec<String>,
    /// `dream` on the hosts (`--remote-dream`).
    remote_dream: String,
    masters: tempfile::TempDir,
    hosts: Vec<Host>,
}

impl Ssh {
    pub fn new(ssh: Vec<String>, remote_dream: String, hosts: &[Host]) -> io::Result<Ssh> {
        if ssh.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an empty ssh command",
            ));
        }
        let masters = tempfile::Builder::new()
            .prefix("dream-f")
            .tempdir_in("/tmp")?;
        Ok(Ssh {
            ssh,
            remote_dream,
            masters,
            hosts: hosts.to_vec(),
        })
    }

    /// `ssh [its options] -o ControlPath=… [more] [-p PORT] DEST`: every
    /// command this transport runs starts so.
    fn command(&self, host: &Host, options: &[&str]) -> Command {
        let mut cmd = Command::new(&self.ssh[0]);
        cmd.args(&self.ssh[1..])
            .arg("-o")
            .arg(format!("ControlPath={}/%C", self.masters.path().display()))
            .args(options)
            .args(destination(host));
        cmd
    }

    /// Options of every session and copy: no prompts, a shared master.
    const SESSION: [&'static str; 6] = [
        "-o",
        "BatchMode=yes",
        "-o",
        "ControlMaster=auto",
        "-o",
        "ControlPersist=60",
    ];

    fn installed_path(host: &Host) -> String {
        format!("{}/.dream/bin/dream", host.root.trim_end_matches('/'))
    }
}

/// The ssh destination and port arguments of `[user@]host[:port]`.
fn destination(host: &Host) -> Vec<String> {
    match host.name.rsplit_once(':') {
        Some((dest, port)) if port.parse::<u16>().is_ok() => {
            vec!["-p".into(), port.into(), dest.into()]
        }
        _ => vec![host.name.clone()],
    }
}

/// Single quotes for the remote shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Transport for Ssh {
    fn open(&self, host: &Host, installed: bool) -> Result<Link, String> {
        let dream = if installed {
            Ssh::installed_path(host)
        } else {
            self.remote_dream.clone()
        };
        let mut child = self
            .command(host, &Ssh::SESSION)
            .args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"])
            .arg("--")
            .arg(format!(
                "{} agent --root {}",
                shell_quote(&dream),
                shell_quote(&host.root)
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: cannot run {}: {e}", host.name, self.ssh[0]))?;
        Ok(Link {
            input: Box::new(child.stdout.take().expect("piped")),
            output: Box::new(child.stdin.take().expect("piped")),
            peer: Box::new(SshPeer(child)),
        })
    }

    fn install(&self, host: &Host) -> Result<String, String> {
        let path = Ssh::installed_path(host);
        let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
        let file = std::fs::File::open(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
        let part = format!("{path}.part");
        let dir = Path::new(&path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| ".".into());
        let script = format!(
            "mkdir -p {d} && cat > {p} && chmod 755 {p} && mv -f {p} {f}",
            d = shell_quote(&dir),
            p = shell_quote(&part),
            f = shell_quote(&path)
        );
        let out = self
            .command(host, &Ssh::SESSION)
            .arg("--")
            .arg(script)
            .stdin(Stdio::from(file))
            .output()
            .map_err(|e| format!("{}: cannot run {}: {e}", host.name, self.ssh[0]))?;
        if out.status.success() {
            Ok(path)
        } else {
            Err(format!(
                "{}: installing dream failed: {}",
                host.name,
                crate::logtext::value(String::from_utf8_lossy(&out.stderr).trim())
            ))
        }
    }
}

impl Drop for Ssh {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = self
                .command(h, &["-O", "exit"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// An ssh process.
struct SshPeer(Child);

impl Peer for SshPeer {
    /// What ssh (or the agent) said last on stderr, read for at most two
    /// seconds, and the process ended, so that a silent or hostile peer
    /// can hold nothing of this run.
    fn end(&mut self) -> String {
        let mut said = String::new();
        if let Some(s) = self.0.stderr.take() {
            said = read_for(s, Duration::from_secs(2));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        crate::logtext::value(said.trim().lines().last().unwrap_or(""))
    }

    fn wait(&mut self) {
        let _ = self.0.wait();
    }
}

/// What `r` says until it closes or `limit` passes, whichever is first
/// (at most 64 KiB).
fn read_for(mut r: impl Read + AsFd, limit: Duration) -> String {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
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

/// Agents in this process, one thread each, over a socket pair: a host's
/// `root` is a directory here. What `dream agent` does on a host, minus
/// ssh.
#[derive(Default)]
pub struct Local;

impl Transport for Local {
    fn open(&self, host: &Host, _installed: bool) -> Result<Link, String> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("{}: {e}", host.name))?;
        let root = PathBuf::from(&host.root);
        let agent = std::thread::spawn(move || {
            let mut input = io::BufReader::new(&theirs);
            let _ = Agent::new(&root).serve_stream(&mut input, &mut &theirs);
        });
        let output = ours
            .try_clone()
            .map_err(|e| format!("{}: {e}", host.name))?;
        let end = ours
            .try_clone()
            .map_err(|e| format!("{}: {e}", host.name))?;
        Ok(Link {
            input: Box::new(ours),
            output: Box::new(output),
            peer: Box::new(LocalPeer {
                socket: end,
                agent: Some(agent),
            }),
        })
    }
}

/// An agent thread.
struct LocalPeer {
    socket: UnixStream,
    agent: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LocalPeer {
    /// A session dropped without a goodbye still ends: the agent reads EOF.
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

impl Peer for LocalPeer {
    fn end(&mut self) -> String {
        // The agent reads EOF, ends its session and releases its lock.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        self.wait();
        String::new()
    }

    fn wait(&mut self) {
        if let Some(t) = self.agent.take() {
            let _ = t.join();
        }
    }
}
