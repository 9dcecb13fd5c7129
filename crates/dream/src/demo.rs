//! `dream demo`: the dream in one command.
//!
//! Creates a deploy root with two sample sites (blue and green, embedded in
//! the binary), holds the socket itself and starts `dream serve` with
//! `dream static` workers on it (systemd's protocol), deploys blue, and
//! prints how to deploy green from a second terminal. With
//! `--auto-deploy DUR` it deploys the two alternately while its own referee
//! drives load, and shows what a user would see: zero errors, zero mixed
//! responses.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dream_core::deploy::{self, DeployOptions};
use dream_core::signals::Signals;
use dream_core::sockets::spawn::Command;
use dream_core::store::lock::Wait;
use dream_core::store::stage::Source;
use nix::sys::signal::Signal;

use crate::exit::{Failure, Result};

const SITES: [(&str, &str, &str); 2] = [
    (
        "blue",
        include_str!("../demo/blue.html"),
        include_str!("../demo/blue.css"),
    ),
    (
        "green",
        include_str!("../demo/green.html"),
        include_str!("../demo/green.css"),
    ),
];
const BUILD: &str = include_str!("../demo/build.sh");

pub struct DemoArgs {
    pub root: Option<PathBuf>,
    pub listen: dream_core::sockets::spec::ListenSpec,
    pub auto_deploy: Option<Duration>,
    pub duration: Option<Duration>,
    pub workers: usize,
    pub connections: usize,
}

/// Writes the two sample sites under `sites/` (outside the deploy root: a
/// source may not lie inside it).
fn write_sites(sites: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (name, html, css) in SITES {
        let dir = sites.join(name);
        std::fs::create_dir_all(dir.join("public"))?;
        std::fs::write(dir.join("public/index.html"), html)?;
        std::fs::write(dir.join("public/style.css"), css)?;
        std::fs::write(dir.join("build.sh"), BUILD)?;
        std::fs::set_permissions(dir.join("build.sh"), std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

fn deploy_site(
    root: &Path,
    sites: &Path,
    site: &str,
) -> std::result::Result<deploy::Report, String> {
    let opts = DeployOptions {
        root: root.to_path_buf(),
        source: Source::Dir(sites.join(site)),
        id: None,
        build: Some("./build.sh".into()),
        keep: 4,
        reload: true,
        confirm_within: None,
        verify: Vec::new(),
        exclude: Vec::new(),
        keep_git: false,
        hooks: false,
        bridge: Vec::new(),
        go_live: true,
        wait_lock: Wait::For(Duration::from_secs(30)),
        command: format!("dream demo (deploying {site})"),
        max_size: None,
        quiet: true,
        interruptible: false,
        settle: Duration::ZERO,
        canary: None,
        pause: None,
    };
    deploy::deploy(&opts, &mut |_| {}).map_err(|e| e.message)
}

pub fn run(a: DemoArgs) -> Result {
    // Signals first: threads started later inherit the blocked mask.
    let mut signals = Signals::new(&[Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD])
        .map_err(Failure::failed)?;
    let (root, _temp) = demo_root(a.root.as_deref())?;
    let sites_dir = tempfile::Builder::new()
        .prefix("dream-demo-sites-")
        .tempdir()
        .map_err(Failure::failed)?;
    let sites = sites_dir.path().to_path_buf();
    write_sites(&sites).map_err(|e| Failure::failed(format!("writing the sample sites: {e}")))?;
    let bound = crate::tools::bind_all(
        std::slice::from_ref(&a.listen),
        dream_core::sockets::listen::DEFAULT_BACKLOG,
        "demo",
        false,
    )?;
    let addr = bound[0].local_addr();
    let first = deploy_site(&root, &sites, "blue").map_err(Failure::failed)?;

    let exe = std::env::current_exe().map_err(Failure::failed)?;
    let supervisor = start_supervisor(&exe, &root, &bound, a.workers, &mut signals)?;

    let url = format!("http://{addr}/");
    welcome(&url, &root, &first.release, &exe, &sites.join("green"));

    let auto = a.auto_deploy;
    let limit = a.duration;
    let deadline = limit.map(|d| Instant::now() + d);
    let live = Arc::new(dream_check::Live::with_latency());
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    let referee = match auto {
        Some(_) => Some(start_referee(&url, a.connections, live.clone())?),
        None => None,
    };
    if let Some(every) = auto {
        threads.push(auto_deploy(
            every,
            root.clone(),
            sites.clone(),
            stop.clone(),
            failures.clone(),
        ));
    }

    let started = Instant::now();
    let supervisor_gone = watch(
        &mut signals,
        supervisor,
        deadline,
        &root,
        &live,
        auto.is_some(),
    )?;
    stop.store(true, Ordering::SeqCst);
    live.stop();
    for t in threads {
        let _ = t.join();
    }
    let report = referee.map(|r| r.join());
    if !supervisor_gone {
        let _ = nix::sys::signal::kill(supervisor, Signal::SIGTERM);
        let _ = nix::sys::wait::waitpid(supervisor, None);
    }
    let elapsed = started.elapsed();
    println!();
    let (all, failed) = tally(&root);
    println!(
        "dream demo: {} in {}, {failed} failed",
        dream_core::plural(all, "deploy"),
        dream_core::fmt_duration(elapsed),
    );
    let mut ok = failures.load(Ordering::SeqCst) == 0 && !supervisor_gone;
    if let Some(Ok(Ok(r))) = report {
        println!("{}", r.human());
        ok &= r.ok;
        // The run, seen: written before the root (a temporary one) goes.
        let page = std::env::temp_dir().join(format!("dream-demo-{}.html", std::process::id()));
        match crate::report::write(&page, &r, Some(&root)) {
            Ok(()) => println!("dream demo: the run as a page: {}", page.display()),
            Err(e) => eprintln!("dream demo: {}", e.message),
        }
    }
    if ok {
        Ok(())
    } else {
        Err(Failure::silent(crate::exit::FAILED))
    }
}

/// Shows the panel every 250 ms until INT or TERM, the deadline, or the
/// supervisor's exit; returns whether the supervisor is gone.
fn watch(
    signals: &mut Signals,
    supervisor: nix::unistd::Pid,
    deadline: Option<Instant>,
    root: &Path,
    live: &dream_check::Live,
    auto: bool,
) -> Result<bool> {
    let tty = std::io::stdout().is_terminal();
    let mut panel = Panel {
        lines: 0,
        last: (Instant::now(), 0),
        last_deploys: 1,
    };
    loop {
        let tick = Instant::now() + Duration::from_millis(250);
        let wake = deadline.map_or(tick, |d| d.min(tick));
        match signals.wait(Some(wake)).map_err(Failure::failed)? {
            Some(Signal::SIGCHLD) if exited(supervisor) => {
                eprintln!("dream demo: the supervisor exited");
                return Ok(true);
            }
            Some(Signal::SIGCHLD) => {}
            Some(_) => return Ok(false),
            None => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
        let current = std::fs::read_link(root.join("current"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        panel.show(tty, &current, tally(root), live, auto);
    }
}

/// What the referee's thread ends with.
type Referee = std::result::Result<dream_check::Report, dream_check::CheckError>;

/// The referee the demo runs under `--auto-deploy`: new connections to
/// `url` until stopped, counting errors and mixed responses into `live`.
fn start_referee(
    url: &str,
    connections: usize,
    live: Arc<dream_check::Live>,
) -> Result<std::thread::JoinHandle<Referee>> {
    let opts = dream_check::Options {
        target: dream_check::Target::parse(url).map_err(Failure::usage)?,
        connections,
        duration: Duration::from_secs(365 * 24 * 3600),
        keep_alive: false,
        body_pattern: Some(dream_check::DEFAULT_BODY_PATTERN.into()),
        timeout: Duration::from_secs(10),
        max_requests: None,
        rate: None,
        // For the page the demo writes on exit.
        timeline: true,
    };
    Ok(std::thread::spawn(move || dream_check::run(&opts, live)))
}

/// The demo's root: `--root DIR` (made if missing), else a temporary
/// directory removed at the end.
fn demo_root(root: Option<&Path>) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match root {
        Some(r) => {
            std::fs::create_dir_all(r)
                .map_err(|e| Failure::failed(format!("{}: {e}", r.display())))?;
            Ok((r.canonicalize().map_err(Failure::failed)?, None))
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("dream-demo-")
                .tempdir()
                .map_err(Failure::failed)?;
            Ok((t.path().to_path_buf(), Some(t)))
        }
    }
}

/// What the demo serves, and how to deploy by hand beside it.
fn welcome(url: &str, root: &Path, release: &str, exe: &Path, green: &Path) {
    println!("dream demo: serving {url} from {}", root.display());
    println!("  release {release} (blue) is live; open the URL in a browser.");
    println!("  Deploy the green site from a second terminal, then reload the page:");
    println!(
        "    {} deploy --root {} {} --build ./build.sh",
        exe.display(),
        root.display(),
        green.display()
    );
    println!("  Ctrl-C stops the demo.");
}

/// Starts `dream serve` with `dream static` workers on `root`, and waits
/// until its first generation is live (30 s at most).
fn start_supervisor(
    exe: &std::path::Path,
    root: &std::path::Path,
    bound: &[dream_core::protocol::Listener],
    workers: usize,
    signals: &mut Signals,
) -> Result<nix::unistd::Pid> {
    let workers = workers.to_string();
    let mut serve = Command::new(exe);
    serve
        .args([
            "serve",
            "--quiet",
            "--workers",
            &workers,
            "--ready",
            "notify",
            "--root",
        ])
        .args([root.as_os_str()])
        .args(["--drain-timeout", "10s", "--"])
        .args([exe.as_os_str()])
        .args(["static", "--drain-grace", "500ms"])
        .sockets(bound)
        .parent_death_signal(Signal::SIGTERM);
    let supervisor = serve.spawn().map_err(Failure::from)?;
    let status_ok = || {
        dream_core::supervise::control::status(root, Some(Duration::from_secs(2)))
            .is_ok_and(|s| s.live().is_some())
    };
    let started = Instant::now();
    while !status_ok() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = nix::sys::signal::kill(supervisor, Signal::SIGKILL);
            return Err(Failure::failed("the supervisor did not come up within 30s"));
        }
        if let Ok(Some(_)) = signals.wait(Some(Instant::now() + Duration::from_millis(20)))
            && exited(supervisor)
        {
            return Err(Failure::failed("the supervisor exited while starting"));
        }
    }
    Ok(supervisor)
}

/// Deploys the green and the blue site in turn, every `every`, until
/// `stop`.
fn auto_deploy(
    every: Duration,
    root: std::path::PathBuf,
    sites: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut next = Instant::now() + every;
        let mut i = 1u64;
        while !stop.load(Ordering::SeqCst) {
            if Instant::now() < next {
                std::thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
                continue;
            }
            next += every;
            let site = if i % 2 == 1 { "green" } else { "blue" };
            i += 1;
            if let Err(e) = deploy_site(&root, &sites, site) {
                failures.fetch_add(1, Ordering::SeqCst);
                eprintln!("dream demo: deploy of {site} failed: {e}");
            }
        }
    })
}

/// Reaps the supervisor if it has exited.
fn exited(pid: nix::unistd::Pid) -> bool {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    waitpid(pid, Some(WaitPidFlag::WNOHANG)).is_ok_and(|s| s != WaitStatus::StillAlive)
}

/// Deploys made to `root` and how many failed, from its history: the
/// demo's own and any made by hand beside it.
fn tally(root: &Path) -> (usize, usize) {
    use dream_core::store::release::EventKind;
    let history = dream_core::store::release::Store::new(root).history();
    let count = |k: EventKind| history.iter().filter(|e| e.event == k).count();
    (count(EventKind::Staged), count(EventKind::Failed))
}

struct Panel {
    lines: usize,
    last: (Instant, u64),
    last_deploys: usize,
}

impl Panel {
    fn show(
        &mut self,
        tty: bool,
        current: &str,
        (d, failed): (usize, usize),
        live: &dream_check::Live,
        load: bool,
    ) {
        let ok = live.ok.load(Ordering::SeqCst);
        let errors = live.errors.load(Ordering::SeqCst);
        let mixed = live.mixed.load(Ordering::SeqCst);
        let now = Instant::now();
        let rate =
            (ok - self.last.1) as f64 / now.duration_since(self.last.0).as_secs_f64().max(1e-3);
        self.last = (now, ok);
        let p99 = live
            .latency_quantile(0.99)
            .map(|us| format!("{:.2}ms", us as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let mut lines = vec![
            format!("current release  {current}"),
            format!("deploys          {d} ({failed} failed)"),
        ];
        if load {
            lines.push(format!("requests         {ok} ({rate:.0}/s), p99 {p99}"));
            lines.push(format!("errors           {errors}"));
            lines.push(format!("mixed            {mixed}"));
        }
        let mut out = std::io::stdout().lock();
        if tty {
            if self.lines > 0 {
                let _ = write!(out, "\x1b[{}A", self.lines);
            }
            for l in &lines {
                let _ = writeln!(out, "\x1b[2K{l}");
            }
            self.lines = lines.len();
        } else if d != self.last_deploys {
            let _ = writeln!(
                out,
                "deploy {d}: current {current}; requests {ok}, errors {errors}, mixed {mixed}, p99 {p99}"
            );
        }
        self.last_deploys = d;
        let _ = out.flush();
    }
}
