//! The supervisor's status, as the typed [`control::Status`] that the
//! control protocol carries and `Status::human` renders.

use super::*;

impl Driver {
    pub(super) fn status(&self) -> control::Status {
        let now = Instant::now();
        let mut pool = self.pool.status(now);
        self.canary_status(&mut pool);
        control::Status {
            ok: true,
            pid: std::process::id(),
            version: version(),
            binary: self.exe.clone(),
            upgrades: self.upgrades,
            root: match &self.cfg.mode {
                Mode::Serve { root } => Some(root.clone()),
                Mode::Pool { .. } => None,
            },
            uptime_s: now.duration_since(self.started).as_secs_f64(),
            output_dropped_bytes: self.output.dropped(),
            sockets: self
                .cfg
                .sockets
                .iter()
                .map(|l| {
                    let queue = crate::sys::listen_queue(l.fd.as_fd());
                    control::SocketStatus {
                        name: l.name.clone(),
                        address: crate::sockets::listen::public_address(l.local_addr()),
                        queued: queue.map(|(q, _)| q),
                        backlog: queue.map(|(_, b)| b),
                    }
                })
                .collect(),
            pool,
            current: match &self.cfg.mode {
                Mode::Serve { root } => resolve_current(root).ok().map(|r| r.id),
                Mode::Pool { .. } => None,
            },
        }
    }
}
