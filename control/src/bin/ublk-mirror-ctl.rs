//! `ublk-mirror-ctl`: drive a ublk-mirror daemon through its control socket.

use std::os::fd::{BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use control::client::Client;
use control::protocol::Command;
use serde_json::Value;

const RUN_DIR: &str = "/run/ublk-mirror";

#[derive(Parser)]
#[command(
    name = "ublk-mirror-ctl",
    version,
    about = "Drive a ublk-mirror daemon through its control socket (see control/PROTOCOL.md)"
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, conflicts_with = "dev_id")]
    socket: Option<PathBuf>,
    /// The device id N: the socket is /run/ublk-mirror/N.sock.
    #[arg(long, global = true)]
    dev_id: Option<u32>,
    /// Print the daemon's JSON reply instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Device path, id, size, image, queues, depth, state.
    Info,
    /// Request counters, reqs_outstanding, reqs_parked, nbd_mirror_failed, mirror.
    Stats,
    /// Park new requests, drain, flush and close the image.
    Pause {
        /// Seconds to wait for the drain; at the timeout the pause is undone.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Reopen the image (optionally at a new path of the same size) and resume.
    Unpause {
        #[arg(long)]
        image: Option<PathBuf>,
        /// fd name to mirror to, or "null".
        #[arg(long)]
        mirror: Option<String>,
    },
    /// Pass an inherited fd (e.g. a connected NBD socket) under NAME.
    PassFd {
        name: String,
        /// The fd number in this process (inherited from the caller).
        #[arg(long)]
        fd: RawFd,
    },
    /// The fds the daemon holds.
    ListFds,
    /// Close a stored fd.
    CloseFd { name: String },
    /// Wait until no request is outstanding.
    WaitIdle {
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Stop the daemon gracefully (as SIGTERM): the device is deleted.
    Shutdown {
        /// Detach instead (live upgrade): drain and flush, then exit leaving the device in
        /// place; guest I/O waits until `ublk-mirror recover --dev-id N` takes it over.
        #[arg(long)]
        keep: bool,
    },
    /// Mirror every write to the NBD target on the stored fd NAME.
    MirrorStart {
        name: String,
        /// Export name for the handshake (when the fd was not passed negotiated).
        #[arg(long)]
        export: Option<String>,
        /// Seconds a request may wait for the target before the mirror fails (0: forever).
        #[arg(long)]
        timeout: Option<f64>,
        /// Also copy the whole device in the background (sparse-aware).
        #[arg(long, conflicts_with = "resync")]
        copy: bool,
        /// Copy only what is out of sync (after a failure).
        #[arg(long)]
        resync: bool,
        /// Copy rate limit, bytes per second of device covered (suffixes K, M, G, KiB, MiB, GiB).
        #[arg(long, value_parser = parse_size)]
        speed: Option<u64>,
    },
    /// Wait until the background copy or resync is ready (actively synced).
    WaitReady {
        #[arg(long, default_value_t = 86_400.0)]
        timeout: f64,
        /// Show progress: a bar on a terminal, a line every 2 s otherwise.
        #[arg(long)]
        progress: bool,
    },
    /// End mirroring cleanly and clear nbd_mirror_failed.
    MirrorStop,
    /// The out-of-sync extents (offset, length).
    DirtyMap,
    /// Every daemon under /run/ublk-mirror with its state.
    List,
    /// Send one line verbatim and print the reply line (for debugging the protocol).
    Raw { line: String },
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

fn socket_of(socket: Option<PathBuf>, dev_id: Option<u32>) -> Result<PathBuf> {
    match (socket, dev_id) {
        (Some(p), _) => Ok(p),
        (None, Some(id)) => Ok(Path::new(RUN_DIR).join(format!("{id}.sock"))),
        (None, None) => bail!("say which daemon: --socket PATH or --dev-id N"),
    }
}

fn run(cli: Cli) -> Result<()> {
    let Cli {
        socket,
        dev_id,
        json,
        command,
    } = cli;
    let (command, wait) = match command {
        Cmd::List => return list(json),
        Cmd::Raw { line } => {
            let path = socket_of(socket, dev_id)?;
            let reply = Client::connect(&path)?.raw_line(&line)?;
            println!("{reply}");
            return Ok(());
        }
        Cmd::Info => (Command::Info, 10.0),
        Cmd::Stats => (Command::Stats, 10.0),
        Cmd::Pause { timeout } => (
            Command::Pause {
                timeout: Some(timeout),
            },
            timeout + 10.0,
        ),
        Cmd::Unpause { image, mirror } => (
            Command::Unpause {
                image: image.map(|p| p.display().to_string()),
                mirror,
            },
            60.0,
        ),
        Cmd::ListFds => (Command::ListFds, 10.0),
        Cmd::CloseFd { name } => (Command::CloseFd { name }, 10.0),
        Cmd::WaitIdle { timeout } => (
            Command::WaitIdle {
                timeout: Some(timeout),
            },
            timeout + 10.0,
        ),
        Cmd::Shutdown { keep } => (Command::Shutdown { keep }, 40.0),
        Cmd::MirrorStart {
            name,
            export,
            timeout,
            copy,
            resync,
            speed,
        } => (
            Command::MirrorStart {
                name,
                export,
                timeout,
                copy,
                resync,
                speed,
            },
            60.0,
        ),
        Cmd::WaitReady { timeout, progress } => {
            let path = socket_of(socket, dev_id)?;
            return wait_ready(&path, timeout, progress, json);
        }
        Cmd::MirrorStop => (Command::MirrorStop, 60.0),
        Cmd::DirtyMap => (Command::DirtyMap, 10.0),
        Cmd::PassFd { name, fd } => {
            // SAFETY: F_GETFD only inspects the descriptor table entry.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                bail!("--fd {fd} is not an open file descriptor in this process");
            }
            // SAFETY: checked open above; borrowed only for the duration of the call.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            let path = socket_of(socket, dev_id)?;
            let v = Client::connect(&path)?.pass_fd(&name, borrowed, None)?;
            return print(&v, json, &format!("passed fd {fd} as {name:?}"));
        }
    };
    let path = socket_of(socket, dev_id)?;
    let mut client = Client::connect(&path)?;
    client.set_timeout(Some(Duration::from_secs_f64(wait)))?;
    let v = client
        .request(command)
        .context(path.display().to_string())?;
    print(&v, json, "ok")
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with an optional unit"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000 * 1000,
        "g" | "gb" => 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => return Err(format!("{s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?}: too large"))
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

/// Polls `stats` until the copy is ready, showing progress if asked.
fn wait_ready(path: &Path, timeout: f64, progress: bool, json: bool) -> Result<()> {
    let tty = progress && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(timeout);
    let mut last_line = std::time::Instant::now() - Duration::from_secs(10);
    loop {
        let mut c = Client::connect(path)?;
        c.set_timeout(Some(Duration::from_secs(10)))?;
        let stats = c.request(Command::Stats)?;
        let copy = &stats["mirror"]["copy"];
        if copy.is_null() {
            bail!(
                "no copy or resync is running (mirror state {})",
                stats["mirror"]["state"]
            );
        }
        let state = copy["state"].as_str().unwrap_or("?");
        let done = copy["bytes_done"].as_f64().unwrap_or(0.0);
        let total = copy["bytes_total"].as_f64().unwrap_or(0.0);
        let rate = copy["rate"].as_f64().unwrap_or(0.0);
        let pct = if total > 0.0 {
            100.0 * done / total
        } else {
            100.0
        };
        let eta = copy["eta"]
            .as_f64()
            .map_or("?".to_string(), |e| format!("{e:.0}s"));
        let text = format!(
            "{} {state}: {pct:5.1}% {} / {} at {}/s, ETA {eta}",
            copy["kind"].as_str().unwrap_or("copy"),
            human(done),
            human(total),
            human(rate)
        );
        if tty {
            let width = 30usize;
            let filled = ((pct / 100.0) * width as f64).round() as usize;
            print!(
                "\r[{}{}] {text}\x1b[K",
                "#".repeat(filled.min(width)),
                ".".repeat(width - filled.min(width))
            );
            let _ = std::io::Write::flush(&mut std::io::stdout());
        } else if progress && last_line.elapsed() >= Duration::from_secs(2) {
            println!("{text}");
            last_line = std::time::Instant::now();
        }
        match state {
            "ready" => {
                if tty {
                    println!();
                }
                return if json {
                    print(copy, true, "")
                } else {
                    println!(
                        "ready: {} copied in {:.1} s",
                        human(done),
                        copy["elapsed"].as_f64().unwrap_or(0.0)
                    );
                    Ok(())
                };
            }
            "copying" => {}
            other => {
                if tty {
                    println!();
                }
                bail!(
                    "the {} ended {other}: {}",
                    copy["kind"],
                    stats["mirror"]["last_error"]
                );
            }
        }
        if std::time::Instant::now() >= deadline {
            bail!("not ready after {timeout} s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn print(v: &Value, json: bool, plain: &str) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    match v {
        Value::Object(map) if !map.is_empty() => print_object("", map),
        _ => println!("{plain}"),
    }
    Ok(())
}

fn print_object(prefix: &str, map: &serde_json::Map<String, Value>) {
    for (k, v) in map {
        match v {
            Value::Object(inner) => print_object(&format!("{prefix}{k}."), inner),
            Value::String(s) => println!("{prefix}{k}: {s}"),
            other => println!("{prefix}{k}: {other}"),
        }
    }
}

fn list(json: bool) -> Result<()> {
    let mut rows = Vec::new();
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
    for entry in entries.flatten() {
        let p = entry.path();
        if p.extension().and_then(|e| e.to_str()) != Some("sock") {
            continue;
        }
        let row = Client::connect(&p)
            .and_then(|mut c| {
                c.set_timeout(Some(Duration::from_secs(5)))?;
                c.request(Command::Info)
            })
            .unwrap_or_else(|e| serde_json::json!({ "socket": p.display().to_string(), "error": e.to_string() }));
        rows.push(row);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no daemons under {RUN_DIR}");
    }
    for r in rows {
        let g = |k: &str| {
            r.get(k)
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                })
                .unwrap_or_default()
        };
        if r.get("error").is_some() {
            println!("{}  unreachable: {}", g("socket"), g("error"));
        } else {
            println!(
                "{}  {}  {}  image={}  label={}",
                g("device"),
                g("state"),
                g("size"),
                g("image"),
                g("label")
            );
        }
    }
    Ok(())
}
