//! `ublk-mirror-ctl`: drive a ublk-mirror daemon through its control socket.
//!
//! One verb per protocol command, of the same name (control/PROTOCOL.md; `wait-ready` stays
//! as an alias of `mirror-wait-ready`), plus `list` and `raw`. Each verb takes only what it
//! uses: the verbs that address one daemon take `--socket` or `--dev-id`, the verbs that print
//! a reply `--json`, either before the verb (the older spelling) or after it.

use std::os::fd::{BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use control::client::Client;
use control::protocol::{
    defaults, timeout_limit, Command, CopyReport, InfoReply, PassFdReply, StatsReply,
};
use control::units::{parse_size, SIZE_UNITS};
use control::RUN_DIR;
use serde::Serialize;
use serde_json::Value;

/// How long a quick command's reply may take.
const QUICK: Duration = Duration::from_secs(10);
/// How long `unpause`, `mirror-start`, `mirror-stop` and `shutdown` may take (reopen,
/// handshake, drain).
const SLOW: Duration = Duration::from_secs(60);
/// How much longer than its own timeout a command's reply may take.
const SLACK: Duration = Duration::from_secs(10);

fn long_about() -> String {
    format!(
        "Drive a ublk-mirror daemon through its control socket (see control/PROTOCOL.md). The \
         verbs are the protocol's commands, plus `list` and `raw`.\n\n\
         Which daemon: --socket PATH or --dev-id N, before or after the verb. Durations are \
         seconds (fractions allowed); a timeout of 0 means no limit. {SIZE_UNITS}\n\n\
         Output is plain text (or JSON with --json), never coloured."
    )
}

#[derive(Parser)]
#[command(
    name = "ublk-mirror-ctl",
    version,
    about = "Drive a ublk-mirror daemon through its control socket (see control/PROTOCOL.md)",
    long_about = long_about(),
    color = clap::ColorChoice::Never
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

/// The options that may also come before the verb, for the verbs that use them.
#[derive(clap::Args)]
struct Global {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    output: Output,
}

/// Which daemon.
#[derive(clap::Args)]
struct Target {
    /// The daemon's control socket (this or --dev-id is required).
    #[arg(long, value_name = "PATH", conflicts_with = "dev_id")]
    socket: Option<PathBuf>,
    /// The device id N: the socket is /run/ublk-mirror/N.sock (this or --socket is required).
    #[arg(long, value_name = "N")]
    dev_id: Option<u32>,
}

#[derive(clap::Args, Clone, Copy)]
struct Output {
    /// Print the daemon's JSON reply instead of text.
    #[arg(long)]
    json: bool,
}

/// A verb addressed to one daemon: which one, how to print, and the verb's own arguments.
#[derive(clap::Args)]
struct On<A: clap::Args> {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    output: Output,
    #[command(flatten)]
    args: A,
}

#[derive(Subcommand)]
enum Cmd {
    /// Device path, id, size, image, queues, depth, state.
    Info(On<NoArgs>),
    /// Request counters, reqs_outstanding, reqs_parked, nbd_mirror_failed, mirror.
    Stats(On<NoArgs>),
    /// Park new requests, drain, flush and close the image.
    Pause(On<PauseArgs>),
    /// Reopen the image (optionally at a new path of the same size) and resume.
    Unpause(On<UnpauseArgs>),
    /// Pass an inherited fd (e.g. a connected NBD socket) under NAME.
    PassFd(On<PassFdArgs>),
    /// The fds the daemon holds.
    ListFds(On<NoArgs>),
    /// Close a stored fd.
    CloseFd(On<CloseFdArgs>),
    /// Wait until no request is outstanding.
    WaitIdle(On<WaitIdleArgs>),
    /// Stop the daemon gracefully (as SIGTERM): the device is deleted.
    Shutdown(On<ShutdownArgs>),
    /// Mirror every write to the NBD target on the stored fd NAME.
    MirrorStart(On<MirrorStartArgs>),
    /// Wait until the background copy or resync is ready (actively synced).
    #[command(visible_alias = "wait-ready")]
    MirrorWaitReady(On<MirrorWaitReadyArgs>),
    /// End mirroring cleanly and clear nbd_mirror_failed.
    MirrorStop(On<NoArgs>),
    /// The out-of-sync extents (offset, length).
    DirtyMap(On<NoArgs>),
    /// Change the running copy's or resync's rate limit from now on.
    MirrorSetSpeed(On<SetSpeedArgs>),
    /// Hold the background copy or resync (the guest and the mirror go on).
    MirrorCopyPause(On<NoArgs>),
    /// Let a held copy or resync go on.
    MirrorCopyResume(On<NoArgs>),
    /// Print the daemon's events as they happen, one line each, starting with a snapshot
    /// (until interrupted, or the daemon closes the connection).
    Watch(On<NoArgs>),
    /// Every daemon under /run/ublk-mirror with its state.
    List {
        #[command(flatten)]
        output: Output,
    },
    /// Send one line verbatim and print the reply line as it is (for debugging the protocol).
    Raw {
        #[command(flatten)]
        target: Target,
        /// The request line, e.g. '{"v":1,"id":1,"cmd":"stats"}'.
        line: String,
    },
}

#[derive(clap::Args)]
struct NoArgs {}

#[derive(clap::Args)]
struct PauseArgs {
    /// Seconds to wait for the drain, 0 for no limit; at the timeout the pause is undone.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout, allow_negative_numbers = true,
          default_value_t = defaults::PAUSE_TIMEOUT)]
    timeout: f64,
}

#[derive(clap::Args)]
struct UnpauseArgs {
    /// Reopen the image at this path (same size required) [default: the current path].
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// Then mirror to the stored fd NAME (as `mirror-start NAME` with its defaults), or "null"
    /// to stop mirroring and clear nbd_mirror_failed [default: the mirror is left as it is].
    #[arg(long, value_name = "NAME")]
    mirror: Option<String>,
}

#[derive(clap::Args)]
struct PassFdArgs {
    /// The name the daemon stores the fd under (1 to 64 printable bytes).
    name: String,
    /// The fd number in this process (inherited from the caller).
    #[arg(long, value_name = "N")]
    fd: RawFd,
}

#[derive(clap::Args)]
struct CloseFdArgs {
    /// The stored fd's name.
    name: String,
}

#[derive(clap::Args)]
struct WaitIdleArgs {
    /// Seconds to wait, 0 for no limit.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout, allow_negative_numbers = true,
          default_value_t = defaults::WAIT_IDLE_TIMEOUT)]
    timeout: f64,
}

#[derive(clap::Args)]
struct ShutdownArgs {
    /// Detach instead (live upgrade): drain and flush, then exit leaving the device in
    /// place; guest I/O waits until `ublk-mirror recover --dev-id N` takes it over.
    #[arg(long)]
    keep: bool,
}

#[derive(clap::Args)]
struct MirrorStartArgs {
    /// The stored fd (see pass-fd) of a socket connected to the NBD server; several names
    /// (`nbd-proxy connect --connections N` stores NAME.0 ... NAME.N-1) mirror over one
    /// connection each, at most one per queue.
    #[arg(value_name = "NAME", num_args = 1.., required = true)]
    names: Vec<String>,
    /// Export name for the NBD handshake, unused when the fd was passed negotiated [default:
    /// "", the server's default export].
    #[arg(
        long,
        value_name = "NAME",
        default_value = "",
        hide_default_value = true
    )]
    export: String,
    /// Seconds a request may wait for the target before the mirror fails, 0 for no limit (a
    /// hung target then hangs the guest).
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout, allow_negative_numbers = true,
          default_value_t = defaults::MIRROR_TIMEOUT)]
    timeout: f64,
    /// Also copy the whole device in the background (sparse-aware).
    #[arg(long, conflicts_with = "resync")]
    copy: bool,
    /// Copy only what is out of sync (after a failure).
    #[arg(long)]
    resync: bool,
    /// Copy rate limit in device bytes covered per second, holes included: a size (20MiB is
    /// 20971520, 20M is 20000000), 0 for no limit.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "0")]
    speed: u64,
    /// Mirror to an export that does not take FLUSH (tapdisk's servers, oldstyle or not),
    /// which is refused otherwise: a guest flush then completes after the local flush alone
    /// and promises nothing about the target until it is closed; `stats` shows
    /// `mirror.durable: false`.
    #[arg(long)]
    allow_no_flush: bool,
    /// With --copy: the target is known to read zeros (freshly created), so holes are not
    /// sent at all (QEMU's target-is-zero).
    #[arg(long, requires = "copy")]
    target_is_zero: bool,
}

#[derive(clap::Args)]
struct SetSpeedArgs {
    /// The copy's new rate limit in device bytes per second, holes included: a size, 0 for
    /// no limit.
    #[arg(value_name = "SIZE", value_parser = parse_size)]
    speed: u64,
}

#[derive(clap::Args)]
struct MirrorWaitReadyArgs {
    /// Seconds to wait, 0 for no limit.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout, allow_negative_numbers = true,
          default_value_t = defaults::MIRROR_WAIT_READY_TIMEOUT)]
    timeout: f64,
    /// Show progress: a bar on a terminal, a line every 2 s otherwise.
    #[arg(long)]
    progress: bool,
}

fn main() {
    // Like any Unix filter: a closed pipe (`| head`, `| grep -q`) ends us quietly.
    // SAFETY: resetting a signal disposition to its default, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("ublk-mirror-ctl: error: {e:#}");
        std::process::exit(1);
    }
}

/// A `--timeout`: seconds, 0 for no limit (`protocol::timeout_limit`, the daemon's own rule).
fn parse_timeout(s: &str) -> std::result::Result<f64, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of seconds"))?;
    timeout_limit(Some(secs), secs)?;
    Ok(secs)
}

/// How long to wait for the reply to a command that itself waits up to `timeout` seconds: a
/// little longer, or without limit when `timeout` is 0.
fn reply_wait(timeout: f64) -> Result<Option<Duration>> {
    let limit = timeout_limit(Some(timeout), timeout).map_err(anyhow::Error::msg)?;
    Ok(limit.map(|d| d + SLACK))
}

/// A usage error, reported like clap's own (exit status 2).
fn usage_error(msg: &str) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::ArgumentConflict, msg)
        .exit()
}

impl Target {
    fn given(&self) -> bool {
        self.socket.is_some() || self.dev_id.is_some()
    }

    /// The socket of the daemon named after the verb (`self`) or before it (`global`).
    fn socket(self, global: Target) -> Result<PathBuf> {
        if self.given() && global.given() {
            bail!("say which daemon once: --socket or --dev-id before or after the verb");
        }
        let t = if self.given() { self } else { global };
        match (t.socket, t.dev_id) {
            (Some(p), _) => Ok(p),
            (None, Some(id)) => Ok(Path::new(RUN_DIR).join(format!("{id}.sock"))),
            (None, None) => bail!("say which daemon: --socket PATH or --dev-id N"),
        }
    }
}

/// What a verb addressed to one daemon does.
enum Action {
    /// Send the command and wait this long for the reply (None: no limit).
    Request(Command, Option<Duration>),
    PassFd {
        name: String,
        fd: RawFd,
    },
    WaitReady {
        timeout: f64,
        progress: bool,
    },
    Watch,
}

fn request(command: Command, wait: Duration) -> Result<Action> {
    Ok(Action::Request(command, Some(wait)))
}

impl<A: clap::Args> On<A> {
    /// Runs the verb's action (from its arguments) against the daemon it names.
    fn run(self, global: Global, action: impl FnOnce(A) -> Result<Action>) -> Result<()> {
        let path = self.target.socket(global.target)?;
        let json = self.output.json || global.output.json;
        match action(self.args)? {
            Action::Request(command, wait) => {
                let mut client = Client::connect(&path)?;
                client.set_timeout(wait)?;
                let reply = client.call(command).context(path.display().to_string())?;
                print(&reply, json, "ok")
            }
            Action::PassFd { name, fd } => {
                // SAFETY: F_GETFD only inspects the descriptor table entry.
                if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    bail!("--fd {fd} is not an open file descriptor in this process");
                }
                // SAFETY: checked open above; borrowed only for the duration of the call.
                let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
                let reply: PassFdReply = Client::connect(&path)?.pass_fd(&name, borrowed, None)?;
                print(&reply, json, &format!("passed fd {fd} as {name:?}"))
            }
            Action::WaitReady { timeout, progress } => wait_ready(&path, timeout, progress, json),
            Action::Watch => watch(&path, json),
        }
    }
}

/// One line per verb: its action from its arguments (`list` and `raw` take no daemon reply
/// of their own shape, and are run here directly).
fn run(cli: Cli) -> Result<()> {
    let Cli { global, command } = cli;
    match command {
        Cmd::List { output } => list_verb(&global, output),
        Cmd::Raw { target, line } => raw(global, target, &line),
        Cmd::Info(on) => on.run(global, |_| request(Command::Info, QUICK)),
        Cmd::Stats(on) => on.run(global, |_| request(Command::Stats, QUICK)),
        Cmd::Pause(on) => on.run(global, pause),
        Cmd::Unpause(on) => on.run(global, unpause),
        Cmd::PassFd(on) => on.run(global, |a| {
            Ok(Action::PassFd {
                name: a.name,
                fd: a.fd,
            })
        }),
        Cmd::ListFds(on) => on.run(global, |_| request(Command::ListFds, QUICK)),
        Cmd::CloseFd(on) => on.run(global, |a| {
            request(Command::CloseFd { name: a.name }, QUICK)
        }),
        Cmd::WaitIdle(on) => on.run(global, wait_idle),
        Cmd::Shutdown(on) => on.run(global, |a| {
            request(Command::Shutdown { keep: a.keep }, SLOW)
        }),
        Cmd::MirrorStart(on) => on.run(global, mirror_start),
        Cmd::MirrorWaitReady(on) => on.run(global, |a| {
            let (timeout, progress) = (a.timeout, a.progress);
            Ok(Action::WaitReady { timeout, progress })
        }),
        Cmd::MirrorStop(on) => on.run(global, |_| request(Command::MirrorStop, SLOW)),
        Cmd::DirtyMap(on) => on.run(global, |_| request(Command::DirtyMap, QUICK)),
        Cmd::MirrorSetSpeed(on) => on.run(global, |a| {
            let speed = (a.speed > 0).then_some(a.speed);
            request(Command::MirrorSetSpeed { speed }, QUICK)
        }),
        Cmd::MirrorCopyPause(on) => on.run(global, |_| request(Command::MirrorCopyPause, QUICK)),
        Cmd::MirrorCopyResume(on) => on.run(global, |_| request(Command::MirrorCopyResume, QUICK)),
        Cmd::Watch(on) => on.run(global, |_| Ok(Action::Watch)),
    }
}

fn list_verb(global: &Global, output: Output) -> Result<()> {
    if global.target.given() {
        usage_error(
            "list asks every daemon under /run/ublk-mirror: it takes no --socket or --dev-id",
        );
    }
    list(output.json || global.output.json)
}

fn raw(global: Global, target: Target, line: &str) -> Result<()> {
    if global.output.json {
        usage_error("raw prints the reply line as it is: it takes no --json");
    }
    let path = target.socket(global.target)?;
    let reply = Client::connect(&path)?.raw_line(line)?;
    println!("{reply}");
    Ok(())
}

fn pause(a: PauseArgs) -> Result<Action> {
    let wait = reply_wait(a.timeout)?;
    let timeout = Some(a.timeout);
    Ok(Action::Request(Command::Pause { timeout }, wait))
}

fn unpause(a: UnpauseArgs) -> Result<Action> {
    let image = a.image.map(|p| p.display().to_string());
    let mirror = a.mirror;
    request(Command::Unpause { image, mirror }, SLOW)
}

fn wait_idle(a: WaitIdleArgs) -> Result<Action> {
    let wait = reply_wait(a.timeout)?;
    let timeout = Some(a.timeout);
    Ok(Action::Request(Command::WaitIdle { timeout }, wait))
}

fn mirror_start(a: MirrorStartArgs) -> Result<Action> {
    let (name, names) = match a.names.as_slice() {
        [one] => (one.clone(), Vec::new()),
        _ => (String::new(), a.names),
    };
    let command = Command::MirrorStart {
        name,
        names,
        export: Some(a.export),
        timeout: Some(a.timeout),
        copy: a.copy,
        resync: a.resync,
        speed: (a.speed > 0).then_some(a.speed),
        allow_no_flush: a.allow_no_flush,
        target_is_zero: a.target_is_zero,
    };
    request(command, SLOW)
}

/// `watch`: the snapshot, then each event as the daemon writes it, a line each: the JSON line
/// itself with --json, else `SEQ EVENT key=value ...` with the keys that are set.
fn watch(path: &Path, json: bool) -> Result<()> {
    use std::io::BufRead;
    let mut client = Client::connect(path)?;
    client.set_timeout(Some(QUICK))?;
    let snapshot: control::protocol::Event = client.request(Command::Watch)?;
    print_event(&snapshot, json)?;
    // Events come when they come: no read timeout from here on.
    let mut lines = client.into_lines()?;
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            return Ok(()); // the daemon closed the connection (it exits, or we lagged)
        }
        let ev: control::protocol::Event =
            serde_json::from_str(line.trim_end()).context("an event line")?;
        print_event(&ev, json)?;
    }
}

fn print_event(ev: &control::protocol::Event, json: bool) -> Result<()> {
    use std::io::Write;
    let text = if json {
        serde_json::to_string(ev)?
    } else {
        let mut t = format!("{} {}", ev.seq, ev.event);
        for (k, v) in [
            ("state", &ev.state),
            ("mirror", &ev.mirror),
            ("reason", &ev.reason),
        ] {
            if let Some(v) = v {
                t.push_str(&format!(" {k}={v}"));
            }
        }
        if let Some(c) = &ev.copy {
            t.push_str(&format!(
                " copy={}:{} done={} total={} rate={}{}",
                c.kind,
                c.state,
                c.bytes_done,
                c.bytes_total,
                c.rate,
                if c.paused { " paused" } else { "" }
            ));
        }
        t
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// `v` as JSON text, as the untyped reply printed it in messages (strings quoted, `null`).
fn json_text<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "?".into())
}

/// Polls `stats` until the copy is ready, showing progress if asked.
fn wait_ready(path: &Path, timeout: f64, progress: bool, json: bool) -> Result<()> {
    let limit = timeout_limit(Some(timeout), timeout).map_err(anyhow::Error::msg)?;
    let deadline = limit.map(|d| Instant::now() + d);
    let mut shown = Progress::new(progress);
    loop {
        let mut c = Client::connect(path)?;
        c.set_timeout(Some(QUICK))?;
        let stats: StatsReply = c.request(Command::Stats)?;
        let Some(copy) = stats.mirror.copy() else {
            bail!(
                "no copy or resync is running (mirror state {})",
                json_text(stats.mirror.state())
            );
        };
        shown.show(copy);
        match copy.state.as_str() {
            "ready" => {
                shown.end();
                return ready(copy, json);
            }
            "copying" => {}
            other => {
                shown.end();
                bail!(
                    "the {} ended {other}: {}",
                    json_text(&copy.kind),
                    json_text(&stats.mirror.last_error())
                );
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            bail!("not ready after {timeout} s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The copy is ready: its report (`--json`) or one line.
fn ready(copy: &CopyReport, json: bool) -> Result<()> {
    if json {
        return print(copy, true, "");
    }
    println!(
        "ready: {} copied in {:.1} s",
        human(copy.bytes_done as f64),
        copy.elapsed
    );
    Ok(())
}

/// What `mirror-wait-ready --progress` shows: a bar redrawn in place on a terminal, a line
/// every 2 s otherwise, nothing without `--progress`.
struct Progress {
    progress: bool,
    tty: bool,
    last_line: Option<Instant>,
    /// Characters of the bar drawn last: spaces (not an ANSI erase) wipe what a longer
    /// previous bar left.
    drawn: usize,
}

impl Progress {
    fn new(progress: bool) -> Progress {
        Progress {
            progress,
            tty: progress && std::io::IsTerminal::is_terminal(&std::io::stdout()),
            last_line: None,
            drawn: 0,
        }
    }

    /// Shows one poll of the copy.
    fn show(&mut self, copy: &CopyReport) {
        let (done, total) = (copy.bytes_done as f64, copy.bytes_total as f64);
        let pct = if total > 0.0 {
            100.0 * done / total
        } else {
            100.0
        };
        let eta = copy.eta.map_or("?".to_string(), |e| format!("{e:.0}s"));
        let text = format!(
            "{} {}: {pct:5.1}% {} / {} at {}/s, ETA {eta}",
            copy.kind,
            copy.state,
            human(done),
            human(total),
            human(copy.rate)
        );
        if self.tty {
            let width = 30usize;
            let filled = ((pct / 100.0) * width as f64).round() as usize;
            let bar = format!(
                "[{}{}] {text}",
                "#".repeat(filled.min(width)),
                ".".repeat(width - filled.min(width))
            );
            let wipe = self.drawn.saturating_sub(bar.chars().count());
            self.drawn = bar.chars().count();
            print!("\r{bar}{}", " ".repeat(wipe));
            let _ = std::io::Write::flush(&mut std::io::stdout());
        } else if self.progress
            && self
                .last_line
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
        {
            println!("{text}");
            self.last_line = Some(Instant::now());
        }
    }

    /// Ends the bar's line before anything else is printed.
    fn end(&self) {
        if self.tty {
            println!();
        }
    }
}

/// Prints a reply: its JSON with `--json`, else one `key: value` line per leaf (nested keys
/// joined with `.`, in key order), or `plain` for an empty one.
fn print<T: Serialize>(reply: &T, json: bool, plain: &str) -> Result<()> {
    print!("{}", render(reply, json, plain)?);
    Ok(())
}

/// What `print` prints. The typed reply goes through a JSON object first, so keys come sorted
/// and values are written as JSON writes them (`null`, `1.5`, `[[0,4096]]`), as they were
/// when the reply was printed untyped.
fn render<T: Serialize>(reply: &T, json: bool, plain: &str) -> Result<String> {
    let v = serde_json::to_value(reply)?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    let mut out = String::new();
    match &v {
        Value::Object(map) if !map.is_empty() => render_object("", map, &mut out),
        _ => out = format!("{plain}\n"),
    }
    Ok(out)
}

fn render_object(prefix: &str, map: &serde_json::Map<String, Value>, out: &mut String) {
    use std::fmt::Write;
    for (k, v) in map {
        // Writing to a String cannot fail.
        let _ = match v {
            Value::Object(inner) => {
                render_object(&format!("{prefix}{k}."), inner, out);
                Ok(())
            }
            Value::String(s) => writeln!(out, "{prefix}{k}: {s}"),
            other => writeln!(out, "{prefix}{k}: {other}"),
        };
    }
}

/// One daemon of `list`: its `info`, or why it did not answer.
#[derive(Serialize)]
#[serde(untagged)]
enum Row {
    Up(InfoReply),
    Unreachable { socket: String, error: String },
}

fn list(json: bool) -> Result<()> {
    let entries = match std::fs::read_dir(RUN_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if json {
                println!("[]");
            } else {
                println!("no daemons ({RUN_DIR} does not exist)");
            }
            return Ok(());
        }
        Err(e) => return Err(e).context(RUN_DIR),
    };
    let rows: Vec<Row> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("sock"))
        .map(|p| {
            Client::connect(&p)
                .and_then(|mut c| {
                    c.set_timeout(Some(Duration::from_secs(5)))?;
                    c.request(Command::Info)
                })
                .map_or_else(
                    |e| Row::Unreachable {
                        socket: p.display().to_string(),
                        error: e.to_string(),
                    },
                    Row::Up,
                )
        })
        .collect();
    if json {
        // Through a JSON value, so each object's keys come sorted as before.
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(&rows)?)?
        );
        return Ok(());
    }
    if rows.is_empty() {
        println!("no daemons under {RUN_DIR}");
    }
    for r in rows {
        match r {
            Row::Unreachable { socket, error } => println!("{socket}  unreachable: {error}"),
            Row::Up(i) => println!(
                "{}  {}  {}  image={}  label={}  pid={}",
                i.device, i.state, i.size, i.image, i.label, i.pid
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_every_option_says_its_default() {
        control::help::assert_rule_kept(Cli::command());
    }

    /// Every verb but `list` and `raw` (and each alias) is a protocol command of that name.
    #[test]
    fn verbs_are_protocol_commands() {
        for verb in Cli::command().get_subcommands() {
            let names = std::iter::once(verb.get_name()).chain(verb.get_all_aliases());
            for name in names {
                if ["list", "raw"].contains(&name) {
                    continue;
                }
                let line = format!(r#"{{"v":1,"id":1,"cmd":"{name}","args":{{}}}}"#);
                match serde_json::from_str::<control::protocol::Request>(&line) {
                    Ok(_) => {}
                    Err(e) => assert!(
                        !e.to_string().contains("unknown variant"),
                        "verb {name} is not a protocol command: {e}"
                    ),
                }
            }
        }
    }

    #[test]
    fn verbs_take_only_what_they_use() {
        let parse = |args: &[&str]| Cli::try_parse_from(args);
        assert!(parse(&["ublk-mirror-ctl", "list", "--dev-id", "0"]).is_err());
        assert!(parse(&["ublk-mirror-ctl", "list", "--socket", "/s"]).is_err());
        assert!(parse(&["ublk-mirror-ctl", "list", "--json"]).is_ok());
        assert!(parse(&["ublk-mirror-ctl", "raw", "--json", "--dev-id", "0", "x"]).is_err());
        assert!(parse(&[
            "ublk-mirror-ctl",
            "stats",
            "--timeout",
            "3",
            "--dev-id",
            "0"
        ])
        .is_err());
        assert!(parse(&["ublk-mirror-ctl", "info", "--keep", "--dev-id", "0"]).is_err());
        // Both places work for the verbs that use them.
        assert!(parse(&["ublk-mirror-ctl", "--socket", "/s", "--json", "stats"]).is_ok());
        assert!(parse(&["ublk-mirror-ctl", "stats", "--socket", "/s", "--json"]).is_ok());
        let cli = parse(&["ublk-mirror-ctl", "wait-ready", "--dev-id", "3"]).expect("alias");
        assert!(matches!(cli.command, Cmd::MirrorWaitReady(_)));
    }

    #[test]
    fn a_daemon_is_named_once() {
        let t = |socket: Option<&str>, dev_id: Option<u32>| Target {
            socket: socket.map(PathBuf::from),
            dev_id,
        };
        let path = |verb: Target, global: Target| verb.socket(global).map_err(|e| e.to_string());
        assert_eq!(
            path(t(None, Some(4)), t(None, None)),
            Ok(PathBuf::from("/run/ublk-mirror/4.sock"))
        );
        assert_eq!(
            path(t(None, None), t(Some("/s"), None)),
            Ok(PathBuf::from("/s"))
        );
        assert!(path(t(None, Some(4)), t(Some("/s"), None))
            .expect_err("twice")
            .contains("once"));
        assert!(path(t(None, None), t(None, None))
            .expect_err("none")
            .contains("--socket PATH or --dev-id N"));
    }

    #[test]
    fn zero_timeouts_mean_no_limit_here_as_in_the_daemon() {
        assert_eq!(parse_timeout("0"), Ok(0.0));
        assert_eq!(parse_timeout("2.5"), Ok(2.5));
        assert!(parse_timeout("-1").is_err());
        assert!(parse_timeout("86401").is_err());
        assert!(parse_timeout("soon").is_err());
        // The reply to `pause --timeout 0` is awaited without limit, not for 10 s.
        assert_eq!(reply_wait(0.0).expect("0"), None);
        assert_eq!(reply_wait(30.0).expect("30"), Some(Duration::from_secs(40)));
        let cli = Cli::try_parse_from([
            "ublk-mirror-ctl",
            "pause",
            "--timeout",
            "0",
            "--dev-id",
            "1",
        ])
        .expect("pause --timeout 0");
        let Cmd::Pause(on) = cli.command else {
            panic!("not pause");
        };
        assert_eq!(on.args.timeout, 0.0);
    }

    /// The lines VM scenarios parse (`ctl_get stats mirror.copy.state`, ...) come out of the
    /// typed reply as they came out of the untyped one.
    #[test]
    fn stats_text_is_the_untyped_text() {
        let line = r#"{"fd_receiver":null,"mirror":{"activity_log_bound":1024,"activity_log_extents":2,
            "activity_log_retired":0,"activity_log_waits":4,"activity_log_writes":3,"bitmap_persistent":false,
            "bytes_mirrored":4096,"copy":{"bytes_done":4096,"bytes_total":8192,"elapsed":1.5,
            "eta":2.0,"kind":"copy","paused":false,"rate":2731.0,"speed_limit":null,"state":"copying"},
            "connections":2,"dirty_bytes":4096,"durable":false,"export":"e","export_size":8192,
            "failed_at":null,"in_flight":1,"last_error":null,"ops":1,"range_locks":1,
            "requested":"m.0,m.1","state":"active","target":"m.0","targets":["m.0","m.1"],
            "timeout":10.0},"name":"l","nbd_mirror_failed":0,"ops":{"discard":
            {"bytes":0,"count":0},"errors":0,"flush":{"count":0},"read":{"bytes":0,"count":0},
            "write":{"bytes":4096,"count":1,"fua":0},"write_zeroes":{"bytes":0,"count":0}},
            "reqs_outstanding":1,"reqs_parked":0,"state":"running"}"#;
        let untyped: Value = serde_json::from_str(line).expect("json");
        let typed: StatsReply = serde_json::from_value(untyped.clone()).expect("typed");
        for json in [false, true] {
            let want = render(&untyped, json, "ok").expect("untyped");
            assert_eq!(render(&typed, json, "ok").expect("typed"), want);
        }
        let text = render(&typed, false, "ok").expect("text");
        for l in [
            "mirror.copy.state: copying\n",
            "mirror.activity_log_extents: 2\n",
            "mirror.copy.speed_limit: null\n",
            "mirror.timeout: 10.0\n",
            "mirror.durable: false\n",
            "reqs_outstanding: 1\n",
        ] {
            assert!(text.contains(l), "{l:?} not in\n{text}");
        }
        let empty = control::protocol::ShutdownReply {};
        assert_eq!(render(&empty, false, "ok").expect("empty"), "ok\n");
        assert_eq!(render(&empty, true, "ok").expect("empty"), "{}\n");
    }

    #[test]
    fn defaults_are_the_protocols() {
        let cli = Cli::try_parse_from(["ublk-mirror-ctl", "mirror-start", "t", "--dev-id", "1"])
            .expect("mirror-start");
        let Cmd::MirrorStart(on) = cli.command else {
            panic!("not mirror-start");
        };
        assert_eq!(on.args.timeout, defaults::MIRROR_TIMEOUT);
        assert_eq!((on.args.export.as_str(), on.args.speed), ("", 0));
        let cli = Cli::try_parse_from(["ublk-mirror-ctl", "mirror-start", "t", "--speed", "20M"])
            .expect("speed");
        let Cmd::MirrorStart(on) = cli.command else {
            panic!("not mirror-start");
        };
        assert_eq!(on.args.speed, 20_000_000);
    }
}
