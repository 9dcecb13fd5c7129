//! Hooks: executables in `ROOT/.dream/hooks/` run around a deploy's
//! switch, with the deploy lock held.
//!
//! `pre-switch` runs once the release is built and before `current`
//! changes: if it fails, nothing is switched and the deploy fails.
//! `post-switch` runs once the new release is live (after the reload),
//! `post-deploy` when the deploy has finished, `deploy-failed` when it
//! failed (with the reason). Each gets one JSON object on stdin (the hook,
//! the release, the previous one, the root, the host, the user, and the
//! error for `deploy-failed`), runs in its own process group with the
//! root as its working directory, has [`DEADLINE`] to finish (then its
//! group is killed), and has its output shown line by line.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

/// How long a hook may run.
pub const DEADLINE: Duration = Duration::from_secs(300);

/// The hooks dream knows.
pub const NAMES: [&str; 4] = ["pre-switch", "post-switch", "post-deploy", "deploy-failed"];

/// What a hook reads on stdin.
#[derive(Debug, Clone, Serialize)]
pub struct HookEvent<'a> {
    pub hook: &'a str,
    pub release: &'a str,
    pub previous: Option<&'a str>,
    pub root: &'a Path,
    pub host: String,
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

impl<'a> HookEvent<'a> {
    pub fn new(hook: &'a str, root: &'a Path, release: &'a str, previous: Option<&'a str>) -> Self {
        let me = crate::lock::Holder::me("");
        HookEvent {
            hook,
            release,
            previous,
            root,
            host: me.host,
            user: me.user,
            error: None,
        }
    }
}

/// `ROOT/.dream/hooks/NAME`, if it exists.
pub fn path(root: &Path, name: &str) -> Option<PathBuf> {
    let p = crate::release::Store::new(root)
        .state()
        .join("hooks")
        .join(name);
    p.is_file().then_some(p)
}

/// Runs hook `event.hook` if the root has it; `Ok` when it has none.
/// `quiet`: its output is kept for the error only.
pub fn run(event: &HookEvent<'_>, quiet: bool) -> Result<(), String> {
    let Some(exe) = path(event.root, event.hook) else {
        return Ok(());
    };
    let name = event.hook;
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("hook {name}: {e}"))?;
    let wr2 = wr.try_clone().map_err(|e| format!("hook {name}: {e}"))?;
    let mut child = std::process::Command::new(&exe)
        .current_dir(event.root)
        .stdin(std::process::Stdio::piped())
        .stdout(wr)
        .stderr(wr2)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("hook {name} ({}): {e}", exe.display()))?;
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    if let Some(mut stdin) = child.stdin.take() {
        let json = serde_json::to_vec(event).expect("an event serializes");
        // A hook that does not read its input is its own business.
        let _ = stdin.write_all(&json);
    }
    let deadline = Instant::now() + DEADLINE;
    let mut pipe = std::fs::File::from(rd);
    let mut tail = Vec::new();
    let mut partial = Vec::new();
    let show = |line: &[u8], tail: &mut Vec<String>| {
        let text = crate::logtext::bounded(&String::from_utf8_lossy(line), 4096);
        if !quiet {
            crate::logtext::say(
                crate::logtext::Level::Info,
                "hook_output",
                &format!("hook {name} | {text}"),
                &[("hook", name.into()), ("line", text.clone().into())],
            );
        }
        tail.push(text);
        if tail.len() > 10 {
            tail.remove(0);
        }
    };
    let timed_out = loop {
        let mut fds = [nix::poll::PollFd::new(
            pipe.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, crate::signals::timeout_until(Some(deadline))) {
            Ok(0) => break true,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("hook {name}: {e}")),
        }
        let mut buf = [0u8; 8192];
        match pipe.read(&mut buf) {
            Ok(0) => break false,
            Ok(n) => {
                partial.extend_from_slice(&buf[..n]);
                while let Some(i) = partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=i).collect();
                    show(&line[..line.len() - 1], &mut tail);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("hook {name}: {e}")),
        }
    };
    if !partial.is_empty() {
        show(&partial, &mut tail);
    }
    if timed_out {
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        return Err(format!(
            "hook {name} did not finish within {}: killed",
            crate::fmt_duration(DEADLINE)
        ));
    }
    let status = child.wait().map_err(|e| format!("hook {name}: {e}"))?;
    // Whatever it left running in its group goes with it.
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    if status.success() {
        return Ok(());
    }
    let said = tail.last().cloned().unwrap_or_default();
    Err(format!(
        "hook {name} {}{}",
        crate::respawn::describe_exit(status),
        if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        }
    ))
}
