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

impl Cgroups {
    /// Makes this supervisor's cgroup, if the kernel offers one it may
    /// write to; `None` otherwise.
    pub fn create(nonce: u64) -> Option<Cgroups> {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let mount = if v2 {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/pids")
        };
        let own = own_path(v2)?;
        let parent = mount.join(own.trim_start_matches('/'));
        remove_stale(&parent);
        let base = parent.join(format!("dream-{}-{nonce:x}", std::process::id()));
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(_) => return None,
        }
        // Only useful if a process can be moved into it: try with none.
        base.join("cgroup.procs")
            .exists()
            .then_some(Cgroups { base })
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
/// in `parent`: their generations' cgroups and their own, where empty
/// (one still holding processes stays, and is named by nothing).
fn remove_stale(parent: &Path) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("dream-"))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(gens) = std::fs::read_dir(e.path()) {
            for g in gens.flatten().filter(|g| g.path().is_dir()) {
                let _ = std::fs::remove_dir(g.path());
            }
        }
        let _ = std::fs::remove_dir(e.path());
    }
}

fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}
