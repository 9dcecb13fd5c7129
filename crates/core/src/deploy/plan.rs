//! `deploy --dry-run`: what a deploy would do, without doing it.

use super::*;

/// What `deploy --dry-run` would do: nothing is written and no lock taken.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub release: String,
    pub previous: Option<String>,
    pub files: u64,
    pub bytes: u64,
    /// Unchanged since the previous release (same path, content and mode):
    /// shared with it rather than copied.
    pub shared_files: u64,
    pub shared_bytes: u64,
    /// New or changed: copied.
    pub copied_files: u64,
    pub copied_bytes: u64,
    pub excluded: Vec<String>,
    pub build: Option<String>,
    /// `current` would name the new release, and the supervisor reload.
    pub switch: String,
}

/// `deploy --dry-run` for a directory source: hashes it (with the same
/// exclusions) and compares it with the current release's manifest.
pub fn plan(opts: &DeployOptions) -> Result<Plan, DeployError> {
    let Source::Dir(src) = &opts.source else {
        return Err(err(
            Kind::Usage,
            "--dry-run needs a directory source (a tarball or a git revision is only known once staged)",
        ));
    };
    refuse_source_in_root(&opts.source, &opts.root)?;
    let exclude =
        stage::Exclude::new(src, &opts.exclude, opts.keep_git).map_err(|e| err(Kind::Usage, e))?;
    // Modes as the frozen release will have them, as staging records
    // them: the digest, and so the id, is the one the deploy will make.
    let m = Manifest::of_tree_but(src, &|rel, dir| exclude.leaves_out(rel, dir))
        .map_err(|e| io_failure(&format!("reading {}", src.display()), e))?
        .frozen();
    let store = Store::new(&opts.root);
    let previous = store.current();
    let prev = previous
        .as_ref()
        .and_then(|id| Manifest::load(&store.manifest_path(id)).ok());
    let prev_index = prev.as_ref().map(|m| m.index());
    let mut plan = Plan {
        release: opts
            .id
            .clone()
            .unwrap_or_else(|| unused_id(&store, &m.digest()[..8])),
        previous: previous.clone(),
        files: 0,
        bytes: 0,
        shared_files: 0,
        shared_bytes: 0,
        copied_files: 0,
        copied_bytes: 0,
        excluded: exclude
            .left_out()
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        build: opts.build.clone(),
        switch: String::new(),
    };
    for e in m.entries() {
        let crate::store::manifest::Kind::File { mode, size, hash } = &e.kind else {
            continue;
        };
        plan.files += 1;
        plan.bytes += size;
        let same = prev_index.as_ref().is_some_and(|idx| {
            matches!(idx.get(e.path.as_path()),
                Some(crate::store::manifest::Kind::File { mode: m, hash: h, .. })
                    if h == hash && stage::frozen_mode(false, *m) == stage::frozen_mode(false, *mode))
        });
        // With a build, sharing is judged after it; before, it is a guess.
        if same && opts.build.is_none() {
            plan.shared_files += 1;
            plan.shared_bytes += size;
        } else {
            plan.copied_files += 1;
            plan.copied_bytes += size;
        }
    }
    plan.switch = format!(
        "current: {} -> {}{}",
        previous.as_deref().unwrap_or("nothing"),
        plan.release,
        if opts.reload {
            ", then the supervisor reloads (if one runs)"
        } else {
            " (no reload)"
        }
    );
    Ok(plan)
}
