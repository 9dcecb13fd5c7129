//! `dream`: atomic, zero-downtime deploys for any server on plain Unix hosts.
//!
//! This binary only parses arguments and composes the libraries:
//! `dream-core` (sockets, processes, locks), `dream-static` (the static file
//! worker) and `dream-check` (the referee).

mod config;
mod demo;
mod deploy;
mod exit;
mod fleet;
mod privs;
mod report;
mod serve;
mod tools;
mod values;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dream_core::sockets::spec::ListenSpec;
use dream_core::supervise::pool::Readiness;
use nix::sys::signal::Signal;

use exit::{Failure, Result};

const AFTER_HELP: &str = "\
Exit codes: 0 done; 1 failed (nothing changed); 2 dream fleet: the hosts may differ (run the same
deploy again to converge); 100 usage error; 111 temporary failure, safe to retry; 129/130/143
interrupted by HUP/INT/TERM.";

#[derive(Parser)]
#[command(
    name = "dream",
    version,
    about = "Atomic, zero-downtime deploys for any server on plain Unix hosts",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The built-in demo: two sample sites, served and deployed while a referee watches
    #[command(
        after_help = "Examples:\n  dream demo                        # serve on 127.0.0.1:5555; deploy by hand\n  dream demo --auto-deploy 2s       # deploy every 2s under load: zero errors\n  dream demo --auto-deploy 500ms --duration 10s   # stop by itself (exit 1 on any error)"
    )]
    Demo(DemoCmd),
    /// Hold the sockets and run a pool of workers from ROOT/current; reload on HUP
    #[command(
        after_help = "Each worker runs in the release directory that ROOT/current named when its\ngeneration started, with the first socket on fd 0, all sockets on fds 3..\n(LISTEN_FDS, LISTEN_PID), and DREAM_RELEASE, DREAM_RELEASE_DIR,\nDREAM_GENERATION, DREAM_WORKER, NOTIFY_SOCKET set.\n\nSignals: HUP reload; TERM/INT drain and exit; QUIT stop now; TTIN/TTOU one\nworker more/less; USR1 status on stderr; USR2 upgrade in place (dream upgrade).\n\nExamples:\n  dream serve --root /srv/app --listen :8080 -- ./bin/server\n  dream serve --listen 127.0.0.1:8080 --workers 4 --ready notify -- dream static\n  dream reload --root /srv/app    # from another terminal, waits for the outcome"
    )]
    Serve(ServeArgs),
    /// Stage, build, switch, reload, verify; roll back on failure
    #[command(
        after_help = "SOURCE is a directory (copied), a tarball (.tar, .tar.gz, .tgz), or git:URL[#REV].\nFiles identical to the previous release's are shared (hard links), the release is\nmade read-only and synced, then current is switched with one rename(2). If a\nsupervisor runs for ROOT it reloads (if that fails, current is switched back), and\nthe deploy succeeds only once the new generation has stayed up for --settle (one\nreverted inside it is exit 1: the supervisor has put the previous release back).\n\nInterrupted (Ctrl-C, TERM, HUP): before the switch nothing changed and staging is\nremoved; after it, current goes back to the previous release and the supervisor is\nasked to go back too; nothing is marked bad. Exit 130, 143 or 129.\n\nExamples:\n  dream deploy --root /srv/app ./build\n  dream deploy --root /srv/app app.tar.gz --build 'make assets'\n  dream deploy --root /srv/app git:/srv/git/app.git#v1.4.2\n\nExit codes: 0 done; 1 failed, nothing changed; 100 usage; 111 lock held or disk full (retry);\n129/130/143 interrupted."
    )]
    Deploy(DeployCmd),
    /// Switch back to the previous good release (or ID), with the same checks
    #[command(
        after_help = "Releases whose deploy failed are marked bad and skipped.\n\nExamples:\n  dream rollback --root /srv/app\n  dream rollback --root /srv/app 20261126T145506Z-1a2b3c4d"
    )]
    Rollback(RollbackCmd),
    /// List releases: current marked, state, age, size; --verify checks their files
    #[command(
        after_help = "With --verify, every file of each release (or of ID) is hashed and compared with\nthe release's manifest (.dream/manifests/<id>); each difference is named and the\nexit is 1 if there is any (someone edited a live release).\n\nExamples:\n  dream releases --root /srv/app\n  dream releases --root /srv/app --verify\n  dream releases --root /srv/app --json | jq -r '.releases[] | select(.state == \"bad\") | .id'"
    )]
    Releases(ReleasesArgs),
    /// Show the running supervisor's generations and workers
    #[command(
        after_help = "Examples:\n  dream status --root /srv/app\n  dream status --root /srv/app --json | jq '.pool.generations'"
    )]
    Status(StatusArgs),
    /// Ask the running supervisor to reload; exit 1 if the new generation failed
    #[command(
        after_help = "Waits until every new worker is ready (or the reload fails and the old generation\nkeeps serving). Same as `kill -HUP`, but with the outcome.\n\nExample:\n  dream reload --root /srv/app && echo live"
    )]
    Reload(ReloadArgs),
    /// Keep a provisional generation (one started with --confirm-within)
    #[command(
        after_help = "A provisional reload (dream reload --confirm-within DUR, dream deploy\n--confirm-within DUR) reverts to the previous release unless confirmed in time.\nExits 1 if the generation was already reverted, naming why.\n\nExamples:\n  dream reload --root /srv/app --confirm-within 60s && ./smoke-test && dream confirm --root /srv/app"
    )]
    Confirm(ConfirmArgs),
    /// Replace the running supervisor's program in place: same pid, sockets and workers
    #[command(
        after_help = "The supervisor checks the new program first (PATH --upgrade-check), waits for a
reload in progress, then execs it in place with its state: the listening sockets,
the workers (not restarted, not reloaded), the control socket. The answer comes
from the new program. If the new program cannot take over, the old one keeps
running and says why (exit 1); if it dies or hangs before it resumes, a guardian
the old one started starts it again on the same sockets (new workers; exit 1).
SIGUSR2 to the supervisor does the same with the default PATH.

Examples:
  apt upgrade dream && dream upgrade --root /srv/app
  dream upgrade --root /srv/app --binary /opt/dream-2/bin/dream"
    )]
    Upgrade(UpgradeArgs),
    /// One release onto many hosts over OpenSSH: all new or all old, never half
    #[command(
        subcommand,
        after_help = "Each host runs `dream agent --root ROOT` over ssh (your ~/.ssh/config, agent and\nknown_hosts; BatchMode). The first host's lock is the fleet's.\n\nExamples:\n  dream fleet deploy ./build --hosts web1,web2,web3 --root /srv/app\n  dream fleet status --hosts web1,web2,web3 --root /srv/app\n  dream fleet lock -m 'db migration' --hosts web1 --root /srv/app\n\nExit codes: 0 new everywhere; 1 failed, every host on the old release; 2 hosts\ndiffer (named; the same command again converges); 100 usage; 111 locked or\nunreachable before anything changed."
    )]
    Fleet(FleetCmd),
    /// The host side of `dream fleet` (run by the coordinator over ssh)
    #[command(
        after_help = "Speaks dream's fleet protocol on stdin and stdout; not for people. Ends, removing\nwhat it staged and releasing its locks, when its input closes or is silent for 20s."
    )]
    Agent(AgentArgs),
    /// Keep N copies of PROGRAM running on the inherited sockets (forkpool)
    #[command(
        after_help = "HUP starts a fresh set of N beside the old ones and drains the old ones once\nthe new are ready (with --relay-hup, HUP is passed to the children instead).\nQUIT or TERM drains every child and exits.\n\nExample:\n  dream listen 127.0.0.1:8080 dream pool -n 4 dream static"
    )]
    Pool(PoolArgs),
    /// Bind listening sockets, then exec PROGRAM with them on fd 0 and fds 3.. (LISTEN_FDS)
    #[command(
        after_help = "Examples:\n  dream listen 127.0.0.1:8080 dream loop 1 dream static\n  dream listen :80 --user www-data -- ./server\n  dream listen [::1]:8080 unix:/run/app.sock -- ./server\n\nSPEC is 127.0.0.1:8080, [::1]:8080, :8080 (all addresses), host:port or unix:/path."
    )]
    Listen(ListenArgs),
    /// Run PROGRAM again each time it exits; HUP/TERM go to it; sleep DELAY after a failure
    #[command(
        name = "loop",
        after_help = "Example:\n  dream listen 127.0.0.1:8080 dream loop 1s dream static\n  kill -HUP <loop pid>   # restart the worker; clients wait in the backlog"
    )]
    Loop(LoopArgs),
    /// Run PROGRAM holding an exclusive flock on FILE (held across exec)
    #[command(
        after_help = "Example:\n  dream lock -n /srv/app/.deploy.lock ./deploy.sh   # exits 111 naming the holder if held"
    )]
    Lock(LockArgs),
    /// Serve static files from DIR; a worker for dream serve or dream listen
    #[command(
        name = "static",
        after_help = "The listening socket comes from LISTEN_FDS or fd 0 (or --listen, to run alone).\nOn HUP or TERM it stops accepting, finishes what it holds, and exits 0.\n\nExample:\n  dream listen 127.0.0.1:8080 dream static public"
    )]
    Static(StaticArgs),
    /// Load generator and referee: count errors and mixed-release responses
    #[command(
        after_help = "A response is mixed when one keep-alive connection goes back to a release it had\nleft, or (with --body-pattern) when its X-Dream-Release header and the release named in\nits body differ. Exits 1 on any connection error, incomplete body, status >= 400 or\nmixed response, or if nothing answered.\n\nExample:\n  dream check http://127.0.0.1:8080/ --duration 10s --connections 64 --keep-alive"
    )]
    Check(CheckArgs),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell
    #[command(after_help = "Example:\n  dream completions bash > /etc/bash_completion.d/dream")]
    Completions {
        /// The shell to complete for
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout, or one subcommand's, or write them all
    #[command(
        after_help = "dream(1) refers to one page per subcommand, dream-deploy(1) and so on.\n\nExamples:\n  dream man > /usr/local/share/man/man1/dream.1\n  dream man deploy | man -l -\n  dream man --dir /usr/local/share/man/man1"
    )]
    Man(ManArgs),
}

#[derive(Args)]
struct ManArgs {
    /// The subcommand whose page to print, nested ones as several words
    /// (`dream man fleet deploy`); default: dream's own
    #[arg(value_name = "SUBCOMMAND")]
    subcommand: Vec<String>,
    /// Write every page (dream.1, dream-deploy.1, …) into DIR instead
    #[arg(long, value_name = "DIR", conflicts_with = "subcommand")]
    dir: Option<PathBuf>,
}

#[derive(Args)]
struct ListenArgs {
    /// listen(2) backlog (capped by net.core.somaxconn)
    #[arg(long, default_value_t = dream_core::sockets::listen::DEFAULT_BACKLOG)]
    backlog: u32,
    /// After binding, switch to USER[:GROUP] (needs root)
    #[arg(long, value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// Print the bound addresses on stderr
    #[arg(short, long)]
    verbose: bool,
    /// SPEC... [--] PROGRAM [ARGS...]
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "SPEC... PROGRAM"
    )]
    args: Vec<OsString>,
}

#[derive(Args)]
struct PoolFlags {
    /// When a worker counts as ready: notify (READY=1), fd:N (a line on fd N), delay:DUR, auto:DUR [default: auto:1s]
    #[arg(long, value_name = "MODE", value_parser = values::readiness)]
    ready: Option<Readiness>,
    /// A new generation not ready by then is killed (the old keeps serving) [default: 60s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    ready_timeout: Option<Duration>,
    /// Signal that tells a worker to finish what it holds and exit [default: TERM]
    #[arg(long, value_name = "SIG", value_parser = values::signal)]
    drain_signal: Option<Signal>,
    /// Then SIGKILL to the worker's process group [default: 30s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    drain_timeout: Option<Duration>,
    /// How workers start while others serve (a reload, a respawn): idle runs them under SCHED_IDLE until ready (at most 0.5s), so the serving workers keep the CPU; normal at dream's own priority; auto is idle when dream may restore the priority (root or CAP_SYS_NICE) [default: auto]
    #[arg(long, value_enum, value_name = "PRIORITY")]
    start_priority: Option<serve::StartPriority>,
    /// Where each worker's NOTIFY_SOCKET is: path, a socket file in ROOT/.dream/notify/ that every sd_notify client can use; abstract, an @… socket with no file (dream pool always uses abstract) [default: path]
    #[arg(long, value_enum, value_name = "KIND")]
    notify_socket: Option<serve::NotifySocket>,
    /// Only warnings and failures
    #[arg(short, long, conflicts_with = "verbose")]
    quiet: bool,
    /// Also log control requests and workers' notifications
    #[arg(short, long)]
    verbose: bool,
    /// Log lines as text, or as one JSON object each (time, level, event, msg); workers' own output passes through untouched
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BuildOn {
    Hosts,
    Local,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl PoolFlags {
    fn verbosity(&self) -> i8 {
        if self.quiet {
            -1
        } else if self.verbose {
            1
        } else {
            0
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Settings file (default: ROOT/dream.toml if it exists); flags win over it
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable); none: inherit LISTEN_FDS from systemd
    #[arg(short, long, value_name = "SPEC", value_parser = values::listen)]
    listen: Vec<ListenSpec>,
    /// listen(2) backlog, capped by net.core.somaxconn [default: 4096]
    #[arg(long)]
    backlog: Option<u32>,
    /// Workers per generation [default: the number of CPUs]
    #[arg(short, long)]
    workers: Option<usize>,
    /// Run workers as USER[:GROUP] (dream must start as root)
    #[arg(long, value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (127.0.0.1:9101, or unix:/run/dream.metrics), from the supervisor itself
    #[arg(long, value_name = "ADDR", value_parser = values::listen)]
    metrics: Option<ListenSpec>,
    /// After a reload goes live, revert it by itself if its workers crash 3 times, or all at once, within DUR; 0 turns it off [default: 10s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    probation: Option<Duration>,
    #[command(flatten)]
    pool: PoolFlags,
    /// COMMAND [ARGS...] (relative paths resolve in the release directory; or `command` in dream.toml)
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Args)]
struct DemoCmd {
    /// Where to create the deploy root (default: a temporary directory)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Address to serve on
    #[arg(short, long, default_value = "127.0.0.1:5555", value_name = "SPEC", value_parser = values::listen)]
    listen: ListenSpec,
    /// Deploy the sites alternately this often, under load from the referee
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    auto_deploy: Option<Duration>,
    /// Stop after this long (default: at Ctrl-C)
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    duration: Option<Duration>,
    /// Workers per generation
    #[arg(short, long, default_value_t = 2)]
    workers: usize,
    /// The referee's concurrent clients (with --auto-deploy)
    #[arg(short, long, default_value_t = 8)]
    connections: usize,
}

#[derive(Args)]
struct DeployCmd {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// DIR, TARBALL or git:URL[#REV]
    source: String,
    /// Release id (default: UTC time and a content or git hash)
    #[arg(long)]
    id: Option<String>,
    /// Settings file (default: ROOT/dream.toml if it exists); flags win over it
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Shell command run in the staged release before the switch
    #[arg(long, value_name = "CMD")]
    build: Option<String>,
    /// Releases to keep; the current and previous are always kept [default: 5]
    #[arg(long)]
    keep: Option<usize>,
    /// Switch current but do not ask the supervisor to reload
    #[arg(long)]
    no_reload: bool,
    /// Wait this long for another deploy's lock (default: fail at once)
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    wait_lock: Option<Duration>,
    /// Refuse a source holding more than SIZE of files (500M, 10G; default:
    /// the free space of ROOT's filesystem); tarballs are checked before
    /// anything is written
    #[arg(long, value_name = "SIZE", value_parser = values::size)]
    max_size: Option<u64>,
    /// A provisional reload: the supervisor reverts the release unless this deploy confirms it within DUR (it does once the reload succeeded), so a deploy killed or cut off in between still ends consistent
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    confirm_within: Option<Duration>,
    /// After the reload, GET PATH through the supervisor's own socket (repeatable): a status outside 2xx/3xx or another release's X-Dream-Release puts the previous release back; without a running supervisor the deploy fails
    #[arg(long, value_name = "PATH", value_parser = values::url_path)]
    verify: Vec<String>,
    /// After the new generation goes live, wait this long for it to stay up: a revert or crash loop inside the window is exit 1 (0s: report at once) [default: 1s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    settle: Option<Duration>,
    /// Leave PATTERN out of a directory source (gitignore syntax, repeatable; the source's .dreamignore too)
    #[arg(long, value_name = "PATTERN")]
    exclude: Vec<String>,
    /// Keep the source's .git/ in the release (left out by default)
    #[arg(long)]
    keep_git: bool,
    /// Do not run ROOT/.dream/hooks/{pre-switch,post-switch,post-deploy,deploy-failed}
    #[arg(long)]
    no_hooks: bool,
    /// Link files under DIR (in the release) that the previous release has and this one lacks, never overwriting (repeatable): old pages keep finding their assets
    #[arg(long, value_name = "DIR", value_parser = values::release_dir)]
    bridge: Vec<PathBuf>,
    /// Print what would be copied, shared, left out, built and switched; write nothing, take no lock
    #[arg(long)]
    dry_run: bool,
    /// Progress lines as text, or as one JSON object each (time, level, event, msg, fields)
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Print the report as JSON on stdout (progress is not printed)
    #[arg(long)]
    json: bool,
    /// No progress lines
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
struct RollbackCmd {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Release to go back to (default: the previous good one)
    id: Option<String>,
    /// Switch current but do not ask the supervisor to reload
    #[arg(long)]
    no_reload: bool,
    /// After the reload, GET PATH through the supervisor's own socket (repeatable), as for deploy
    #[arg(long, value_name = "PATH", value_parser = values::url_path)]
    verify: Vec<String>,
    /// After the new generation goes live, wait this long for it to stay up: a revert or crash loop inside the window is exit 1 (0s: report at once) [default: 1s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    settle: Option<Duration>,
    /// Print which release it would go back to; write nothing, take no lock
    #[arg(long)]
    dry_run: bool,
    /// Wait this long for another deploy's lock (default: fail at once)
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    wait_lock: Option<Duration>,
    /// Print the report as JSON on stdout (progress is not printed)
    #[arg(long)]
    json: bool,
    /// No progress lines
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
struct ReleasesArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Check the files of every release (or of ID) against its manifest
    #[arg(long)]
    verify: bool,
    /// With --verify: the release to check (default: all)
    #[arg(requires = "verify")]
    id: Option<String>,
    /// Print JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StatusArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Print JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ReloadArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Provisional: the new generation reverts unless `dream confirm` comes within DUR of it going live
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    confirm_within: Option<Duration>,
    /// After the new generation goes live, wait this long for it to stay up: a revert or crash loop inside the window is exit 1 (0s: report at once) [default: 1s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    settle: Option<Duration>,
    /// Print the answer as JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ConfirmArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// The generation to keep (default: the live one)
    generation: Option<u64>,
    /// Print the answer as JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum FleetCmd {
    /// Prepare SOURCE on every host, switch (canary first), confirm; revert all on failure
    #[command(
        after_help = "SOURCE is staged once here, then each host receives only the files its current\nrelease does not already hold. The --canary hosts (default 1) switch and settle\nalone, then the rest in --group waves; more failed hosts than --max-fail revert\nevery switched host. Each host reverts by itself if this\ncoordinator goes silent (--confirm-within).\n\nExamples:\n  dream fleet deploy ./build --hosts web1,web2,web3 --root /srv/app\n  dream fleet deploy app.tar.gz --hosts-from 'cat hosts.txt' --root /srv/app --group 25%\n  dream fleet deploy . --build 'npm ci && npm run build' --build-on local --hosts web1,web2 --root /srv/app\n  dream fleet deploy ./build --hosts web1,web2 --root /srv/app --wait-lock 5m --json\n\nExit codes: 0 new everywhere; 1 failed, every host on the old release; 2 hosts\ndiffer (named; the same command again converges); 100 usage; 111 locked or\nunreachable before anything changed; 129/130/143 interrupted."
    )]
    Deploy(FleetDeployArgs),
    /// Every host back to ID (default: the primary's previous good release)
    Rollback(FleetRollbackArgs),
    /// What each host runs; exit 2 if they differ
    Status(FleetArgs),
    /// Hold the fleet by hand: deploys refuse at once until `dream fleet unlock`
    Lock(FleetLockArgs),
    /// Release a hold taken with `dream fleet lock`
    Unlock(FleetArgs),
}

#[derive(Args, Clone)]
struct FleetArgs {
    /// Hosts, comma-separated: [user@]host[:port] (or [fleet] hosts in dream.toml)
    #[arg(long, value_delimiter = ',', value_name = "HOSTS")]
    hosts: Vec<String>,
    /// A command printing the hosts, one per line
    #[arg(long, value_name = "CMD", conflicts_with = "hosts")]
    hosts_from: Option<String>,
    /// The deploy root on the hosts (or [fleet] root; per host in [fleet] hosts)
    #[arg(long, value_name = "DIR")]
    root: Option<String>,
    /// Settings file with a [fleet] table (default: ./dream.toml if it exists)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The ssh command, split on spaces (default: ssh)
    #[arg(long, value_name = "CMD")]
    ssh: Option<String>,
    /// dream on the hosts [default: dream]
    #[arg(long, value_name = "PATH")]
    remote_dream: Option<String>,
    /// At most this many ssh sessions starting at once [default: 8]
    #[arg(long, value_name = "N")]
    parallel: Option<usize>,
    /// Copy this dream to hosts whose dream is missing or incompatible (into ROOT/.dream/bin/)
    #[arg(long)]
    install: bool,
    /// Wait this long for each host's deploy lock (default: fail at once, naming the holder); a manual hold is never waited on
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    wait_lock: Option<Duration>,
    /// Progress lines as text, or as one JSON object each
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Print the outcome as JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Args, Default)]
struct RolloutArgs {
    /// Hosts switched first, alone [default: 1]
    #[arg(long, value_name = "N")]
    canary: Option<usize>,
    /// Then groups of N hosts or P% of them [default: all the rest at once]
    #[arg(long, value_name = "N|P%")]
    group: Option<fleet::Group>,
    /// Pause between groups
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    wait: Option<Duration>,
    /// After each host's switch, its new generation must stay up this long (as for deploy) [default: 1s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    settle: Option<Duration>,
    /// Hosts allowed to fail their switch before the whole fleet reverts (they stay on the old release; exit 2) [default: 0]
    #[arg(long, value_name = "N")]
    max_fail: Option<usize>,
    /// After each host's switch, GET PATH through that host's own socket (repeatable): a failure reverts the fleet
    #[arg(long, value_name = "PATH", value_parser = values::url_path)]
    verify: Vec<String>,
}

#[derive(Args)]
struct FleetDeployArgs {
    /// DIR, TARBALL or git:URL[#REV], staged once here
    source: String,
    /// Release id (default: UTC time and the content hash)
    #[arg(long)]
    id: Option<String>,
    /// Shell command run in each host's staged release before the switch
    #[arg(long, value_name = "CMD")]
    build: Option<String>,
    /// Where --build runs: on every host, or once here (the hosts then get the built tree)
    #[arg(long, value_enum, default_value_t = BuildOn::Hosts)]
    build_on: BuildOn,
    /// Each host's reload stays provisional while the run is heard from, and this long after: a host cut off from the run reverts itself [default: 30s; at least --settle + 2s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    confirm_within: Option<Duration>,
    /// Print the plan (hosts, groups, what each host lacks) and change nothing
    #[arg(long)]
    dry_run: bool,
    /// Leave PATTERN out of a directory source (gitignore syntax, repeatable; its .dreamignore too)
    #[arg(long, value_name = "PATTERN")]
    exclude: Vec<String>,
    /// Keep the source's .git/ (left out by default)
    #[arg(long)]
    keep_git: bool,
    /// As for deploy: files under DIR each host's previous release has and the new one lacks are linked in
    #[arg(long, value_name = "DIR", value_parser = values::release_dir)]
    bridge: Vec<PathBuf>,
    #[command(flatten)]
    rollout: RolloutArgs,
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Args)]
struct FleetRollbackArgs {
    /// The release to go back to (default: the primary's previous good one)
    id: Option<String>,
    /// As for deploy [default: 30s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    confirm_within: Option<Duration>,
    #[command(flatten)]
    rollout: RolloutArgs,
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Args)]
struct FleetLockArgs {
    /// Why (shown to whoever tries to deploy)
    #[arg(short, long, value_name = "MSG")]
    message: String,
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Args)]
struct AgentArgs {
    /// The deploy root on this host
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
}

#[derive(Args)]
struct UpgradeArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// The new dream program (default: the path the supervisor started from)
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Print the answer as JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PoolArgs {
    /// Number of children
    #[arg(short = 'n', long = "workers", default_value_t = 1)]
    workers: usize,
    /// Relay HUP to the children instead of starting a new set
    #[arg(long)]
    relay_hup: bool,
    #[command(flatten)]
    pool: PoolFlags,
    /// The program to keep N copies of, and its arguments
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "PROGRAM"
    )]
    program: Vec<OsString>,
}

#[derive(Args)]
struct LoopArgs {
    /// Pause after a failed run: 1, 0.5, 250ms, 2s
    #[arg(value_parser = values::duration)]
    delay: Duration,
    /// The program to run again after each exit, and its arguments
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "PROGRAM"
    )]
    program: Vec<OsString>,
}

#[derive(Args)]
struct LockArgs {
    /// Fail at once (exit 111) if the lock is held, naming the holder
    #[arg(short = 'n', long = "no-wait")]
    no_wait: bool,
    /// The lock file (created if missing); the lock is flock(2) on it
    file: PathBuf,
    /// The program to run while holding the lock, and its arguments
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "PROGRAM"
    )]
    program: Vec<OsString>,
}

#[derive(Args)]
struct StaticArgs {
    /// Directory to serve, relative to the cwd (the release directory)
    #[arg(default_value = "public")]
    dir: PathBuf,
    /// Bind this address itself instead of taking an inherited socket
    #[arg(long, value_name = "SPEC", value_parser = values::listen)]
    listen: Option<ListenSpec>,
    /// Time for a request's headers, and for an idle keep-alive connection
    #[arg(long, default_value = "10s", value_name = "DUR", value_parser = values::duration)]
    header_timeout: Duration,
    /// Connections served at once; at the cap the connection idle the
    /// longest (keep-alive, or slow to send its headers) is closed to make
    /// room, else clients wait in the backlog
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// While draining, how long idle keep-alive connections stay open
    #[arg(long, default_value = "1s", value_name = "DUR", value_parser = values::duration)]
    drain_grace: Duration,
    /// While draining, tell keep-alive connections to close spread over
    /// this window, so their clients reconnect to the new workers a few at
    /// a time (0: all on their next request)
    #[arg(long, default_value = "150ms", value_name = "DUR", value_parser = values::duration)]
    drain_spread: Duration,
    /// While draining, when to stop waiting for busy connections
    #[arg(long, default_value = "30s", value_name = "DUR", value_parser = values::duration)]
    drain_timeout: Duration,
    /// Close a connection whose client takes nothing of a response for this long
    #[arg(long, default_value = "30s", value_name = "DUR", value_parser = values::duration)]
    send_timeout: Duration,
}

#[derive(Args)]
struct CheckArgs {
    /// http://HOST:PORT/PATH
    url: String,
    /// How long to run: 10s, 500ms, 1m
    #[arg(short, long, default_value = "10s", value_parser = values::duration)]
    duration: Duration,
    /// Concurrent clients
    #[arg(short, long, default_value_t = 16)]
    connections: usize,
    /// Reuse each connection (default: a new connection per request)
    #[arg(short, long)]
    keep_alive: bool,
    /// Regex whose first capture names the release in a body, e.g.
    /// 'release ([A-Za-z0-9._-]+)' (default: bodies are not judged, only the
    /// X-Dream-Release header)
    #[arg(long, value_name = "REGEX")]
    body_pattern: Option<String>,
    /// Limit for connecting and for each response
    #[arg(long, default_value = "5s", value_parser = values::duration)]
    timeout: Duration,
    /// Stop after this many requests in all
    #[arg(long)]
    requests: Option<u64>,
    /// Send this many requests per second in all, on a schedule (an open loop: latency counts from when each was due) instead of as fast as answers come
    #[arg(long, value_name = "PER_SECOND")]
    rate: Option<f64>,
    /// Print the report as JSON on stdout
    #[arg(long)]
    json: bool,
    /// Also write the run as one self-contained HTML page (no network): requests per second, latency and errors over time, and the summary
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
    /// With --report: mark that root's deploys, rollbacks and reverts (from its history) on the time axis
    #[arg(long, value_name = "DIR", requires = "report")]
    root: Option<PathBuf>,
}

fn main() {
    // A supervisor that has just upgraded itself: its state, not its
    // command line, says what to do.
    if dream_core::supervise::resuming() {
        let code = match dream_core::supervise::resume() {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{} dream serve: {e}", dream_core::log_time());
                exit::FAILED
            }
        };
        std::process::exit(code);
    }
    // The guardian an upgrading supervisor starts (`supervise::guard`).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "--upgrade-guard")
    {
        let args: Vec<OsString> = std::env::args_os().skip(2).collect();
        std::process::exit(dream_core::supervise::guard(&args));
    }
    // The pre-flight a running supervisor asks of a new program.
    let args: Vec<OsString> = std::env::args_os().take(3).collect();
    if args.get(1).is_some_and(|a| a == "--upgrade-check") {
        let v = args.get(2).map(|v| v.to_string_lossy()).unwrap_or_default();
        std::process::exit(dream_core::supervise::upgrade_check(&v));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            // A bad value is refused by clap before a command runs; one
            // that was asked for --json still gets its answer on stdout.
            let json = std::env::args_os()
                .skip(1)
                .take_while(|a| a != "--")
                .any(|a| a == "--json");
            if code == exit::USAGE && json {
                let rendered = e.render().to_string();
                let first = rendered.lines().next().unwrap_or_default();
                let message = first.strip_prefix("error: ").unwrap_or(first);
                print_line(
                    &serde_json::json!({"ok": false, "error": message, "exit": code}).to_string(),
                );
            }
            std::process::exit(code);
        }
    };
    let name = match &cli.command {
        Cmd::Serve(_) => "serve",
        Cmd::Status(_) => "status",
        Cmd::Completions { .. } => "completions",
        Cmd::Man(_) => "man",
        Cmd::Demo(_) => "demo",
        Cmd::Deploy(_) => "deploy",
        Cmd::Rollback(_) => "rollback",
        Cmd::Releases(_) => "releases",
        Cmd::Reload(_) => "reload",
        Cmd::Confirm(_) => "confirm",
        Cmd::Upgrade(_) => "upgrade",
        Cmd::Fleet(_) => "fleet",
        Cmd::Agent(_) => "agent",
        Cmd::Pool(_) => "pool",
        Cmd::Listen(_) => "listen",
        Cmd::Loop(_) => "loop",
        Cmd::Lock(_) => "lock",
        Cmd::Static(_) => "static",
        Cmd::Check(_) => "check",
    };
    // Every command that takes --json answers on stdout whether it
    // succeeds or fails: `{"ok":false,"error":…,"exit":N}`.
    let json = outputs(&cli.command).json;

    let code = match run(cli.command) {
        Ok(()) => exit::OK,
        Err(f) => {
            report(name, json, &f);
            f.code
        }
    };
    std::process::exit(code);
}

/// A command's failure: one line on stderr (JSON with `--log-format
/// json`), and with `--json` the answer on stdout too.
fn report(name: &str, json: bool, f: &Failure) {
    if f.message.is_empty() {
        return;
    }
    if dream_core::logtext::json() {
        eprint!(
            "{}",
            dream_core::logtext::json_line(
                dream_core::logtext::Level::Error,
                "failed",
                &f.message,
                &[("from", name.into()), ("exit", f.code.into())],
            )
        );
    } else {
        eprintln!("dream {name}: {}", f.message);
    }
    if json {
        print_json(f.code, serde_json::json!({"error": f.message}));
    }
}

/// The pool's settings: each flag, else the config file's value, else the
/// built-in default.
fn pool_options(f: &PoolFlags, file: &config::Serve, workers: Option<usize>) -> serve::PoolOptions {
    // The defaults are the pool's own, written once (pool::Settings).
    let d = dream_core::supervise::pool::Settings::default();
    serve::PoolOptions {
        workers: workers.or(file.workers),
        ready: f.ready.or(file.ready).unwrap_or(d.readiness),
        ready_timeout: f
            .ready_timeout
            .or(file.ready_timeout)
            .unwrap_or(d.ready_timeout),
        drain_signal: f
            .drain_signal
            .or(file.drain_signal)
            .unwrap_or(d.drain_signal),
        drain_timeout: f
            .drain_timeout
            .or(file.drain_timeout)
            .unwrap_or(d.drain_timeout),
        // `dream pool` runs one directory: nothing to revert to.
        probation: Duration::ZERO,
        start_priority: f
            .start_priority
            .or(file.start_priority)
            .unwrap_or(serve::StartPriority::Auto),
        notify_socket: f
            .notify_socket
            .or(file.notify_socket)
            .unwrap_or(serve::NotifySocket::Path),
    }
}

/// How a command answers: `--json` (a JSON answer on stdout, failures
/// included) and `--log-format`. Every command is named here, with no
/// catch-all, so a new one cannot forget either.
struct Outputs {
    json: bool,
    log_format: LogFormat,
}

fn outputs(cmd: &Cmd) -> Outputs {
    let (json, log_format) = match cmd {
        Cmd::Serve(a) => (false, a.pool.log_format),
        Cmd::Pool(a) => (false, a.pool.log_format),
        Cmd::Deploy(a) => (a.json, a.log_format),
        Cmd::Rollback(a) => (a.json, LogFormat::Text),
        Cmd::Releases(a) => (a.json, LogFormat::Text),
        Cmd::Status(a) => (a.json, LogFormat::Text),
        Cmd::Reload(a) => (a.json, LogFormat::Text),
        Cmd::Confirm(a) => (a.json, LogFormat::Text),
        Cmd::Upgrade(a) => (a.json, LogFormat::Text),
        Cmd::Check(a) => (a.json, LogFormat::Text),
        Cmd::Fleet(
            FleetCmd::Deploy(FleetDeployArgs { fleet, .. })
            | FleetCmd::Rollback(FleetRollbackArgs { fleet, .. })
            | FleetCmd::Lock(FleetLockArgs { fleet, .. })
            | FleetCmd::Status(fleet)
            | FleetCmd::Unlock(fleet),
        ) => (fleet.json, fleet.log_format),
        // Commands whose output is their product (a man page, a shell's
        // completions, a worker's or a tool's own lines), or a protocol.
        Cmd::Completions { .. }
        | Cmd::Man(_)
        | Cmd::Demo(_)
        | Cmd::Agent(_)
        | Cmd::Listen(_)
        | Cmd::Loop(_)
        | Cmd::Lock(_)
        | Cmd::Static(_) => (false, LogFormat::Text),
    };
    Outputs { json, log_format }
}

fn run(cmd: Cmd) -> Result {
    let json_logs = outputs(&cmd).log_format == LogFormat::Json;
    dream_core::logtext::set_json(json_logs);
    match cmd {
        Cmd::Serve(a) => run_serve(a),
        Cmd::Status(a) => serve::status(a.root.as_deref(), a.json),
        Cmd::Completions { shell } => run_completions(shell),
        Cmd::Man(a) => run_man(&a),
        Cmd::Demo(a) => demo::run(demo::DemoArgs {
            root: a.root,
            listen: a.listen,
            auto_deploy: a.auto_deploy,
            duration: a.duration,
            workers: a.workers,
            connections: a.connections,
        }),
        Cmd::Deploy(a) => run_deploy(a),
        Cmd::Rollback(a) => deploy::rollback(deploy::RollbackArgs {
            root: a.root.as_deref(),
            id: a.id.as_deref(),
            no_reload: a.no_reload,
            verify: &a.verify,
            settle: a.settle.unwrap_or(dream_core::deploy::DEFAULT_SETTLE),
            wait_lock: a.wait_lock,
            dry_run: a.dry_run,
            json: a.json,
            quiet: a.quiet,
        }),
        Cmd::Releases(a) if a.verify => deploy::verify(a.root.as_deref(), a.id.as_deref(), a.json),
        Cmd::Releases(a) => deploy::releases(a.root.as_deref(), a.json),
        Cmd::Reload(a) => serve::reload(
            a.root.as_deref(),
            a.confirm_within,
            a.settle.unwrap_or(dream_core::deploy::DEFAULT_SETTLE),
            a.json,
        ),
        Cmd::Confirm(a) => serve::confirm(a.root.as_deref(), a.generation, a.json),
        Cmd::Upgrade(a) => serve::upgrade(a.root.as_deref(), a.binary, a.json),
        Cmd::Fleet(cmd) => run_fleet(cmd),
        Cmd::Agent(a) => {
            let root = std::path::absolute(&a.root)
                .map_err(|e| Failure::usage(format!("{}: {e}", a.root.display())))?;
            dream_core::fleet::Agent::new(&root)
                .serve()
                .map_err(|e| Failure::failed(format!("the session: {e}")))
        }
        Cmd::Pool(a) => serve::pool(
            a.workers,
            a.relay_hup,
            pool_options(&a.pool, &config::Serve::default(), Some(a.workers)),
            a.pool.verbosity(),
            &a.program,
        ),
        Cmd::Listen(a) => {
            let line = tools::split_specs(&a.args)?;
            tools::listen(
                &line.specs,
                line.backlog.unwrap_or(a.backlog),
                line.user.as_deref().or(a.user.as_deref()),
                a.verbose || line.verbose,
                &line.program,
            )
        }
        Cmd::Loop(a) => tools::run_loop(a.delay, &a.program),
        Cmd::Lock(a) => tools::lock(&a.file, a.no_wait, &a.program),
        Cmd::Static(a) => run_static(a),
        Cmd::Check(a) => run_check(a),
    }
}

/// `dream serve`: flags, then `[serve]` in dream.toml, then the defaults.
fn run_serve(a: ServeArgs) -> Result {
    let root = serve::root_dir(a.root.as_deref())?;
    let file = config::load(&root, a.config.as_deref())?.serve;
    let listen = if a.listen.is_empty() {
        file.listen.clone().unwrap_or_default()
    } else {
        a.listen.clone()
    };
    let command: Vec<OsString> = if a.command.is_empty() {
        file.command.iter().flatten().map(OsString::from).collect()
    } else {
        a.command.clone()
    };
    if command.is_empty() {
        return Err(Failure::usage(
            "no COMMAND: give it after `--` (dream serve --listen :8080 -- ./server) or as `command` in dream.toml",
        ));
    }
    serve::serve(serve::ServeOptions {
        root: Some(&root),
        listen: &listen,
        metrics: a.metrics.clone().or(file.metrics.clone()),
        backlog: a
            .backlog
            .or(file.backlog)
            .unwrap_or(dream_core::sockets::listen::DEFAULT_BACKLOG),
        user: a.user.as_deref().or(file.user.as_deref()),
        pool: serve::PoolOptions {
            probation: a
                .probation
                .or(file.probation)
                .unwrap_or(dream_core::supervise::pool::Settings::default().probation),
            ..pool_options(&a.pool, &file, a.workers)
        },
        verbosity: a.pool.verbosity(),
        command: &command,
    })
}

/// `dream deploy`: flags, then `[deploy]` in dream.toml, then the defaults.
fn run_deploy(a: DeployCmd) -> Result {
    let root = serve::root_dir(a.root.as_deref())?;
    let file = config::load(&root, a.config.as_deref())?.deploy;
    deploy::deploy(deploy::DeployArgs {
        root: Some(&root),
        source: &a.source,
        id: a.id,
        build: a.build.or(file.build),
        keep: a.keep.or(file.keep).unwrap_or(5),
        no_reload: a.no_reload,
        wait_lock: a.wait_lock.or(file.wait_lock),
        max_size: a.max_size.or(file.max_size),
        confirm_within: a.confirm_within.or(file.confirm_within),
        verify: a.verify,
        settle: a
            .settle
            .or(file.settle)
            .unwrap_or(dream_core::deploy::DEFAULT_SETTLE),
        exclude: if a.exclude.is_empty() {
            file.exclude.clone().unwrap_or_default()
        } else {
            a.exclude.clone()
        },
        keep_git: a.keep_git,
        no_hooks: a.no_hooks,
        bridge: a.bridge,
        dry_run: a.dry_run,
        json: a.json,
        quiet: a.quiet,
    })
}

fn run_completions(shell: clap_complete::Shell) -> Result {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "dream", &mut out);
    print_line(String::from_utf8_lossy(&out).trim_end());
    Ok(())
}

fn run_man(a: &ManArgs) -> Result {
    use clap::CommandFactory;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    if let Some(dir) = &a.dir {
        return clap_mangen::generate_to(cmd, dir)
            .map_err(|e| Failure::failed(format!("{}: {e}", dir.display())));
    }
    // Each word goes one level down (the page is titled by the path,
    // `dream-fleet-deploy`, as `--dir` names its file).
    let mut page = cmd;
    let mut path = vec!["dream".to_string()];
    for name in &a.subcommand {
        let sub = page
            .get_subcommands()
            .find(|s| s.get_name() == name)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = page.get_subcommands().map(|s| s.get_name()).collect();
                Failure::usage(format!(
                    "no subcommand {name:?} under `{}` (it has: {})",
                    path.join(" "),
                    known.join(", ")
                ))
            })?;
        path.push(name.clone());
        page = sub;
    }
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .map_err(Failure::failed)?;
    print_line(String::from_utf8_lossy(&out).trim_end());
    Ok(())
}

/// A command's `--json` answer on stdout: its own fields, and beside them
/// `ok` and `exit` (the exit status the command ends with), so that a
/// success and a failure have one shape (doc/DESIGN.md, "--json").
pub fn print_json(exit: i32, fields: impl serde::Serialize) {
    let mut v = serde_json::to_value(fields).expect("an answer serializes");
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("ok".into(), (exit == exit::OK).into());
        m.insert("exit".into(), exit.into());
    }
    print_line(&v.to_string());
}

/// Prints a line on stdout; a closed pipe is not an error.
pub fn print_line(s: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{s}");
}

/// The fleet from flags, then `[fleet]` in the config file.
fn fleet_of(a: &FleetArgs, r: &RolloutArgs) -> Result<(fleet::Fleet, config::FleetConfig)> {
    let path = a.config.clone().or_else(|| {
        let p = PathBuf::from("dream.toml");
        p.is_file().then_some(p)
    });
    let file = match path {
        Some(p) => config::load(Path::new("."), Some(&p))?.fleet,
        None => config::FleetConfig::default(),
    };
    let root = a.root.clone().or(file.root.clone());
    let names: Vec<(String, Option<String>)> = if let Some(cmd) = &a.hosts_from {
        let out = std::process::Command::new("sh")
            .args(["-c", cmd])
            .output()
            .map_err(|e| Failure::usage(format!("--hosts-from: {e}")))?;
        if !out.status.success() {
            return Err(Failure::usage(format!(
                "--hosts-from {cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| (l.to_string(), None))
            .collect()
    } else if !a.hosts.is_empty() {
        a.hosts.iter().map(|h| (h.clone(), None)).collect()
    } else {
        file.hosts
            .iter()
            .flatten()
            .map(|h| match h {
                config::FleetHost::Name(n) => (n.clone(), None),
                config::FleetHost::Table { host, root } => (host.clone(), root.clone()),
            })
            .collect()
    };
    if names.is_empty() {
        return Err(Failure::usage(
            "no hosts: give --hosts H1,H2, --hosts-from CMD, or [fleet] hosts in dream.toml",
        ));
    }
    let hosts = names
        .iter()
        .map(|(n, r)| {
            let root = r.clone().or(root.clone()).ok_or_else(|| {
                Failure::usage(format!(
                    "no deploy root for {n}: give --root DIR or [fleet] root"
                ))
            })?;
            dream_core::fleet::Host::parse(n, &root).map_err(Failure::usage)
        })
        .collect::<Result<Vec<_>>>()?;
    let ssh: Vec<String> = match (&a.ssh, &file.ssh) {
        (Some(s), _) | (None, Some(config::SshCommand::Line(s))) => {
            s.split_whitespace().map(str::to_string).collect()
        }
        (None, Some(config::SshCommand::List(l))) => l.clone(),
        (None, None) => vec!["ssh".into()],
    };
    if ssh.is_empty() {
        return Err(Failure::usage("--ssh: an empty command"));
    }
    let f = fleet::Fleet {
        ssh,
        remote_dream: a
            .remote_dream
            .clone()
            .or(file.remote_dream.clone())
            .unwrap_or_else(|| "dream".into()),
        json: a.json,
        run: dream_core::fleet::Fleet {
            hosts,
            parallel: a.parallel.or(file.parallel).unwrap_or(8).max(1),
            install: a.install || file.install.unwrap_or(false),
            wait_lock: a.wait_lock.or(file.wait_lock),
            settle: r
                .settle
                .or(file.settle)
                .unwrap_or(dream_core::deploy::DEFAULT_SETTLE),
            verify: r.verify.clone(),
            rollout: fleet::Rollout {
                canary: r.canary.or(file.canary).unwrap_or(1),
                group: match (r.group, &file.group) {
                    (Some(g), _) => Some(g),
                    (None, Some(g)) => Some(
                        g.parse()
                            .map_err(|e| Failure::usage(format!("[fleet] group: {e}")))?,
                    ),
                    (None, None) => None,
                },
                wait: r.wait.or(file.wait).unwrap_or_default(),
                max_fail: r.max_fail.or(file.max_fail).unwrap_or(0),
            },
        },
    };
    Ok((f, file))
}

/// A fleet host's provisional window (default 30s): the lease its agent
/// renews while the coordinator is heard from. It must outlast the host's
/// settle window, which runs inside it before any renewal.
fn lease(f: &fleet::Fleet, given: Option<Duration>) -> std::result::Result<Duration, Failure> {
    let within = given.unwrap_or(Duration::from_secs(30));
    let least = f.run.settle + Duration::from_secs(2);
    if within < least {
        return Err(Failure::usage(format!(
            "--confirm-within {} is too short: each host's settle window ({}) runs inside it, and it needs 2s more (at least {})",
            dream_core::fmt_duration(within),
            dream_core::fmt_duration(f.run.settle),
            dream_core::fmt_duration(least)
        )));
    }
    Ok(within)
}

fn run_fleet(cmd: FleetCmd) -> Result {
    match cmd {
        FleetCmd::Deploy(a) => {
            let (f, file) = fleet_of(&a.fleet, &a.rollout)?;
            fleet::deploy(
                &f,
                &fleet::DeployPlan {
                    source: a.source,
                    id: a.id,
                    build: a.build,
                    dry_run: a.dry_run,
                    exclude: a.exclude,
                    keep_git: a.keep_git,
                    bridge: a.bridge,
                    build_on_local: a.build_on == BuildOn::Local,
                    confirm_within: lease(&f, a.confirm_within.or(file.confirm_within))?,
                },
            )
        }
        FleetCmd::Rollback(a) => {
            let (f, file) = fleet_of(&a.fleet, &a.rollout)?;
            fleet::rollback(
                &f,
                a.id.as_deref(),
                lease(&f, a.confirm_within.or(file.confirm_within))?,
            )
        }
        FleetCmd::Status(a) => fleet::status(&fleet_of(&a, &RolloutArgs::default())?.0),
        FleetCmd::Lock(a) => fleet::hold(
            &fleet_of(&a.fleet, &RolloutArgs::default())?.0,
            Some(a.message),
        ),
        FleetCmd::Unlock(a) => fleet::hold(&fleet_of(&a, &RolloutArgs::default())?.0, None),
    }
}

fn run_static(a: StaticArgs) -> Result {
    use dream_core::protocol;
    let listeners = match &a.listen {
        Some(spec) => {
            let bound = tools::bind_all(
                std::slice::from_ref(spec),
                dream_core::sockets::listen::DEFAULT_BACKLOG,
                "static",
                true,
            )?;
            bound
                .into_iter()
                .map(|b| b.into_std())
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(Failure::failed)?
        }
        None => protocol::take_listeners()
            .map_err(|e| {
                Failure::usage(format!(
                    "{e}; run it under `dream serve` or `dream listen SPEC dream static`, or give --listen SPEC"
                ))
            })?
            .into_iter()
            .map(|i| i.into_std())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Failure::failed)?,
    };
    raise_fd_limit();
    let config = dream_static::Config {
        root: a.dir,
        release: std::env::var("DREAM_RELEASE")
            .ok()
            .filter(|s| !s.is_empty()),
        header_timeout: a.header_timeout,
        max_connections: a.max_connections,
        drain_grace: a.drain_grace,
        drain_spread: a.drain_spread,
        drain_timeout: a.drain_timeout,
        send_timeout: a.send_timeout,
    };
    dream_static::serve(listeners, config).map_err(Failure::failed)
}

/// Workers hold one descriptor per connection: lift the soft limit to the
/// hard one so that the connection cap, not EMFILE, is what binds.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn run_check(a: CheckArgs) -> Result {
    let target = dream_check::Target::parse(&a.url).map_err(Failure::usage)?;
    if a.connections == 0 {
        return Err(Failure::usage("--connections must be at least 1"));
    }
    let opts = dream_check::Options {
        target,
        connections: a.connections,
        duration: a.duration,
        keep_alive: a.keep_alive,
        body_pattern: a.body_pattern,
        timeout: a.timeout,
        max_requests: a.requests,
        rate: a.rate,
        timeline: a.report.is_some(),
    };
    let live = Arc::new(dream_check::Live::default());
    let report = dream_check::run(&opts, live).map_err(|e| match e {
        dream_check::CheckError::Runtime(io) => Failure::failed(io),
        other => Failure::usage(other),
    })?;
    if let Some(page) = &a.report {
        report::write(page, &report, a.root.as_deref())?;
    }
    let code = if report.ok { exit::OK } else { exit::FAILED };
    if a.json {
        print_json(code, &report);
    } else {
        print_line(&report.human());
    }
    if report.ok {
        Ok(())
    } else {
        Err(Failure::silent(exit::FAILED))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every option and positional argument of every subcommand says what
    /// it is for.
    #[test]
    fn every_argument_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "dream", &mut missing);
        assert!(missing.is_empty(), "undescribed: {missing:#?}");
    }
}
