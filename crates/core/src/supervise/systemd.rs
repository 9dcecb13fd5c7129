//! What the supervisor tells systemd when it runs under it
//! (`NOTIFY_SOCKET`): readiness and reloads, and its listening sockets,
//! stored in the service's file descriptor store.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use super::{Driver, Note, Systemd};
use crate::protocol;

impl Driver {
    /// Under systemd, hands the listening sockets to the service's file
    /// descriptor store (`FDSTORE=1`, one message per socket, named): if
    /// this process ever dies, systemd restarts it with the same sockets
    /// in `LISTEN_FDS`, and clients wait in their backlog meanwhile.
    /// Needs `FileDescriptorStoreMax=` in the unit (the shipped ones have it).
    pub(super) fn store_sockets_with_systemd(&self) {
        let Some(path) = &self.systemd else {
            return;
        };
        for l in &self.cfg.sockets {
            let msg = format!("FDSTORE=1\nFDNAME={}", l.name);
            if let Err(e) = notify_with_fd(path, &msg, l.fd.as_fd()) {
                self.log(
                    -1,
                    Note::Supervisor,
                    &format!("cannot store {} with systemd: {e}", l.local_addr()),
                );
            }
        }
    }

    pub(super) fn tell_systemd(&self, what: Systemd) {
        let Some(path) = &self.systemd else {
            return;
        };
        let mut text = what.as_str().to_string();
        if what == Systemd::Reloading
            && let Ok(t) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        {
            let usec = t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000;
            text.push_str(&format!("\nMONOTONIC_USEC={usec}"));
        }
        if let Err(e) = protocol::notify_to(path, &text) {
            self.log(-1, Note::Supervisor, &format!("cannot notify systemd: {e}"));
        }
    }
}

/// An sd_notify message carrying one descriptor (`SCM_RIGHTS`), as
/// `FDSTORE=1` needs.
fn notify_with_fd(path: &std::ffi::OsStr, msg: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name)?,
        None => UnixAddr::new(Path::new(path))?,
    };
    let sock = UnixDatagram::unbound()?;
    let fds = [fd.as_raw_fd()];
    let iov = [io::IoSlice::new(msg.as_bytes())];
    sendmsg(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        Some(&addr),
    )?;
    Ok(())
}
