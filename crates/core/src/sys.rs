//! The only module of `dream-core` that uses `unsafe`.
//!
//! What needs it:
//!
//! * **spawn + exec with an exact descriptor layout.** `std::process::Command`
//!   cannot set `LISTEN_PID` to the child's own pid (it is known only after
//!   the child exists, and `pre_exec` may not allocate or call `setenv`). So
//!   we build the whole exec image (path, argv, envp, descriptor map) in the
//!   parent, with a fixed-size hole for the pid in the `LISTEN_PID=` entry,
//!   and the child only writes digits into that hole and makes raw system
//!   calls before `execve`. The child is a `clone(CLONE_VM | CLONE_VFORK)`
//!   (as `posix_spawn` makes them): it borrows the parent's memory while the
//!   calling thread waits, so it allocates nothing, takes no lock and writes
//!   only into the prepared image, which the parent discards afterwards.
//! * **signal handlers, `ioctl`s and `/proc` work** that have no safe
//!   wrapper (see each block).
//!
//! Taking ownership of inherited descriptors and unsetting environment
//! variables are in `dream_protocol::sys`, the worker-side crate.

#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// Digits reserved for the pid in `LISTEN_PID=`; pids fit in 10 digits.
const PID_DIGITS: usize = 20;

/// Everything `execve` needs, prepared before `fork` so that the child
/// allocates nothing.
pub struct ExecImage {
    path: CString,
    /// Owns the strings that `argv_ptrs` points into.
    #[allow(dead_code)]
    argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    env: Vec<Vec<u8>>,
    /// Index into `env` of the `LISTEN_PID=` entry whose digits the child writes.
    pid_slot: Option<usize>,
    cwd: Option<CString>,
    /// `(source, target)`: after the exec, `target` refers to what `source` did.
    fd_map: Vec<(RawFd, RawFd)>,
    new_process_group: bool,
    parent_death_signal: Option<libc::c_int>,
    /// Switch to this uid and gid (dropping supplementary groups).
    ids: Option<(libc::uid_t, libc::gid_t)>,
    /// Start under `SCHED_IDLE` (every thread the program makes inherits it).
    background: bool,
    /// A cgroup's `cgroup.procs`: the child joins it before its exec.
    cgroup: Option<CString>,
}

// SAFETY: the raw pointers in `argv_ptrs` point into `argv`, which the image
// owns and never mutates after construction; moving the image between threads
// moves the heap buffers they point to along with it.
unsafe impl Send for ExecImage {}

impl ExecImage {
    /// Builds an image. `env` entries are `KEY=VALUE`; if `stamp_listen_pid`
    /// is set, a `LISTEN_PID=<pid of the new process>` entry is added.
    pub fn new(
        path: &OsStr,
        argv: &[&OsStr],
        env: &[(Vec<u8>, Vec<u8>)],
        stamp_listen_pid: bool,
    ) -> io::Result<ExecImage> {
        let path = cstring(path.as_bytes())?;
        let argv: Vec<CString> = argv
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<io::Result<_>>()?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut entries = Vec::with_capacity(env.len() + 1);
        for (k, v) in env {
            if k.is_empty() || k.contains(&b'=') || k.contains(&0) || v.contains(&0) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "invalid environment variable {:?}",
                        String::from_utf8_lossy(k)
                    ),
                ));
            }
            let mut e = Vec::with_capacity(k.len() + v.len() + 2);
            e.extend_from_slice(k);
            e.push(b'=');
            e.extend_from_slice(v);
            e.push(0);
            entries.push(e);
        }
        let pid_slot = stamp_listen_pid.then(|| {
            let mut e = b"LISTEN_PID=".to_vec();
            e.resize(e.len() + PID_DIGITS + 1, 0);
            entries.push(e);
            entries.len() - 1
        });
        Ok(ExecImage {
            path,
            argv,
            argv_ptrs,
            env: entries,
            pid_slot,
            cwd: None,
            fd_map: Vec::new(),
            new_process_group: false,
            parent_death_signal: None,
            ids: None,
            background: false,
            cgroup: None,
        })
    }

    pub fn set_cwd(&mut self, dir: &OsStr) -> io::Result<()> {
        self.cwd = Some(cstring(dir.as_bytes())?);
        Ok(())
    }

    /// After exec, descriptor `target` will refer to what `source` refers to
    /// now, without close-on-exec. Every descriptor not named as a target is
    /// expected to be close-on-exec already (all of ours are, from birth).
    pub fn map_fd(&mut self, source: BorrowedFd<'_>, target: RawFd) {
        use std::os::fd::AsRawFd;
        self.fd_map.push((source.as_raw_fd(), target));
    }

    pub fn set_new_process_group(&mut self, yes: bool) {
        self.new_process_group = yes;
    }

    pub fn set_ids(&mut self, uid: u32, gid: u32) {
        self.ids = Some((uid, gid));
    }

    /// Run the program under `SCHED_IDLE` from before its exec until
    /// [`foreground`] is called on it: its start-up (the exec, the dynamic
    /// loader, its own initialisation) takes only CPU time no one else
    /// wants. The cost, on a host saturated to the last cycle: the spawn
    /// waits for the exec (the child borrows this process's memory until
    /// then), so the supervisor waits as long as the starved child does.
    pub fn set_background(&mut self, yes: bool) {
        self.background = yes;
    }

    /// The child joins the cgroup whose `cgroup.procs` this is before its
    /// exec (so everything the program starts is in it too); a cgroup that
    /// cannot be joined is passed over.
    pub fn set_cgroup(&mut self, procs: &std::path::Path) -> io::Result<()> {
        self.cgroup = Some(cstring(procs.as_os_str().as_bytes())?);
        Ok(())
    }

    pub fn set_parent_death_signal(&mut self, signal: Option<nix::sys::signal::Signal>) {
        self.parent_death_signal = signal.map(|s| s as libc::c_int);
    }

    /// Starts a process running this image and returns its pid once the
    /// exec has succeeded; an exec failure is reported as the child's
    /// `errno`.
    ///
    /// The child is made with `clone(CLONE_VM | CLONE_VFORK)`, as
    /// `posix_spawn` does, not `fork`: it borrows the supervisor's memory
    /// until its `execve` instead of copying its page tables and making
    /// every page copy-on-write, which was a quarter of the supervisor's
    /// own work in a reload. The calling thread waits meanwhile; the child
    /// runs on a stack of its own with every signal blocked until it has
    /// reset their handlers, and makes only raw system calls (see
    /// [`ExecImage::child_exec`]).
    pub fn spawn(&mut self) -> io::Result<libc::pid_t> {
        // The error pipe is close-on-exec: EOF means execve succeeded.
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let envp = self.envp();
        struct Child<'a> {
            image: &'a mut ExecImage,
            envp: &'a [*const libc::c_char],
            parent: libc::pid_t,
            errors: RawFd,
        }
        extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
            // SAFETY: `arg` is the `Child` below, alive in the parent's
            // frame, which is suspended (CLONE_VFORK) until this process
            // execs or exits.
            let child = unsafe { &mut *arg.cast::<Child<'_>>() };
            let errno = child.image.child_exec(child.envp, Some(child.parent));
            let bytes = errno.to_ne_bytes();
            // SAFETY: write(2) and _exit(2) are system calls; `bytes` lives
            // on this stack frame.
            unsafe {
                libc::write(child.errors, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(127)
            }
        }
        use std::os::fd::AsRawFd;
        let mut child = Child {
            image: self,
            envp: &envp,
            parent: std::process::id() as libc::pid_t,
            errors: wr.as_raw_fd(),
        };
        // The child's stack: never read before it is written, so left
        // uninitialised (zeroing it cost more than the clone).
        let mut stack: Vec<std::mem::MaybeUninit<u8>> = Vec::with_capacity(64 * 1024);
        // SAFETY: the stack is ours and outlives the child's use of it (the
        // parent resumes only once the child has exec'd or exited); its top
        // is aligned down to 16 bytes as the ABI wants. Signals are blocked
        // across clone so that no handler of the parent runs in the child
        // (which shares its memory) before the child has reset them; the
        // parent's mask is restored right after.
        let pid = unsafe {
            let top = stack.as_mut_ptr().add(stack.capacity());
            let top = top.sub(top as usize % 16);
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child_main,
                top.cast(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&mut child as *mut Child<'_>).cast(),
            );
            let e = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                return Err(e);
            }
            pid
        };
        drop(stack);
        drop(wr);
        let mut buf = [0u8; 4];
        let mut got = 0;
        while got < buf.len() {
            match nix::unistd::read(&rd, &mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if got == 0 {
            return Ok(pid);
        }
        // The child failed before or at exec; collect it so no zombie stays.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)))
    }

    /// Replace the current process with this image. Returns only on failure.
    pub fn exec(&mut self) -> io::Error {
        let envp = self.envp();
        io::Error::from_raw_os_error(self.child_exec(&envp, None))
    }

    fn envp(&mut self) -> Vec<*const libc::c_char> {
        let mut envp: Vec<*const libc::c_char> =
            self.env.iter().map(|e| e.as_ptr().cast()).collect();
        envp.push(std::ptr::null());
        envp
    }

    /// Runs in the new process (after `clone`, sharing the parent's memory,
    /// or in place of the current process image). Only system calls, no
    /// allocation, no lock, and nothing written outside `self` and this
    /// stack.
    fn child_exec(&mut self, envp: &[*const libc::c_char], parent: Option<libc::pid_t>) -> i32 {
        let errno = || {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        // SAFETY: each call below is an async-signal-safe system call on
        // values owned by this function or by `self`; pointers passed to the
        // kernel point into buffers that outlive the calls.
        unsafe {
            // Signal dispositions: handlers reset at exec anyway, but ignored
            // signals (Rust ignores SIGPIPE) would stay ignored in the worker.
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                return errno();
            }
            if self.new_process_group && libc::setpgid(0, 0) != 0 {
                return errno();
            }
            // Into its generation's cgroup, while still privileged: `0`
            // is "the writer".
            if let Some(procs) = &self.cgroup {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0\n".as_ptr().cast(), 2);
                    libc::close(fd);
                }
            }
            // Credentials first: changing them clears PR_SET_PDEATHSIG.
            if let Some((uid, gid)) = self.ids {
                // Raw system calls: glibc's wrappers would broadcast the
                // change to the threads of the process whose memory this
                // child borrows (see `spawn`).
                if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                    || libc::syscall(libc::SYS_setgid, gid) != 0
                    || libc::syscall(libc::SYS_setuid, uid) != 0
                {
                    return errno();
                }
            }
            if self.background {
                // Any thread may lower its own scheduling class.
                let param = libc::sched_param { sched_priority: 0 };
                if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                    return errno();
                }
            }
            if let Some(sig) = self.parent_death_signal {
                if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                    return errno();
                }
                // The parent may have died before prctl took effect.
                if parent.is_some_and(|p| libc::getppid() != p) {
                    libc::_exit(1);
                }
            }
            // Move every source above every target first, so that a source
            // which happens to sit on another entry's target is not
            // clobbered, and so that dup2 never sees equal fds (dup2(fd, fd)
            // would leave close-on-exec set).
            let floor = self.fd_map.iter().map(|&(_, t)| t).max().unwrap_or(2) + 1;
            for entry in self.fd_map.iter_mut() {
                let high = libc::fcntl(entry.0, libc::F_DUPFD_CLOEXEC, floor);
                if high < 0 {
                    return errno();
                }
                entry.0 = high;
            }
            // Nothing else may reach the new program: mark every other
            // descriptor close-on-exec, including ones dream itself
            // inherited from its parent. dup2 below clears the flag on
            // exactly the targets.
            mark_cloexec_from(3);
            for &(high, target) in &self.fd_map {
                if libc::dup2(high, target) < 0 {
                    return errno();
                }
            }
            if let Some(dir) = &self.cwd {
                if libc::chdir(dir.as_ptr()) != 0 {
                    return errno();
                }
            }
            if let Some(slot) = self.pid_slot {
                let entry = &mut self.env[slot];
                write_decimal(&mut entry[b"LISTEN_PID=".len()..], libc::getpid() as u64);
            }
            libc::execve(self.path.as_ptr(), self.argv_ptrs.as_ptr(), envp.as_ptr());
            errno()
        }
    }
}

/// Whether this process may raise a thread's scheduling class back from
/// `SCHED_IDLE` (`CAP_SYS_NICE` in its effective set: root, usually).
pub fn may_foreground() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0)
}

/// The threads of process `pid` (`"self"` for this one), each with the
/// children it started, from `/proc/PID/task/TID/children`.
pub fn threads(pid: &str) -> io::Result<Vec<(libc::pid_t, Vec<libc::pid_t>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // A thread that ended meanwhile has no children left to name.
        let children = std::fs::read_to_string(entry.path().join("children"))
            .map(|text| {
                text.split_whitespace()
                    .filter_map(|c| c.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        out.push((tid, children));
    }
    Ok(out)
}

/// The most any one task (thread) of process `pid`, or of a process it
/// started, has waited in a run queue for a CPU: the second field of
/// `/proc/PID/task/TID/schedstat`, in nanoseconds, counted since the task
/// began (so, for a worker, since its spawn). Tasks that ended are not
/// counted; the worker itself must be there.
pub fn cpu_wait(pid: libc::pid_t) -> io::Result<std::time::Duration> {
    let mut most = 0u64;
    each_task(pid, &mut std::collections::HashSet::new(), |p, tid| {
        let waited = std::fs::read_to_string(format!("/proc/{p}/task/{tid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok());
        most = most.max(waited.unwrap_or(0));
        Ok(())
    })?;
    Ok(std::time::Duration::from_nanos(most))
}

/// Calls `f(process, thread)` for every thread of process `pid` and of
/// every process it started (from `/proc/PID/task/TID/children`), each
/// thread not yet in `done` once; true if it found any such thread. `pid`
/// itself must exist; a child that exited meanwhile is passed over.
fn each_task(
    pid: libc::pid_t,
    done: &mut std::collections::HashSet<libc::pid_t>,
    mut f: impl FnMut(libc::pid_t, libc::pid_t) -> io::Result<()>,
) -> io::Result<bool> {
    let mut todo = vec![pid];
    let mut found = false;
    while let Some(p) = todo.pop() {
        let tasks = match threads(&p.to_string()) {
            Ok(t) => t,
            Err(e) if p == pid => return Err(e),
            Err(_) => continue,
        };
        for (tid, children) in tasks {
            todo.extend(children);
            if done.insert(tid) {
                found = true;
                f(p, tid)?;
            }
        }
    }
    Ok(found)
}

/// Puts every thread of process `pid`, and of every process it started
/// (a worker may fork its own workers before it is ready: they inherited
/// `SCHED_IDLE` too), back under `SCHED_OTHER`. On Linux the policy is per
/// thread; threads and children that appear meanwhile are caught by a
/// second pass, later ones inherit from a thread already moved. The nice
/// value is untouched. Needs `CAP_SYS_NICE`.
pub fn foreground(pid: libc::pid_t) -> io::Result<()> {
    set_policy(pid, libc::SCHED_OTHER)
}

fn set_policy(pid: libc::pid_t, policy: libc::c_int) -> io::Result<()> {
    let mut done = std::collections::HashSet::new();
    // Threads and children that appear during the first pass are caught
    // by the second; later ones inherit from a thread already moved.
    for _ in 0..2 {
        let found = each_task(pid, &mut done, |_, tid| {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: sched_setscheduler(2) on a thread id, with a
            // pointer to a parameter that lives across the call.
            if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
                let e = io::Error::last_os_error();
                // A thread that ended meanwhile is not an error.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(e);
                }
            }
            Ok(())
        })?;
        if !found {
            break;
        }
    }
    Ok(())
}

/// Sets close-on-exec on every descriptor from `first` up.
///
/// # Safety
/// Async-signal-safe: system calls only, no allocation.
unsafe fn mark_cloexec_from(first: libc::c_int) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes descriptor
    // flags (Linux 5.11+); the fallback does the same one fd at a time, up
    // to the descriptor limit.
    unsafe {
        let r = libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        );
        if r == 0 {
            return;
        }
        let mut lim: libc::rlimit = std::mem::zeroed();
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur.min(1 << 20) as libc::c_int
        } else {
            4096
        };
        for fd in first..max {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Writes `n` in decimal followed by NUL into `buf`, without allocating.
fn write_decimal(buf: &mut [u8], mut n: u64) {
    let mut digits = [0u8; PID_DIGITS];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = digits[len - 1 - i];
    }
    buf[len] = 0;
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "argument contains a NUL byte: {:?}",
                String::from_utf8_lossy(bytes)
            ),
        )
    })
}

// Claiming inherited descriptors and unsetting environment variables
// live in `dream_protocol::sys` (workers need them without the rest of
// dream); one registry of claimed descriptors serves both crates.
pub use dream_protocol::sys::{claim_inherited_fd, remove_env_vars, single_threaded, with_raw_fd};

/// `ioctl(FICLONE)`: makes `dst` share `src`'s data blocks copy-on-write
/// (btrfs, XFS with reflink, bcachefs…). Fails with `EOPNOTSUPP`, `EXDEV`
/// or `EINVAL` where the filesystem cannot.
pub fn reflink(src: &std::fs::File, dst: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // _IOW(0x94, 9, int) from <linux/fs.h>.
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source descriptor as its integer argument
    // and reads or writes no memory of this process; both descriptors are
    // open for the duration of the call (borrowed from `File`s).
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

extern "C" fn on_interrupt(_: libc::c_int) {}

/// The write end of the pipe that [`signal_pipe`]'s handler writes to.
static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal_to_pipe(_: libc::c_int) {
    let fd = SIGNAL_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        let saved = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // SAFETY: write(2) is async-signal-safe; the buffer is a static
        // byte; a full pipe (EAGAIN) is fine, it is readable already.
        unsafe { libc::write(fd, b"!".as_ptr().cast(), 1) };
        // SAFETY: restoring errno, as a handler must, through libc's own
        // thread-local location.
        unsafe { *libc::__errno_location() = saved };
    }
}

/// A pipe that becomes readable, and stays readable, once any of `signals`
/// arrives: the handler writes a byte (async-signal safe) and nobody reads
/// it. Every thread that polls it learns of the signal at once, without
/// waiting for another thread to pass it on. Once per process.
pub fn signal_pipe(signals: &[nix::sys::signal::Signal]) -> io::Result<OwnedFd> {
    use nix::fcntl::OFlag;
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    use std::os::fd::IntoRawFd;
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    let write = write.into_raw_fd();
    if SIGNAL_PIPE
        .compare_exchange(
            -1,
            write,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        )
        .is_err()
    {
        let _ = nix::unistd::close(write);
        return Err(io::Error::other(
            "signal_pipe may be set up once per process",
        ));
    }
    let action = SigAction::new(
        SigHandler::Handler(on_signal_to_pipe),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in signals {
        // SAFETY: the handler only calls write(2) on a descriptor that stays
        // open for the life of the process, and restores errno.
        unsafe { sigaction(*sig, &action) }?;
    }
    Ok(read)
}

/// Installs a handler for `signal` that does nothing and is not restarted
/// (no `SA_RESTART`): sent to one thread with `pthread_kill`, it makes a
/// blocking system call there (such as `accept(2)`) return `EINTR`.
pub fn install_interrupt_handler(signal: nix::sys::signal::Signal) -> io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is trivially async-signal
    // safe, and it replaces only this one signal's disposition.
    unsafe { sigaction(signal, &action) }?;
    Ok(())
}

/// Whether any of `signals` is pending for this thread or process while
/// blocked in this thread (`sigpending(2)` reports only blocked signals).
pub fn signal_pending(signals: &nix::sys::signal::SigSet) -> bool {
    let mut pending = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigpending writes a full sigset_t into the buffer we own, and
    // we read it only if it succeeded; sigismember only reads it.
    unsafe {
        if libc::sigpending(pending.as_mut_ptr()) != 0 {
            return false;
        }
        let pending = pending.assume_init();
        signals
            .iter()
            .any(|s| libc::sigismember(&pending, s as libc::c_int) == 1)
    }
}

/// Makes `cmd`'s child start as a program expects and end with us: the
/// signal mask empty, INT, TERM, HUP, QUIT and PIPE at their default
/// dispositions (whatever this process blocked or ignored), and
/// `PR_SET_PDEATHSIG=SIGKILL`, so a child of a deploy killed with `-9`
/// does not run on beside the next deploy.
pub fn child_defaults(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: `getpid` is async-signal-safe and runs before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the hook runs in the child between fork and exec and calls
    // only async-signal-safe functions (sigemptyset, sigprocmask, signal,
    // prctl, getppid) on memory of its own stack; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            for sig in [
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGPIPE,
            ] {
                libc::signal(sig, libc::SIG_DFL);
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent died before the death signal was armed.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// How many bytes a connected socket holds that nobody has read yet
/// (`FIONREAD`); 0 on any error.
pub fn unread_bytes(fd: std::os::fd::BorrowedFd<'_>) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points to
    // a live local; the descriptor is borrowed, so open for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r == 0 { n.max(0) as usize } else { 0 }
}

/// Hands the allocator's free memory back to the kernel (glibc's
/// `malloc_trim`), e.g. after a flood of connections has passed; elsewhere
/// a no-op.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists under
    // its locks; it has no preconditions and touches no memory of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `pidfd_open(2)`: a descriptor that becomes readable when process `pid`
/// (a child of ours, not yet reaped) exits, so a wait for it can sit in
/// `poll(2)` with a deadline beside other descriptors.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new descriptor
    // or -1; it touches no memory of this process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing
    // else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(2)`: signals the process a pidfd names, which
/// cannot be another process that took its pid since.
pub fn pidfd_kill(pidfd: BorrowedFd<'_>, signal: nix::sys::signal::Signal) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the call takes a descriptor we borrow (open for the call), a
    // signal number, a null siginfo (allowed: the kernel fills one in) and
    // flags 0; it touches no memory of this process.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Replaces this process's program in place, as the supervisor's upgrade
/// does: `execve(path)` (or, with `exe`, `execveat(exe, "", AT_EMPTY_PATH)`
/// on a descriptor kept from start) with the signal mask, the pending
/// signals and every descriptor not marked close-on-exec left as they are.
///
/// Unlike `std::process::Command::exec` and [`ExecImage::exec`], nothing
/// is reset first: std clears the signal mask before `execve`, which would
/// turn a HUP arriving during the upgrade into the default action (death).
/// Returns only on failure.
pub fn reexec(
    program: Result<&std::path::Path, BorrowedFd<'_>>,
    argv: &[std::ffi::OsString],
    env: &[(std::ffi::OsString, std::ffi::OsString)],
) -> io::Error {
    let cstr = |b: &[u8]| CString::new(b).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let argv: io::Result<Vec<CString>> = argv.iter().map(|a| cstr(a.as_bytes())).collect();
    let env: io::Result<Vec<CString>> = env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstr(&kv)
        })
        .collect();
    let (argv, env) = match (argv, env) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let result = match program {
        Ok(path) => match cstr(path.as_os_str().as_bytes()) {
            Ok(path) => nix::unistd::execve(&path, &argv, &env),
            Err(e) => return e,
        },
        Err(fd) => nix::unistd::execveat(fd, c"", &argv, &env, nix::fcntl::AtFlags::AT_EMPTY_PATH),
    };
    match result {
        Ok(never) => match never {},
        Err(e) => e.into(),
    }
}

/// A listening TCP socket's accept queue: the connections waiting to be
/// accepted, and the queue's limit (the backlog), from `TCP_INFO` (for a
/// socket in LISTEN state Linux reports them in `tcpi_unacked` and
/// `tcpi_sacked`). `None` for other sockets (a Unix one).
pub fn listen_queue(fd: BorrowedFd<'_>) -> Option<(u32, u32)> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers, valid when zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is
    // that large and lives across the call; `fd` is borrowed, so open.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // TCP_LISTEN is state 10 in the kernel's numbering.
    (r == 0 && info.tcpi_state == 10).then_some((info.tcpi_unacked, info.tcpi_sacked))
}

/// Steers a `SO_REUSEPORT` group's new connections: of every 10,000, about
/// `first` go to the group's second listener (index 1, a canary's), about
/// `second` to its third (index 2, the canary's twin) and the rest to its
/// first (index 0, the address's own), drawn at random for each connection
/// by a classic BPF program attached to the group
/// (`SO_ATTACH_REUSEPORT_CBPF`). Shares of 0 send everything to the first.
/// Replacing the program changes the weights at once, for every listener
/// of the group; connections already queued stay where they are.
pub fn route_reuseport(fd: BorrowedFd<'_>, first: u32, second: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const SKF_AD_OFF: u32 = (-0x1000i32) as u32;
    const SKF_AD_RANDOM: u32 = 56;
    let insn = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let jge = libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K;
    let ret = |k| insn(libc::BPF_RET | libc::BPF_K, 0, 0, k);
    let first = first.min(10_000);
    let both = (first + second).min(10_000);
    let program = [
        // A = a random 32-bit number, % 10000
        insn(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            0,
            0,
            SKF_AD_OFF + SKF_AD_RANDOM,
        ),
        insn(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, 0, 0, 10_000),
        // A < first: listener 1
        insn(jge, 1, 0, first),
        ret(1),
        // A < first + second: listener 2; else listener 0
        insn(jge, 1, 0, both),
        ret(2),
        ret(0),
    ];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `program`, both live across the call; the
    // kernel copies the program and keeps no pointer into it. `fd` is
    // borrowed, so open.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_without_allocation() {
        let mut buf = [0xffu8; PID_DIGITS + 1];
        write_decimal(&mut buf, 4242);
        assert_eq!(&buf[..5], b"4242\0");
        write_decimal(&mut buf, 0);
        assert_eq!(&buf[..2], b"0\0");
    }
}
