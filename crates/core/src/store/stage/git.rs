//! A git source: checked out with the system git, without its `.git`.

use super::*;

/// Checks out `url` at `rev` into `dst` with the system git, without its
/// `.git`; returns the short commit hash.
pub fn git_checkout(
    url: &str,
    rev: Option<&str>,
    dst: &Path,
    max_bytes: u64,
    mut signals: Option<&mut crate::signals::Signals>,
) -> Result<String, StageError> {
    let mut git = |args: &[&str], dir: Option<&Path>| -> Result<String, StageError> {
        let mut cmd = std::process::Command::new("git");
        cmd.args([
            "-c",
            "protocol.ext.allow=never",
            "-c",
            "core.hooksPath=/dev/null",
        ]);
        if let Some(d) = dir {
            cmd.arg("-C").arg(d);
        }
        // Nothing of a calling git's environment (a post-receive hook
        // runs with GIT_DIR=.): this clone is its own repository.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("GIT_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ALLOW_PROTOCOL", GIT_TRANSPORTS.join(":"));
        // As every child of a deploy: its own group, ended with the
        // deploy, and an interrupt while it waits on a stalled server ends
        // it (exit 128 + the signal, from the caller).
        let ended = crate::child::run(
            cmd,
            None,
            crate::child::Output::Capture { limit: 64 << 20 },
            None,
            signals.as_deref_mut(),
        )
        .map_err(|e| StageError::Git(format!("cannot run git: {e} (is git installed?)")))?;
        let (status, tail, stdout) = match ended {
            crate::child::Ended::Exited {
                status,
                tail,
                stdout,
            } => (status, tail, stdout),
            crate::child::Ended::Interrupted(sig) => return Err(StageError::Interrupted(sig)),
            crate::child::Ended::TimedOut { tail } => {
                return Err(StageError::Git(tail.last().cloned().unwrap_or_default()));
            }
        };
        if !status.success() {
            let last = tail.last().cloned().unwrap_or_else(|| "failed".into());
            if tail.iter().any(|l| l.contains("No space left on device")) {
                return Err(StageError::Io {
                    path: dst.to_path_buf(),
                    source: io::Error::new(io::ErrorKind::StorageFull, last),
                });
            }
            return Err(StageError::Git(last));
        }
        Ok(String::from_utf8_lossy(&stdout).trim().to_string())
    };
    let dst_str = dst
        .to_str()
        .ok_or_else(|| StageError::Git("staging path is not UTF-8".into()))?;
    git(
        &["clone", "--quiet", "--no-checkout", "--", url, dst_str],
        None,
    )?;
    let rev = rev.unwrap_or("HEAD");
    // The size of the tree, judged before anything of it is written.
    let sizes = git(&["ls-tree", "-r", "-l", "--full-tree", rev], Some(dst))?;
    let (mut files, mut bytes) = (0u64, 0u64);
    for line in sizes.lines() {
        files += 1;
        bytes += line
            .split_whitespace()
            .nth(3)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    if bytes > max_bytes {
        return Err(StageError::TooBig {
            limit: max_bytes,
            needs: Some(bytes),
        });
    }
    if files > max_entries() {
        return Err(StageError::Refused(format!(
            "more than {} files (DREAM_MAX_ENTRIES)",
            max_entries()
        )));
    }
    git(&["checkout", "--quiet", "--detach", rev, "--"], Some(dst))?;
    let hash = git(&["rev-parse", "--short=8", "HEAD"], Some(dst))?;
    let dotgit = dst.join(".git");
    fs::remove_dir_all(&dotgit).map_err(io_at(&dotgit))?;
    Ok(hash)
}
