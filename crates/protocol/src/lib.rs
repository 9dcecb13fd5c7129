//! The worker's side of dream, and of systemd socket activation.
//!
//! A worker under `dream serve` (or systemd, or inetd) does three things
//! with this crate and nothing else from dream:
//!
//! ```no_run
//! // 1. Take the listening sockets, before starting any thread.
//! let listeners = dream_protocol::take_listeners()?;
//! let dream_protocol::StdListener::Tcp(listener) = listeners.into_iter().next().unwrap().into_std()?
//! else { panic!("expected TCP") };
//! // 2. Say READY=1 once it can serve (a no-op outside a supervisor).
//! dream_protocol::notify("READY=1")?;
//! // 3. Accept until SIGTERM, then finish what is in flight and exit 0.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Sockets come from one of two places:
//!
//! * **systemd**: `LISTEN_PID` equals the process's own pid and
//!   `LISTEN_FDS=N`; the sockets are fds 3 .. 3+N, named by the
//!   colon-separated `LISTEN_FDNAMES`;
//! * **inetd**: fd 0 is a listening socket.
//!
//! [`take_listeners`] tries both, in that order, checks that every
//! descriptor really is a listening socket (`SO_ACCEPTCONN`), marks it
//! close-on-exec and, as `sd_listen_fds(1)` does, removes the variables so
//! the worker's own children do not mistake them for theirs.
//!
//! [`Listener`] is also the one type dream itself uses for a named
//! listening socket, from binding (`dream_core::sockets::listen::bind`) through
//! hand-off to workers (`dream_core::sockets::spawn::Command::sockets`) to
//! inheritance here. `doc/protocol.md` describes the protocol for worker
//! authors in any language.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use socket2::{Domain, SockRef};

pub mod sys;

pub const SD_LISTEN_FDS_START: RawFd = 3;
pub const LISTEN_FDS: &str = "LISTEN_FDS";
pub const LISTEN_PID: &str = "LISTEN_PID";
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The release id a worker runs (`DREAM_RELEASE`).
pub const DREAM_RELEASE: &str = "DREAM_RELEASE";
/// The release's directory, also the worker's working directory.
pub const DREAM_RELEASE_DIR: &str = "DREAM_RELEASE_DIR";
/// The generation number (1, 2, …) the worker belongs to.
pub const DREAM_GENERATION: &str = "DREAM_GENERATION";
/// The worker's index within its generation (0 ..).
pub const DREAM_WORKER: &str = "DREAM_WORKER";

/// A listening socket and the name it is handed down under
/// (`LISTEN_FDNAMES`; `"stdin"` for an inetd socket on fd 0).
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    pub name: String,
}

/// A listening socket as a std type.
#[derive(Debug)]
pub enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Listener {
    pub fn new(fd: OwnedFd, name: impl Into<String>) -> Listener {
        Listener {
            fd,
            name: name.into(),
        }
    }

    /// Converts to the std listener of the socket's address family.
    pub fn into_std(self) -> io::Result<StdListener> {
        let domain = SockRef::from(&self.fd).domain()?;
        Ok(if domain == Domain::UNIX {
            StdListener::Unix(self.fd.into())
        } else {
            StdListener::Tcp(self.fd.into())
        })
    }

    /// A printable local address: `127.0.0.1:8080`, `unix:/path`.
    pub fn local_addr(&self) -> String {
        describe_local(self.fd.as_fd())
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Why no listener could be taken.
#[derive(Debug)]
pub enum ProtocolError {
    NoSockets { hint: String },
    BadCount(String),
    NotAListener { fd: RawFd, why: String },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::NoSockets { hint } => write!(
                f,
                "no listening socket: fd 0 is not one and LISTEN_FDS is not set for this process{hint}"
            ),
            ProtocolError::BadCount(n) => write!(f, "LISTEN_FDS={n:?} is not a positive number"),
            ProtocolError::NotAListener { fd, why } => {
                write!(f, "fd {fd} from LISTEN_FDS is {why}")
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

/// The sockets of the systemd protocol, if they are meant for this process.
///
/// `Ok(None)` when `LISTEN_FDS` is unset or `LISTEN_PID` names another
/// process. The variables are removed either way when they were for us.
pub fn listeners_from_env() -> Result<Option<Vec<Listener>>, ProtocolError> {
    let Some(count) = std::env::var_os(LISTEN_FDS) else {
        return Ok(None);
    };
    let pid = std::env::var(LISTEN_PID).ok();
    if pid.as_deref() != Some(&std::process::id().to_string()) {
        return Ok(None);
    }
    let names = std::env::var(LISTEN_FDNAMES).unwrap_or_default();
    sys::remove_env_vars(&[LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES]);
    let count_str = count.to_string_lossy().into_owned();
    let n: RawFd = match count_str.parse() {
        Ok(n) if n > 0 && n < 4096 => n,
        _ => return Err(ProtocolError::BadCount(count_str)),
    };
    let mut names = names.split(':');
    let mut out = Vec::new();
    for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + n {
        let name = names
            .next()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| format!("fd{fd}"));
        check_listener(fd).map_err(|why| ProtocolError::NotAListener { fd, why })?;
        let owned = sys::claim_inherited_fd(fd).ok_or_else(|| ProtocolError::NotAListener {
            fd,
            why: "already taken".into(),
        })?;
        set_cloexec(&owned);
        out.push(Listener::new(owned, name));
    }
    Ok(Some(out))
}

/// Takes this process's listening sockets: systemd's protocol first, then
/// fd 0.
pub fn take_listeners() -> Result<Vec<Listener>, ProtocolError> {
    let stale_pid = std::env::var(LISTEN_PID).ok();
    if let Some(found) = listeners_from_env()? {
        return Ok(found);
    }
    if check_listener(0).is_ok() {
        if let Some(fd) = sys::claim_inherited_fd(0) {
            set_cloexec(&fd);
            return Ok(vec![Listener::new(fd, "stdin")]);
        }
    }
    let hint = match (std::env::var_os(LISTEN_FDS), stale_pid) {
        (Some(_), Some(pid)) => format!(
            " (LISTEN_FDS is set, but LISTEN_PID={pid} names another process: this is {})",
            std::process::id()
        ),
        _ => String::new(),
    };
    Err(ProtocolError::NoSockets { hint })
}
/// Ok if `fd` is an open socket in the listening state.
pub fn check_listener(fd: RawFd) -> Result<(), String> {
    sys::with_raw_fd(fd, |b| {
        let sock = SockRef::from(&b);
        match sock.r#type() {
            Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => Err("not a socket".to_string()),
            Err(e) => Err(format!("not usable: {e}")),
            Ok(t) if t != socket2::Type::STREAM => Err("not a stream socket".to_string()),
            Ok(_) => match sock.is_listener() {
                Ok(true) => Ok(()),
                // Bound, connected to nobody, not listening: a listener
                // that another worker shut down (shutdown(2)); the
                // supervisor makes it listen again, and accepting on it
                // works from then on. A worker must not fail for that.
                Ok(false) if sock.peer_addr().is_err() && bound(&sock) => Ok(()),
                Ok(false) => Err("a socket that is not listening".to_string()),
                Err(e) => Err(format!("not usable: {e}")),
            },
        }
    })
    .unwrap_or_else(|| Err("not open".to_string()))
}

/// Whether a socket has a local address of its own (a port, a path).
fn bound(sock: &SockRef<'_>) -> bool {
    sock.local_addr()
        .is_ok_and(|a| a.as_socket().is_some_and(|a| a.port() != 0) || a.as_pathname().is_some())
}

/// A printable local address of a socket.
pub fn describe_local(fd: BorrowedFd<'_>) -> String {
    let sock = SockRef::from(&fd);
    match sock.local_addr() {
        Ok(addr) => {
            if let Some(a) = addr.as_socket() {
                a.to_string()
            } else if let Some(p) = addr.as_pathname() {
                format!("unix:{}", p.display())
            } else {
                "unix:(unnamed)".to_string()
            }
        }
        Err(e) => format!("fd {} ({e})", fd.as_raw_fd()),
    }
}

fn set_cloexec(fd: &OwnedFd) {
    let _ = SockRef::from(fd).set_cloexec(true);
}

/// Sends an sd_notify message (`READY=1`, `STOPPING=1`, ...) to
/// `$NOTIFY_SOCKET`. Returns `Ok(false)` when no one listens for it.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    notify_to(&path, state)?;
    Ok(true)
}

/// Sends an sd_notify message to the socket at `path` (`@name` for an
/// abstract socket).
pub fn notify_to(path: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(path))?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}
