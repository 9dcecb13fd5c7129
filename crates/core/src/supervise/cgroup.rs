//! A generation's processes as the kernel counts them: one cgroup per
//! generation, which a worker joins before its exec, and which everything
//! it starts inherits. A process cannot shed it by `setsid`, a double
//! fork or an empty environment, so when a generation is over every
//! process it left is found and ended, whoever its parent is.
//!
//! Used where the kernel offers a hierarchy dream may write to: cgroup v2
//! at `/sys/fs/cgroup`, else v1's `pids` hierarchy (no controller limits
//! are set: the hierarchy only counts). Elsewhere (no permission, no
//! cgroupfs) the supervisor falls back to what it had: the subreaper's
//! children and their `DREAM_GENERATION`.

use std::io;
use std::path::{Path, PathBuf};

/// This supervisor's cgroups: `<hierarchy><own cgroup>/dream-<pid>-<nonce>/gen-<N>`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Cgroups {
    base: PathBuf,
    /// The cgroups of supervisors that are gone and left processes in
    /// them, by supervisor pid, found when this one started
    /// ([`Cgroups::strays`]).
    #[serde(skip)]
    strays: Vec<(i32, PathBuf)>,
}

/// The cgroup this process is in, within the hierarchy mounted at
/// `mount`: from `/proc/self/cgroup` (`0::PATH` for v2, `N:pids:PATH`
/// for v1).
fn own_path(v2: bool) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let wanted = if v2 {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == "pids")
        };
        wanted.then(|| path.to_string())
    })
}

/// The directory of the cgroup this process is in.
fn own_cgroup() -> Option<PathBuf> {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let mount = if v2 {
        PathBuf::from("/sys/fs/cgroup")
    } else {
        PathBuf::from("/sys/fs/cgroup/pids")
    };
    let own = own_path(v2)?;
    Some(mount.join(own.trim_start_matches('/')))
}

impl Cgroups {
    /// Makes this supervisor's cgroup, if the kernel offers one it may
    /// write to; `None` otherwise.
    pub fn create(nonce: u64) -> Option<Cgroups> {
        let parent = own_cgroup()?;
        let strays = remove_stale(&parent);
        let base = parent.join(format!("dream-{}-{nonce:x}", std::process::id()));
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(_) => return None,
        }
        // Only useful if a process can be moved into it: try with none.
        base.join("cgroup.procs")
            .exists()
            .then_some(Cgroups { base, strays })
    }

    /// What supervisors that are gone left running, by supervisor pid:
    /// their workers had the drain signal when their parent died (their
    /// parent-death signal), and may still be finishing requests.
    pub fn strays(&self) -> Vec<(i32, Vec<i32>)> {
        self.strays
            .iter()
            .map(|(sup, dir)| (*sup, members_below(dir)))
            .filter(|(_, pids)| !pids.is_empty())
            .collect()
    }

    /// Kills what [`Cgroups::strays`] names and removes their cgroups
    /// (those still held are removed at a later start); returns the pids
    /// killed.
    pub fn end_strays(&mut self) -> Vec<i32> {
        let strays = std::mem::take(&mut self.strays);
        end(&strays)
            .into_iter()
            .flat_map(|(_, pids)| pids)
            .collect()
    }

    /// Generation `generation`'s cgroup, made if needed; its
    /// `cgroup.procs`, which a worker writes `0` to before its exec.
    pub fn procs_file(&self, generation: u64) -> Option<PathBuf> {
        let dir = self.base.join(format!("gen-{generation}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(_) => return None,
        }
        Some(dir.join("cgroup.procs"))
    }

    /// The processes in generation `generation`'s cgroup.
    pub fn members(&self, generation: u64) -> Vec<i32> {
        read_pids(&self.base.join(format!("gen-{generation}/cgroup.procs")))
    }

    /// Every generation whose cgroup exists, with its processes.
    pub fn all(&self) -> Vec<(u64, Vec<i32>)> {
        let Ok(rd) = std::fs::read_dir(&self.base) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let g = e.file_name().to_str()?.strip_prefix("gen-")?.parse().ok()?;
                Some((g, read_pids(&e.path().join("cgroup.procs"))))
            })
            .collect()
    }

    /// Removes the cgroups of generations that are over and empty (a
    /// process killed a moment ago may still hold one: it is tried again
    /// at the next sweep); with `all`, this supervisor's own too.
    pub fn tidy(&self, live: &[u64], all: bool) {
        for (g, pids) in self.all() {
            if pids.is_empty() && (all || !live.contains(&g)) {
                let _ = std::fs::remove_dir(self.base.join(format!("gen-{g}")));
            }
        }
        if all {
            let _ = std::fs::remove_dir(&self.base);
        }
    }
}

/// Removes what supervisors that are gone (killed with SIGKILL, say) left
/// in `parent`: their generations' cgroups and their own, where empty.
/// Returns the ones still holding processes, by supervisor pid.
fn remove_stale(parent: &Path) -> Vec<(i32, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut held = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = supervisor_of(&e.path()) else {
            continue;
        };
        if alive(pid) {
            continue;
        }
        remove_below(&e.path());
        if e.path().exists() {
            held.push((pid, e.path()));
        }
    }
    held
}

/// The supervisor pid a `dream-<pid>-<nonce>` cgroup is named for.
fn supervisor_of(dir: &Path) -> Option<i32> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("dream-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Whether `pid` runs (a zombie, or a pid no one has, does not).
fn alive(pid: i32) -> bool {
    crate::proc_stat(pid)
        .and_then(|f| f.first().cloned())
        .is_some_and(|state| !matches!(state.as_str(), "Z" | "X"))
}

/// The generations' cgroups below a supervisor's.
fn generations(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|g| g.path())
        .filter(|g| g.is_dir())
        .collect()
}

fn members_below(dir: &Path) -> Vec<i32> {
    generations(dir)
        .iter()
        .flat_map(|g| read_pids(&g.join("cgroup.procs")))
        .collect()
}

/// Kills every process in a supervisor's generations: all at once where
/// the kernel offers `cgroup.kill` (no pid is read, so none can have been
/// reused), else each member read from `cgroup.procs`.
fn kill_below(dir: &Path) -> Vec<i32> {
    let mut killed = Vec::new();
    for g in generations(dir) {
        let pids = read_pids(&g.join("cgroup.procs"));
        if pids.is_empty() {
            continue;
        }
        if std::fs::write(g.join("cgroup.kill"), "1").is_err() {
            for p in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        killed.extend(pids);
    }
    killed
}

/// Removes a supervisor's cgroup and its generations', where empty.
fn remove_below(dir: &Path) {
    for g in generations(dir) {
        let _ = std::fs::remove_dir(g);
    }
    let _ = std::fs::remove_dir(dir);
}

/// Ends at once what supervisors that are gone left running in this
/// process's cgroup (their workers, still draining), for a `dream serve`
/// that binds its addresses afresh: they may hold them. Returns the pids
/// killed, by supervisor, once they are gone (or 2 s have passed).
pub fn end_strays_now() -> Vec<(i32, Vec<i32>)> {
    let Some(parent) = own_cgroup() else {
        return Vec::new();
    };
    let held = remove_stale(&parent);
    let killed = end(&held);
    // A killed process has closed its sockets once it has left its cgroup.
    let limit = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while held.iter().any(|(_, d)| !members_below(d).is_empty())
        && std::time::Instant::now() < limit
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for (_, d) in &held {
        remove_below(d);
    }
    killed
}

/// Kills what each gone supervisor's cgroup holds and removes the cgroups
/// already empty; returns the pids killed, by supervisor.
fn end(strays: &[(i32, PathBuf)]) -> Vec<(i32, Vec<i32>)> {
    let killed = strays
        .iter()
        .map(|(sup, dir)| (*sup, kill_below(dir)))
        .filter(|(_, pids)| !pids.is_empty())
        .collect();
    for (_, dir) in strays {
        remove_below(dir);
    }
    killed
}

fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}
