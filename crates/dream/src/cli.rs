//! The command line: every command, its flags and their help, as clap
//! reads them. What each command does is in `main.rs` and the modules it
//! calls.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dream_core::sockets::spec::ListenSpec;
use dream_core::supervise::pool::Readiness;
use nix::sys::signal::Signal;

use crate::values;

pub(crate) const AFTER_HELP: &str = "\
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
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
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
    /// Stop accepting without refusing anyone: connections wait in the backlog until `dream resume`
    #[command(
        after_help = "The live generation drains (its requests are answered) and nothing accepts; new\nconnections complete their handshake and wait in the listening sockets' backlog.\nAnswered once every worker is gone: run what old and new code cannot both run\nagainst (a migration), then `dream resume` (or `dream reload`, or a deploy) starts\nthe release `current` names, which takes everything that waited. Past --max the\nsupervisor resumes by itself. If the resumed release does not come up, the paused\none serves again. `dream deploy --pause` does all of this around its switch.\n\nExample:\n  dream pause --root /srv/app --max 20s && ./migrate && dream resume --root /srv/app"
    )]
    Pause(PauseArgs),
    /// End a pause: start the release `current` names; exit 1 if it failed (the paused one serves again)
    Resume(StatusArgs),
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
pub(crate) struct ManArgs {
    /// The subcommand whose page to print, nested ones as several words
    /// (`dream man fleet deploy`); default: dream's own
    #[arg(value_name = "SUBCOMMAND")]
    pub(crate) subcommand: Vec<String>,
    /// Write every page (dream.1, dream-deploy.1, …) into DIR instead
    #[arg(long, value_name = "DIR", conflicts_with = "subcommand")]
    pub(crate) dir: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct ListenArgs {
    /// listen(2) backlog (capped by net.core.somaxconn)
    #[arg(long, default_value_t = dream_core::sockets::listen::DEFAULT_BACKLOG)]
    pub(crate) backlog: u32,
    /// After binding, switch to USER[:GROUP] (needs root)
    #[arg(long, value_name = "USER[:GROUP]")]
    pub(crate) user: Option<String>,
    /// Print the bound addresses on stderr
    #[arg(short, long)]
    pub(crate) verbose: bool,
    /// SPEC... [--] PROGRAM [ARGS...]
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "SPEC... PROGRAM"
    )]
    pub(crate) args: Vec<OsString>,
}

#[derive(Args)]
pub(crate) struct PoolFlags {
    /// When a worker counts as ready: notify (READY=1), fd:N (a line on fd N), delay:DUR, auto:DUR [default: auto:1s]
    #[arg(long, value_name = "MODE", value_parser = values::readiness)]
    pub(crate) ready: Option<Readiness>,
    /// A new generation not ready by then is killed (the old keeps serving) [default: 60s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) ready_timeout: Option<Duration>,
    /// Signal that tells a worker to finish what it holds and exit [default: TERM]
    #[arg(long, value_name = "SIG", value_parser = values::signal)]
    pub(crate) drain_signal: Option<Signal>,
    /// Then SIGKILL to the worker's process group [default: 30s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) drain_timeout: Option<Duration>,
    /// How workers start while others serve (a reload, a respawn): idle runs them under SCHED_IDLE until ready (at most 0.5s), so the serving workers keep the CPU; normal at dream's own priority; auto is idle when dream may restore the priority (root or CAP_SYS_NICE) [default: auto]
    #[arg(long, value_enum, value_name = "PRIORITY")]
    pub(crate) start_priority: Option<values::StartPriority>,
    /// Where each worker's NOTIFY_SOCKET is: path, a socket file in ROOT/.dream/notify/ that every sd_notify client can use; abstract, an @… socket with no file (dream pool always uses abstract) [default: path]
    #[arg(long, value_enum, value_name = "KIND")]
    pub(crate) notify_socket: Option<values::NotifySocket>,
    /// Only warnings and failures
    #[arg(short, long, conflicts_with = "verbose")]
    pub(crate) quiet: bool,
    /// Also log control requests and workers' notifications
    #[arg(short, long)]
    pub(crate) verbose: bool,
    /// Log lines as text, or as one JSON object each (time, level, event, msg); workers' own output passes through untouched
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BuildOn {
    Hosts,
    Local,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

impl PoolFlags {
    pub(crate) fn verbosity(&self) -> i8 {
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
pub(crate) struct ServeArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// Settings file (default: ROOT/dream.toml if it exists); flags win over it
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Address to listen on (repeatable); none: inherit LISTEN_FDS from systemd
    #[arg(short, long, value_name = "SPEC", value_parser = values::listen)]
    pub(crate) listen: Vec<ListenSpec>,
    /// listen(2) backlog, capped by net.core.somaxconn [default: 4096]
    #[arg(long)]
    pub(crate) backlog: Option<u32>,
    /// Workers per generation [default: the number of CPUs]
    #[arg(short, long)]
    pub(crate) workers: Option<usize>,
    /// Run workers as USER[:GROUP] (dream must start as root)
    #[arg(long, value_name = "USER[:GROUP]")]
    pub(crate) user: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (127.0.0.1:9101, or unix:/run/dream.metrics), from the supervisor itself
    #[arg(long, value_name = "ADDR", value_parser = values::listen)]
    pub(crate) metrics: Option<ListenSpec>,
    /// After a reload goes live, revert it by itself if its workers crash 3 times, or all at once, within DUR; 0 turns it off [default: 10s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) probation: Option<Duration>,
    #[command(flatten)]
    pub(crate) pool: PoolFlags,
    /// COMMAND [ARGS...] (relative paths resolve in the release directory; or `command` in dream.toml)
    #[arg(last = true, value_name = "COMMAND")]
    pub(crate) command: Vec<OsString>,
}

#[derive(Args)]
pub(crate) struct DemoCmd {
    /// Where to create the deploy root (default: a temporary directory)
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// Address to serve on
    #[arg(short, long, default_value = "127.0.0.1:5555", value_name = "SPEC", value_parser = values::listen)]
    pub(crate) listen: ListenSpec,
    /// Deploy the sites alternately this often, under load from the referee
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) auto_deploy: Option<Duration>,
    /// Stop after this long (default: at Ctrl-C)
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) duration: Option<Duration>,
    /// Workers per generation
    #[arg(short, long, default_value_t = 2)]
    pub(crate) workers: usize,
    /// The referee's concurrent clients (with --auto-deploy)
    #[arg(short, long, default_value_t = 8)]
    pub(crate) connections: usize,
}

#[derive(Args)]
pub(crate) struct DeployCmd {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// DIR, TARBALL or git:URL[#REV]
    pub(crate) source: String,
    /// Release id (default: UTC time and a content or git hash)
    #[arg(long)]
    pub(crate) id: Option<String>,
    /// Settings file (default: ROOT/dream.toml if it exists); flags win over it
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Shell command run in the staged release before the switch
    #[arg(long, value_name = "CMD")]
    pub(crate) build: Option<String>,
    /// Releases to keep; the current and previous are always kept [default: 5]
    #[arg(long)]
    pub(crate) keep: Option<usize>,
    /// Switch current but do not ask the supervisor to reload
    #[arg(long)]
    pub(crate) no_reload: bool,
    /// Wait this long for another deploy's lock (default: fail at once)
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) wait_lock: Option<Duration>,
    /// Refuse a source holding more than SIZE of files (500M, 10G; default:
    /// the free space of ROOT's filesystem); tarballs are checked before
    /// anything is written
    #[arg(long, value_name = "SIZE", value_parser = values::size)]
    pub(crate) max_size: Option<u64>,
    /// A provisional reload: the supervisor reverts the release unless this deploy confirms it within DUR (it does once the reload succeeded), so a deploy killed or cut off in between still ends consistent
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) confirm_within: Option<Duration>,
    /// After the reload, GET PATH through the supervisor's own socket (repeatable): a status outside 2xx/3xx or another release's X-Dream-Release puts the previous release back; without a running supervisor the deploy fails
    #[arg(long, value_name = "PATH", value_parser = values::url_path)]
    pub(crate) verify: Vec<String>,
    /// After the new generation goes live, wait this long for it to stay up: a revert or crash loop inside the window is exit 1 (0s: report at once) [default: 1s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) settle: Option<Duration>,
    /// Leave PATTERN out of a directory source (gitignore syntax, repeatable; the source's .dreamignore too)
    #[arg(long, value_name = "PATTERN")]
    pub(crate) exclude: Vec<String>,
    /// Keep the source's .git/ in the release (left out by default)
    #[arg(long)]
    pub(crate) keep_git: bool,
    /// Do not run ROOT/.dream/hooks/{pre-switch,post-switch,post-deploy,deploy-failed}
    #[arg(long)]
    pub(crate) no_hooks: bool,
    /// Link files under DIR (in the release) that the previous release has and this one lacks, never overwriting (repeatable): old pages keep finding their assets
    #[arg(long, value_name = "DIR", value_parser = values::release_dir)]
    pub(crate) bridge: Vec<PathBuf>,
    #[command(flatten)]
    pub(crate) canary: CanaryArgs,
    /// Not a canary this time, whatever `[deploy] canary` in dream.toml says (a hotfix)
    #[arg(long, conflicts_with = "canary")]
    pub(crate) no_canary: bool,
    /// Stop the old release before the switch: it drains, nothing accepts and connections wait in the backlog while the pre-switch hook runs (a migration old and new code cannot both run against); the new release then takes everything that waited. If it does not come up, the old one serves again
    #[arg(long)]
    pub(crate) pause: bool,
    /// The longest the pause may hold connections before the supervisor resumes by itself [default: 30s]
    #[arg(long, value_name = "DUR", value_parser = values::duration, requires = "pause")]
    pub(crate) pause_max: Option<Duration>,
    /// Print what would be copied, shared, left out, built and switched; write nothing, take no lock
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Progress lines as text, or as one JSON object each (time, level, event, msg, fields)
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    /// Print the report as JSON on stdout (progress is not printed)
    #[arg(long)]
    pub(crate) json: bool,
    /// No progress lines
    #[arg(short, long)]
    pub(crate) quiet: bool,
}

#[derive(Args)]
pub(crate) struct RollbackCmd {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// Release to go back to (default: the previous good one)
    pub(crate) id: Option<String>,
    /// Switch current but do not ask the supervisor to reload
    #[arg(long)]
    pub(crate) no_reload: bool,
    /// After the reload, GET PATH through the supervisor's own socket (repeatable), as for deploy
    #[arg(long, value_name = "PATH", value_parser = values::url_path)]
    pub(crate) verify: Vec<String>,
    /// After the new generation goes live, wait this long for it to stay up: a revert or crash loop inside the window is exit 1 (0s: report at once) [default: 1s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) settle: Option<Duration>,
    /// Print which release it would go back to; write nothing, take no lock
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Wait this long for another deploy's lock (default: fail at once)
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) wait_lock: Option<Duration>,
    /// Print the report as JSON on stdout (progress is not printed)
    #[arg(long)]
    pub(crate) json: bool,
    /// No progress lines
    #[arg(short, long)]
    pub(crate) quiet: bool,
}

#[derive(Args)]
pub(crate) struct ReleasesArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// Check the files of every release (or of ID) against its manifest
    #[arg(long)]
    pub(crate) verify: bool,
    /// With --verify: the release to check (default: all)
    #[arg(requires = "verify")]
    pub(crate) id: Option<String>,
    /// Print JSON on stdout
    #[arg(long)]
    pub(crate) json: bool,
}

/// A root and `--json`: what `status` and `resume` take.
#[derive(Args)]
pub(crate) struct StatusArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// Print JSON on stdout
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct ReloadArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// Provisional: the new generation reverts unless `dream confirm` comes within DUR of it going live
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) confirm_within: Option<Duration>,
    /// After the new generation goes live, wait this long for it to stay up: a revert or crash loop inside the window is exit 1 (0s: report at once) [default: 1s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) settle: Option<Duration>,
    #[command(flatten)]
    pub(crate) canary: CanaryArgs,
    /// Print the answer as JSON on stdout
    #[arg(long)]
    pub(crate) json: bool,
}

/// A canary reload (`deploy`, `reload`): the new release serves a share
/// of new connections beside the live one, is judged against it, and is
/// promoted or reverted without a person.
#[derive(Args, Clone, Default)]
pub(crate) struct CanaryArgs {
    /// Start the new release as a canary beside the live one: K workers (K of the live generation's N get K/N of new connections) or P% of new connections; judged against the live release for --judge-for, then promoted (a reload onto it) or reverted (the canary drains, nothing else moves). Exit 0 only when promoted. Needs TCP listening sockets
    #[arg(long, value_name = "SHARE", value_parser = values::canary_share)]
    pub(crate) canary: Option<dream_core::supervise::canary::judge::Share>,
    #[command(flatten)]
    pub(crate) judge: JudgeArgs,
}

impl CanaryArgs {
    /// The control protocol's canary, if one was asked for.
    pub(crate) fn spec(&self) -> Option<dream_core::supervise::canary::judge::Spec> {
        Some(self.judge.spec(self.canary?))
    }
}

/// How a canary is judged (`deploy`/`reload --canary`, and each canary host
/// of `fleet deploy`).
#[derive(Args, Clone, Default)]
pub(crate) struct JudgeArgs {
    /// How long the canary is judged, from when all its workers are ready [default: 30s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) judge_for: Option<Duration>,
    /// GET PATH through the supervisor's socket 20 times a second while the canary is judged, each answer attributed to a release by its X-Dream-Release header (see doc/protocol.md); without it the canary is judged on its workers' exits only
    #[arg(long, value_name = "PATH", value_parser = values::url_path)]
    pub(crate) judge_path: Option<String>,
    /// Revert when the canary's error rate (5xx, or no answer) is more than PCT percentage points above the live release's [default: 2]
    #[arg(long, value_name = "PCT", value_parser = values::percent_points)]
    pub(crate) judge_max_errors: Option<u32>,
    /// Revert when the canary's p99 latency is more than R times the live release's (and 1 ms above it) [default: 3]
    #[arg(long, value_name = "R", value_parser = values::ratio)]
    pub(crate) judge_max_latency_ratio: Option<u32>,
    /// Fewest answers from each release for a verdict: fewer is "inconclusive", which reverts [default: 50]
    #[arg(long, value_name = "N")]
    pub(crate) judge_min_requests: Option<u32>,
}

impl JudgeArgs {
    /// Whether any judge flag was given.
    pub(crate) fn any(&self) -> bool {
        self.judge_for.is_some()
            || self.judge_path.is_some()
            || self.judge_max_errors.is_some()
            || self.judge_max_latency_ratio.is_some()
            || self.judge_min_requests.is_some()
    }

    /// A canary of `share`, judged as these flags say.
    pub(crate) fn spec(
        &self,
        share: dream_core::supervise::canary::judge::Share,
    ) -> dream_core::supervise::canary::judge::Spec {
        let mut spec = dream_core::supervise::canary::judge::Spec::new(share);
        if let Some(d) = self.judge_for {
            spec.judge_ms = d.as_millis() as u64;
        }
        spec.judge_path = self.judge_path.clone();
        if let Some(e) = self.judge_max_errors {
            spec.max_errors = e;
        }
        if let Some(r) = self.judge_max_latency_ratio {
            spec.max_latency_ratio = r;
        }
        if let Some(n) = self.judge_min_requests {
            spec.min_requests = n;
        }
        spec
    }
}

#[derive(Args)]
pub(crate) struct PauseArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// Resume by itself after DUR, on the release current names [default: 30s, under the 60s most proxies and clients wait]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) max: Option<Duration>,
    /// Print the answer as JSON on stdout
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct ConfirmArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// The generation to keep (default: the live one)
    pub(crate) generation: Option<u64>,
    /// Print the answer as JSON on stdout
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum FleetCmd {
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
pub(crate) struct FleetArgs {
    /// Hosts, comma-separated: [user@]host[:port] (or [fleet] hosts in dream.toml)
    #[arg(long, value_delimiter = ',', value_name = "HOSTS")]
    pub(crate) hosts: Vec<String>,
    /// A command printing the hosts, one per line
    #[arg(long, value_name = "CMD", conflicts_with = "hosts")]
    pub(crate) hosts_from: Option<String>,
    /// The deploy root on the hosts (or [fleet] root; per host in [fleet] hosts)
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<String>,
    /// Settings file with a [fleet] table (default: ./dream.toml if it exists)
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The ssh command, split on spaces (default: ssh)
    #[arg(long, value_name = "CMD")]
    pub(crate) ssh: Option<String>,
    /// dream on the hosts [default: dream]
    #[arg(long, value_name = "PATH")]
    pub(crate) remote_dream: Option<String>,
    /// At most this many ssh sessions starting at once [default: 8]
    #[arg(long, value_name = "N")]
    pub(crate) parallel: Option<usize>,
    /// Copy this dream to hosts whose dream is missing or incompatible (into ROOT/.dream/bin/)
    #[arg(long)]
    pub(crate) install: bool,
    /// Wait this long for each host's deploy lock (default: fail at once, naming the holder); a manual hold is never waited on
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) wait_lock: Option<Duration>,
    /// Progress lines as text, or as one JSON object each
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    /// Print the outcome as JSON on stdout
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Default)]
pub(crate) struct RolloutArgs {
    /// Hosts switched first, alone [default: 1]
    #[arg(long, value_name = "N")]
    pub(crate) canary: Option<usize>,
    /// Then groups of N hosts or P% of them [default: all the rest at once]
    #[arg(long, value_name = "N|P%")]
    pub(crate) group: Option<dream_core::fleet::Group>,
    /// Pause between groups
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) wait: Option<Duration>,
    /// After each host's switch, its new generation must stay up this long (as for deploy) [default: 1s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) settle: Option<Duration>,
    /// Hosts allowed to fail their switch before the whole fleet reverts (they stay on the old release; exit 2) [default: 0]
    #[arg(long, value_name = "N")]
    pub(crate) max_fail: Option<usize>,
    /// After each host's switch, GET PATH through that host's own socket (repeatable): a failure reverts the fleet
    #[arg(long, value_name = "PATH", value_parser = values::url_path)]
    pub(crate) verify: Vec<String>,
}

#[derive(Args)]
pub(crate) struct FleetDeployArgs {
    /// DIR, TARBALL or git:URL[#REV], staged once here
    pub(crate) source: String,
    /// Release id (default: UTC time and the content hash)
    #[arg(long)]
    pub(crate) id: Option<String>,
    /// Shell command run in each host's staged release before the switch
    #[arg(long, value_name = "CMD")]
    pub(crate) build: Option<String>,
    /// Releases each host keeps, pruned once the run has committed (as for deploy: the newest N good ones, plus current, previous and any a process runs in) [default: 5]
    #[arg(long, value_name = "N")]
    pub(crate) keep: Option<usize>,
    /// Where --build runs: on every host, or once here (the hosts then get the built tree)
    #[arg(long, value_enum, default_value_t = BuildOn::Hosts)]
    pub(crate) build_on: BuildOn,
    /// Each host's reload stays provisional while the run is heard from, and this long after: a host cut off from the run reverts itself [default: 30s; at least --settle + 2s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) confirm_within: Option<Duration>,
    /// Print the plan (hosts, groups, what each host lacks) and change nothing
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Leave PATTERN out of a directory source (gitignore syntax, repeatable; its .dreamignore too)
    #[arg(long, value_name = "PATTERN")]
    pub(crate) exclude: Vec<String>,
    /// Keep the source's .git/ (left out by default)
    #[arg(long)]
    pub(crate) keep_git: bool,
    /// As for deploy: files under DIR each host's previous release has and the new one lacks are linked in
    #[arg(long, value_name = "DIR", value_parser = values::release_dir)]
    pub(crate) bridge: Vec<PathBuf>,
    #[command(flatten)]
    pub(crate) rollout: RolloutArgs,
    /// Judge each canary host's switch there (with any --judge-* flag): the new release on SHARE of that host's connections beside the old one, promoted or reverted by its supervisor before any other host switches [default: 25%]
    #[arg(long, value_name = "SHARE", value_parser = values::canary_share)]
    pub(crate) judge_share: Option<dream_core::supervise::canary::judge::Share>,
    #[command(flatten)]
    pub(crate) judge: JudgeArgs,
    #[command(flatten)]
    pub(crate) fleet: FleetArgs,
}

#[derive(Args)]
pub(crate) struct FleetRollbackArgs {
    /// The release to go back to (default: the primary's previous good one)
    pub(crate) id: Option<String>,
    /// As for deploy [default: 30s]
    #[arg(long, value_name = "DUR", value_parser = values::duration)]
    pub(crate) confirm_within: Option<Duration>,
    #[command(flatten)]
    pub(crate) rollout: RolloutArgs,
    #[command(flatten)]
    pub(crate) fleet: FleetArgs,
}

#[derive(Args)]
pub(crate) struct FleetLockArgs {
    /// Why (shown to whoever tries to deploy)
    #[arg(short, long, value_name = "MSG")]
    pub(crate) message: String,
    #[command(flatten)]
    pub(crate) fleet: FleetArgs,
}

#[derive(Args)]
pub(crate) struct AgentArgs {
    /// The deploy root on this host
    #[arg(long, value_name = "DIR")]
    pub(crate) root: PathBuf,
}

#[derive(Args)]
pub(crate) struct UpgradeArgs {
    /// Deploy root (default: $DREAM_ROOT, else the current directory if it has .dream/ or dream.toml)
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// The new dream program (default: the path the supervisor started from)
    #[arg(long, value_name = "PATH")]
    pub(crate) binary: Option<PathBuf>,
    /// Print the answer as JSON on stdout
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct PoolArgs {
    /// Number of children
    #[arg(short = 'n', long = "workers", default_value_t = 1)]
    pub(crate) workers: usize,
    /// Relay HUP to the children instead of starting a new set
    #[arg(long)]
    pub(crate) relay_hup: bool,
    #[command(flatten)]
    pub(crate) pool: PoolFlags,
    /// The program to keep N copies of, and its arguments
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "PROGRAM"
    )]
    pub(crate) program: Vec<OsString>,
}

#[derive(Args)]
pub(crate) struct LoopArgs {
    /// Pause after a failed run: 1, 0.5, 250ms, 2s
    #[arg(value_parser = values::duration)]
    pub(crate) delay: Duration,
    /// The program to run again after each exit, and its arguments
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "PROGRAM"
    )]
    pub(crate) program: Vec<OsString>,
}

#[derive(Args)]
pub(crate) struct LockArgs {
    /// Fail at once (exit 111) if the lock is held, naming the holder
    #[arg(short = 'n', long = "no-wait")]
    pub(crate) no_wait: bool,
    /// The lock file (created if missing); the lock is flock(2) on it
    pub(crate) file: PathBuf,
    /// The program to run while holding the lock, and its arguments
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "PROGRAM"
    )]
    pub(crate) program: Vec<OsString>,
}

#[derive(Args)]
pub(crate) struct StaticArgs {
    /// Directory to serve, relative to the cwd (the release directory)
    #[arg(default_value = "public")]
    pub(crate) dir: PathBuf,
    /// Bind this address itself instead of taking an inherited socket
    #[arg(long, value_name = "SPEC", value_parser = values::listen)]
    pub(crate) listen: Option<ListenSpec>,
    /// Time for a request's headers, and for an idle keep-alive connection
    #[arg(long, default_value = "10s", value_name = "DUR", value_parser = values::duration)]
    pub(crate) header_timeout: Duration,
    /// Connections served at once; at the cap the connection idle the
    /// longest (keep-alive, or slow to send its headers) is closed to make
    /// room, else clients wait in the backlog
    #[arg(long, default_value_t = 10_000)]
    pub(crate) max_connections: usize,
    /// While draining, how long idle keep-alive connections stay open
    #[arg(long, default_value = "1s", value_name = "DUR", value_parser = values::duration)]
    pub(crate) drain_grace: Duration,
    /// While draining, tell keep-alive connections to close spread over
    /// this window, so their clients reconnect to the new workers a few at
    /// a time (0: all on their next request)
    #[arg(long, default_value = "150ms", value_name = "DUR", value_parser = values::duration)]
    pub(crate) drain_spread: Duration,
    /// While draining, when to stop waiting for busy connections
    #[arg(long, default_value = "30s", value_name = "DUR", value_parser = values::duration)]
    pub(crate) drain_timeout: Duration,
    /// Close a connection whose client takes nothing of a response for this long
    #[arg(long, default_value = "30s", value_name = "DUR", value_parser = values::duration)]
    pub(crate) send_timeout: Duration,
}

#[derive(Args)]
pub(crate) struct CheckArgs {
    /// http://HOST:PORT/PATH
    pub(crate) url: String,
    /// How long to run: 10s, 500ms, 1m
    #[arg(short, long, default_value = "10s", value_parser = values::duration)]
    pub(crate) duration: Duration,
    /// Concurrent clients
    #[arg(short, long, default_value_t = 16)]
    pub(crate) connections: usize,
    /// Reuse each connection (default: a new connection per request)
    #[arg(short, long)]
    pub(crate) keep_alive: bool,
    /// Regex whose first capture names the release in a body, e.g.
    /// 'release ([A-Za-z0-9._-]+)' (default: bodies are not judged, only the
    /// X-Dream-Release header)
    #[arg(long, value_name = "REGEX")]
    pub(crate) body_pattern: Option<String>,
    /// Limit for connecting and for each response
    #[arg(long, default_value = "5s", value_parser = values::duration)]
    pub(crate) timeout: Duration,
    /// Stop after this many requests in all
    #[arg(long)]
    pub(crate) requests: Option<u64>,
    /// Send this many requests per second in all, on a schedule (an open loop: latency counts from when each was due) instead of as fast as answers come
    #[arg(long, value_name = "PER_SECOND")]
    pub(crate) rate: Option<f64>,
    /// Print the report as JSON on stdout
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write the run as one self-contained HTML page (no network): requests per second, latency and errors over time, and the summary
    #[arg(long, value_name = "FILE.html")]
    pub(crate) report: Option<PathBuf>,
    /// With --report: mark that root's deploys, rollbacks and reverts (from its history) on the time axis
    #[arg(long, value_name = "DIR", requires = "report")]
    pub(crate) root: Option<PathBuf>,
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
