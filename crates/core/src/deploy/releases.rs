//! What is in the store: `dream releases`, `releases --verify`, and which
//! releases a deploy keeps when it prunes.

use super::*;

/// One row of `dream releases`.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseInfo {
    pub id: String,
    pub current: bool,
    /// `current`, `ok`, `bad`, `rolled back` (left by a rollback: skipped
    /// by the next automatic one).
    pub state: &'static str,
    pub staged: Option<String>,
    pub age_s: Option<f64>,
    pub files: u64,
    pub bytes: u64,
}

/// `dream releases`.
pub fn list(root: &Path) -> Vec<ReleaseInfo> {
    let store = Store::new(root);
    let history = store.history();
    let current = store.current();
    let bad = store.bad();
    let left = store.rolled_back();
    store
        .ordered()
        .into_iter()
        .map(|id| {
            let staged = history
                .iter()
                .find(|e| e.event == EventKind::Staged && e.release == id)
                .map(|e| e.time.clone());
            let age_s = staged
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                .map(|d| d.as_secs_f64());
            let (bytes, files) = release::tree_size(&store.release_dir(&id));
            let is_current = current.as_deref() == Some(id.as_str());
            ReleaseInfo {
                state: if is_current {
                    "current"
                } else if bad.contains(&id) {
                    "bad"
                } else if left.contains(&id) {
                    "rolled back"
                } else {
                    "ok"
                },
                current: is_current,
                id,
                staged,
                age_s,
                files,
                bytes,
            }
        })
        .collect()
}

/// One release checked against its manifest.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub id: String,
    pub ok: bool,
    pub entries: usize,
    /// Each difference: what, at which path (and the two values where
    /// there are two); shown as `changed PATH`, `missing PATH`, ….
    pub differences: Vec<crate::store::manifest::Difference>,
    /// Why it could not be checked at all (no manifest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Hashes every file of each release (or of `only`) and compares it with
/// the release's stored manifest.
pub fn verify(root: &Path, only: Option<&str>) -> Result<Vec<Verified>, DeployError> {
    let store = Store::new(root);
    let ids = match only {
        Some(id) => {
            if !store.release_dir(id).is_dir() {
                return Err(err(
                    Kind::Usage,
                    format!("no release {id} in {}", store.releases().display()),
                ));
            }
            vec![id.to_string()]
        }
        None => store.ordered(),
    };
    let mut out = Vec::new();
    for id in ids {
        let stored = match Manifest::load(&Store::new(root).manifest_path(&id)) {
            Ok(m) => m,
            Err(e) => {
                out.push(Verified {
                    id,
                    ok: false,
                    entries: 0,
                    differences: Vec::new(),
                    error: Some(format!("no manifest: {e}")),
                });
                continue;
            }
        };
        let actual = Manifest::of_tree(&store.release_dir(&id))
            .map_err(|e| io_failure(&format!("reading release {id}"), e))?;
        let differences = stored.differences(&actual);
        out.push(Verified {
            ok: differences.is_empty(),
            entries: stored.entries().len(),
            id,
            differences,
            error: None,
        });
    }
    Ok(out)
}

/// `1.5 MB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Releases some live process runs in: a supervisor's generations, or any
/// process whose cwd is inside one.
pub(super) fn in_use(store: &Store) -> Vec<String> {
    let mut used = Vec::new();
    if let Ok(s) = control::status(&store.root, Some(Duration::from_secs(10))) {
        used.extend(s.pool.generations.into_iter().map(|g| g.release));
    }
    let releases = store
        .releases()
        .canonicalize()
        .unwrap_or_else(|_| store.releases());
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cwd) = std::fs::read_link(e.path().join("cwd"))
            && let Ok(rest) = cwd.strip_prefix(&releases)
            && let Some(first) = rest.components().next()
        {
            used.push(first.as_os_str().to_string_lossy().into_owned());
        }
    }
    used
}

/// [`prune`] with `current` read from the store: a fleet host's prune once
/// its run committed (the caller holds the lock). The ids removed.
pub fn prune_beyond(store: &Store, keep: usize, previous: Option<&str>) -> Vec<String> {
    match store.current() {
        Some(current) => prune(store, keep, &current, previous),
        None => Vec::new(),
    }
}

/// Removes releases beyond `--keep`: the newest `keep` *good* releases
/// stay (bad ones never push a rollback target out), and of the bad ones
/// at most `keep`, the newest, for a look at what failed. `current`,
/// `previous` and any release a process runs in always stay.
pub(super) fn prune(
    store: &Store,
    keep: usize,
    current: &str,
    previous: Option<&str>,
) -> Vec<String> {
    let bad = store.bad();
    let used = in_use(store);
    let (mut good_kept, mut bad_kept) = (0, 0);
    let mut doomed = Vec::new();
    for id in store.ordered().into_iter().rev() {
        let protected = id == current || Some(id.as_str()) == previous || used.contains(&id);
        let seen = if bad.contains(&id) {
            &mut bad_kept
        } else {
            &mut good_kept
        };
        *seen += 1;
        if *seen > keep && !protected {
            doomed.push(id);
        }
    }
    let mut removed = Vec::new();
    for id in doomed {
        if release::remove_tree(&store.release_dir(&id)).is_ok() {
            let _ = std::fs::remove_file(store.manifest_path(&id));
            let _ = store.append(&Event::new(EventKind::Pruned, &id));
            removed.push(id);
        }
    }
    removed.reverse();
    removed
}
