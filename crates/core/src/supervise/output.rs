//! The supervisor's output (its own log lines and its workers' stderr),
//! which must never stop the supervisor.
//!
//! A reader that stalls (`dream serve … | less`, a stopped `cat`, a full
//! journal pipe) would block a plain `write(2)` to stderr, and with it the
//! poll loop, the control socket and every deploy waiting on it. Output
//! instead goes into a bounded queue that one writer thread drains into
//! fd 2; when the queue is full, new output is dropped and counted, and
//! the writer says how much was lost once the reader catches up. The
//! supervisor only ever does a non-blocking hand-off.
//!
//! Setting `O_NONBLOCK` on fd 2 instead would change the open file
//! description that the terminal or the parent shares with us.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

/// Most bytes waiting for the reader before output is dropped.
pub const MAX_QUEUED: usize = 1 << 20;

#[derive(Default)]
struct Counters {
    queued: AtomicUsize,
    dropped: AtomicU64,
    dropped_total: AtomicU64,
}

/// The sending side, owned by the supervisor.
pub struct Output {
    tx: Option<Sender<Vec<u8>>>,
    counters: Arc<Counters>,
    done: Receiver<()>,
}

impl Output {
    /// Starts the writer thread for fd 2. Call it once signals are blocked
    /// (the thread inherits the mask, so it never takes a signal meant for
    /// the supervisor's signalfd).
    pub fn stderr() -> Output {
        let (tx, rx) = channel::<Vec<u8>>();
        let (done_tx, done) = channel();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::Builder::new()
            .name("dream-output".into())
            .spawn(move || {
                let mut err = std::io::stderr();
                for chunk in rx {
                    let _ = err.write_all(&chunk);
                    c.queued.fetch_sub(chunk.len(), Ordering::Relaxed);
                    let lost = c.dropped.swap(0, Ordering::Relaxed);
                    if lost > 0 {
                        let _ = writeln!(
                            err,
                            "dream: {lost} bytes of output dropped: the reader of this output stalled"
                        );
                    }
                }
                let _ = done_tx.send(());
            })
            .expect("spawn the output thread");
        Output {
            tx: Some(tx),
            counters,
            done,
        }
    }

    /// Queues `bytes` without waiting; drops them (and counts them) when
    /// the queue is full. Returns whether they were queued.
    pub fn write(&self, bytes: &[u8]) -> bool {
        let c = &self.counters;
        let Some(tx) = &self.tx else { return false };
        if c.queued.load(Ordering::Relaxed) + bytes.len() > MAX_QUEUED {
            c.dropped.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            c.dropped_total
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            return false;
        }
        c.queued.fetch_add(bytes.len(), Ordering::Relaxed);
        tx.send(bytes.to_vec()).is_ok()
    }

    /// Bytes dropped since start because the reader stalled.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped_total.load(Ordering::Relaxed)
    }

    /// Lets the writer finish what is queued, for at most `limit` (a
    /// stalled reader must not hold up the supervisor's exit either).
    pub fn finish(&mut self, limit: Duration) {
        if self.tx.take().is_some() {
            let _ = self.done.recv_timeout(limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        // No writer thread: nothing drains, as with a stalled reader.
        let (tx, _rx) = channel();
        let (_done_tx, done) = channel();
        let out = Output {
            tx: Some(tx),
            counters: Arc::default(),
            done,
        };
        let chunk = vec![b'x'; 64 * 1024];
        let started = std::time::Instant::now();
        let taken = (0..64).filter(|_| out.write(&chunk)).count();
        assert_eq!(taken, MAX_QUEUED / chunk.len());
        assert_eq!(out.dropped(), (64 - taken as u64) * chunk.len() as u64);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
