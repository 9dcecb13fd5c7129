//! The supervisor's status: as JSON for the control protocol, and as a
//! few lines for people (`dream status`, SIGUSR1).

use super::*;

/// A status snapshot as a few lines for people.
pub fn human_status(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "supervisor pid {}, up {}{}",
        v["pid"],
        crate::fmt_duration(Duration::from_secs_f64(
            v["uptime_s"].as_f64().unwrap_or(0.0)
        )),
        v["root"]
            .as_str()
            .map(|r| format!(", root {r}"))
            .unwrap_or_default()
    );
    for sock in v["sockets"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "listening on {}",
            sock["address"].as_str().unwrap_or("?")
        );
    }
    let pool = &v["pool"];
    let live = pool["generations"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["state"] == "live")
        .and_then(|g| g["release"].as_str());
    if let (Some(current), Some(live)) = (v["current"].as_str(), live)
        && current != live
    {
        let _ = writeln!(
            s,
            "warning: current is {current}, but the live generation runs {live} (a reload failed or has not run: dream reload, or dream rollback)"
        );
    }
    let _ = writeln!(
        s,
        "workers: {} wanted, {} restarts{}",
        pool["workers_target"],
        pool["restarts"],
        if pool["reloading"] == true {
            ", reload in progress"
        } else {
            ""
        }
    );
    for g in pool["generations"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "generation {} {}: release {} ({}), age {}",
            g["id"],
            g["state"].as_str().unwrap_or("?"),
            g["release"].as_str().unwrap_or("?"),
            g["release_dir"].as_str().unwrap_or("?"),
            crate::fmt_duration(Duration::from_secs_f64(g["age_s"].as_f64().unwrap_or(0.0)))
        );
        for w in g["workers"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "  worker {}.{} pid {} {}, restarts {}",
                g["id"],
                w["index"],
                w["pid"],
                w["state"].as_str().unwrap_or("?"),
                w["restarts"]
            );
        }
    }
    s.trim_end().to_string()
}

impl Driver {
    pub(super) fn status(&self) -> Value {
        let now = Instant::now();
        let root = match &self.cfg.mode {
            Mode::Serve { root } => Some(root.clone()),
            Mode::Pool { .. } => None,
        };
        json!({
            "ok": true,
            "pid": std::process::id(),
            "root": root,
            "uptime_s": now.duration_since(self.started).as_secs_f64(),
            // Output dropped because its reader stalled (see output.rs).
            "output_dropped_bytes": self.output.dropped(),
            "sockets": self.cfg.sockets.iter().map(|protocol::Listener { fd, name }| json!({
                "name": name,
                "address": protocol::describe_local(fd.as_fd()),
            })).collect::<Vec<_>>(),
            "pool": self.pool.status(now),
            // What `current` names now, which may differ from what the live
            // generation runs (a reload pending, or one that failed).
            "current": match &self.cfg.mode {
                Mode::Serve { root } => resolve_current(root).ok().map(|r| r.id),
                Mode::Pool { .. } => None,
            },
        })
    }
}
