//! Binding listening sockets, with errors a person can act on.
//!
//! TCP sockets get `SO_REUSEADDR` (a restarted holder must not wait out
//! TIME_WAIT); `:PORT` binds `[::]` dual-stack, falling back to `0.0.0.0`
//! where IPv6 is off. Unix sockets are bound under a temporary name in the
//! same directory and renamed into place, so the path never names a socket
//! that is not yet listening; an existing socket at the path is probed with
//! `connect()` first and replaced only if nothing answers.
//!
//! Every socket is created close-on-exec: it reaches a child only through
//! [`crate::sockets::spawn::Command::sockets`]. What [`bind`] returns is the same
//! [`Listener`] a worker takes back out of `LISTEN_FDS`.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::sockets::spec::{ListenSpec, Resolved, SpecError};

/// Default `listen(2)` backlog: deep enough that a burst during a worker
/// restart waits in the kernel rather than being dropped.
pub const DEFAULT_BACKLOG: u32 = 4096;

pub use dream_protocol::Listener;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("cannot listen on {addr}: address already in use{}", holder_suffix(.holder))]
    InUse {
        addr: String,
        holder: Option<String>,
    },
    #[error(
        "cannot listen on {addr}: permission denied (ports below 1024 need root: start dream as root with --user USER to drop privileges after binding, or grant CAP_NET_BIND_SERVICE with `setcap cap_net_bind_service=+ep $(command -v dream)`)"
    )]
    PrivilegedPort { addr: String },
    #[error("cannot listen on unix:{}: a live server already answers there", .path.display())]
    UnixInUse { path: PathBuf },
    #[error("cannot listen on unix:{}: the path exists and is not a socket; refusing to replace it", .path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot listen on {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
}

fn holder_suffix(holder: &Option<String>) -> String {
    holder
        .as_ref()
        .map(|h| format!(" (held by {h})"))
        .unwrap_or_default()
}

impl ListenError {
    /// True when retrying later may succeed (the address may be freed).
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            ListenError::InUse { .. } | ListenError::UnixInUse { .. }
        )
    }
}

/// The kernel's cap on the listen backlog.
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The backlog the kernel will really use for `requested`, and the cap if
/// it applied.
pub fn effective_backlog(requested: u32) -> (u32, Option<u32>) {
    match somaxconn() {
        Some(max) if requested > max => (max, Some(max)),
        _ => (requested, None),
    }
}

/// Binds and listens according to `spec`.
pub fn bind(spec: &ListenSpec, backlog: u32) -> Result<Listener, ListenError> {
    let backlog = backlog.min(i32::MAX as u32) as i32;
    match spec.resolve()? {
        Resolved::Tcp(addr) => bind_tcp(spec, addr, backlog),
        Resolved::Unix(path) => bind_unix(spec, &path, backlog),
    }
}

fn bind_tcp(spec: &ListenSpec, addr: SocketAddr, backlog: i32) -> Result<Listener, ListenError> {
    let attempt = |addr: SocketAddr| -> io::Result<Socket> {
        let socket = |reuse_port: bool| -> io::Result<Socket> {
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            sock.set_reuse_address(true)?;
            sock.set_reuse_port(reuse_port)?;
            if addr.is_ipv6() && spec.is_dual_stack() {
                sock.set_only_v6(false)?;
            }
            Ok(sock)
        };
        // The socket joins a `SO_REUSEPORT` group, so that a canary can
        // listen beside it ([`beside`]). A group takes in any socket of the
        // same user that asks, so a second server started by mistake would
        // silently share the port: the address is first bound without the
        // option, which fails as it always did while anything listens there.
        if addr.port() != 0 {
            socket(false)?.bind(&addr.into())?;
        }
        let sock = socket(true)?;
        sock.bind(&addr.into())?;
        sock.listen(backlog)?;
        Ok(sock)
    };
    let mut result = attempt(addr);
    if spec.is_dual_stack()
        && matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT))
    {
        result = attempt(SocketAddr::new([0, 0, 0, 0].into(), addr.port()));
    }
    let sock = result.map_err(|source| tcp_error(spec, addr, source))?;
    Ok(Listener::new(sock.into(), socket_name(spec)))
}

/// A second listener on `l`'s TCP address, in its `SO_REUSEPORT` group, with
/// the same backlog: what a canary generation accepts on while
/// [`crate::sys::route_reuseport`] steers its share of connections to it.
pub fn beside(l: &Listener) -> io::Result<Listener> {
    use std::os::fd::AsFd;
    let addr = shared_port(l)?;
    let first = socket2::SockRef::from(&l.fd);
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(first.only_v6()?)?;
    }
    sock.bind(&addr.into())?;
    let backlog = crate::sys::listen_queue(l.fd.as_fd()).map_or(DEFAULT_BACKLOG, |(_, b)| b);
    sock.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(Listener::new(sock.into(), l.name.clone()))
}

/// The TCP address of `l`, if another listener can join it in its
/// `SO_REUSEPORT` group (what a canary needs); else why not.
pub fn shared_port(l: &Listener) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(&l.fd);
    let Some(addr) = sock.local_addr()?.as_socket() else {
        return Err(io::Error::other(format!(
            "{} is not a TCP socket: a canary needs TCP listening sockets",
            l.name
        )));
    };
    if !sock.reuse_port()? {
        return Err(io::Error::other(format!(
            "{} ({addr}) was not bound with SO_REUSEPORT, through which a canary shares the port (systemd: ReusePort=yes in the socket unit; a socket from an older dream: restart dream serve)",
            l.name
        )));
    }
    Ok(addr)
}

fn tcp_error(spec: &ListenSpec, addr: SocketAddr, source: io::Error) -> ListenError {
    let shown = if spec.is_dual_stack() {
        spec.to_string()
    } else {
        addr.to_string()
    };
    match source.raw_os_error() {
        Some(libc::EADDRINUSE) => ListenError::InUse {
            addr: shown,
            holder: find_tcp_holder(addr.port()),
        },
        Some(libc::EACCES) if addr.port() < 1024 => ListenError::PrivilegedPort { addr: shown },
        _ => ListenError::Io {
            addr: shown,
            source,
        },
    }
}

fn bind_unix(spec: &ListenSpec, path: &Path, backlog: i32) -> Result<Listener, ListenError> {
    let io_err = |source| ListenError::Io {
        addr: spec.to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(ListenError::UnixInUse {
                        path: path.to_path_buf(),
                    });
                }
                // Nobody listens: a stale socket left by a crash; replace it.
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(_) => {
            return Err(ListenError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| io_err(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    let tmp = path.with_file_name(temporary_name(file_name));
    let _ = std::fs::remove_file(&tmp);
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(io_err)?;
    let addr = SockAddr::unix(&tmp).map_err(io_err)?;
    sock.bind(&addr).map_err(io_err)?;
    let placed = sock
        .listen(backlog)
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(e));
    }
    Ok(Listener::new(sock.into(), socket_name(spec)))
}

/// The name a Unix socket is bound under before it is renamed into place:
/// `.app.sock.dream-PID` beside `app.sock` ([`public_address`] reads it back).
fn temporary_name(file_name: &std::ffi::OsStr) -> std::ffi::OsString {
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".dream-{}", std::process::id()));
    tmp_name
}

/// An address as clients use it: a Unix socket bound under its temporary
/// name and renamed into place (`unix:dir/.app.sock.dream-12`) is shown at
/// its path (`unix:dir/app.sock`), which `getsockname` does not know.
pub fn public_address(addr: String) -> String {
    let Some(path) = addr.strip_prefix("unix:") else {
        return addr;
    };
    let path = Path::new(path);
    let real = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix('.'))
        .and_then(|n| n.rsplit_once(".dream-"))
        .filter(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        .map(|(name, _)| path.with_file_name(name));
    match real {
        Some(p) => format!("unix:{}", p.display()),
        None => addr,
    }
}

/// A `LISTEN_FDNAMES` entry: the spec with `:` (the separator) replaced.
pub fn socket_name(spec: &ListenSpec) -> String {
    let s: String = spec
        .to_string()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.trim_matches('_').chars().take(255).collect::<String>()
}

/// Who listens on a TCP port: `pid 123 (nginx)`, read from /proc; `None`
/// if it cannot be seen (another user's process, without root).
pub fn find_tcp_holder(port: u16) -> Option<String> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find_map(|table| listening_inode(&table, port))?;
    let needle = format!("socket:[{inode}]");
    for proc in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = proc.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == needle.as_str()) {
                let comm = std::fs::read_to_string(proc.path().join("comm")).unwrap_or_default();
                return Some(format!("pid {pid} ({})", comm.trim()));
            }
        }
    }
    Some(format!(
        "a process this user cannot see (socket inode {inode})"
    ))
}

/// The inode of the socket listening on `port` in a /proc/net/tcp table.
fn listening_inode(table: &str, port: u16) -> Option<u64> {
    const LISTEN: &str = "0A";
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local_port = f.get(1)?.rsplit_once(':')?.1;
        (u16::from_str_radix(local_port, 16).ok()? == port && *f.get(3)? == LISTEN)
            .then(|| f.get(9)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F91 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 999 1\n";
        assert_eq!(listening_inode(table, 8080), Some(12345));
        assert_eq!(listening_inode(table, 8081), None);
    }

    #[test]
    fn socket_names_are_protocol_safe() {
        let n = socket_name(
            &"unix:/run/a b.sock"
                .parse()
                .unwrap_or(ListenSpec::AnyAddress(1)),
        );
        assert!(!n.contains(':'));
        assert_eq!(
            socket_name(&"127.0.0.1:80".parse().unwrap()),
            "127.0.0.1_80"
        );
    }

    #[test]
    fn binds_port_zero_and_reports_the_real_port() {
        let b = bind(&"127.0.0.1:0".parse().unwrap(), 16).unwrap();
        assert!(!b.local_addr().ends_with(":0"), "{}", b.local_addr());
        assert!(socket2::SockRef::from(&b).is_listener().unwrap());
    }

    #[test]
    fn address_in_use_names_the_holder() {
        let a = bind(&"127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let err = bind(&a.local_addr().parse().unwrap(), 16).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("address already in use"), "{msg}");
        assert!(msg.contains(&a.local_addr()), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(err.is_temporary());
    }

    #[test]
    fn unix_socket_replaces_stale_and_refuses_live() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let spec: ListenSpec = format!("unix:{}", path.display()).parse().unwrap();
        let live = bind(&spec, 16).unwrap();
        assert!(matches!(
            bind(&spec, 16),
            Err(ListenError::UnixInUse { .. })
        ));
        drop(live); // the path stays, now stale
        assert!(path.exists());
        let again = bind(&spec, 16).unwrap();
        assert!(socket2::SockRef::from(&again).is_listener().unwrap());
        // no temporary names are left behind
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn unix_refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"precious").unwrap();
        let spec: ListenSpec = format!("unix:{}", path.display()).parse().unwrap();
        assert!(matches!(
            bind(&spec, 16),
            Err(ListenError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
