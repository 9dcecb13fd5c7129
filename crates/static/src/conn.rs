//! Per-connection bookkeeping that keeps a worker serving under abuse:
//! which connections are idle (waiting for a request's headers, slowly or
//! not at all) so that, at the connection cap, the idlest is shed to make
//! room for a new client (as nginx reuses its idle keep-alive connections);
//! and a send timeout, so that a client that stops reading cannot hold a
//! connection, its memory and its descriptor for ever.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// One connection's state, shared with the registry.
pub struct Conn {
    /// Serving a request (headers read, response not yet fully written).
    busy: AtomicBool,
    /// Milliseconds since the registry's epoch when it last became idle.
    idle_since: AtomicU64,
    /// Told to close (shed at the connection cap).
    pub shed: Notify,
    /// Request heads received whole (an empty line seen after them).
    heads: AtomicU64,
    /// Requests answered (each counted as its response is made).
    answered: AtomicU64,
    /// The socket, to ask whether bytes wait on it unread.
    fd: std::os::fd::RawFd,
}

impl Conn {
    /// Counts one request answered; with `ask` (the response would say
    /// close), true if another request was already received on this
    /// connection (pipelined behind it, in the server's buffer or still in
    /// the socket): it must be answered before the connection may be
    /// closed. Without `ask` no system call is made.
    pub fn answer_one(&self, ask: bool) -> bool {
        let answered = self.answered.fetch_add(1, Ordering::Relaxed) + 1;
        ask && (self.heads.load(Ordering::Relaxed) > answered
            || dream_core::with_raw_fd(self.fd, dream_core::unread_bytes).unwrap_or(0) > 0)
    }
}

/// Every open connection.
pub struct Registry {
    epoch: Instant,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        }
    }
}

impl Registry {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Registers a new connection, idle (no request yet). It is
    /// registered as it is accepted, before its task first runs, so that
    /// a burst of idlers at the cap can be shed at once.
    pub fn add(&self, fd: std::os::fd::RawFd) -> (u64, Arc<Conn>) {
        let conn = Arc::new(Conn {
            busy: AtomicBool::new(false),
            idle_since: AtomicU64::new(self.now_ms()),
            shed: Notify::new(),
            heads: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            fd,
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.conns.lock() {
            m.insert(id, conn.clone());
        }
        (id, conn)
    }

    /// Forgets a closed connection.
    pub fn remove(&self, id: u64) {
        if let Ok(mut m) = self.conns.lock() {
            m.remove(&id);
        }
    }

    /// Marks `conn` busy until the returned guard is dropped (the response
    /// body written, or abandoned).
    pub fn busy(&self, conn: &Arc<Conn>) -> BusyGuard {
        conn.busy.store(true, Ordering::Relaxed);
        BusyGuard {
            conn: conn.clone(),
            epoch: self.epoch,
        }
    }

    /// Tells the connection idle the longest to close; false if none is
    /// idle (every connection is serving a request).
    pub fn shed_idlest(&self) -> bool {
        let Ok(m) = self.conns.lock() else {
            return false;
        };
        let idlest = m
            .values()
            .filter(|c| !c.busy.load(Ordering::Relaxed))
            .min_by_key(|c| c.idle_since.load(Ordering::Relaxed));
        match idlest {
            Some(c) => {
                // Not shed twice: it counts as busy until it is gone.
                c.busy.store(true, Ordering::Relaxed);
                c.shed.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Marks its connection idle again when dropped.
pub struct BusyGuard {
    conn: Arc<Conn>,
    epoch: Instant,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.conn.idle_since.store(ms, Ordering::Relaxed);
        self.conn.busy.store(false, Ordering::Relaxed);
    }
}

/// A stream whose writes fail with `TimedOut` when the peer has taken
/// nothing for `limit` (a client that never reads), and which counts the
/// request heads it reads whole (for [`Conn::answer_one`]).
pub struct SendTimeout<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    conn: Arc<Conn>,
    /// How much of `\r\n\r\n` the bytes read so far end with.
    matched: usize,
}

impl<S> SendTimeout<S> {
    pub fn new(inner: S, limit: Duration, conn: Arc<Conn>) -> SendTimeout<S> {
        SendTimeout {
            inner,
            limit,
            stalled: None,
            conn,
            matched: 0,
        }
    }

    /// Counts the ends of request heads (an empty line) in `bytes`. A GET
    /// or HEAD has no body, so each is one request; a body that holds an
    /// empty line counts too many, which only keeps a connection open
    /// longer (until the drain's grace), never closes one early.
    fn count_heads(&mut self, bytes: &[u8]) {
        const END: &[u8] = b"\r\n\r\n";
        let mut heads = 0;
        for &b in bytes {
            self.matched = if b == END[self.matched] {
                self.matched + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            if self.matched == END.len() {
                heads += 1;
                self.matched = 0;
            }
        }
        if heads > 0 {
            self.conn.heads.fetch_add(heads, Ordering::Relaxed);
        }
    }

    /// After the inner stream said Pending: fail once it has been stuck
    /// for the limit, else wait for the socket or the timer.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing within the send timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.count_heads(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.pending(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.pending(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.pending(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
