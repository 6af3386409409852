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
    /// Stop the daemon gracefully (as SIGTERM).
    Shutdown,
    /// Mirror every write to the NBD target on the stored fd NAME.
    MirrorStart {
        name: String,
        /// Export name for the handshake (when the fd was not passed negotiated).
        #[arg(long)]
        export: Option<String>,
        /// Seconds a request may wait for the target before the mirror fails (0: forever).
        #[arg(long)]
        timeout: Option<f64>,
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
        Cmd::Shutdown => (Command::Shutdown, 10.0),
        Cmd::MirrorStart {
            name,
            export,
            timeout,
        } => (
            Command::MirrorStart {
                name,
                export,
                timeout,
            },
            60.0,
        ),
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
