//! `nbd-proxy serve`: export image files over NBD (the migration's destination side).
//! `nbd-proxy connect`: dial an NBD export and hand the connected socket to a ublk-mirror
//! daemon's control socket (the source side).

mod handoff;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nbd_proxy::address::{Address, Stream};
use nbd_proxy::server::{Export, Server, ServerConfig};

#[derive(Parser)]
#[command(
    name = "nbd-proxy",
    version,
    about = "NBD export of image files, and the source side's connect-and-hand-off",
    long_about = "NBD export of image files (the migration's destination side), and the source \
                  side's connect-and-hand-off to a ublk-mirror daemon.\n\n\
                  Durations are seconds, except --reorder-jitter (milliseconds, a test knob).\n\n\
                  Logging: RUST_LOG=debug|info|warn (default info), to stderr, as plain lines \
                  (\"TIME LEVEL nbd-proxy[PID]: message\", as ublk-mirror's), never coloured.",
    color = clap::ColorChoice::Never
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export image files over NBD until SIGTERM/SIGINT.
    ///
    /// Advertises FLUSH, FUA, TRIM, WRITE_ZEROES (with FAST_ZERO) and CAN_MULTI_CONN; FLUSH and
    /// FUA reach stable storage (fdatasync) before the reply; TRIM and WRITE_ZEROES read back as
    /// zeros. Prints "listening on ADDRESS" on stdout once it accepts connections.
    Serve(ServeArgs),
    /// Connect to an NBD export and pass the connected socket to a ublk-mirror daemon.
    Connect(ConnectArgs),
    /// Send one command to a running `serve --control` socket and print its answer, e.g.
    /// `nbd-proxy control --socket /run/nbd-proxy.sock remove disk` at cutover. Exits 1 when
    /// the server answers `error ...`.
    Control(ControlArgs),
}

#[derive(clap::Args)]
struct ControlArgs {
    /// The server's --control socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// `add NAME=PATH [ro]`, `remove NAME` or `list`.
    #[arg(required = true, num_args = 1..)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// NAME=PATH of an image to export; repeat for several [default: none; add them at run
    /// time through --control].
    #[arg(long = "export", value_name = "NAME=PATH")]
    exports: Vec<String>,
    /// Where to listen: tcp:ADDR:PORT or unix:PATH.
    #[arg(long, value_name = "ADDRESS")]
    listen: Address,
    /// Export every image read-only.
    #[arg(long)]
    read_only: bool,
    /// Allow a TCP listen address that is not loopback without TLS. Without TLS anyone who can
    /// reach the port can write the exported disks.
    #[arg(long)]
    insecure_listen: bool,
    /// Server certificate (PEM). With --tls-key, TLS is offered and required: clients must
    /// NBD_OPT_STARTTLS before anything else [default: none, plain NBD].
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM) [default: none; required with --tls-cert].
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that signs client certificates: with it, a client without a valid certificate
    /// is refused during the TLS handshake [default: none, clients are not verified].
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Keep each TLS session in this process, relayed by a thread per connection. By default,
    /// once a client has chosen its export, the session moves into the kernel (kTLS: the
    /// socket is served as a plain one and the kernel encrypts), where the kernel has TLS;
    /// where it has not, the relay is used anyway and the log says why.
    #[arg(long, requires = "tls_cert")]
    tls_relay: bool,
    /// Unix socket for adding and removing exports at run time, one command per line:
    /// `add NAME=PATH [ro]`, `remove NAME` (flushes, drains and closes its connections, then
    /// releases the image), `list`. Each is answered with one line, `ok ...` or `error ...`
    /// [default: none, the exports are fixed].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Seconds a client has to finish the handshake, at least 1 (no "0 for no limit": a client
    /// that never finishes would hold a connection slot for ever).
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = parse_handshake_timeout)]
    handshake_timeout: u64,
    /// Connections at once (1 or more); more are refused.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = parse_max_connections)]
    max_connections: usize,
    /// Requests executed concurrently per connection (1 to 64).
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u8).range(1..=64))]
    workers: u8,
    /// TEST ONLY: delay each request by a random 0..=MS milliseconds so replies come back out
    /// of order; 0: off.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    reorder_jitter: u64,
}

#[derive(clap::Args)]
struct ConnectArgs {
    /// The NBD server: tcp:ADDR:PORT or unix:PATH.
    #[arg(long, value_name = "ADDRESS")]
    to: Address,
    /// Export name on the server [default: "", the server's default export].
    #[arg(
        long,
        value_name = "NAME",
        default_value = "",
        hide_default_value = true
    )]
    export: String,
    /// The ublk-mirror daemon's control socket.
    #[arg(long, value_name = "PATH")]
    handoff: PathBuf,
    /// Name under which the daemon stores the socket (referenced later by `mirror-start NAME`).
    /// With --connections N above 1 the sockets are stored as NAME.0 ... NAME.N-1.
    #[arg(long)]
    name: String,
    /// Connections to open and hand over, all to the same export: a daemon with Q queues
    /// drives up to Q of them, one per queue, which needs an export with CAN_MULTI_CONN.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=32))]
    connections: u16,
    /// Complete the NBD handshake here (through NBD_OPT_GO) and hand off a socket already in
    /// the transmission phase, with the export's size and flags. By default the daemon runs the
    /// handshake itself on the socket it receives.
    #[arg(long)]
    negotiate: bool,
    /// CA (PEM) to verify the server with. Turns TLS on: the proxy negotiates (STARTTLS, then
    /// GO) and then moves the session into the kernel (kTLS) and hands the daemon the TCP
    /// socket itself, in the transmission phase, and exits. Where the kernel has no TLS (or
    /// with --tls-relay) it hands over one end of a socketpair instead and stays running to
    /// relay between it and the TLS session until either side closes [default: none, plain
    /// NBD].
    #[arg(long, value_name = "PATH")]
    tls_ca: Option<PathBuf>,
    /// With --tls-ca: always relay through this process (a thread per connection), never
    /// kTLS.
    #[arg(long, requires = "tls_ca")]
    tls_relay: bool,
    /// Client certificate (PEM), for servers that verify clients [default: none].
    #[arg(long, value_name = "PATH", requires = "tls_key", requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM) [default: none; required with --tls-cert].
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name to verify in the server's certificate [default: the --to host, or "localhost" for
    /// a unix socket].
    #[arg(long, value_name = "NAME")]
    tls_hostname: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    control::logging::init("nbd-proxy", "");
    let res = match cli.command {
        Command::Serve(a) => serve(a),
        Command::Connect(a) => {
            let tls = a.tls_ca.as_ref().map(|ca| handoff::TlsClient {
                ca: ca.clone(),
                identity: a.tls_cert.clone().zip(a.tls_key.clone()),
                hostname: a.tls_hostname.clone(),
                relay: a.tls_relay,
            });
            handoff::connect_n(
                &a.to,
                &a.export,
                &a.handoff,
                &a.name,
                a.connections,
                a.negotiate,
                tls,
            )
        }
        Command::Control(a) => control_client(&a),
    };
    if let Err(e) = res {
        eprintln!("nbd-proxy: error: {e:#}");
        std::process::exit(1);
    }
}

/// `--handshake-timeout`: seconds, at least 1. Where other timeouts take 0 for "no limit", this
/// one refuses it: a client that never finishes its handshake would hold a slot for ever.
fn parse_handshake_timeout(s: &str) -> std::result::Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err(
            "0 would mean no limit, which the handshake does not take (a client that \
                      never finishes would hold a connection slot for ever): give 1 or more \
                      seconds"
                .into(),
        ),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?}: expected a whole number of seconds")),
    }
}

/// `--max-connections`: 1 or more.
fn parse_max_connections(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("at least 1 (0 would refuse every client)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?}: expected a whole number")),
    }
}

fn control_client(a: &ControlArgs) -> Result<()> {
    let mut conn = UnixStream::connect(&a.socket)
        .with_context(|| format!("connecting to {}", a.socket.display()))?;
    writeln!(conn, "{}", a.command.join(" ")).context("sending the command")?;
    conn.shutdown(std::net::Shutdown::Write)
        .context("sending the command")?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .context("reading the answer")?;
    let answer = answer.trim_end();
    match answer.strip_prefix("ok") {
        Some(rest) => {
            println!("{}", rest.trim_start());
            Ok(())
        }
        None if answer.is_empty() => bail!("the server closed the connection without answering"),
        None => bail!("{}", answer.strip_prefix("error ").unwrap_or(answer)),
    }
}

fn parse_export(spec: &str, read_only: bool) -> Result<Export> {
    let (name, path) = spec
        .split_once('=')
        .with_context(|| format!("--export {spec:?}: expected NAME=PATH"))?;
    Ok(Export::open(name, path.as_ref(), read_only)?)
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

fn serve(args: ServeArgs) -> Result<()> {
    let server = Server::new(server_config(&args)?);
    for spec in &args.exports {
        server.add_export(parse_export(spec, args.read_only)?)?;
    }
    let tls = server.config.tls.is_some();
    let listener = Listener::bind(&args.listen, tls, args.insecure_listen)?;
    let shown = listener.shown()?;
    if let Some(path) = &args.control {
        start_control(server.clone(), path.clone(), args.read_only)?;
    }
    install_shutdown(server.clone(), &listener, args.control.clone())?;
    println!("listening on {shown}");
    std::io::stdout().flush()?;
    log::info!("listening on {shown}");
    loop {
        let Some((stream, peer)) = listener.accept() else {
            continue;
        };
        let server = server.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || server.serve_connection(stream, &peer));
        if let Err(e) = spawned {
            log::error!("cannot start a connection thread: {e}");
        }
    }
}

/// The server's configuration from `serve`'s options (TLS loaded here).
fn server_config(args: &ServeArgs) -> Result<ServerConfig> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(nbd_proxy::tls::server_config(
            cert,
            key,
            args.tls_client_ca.as_deref(),
        )?),
        _ => None,
    };
    if args.reorder_jitter > 0 {
        log::warn!(
            "--reorder-jitter {} ms: test mode, requests are delayed at random",
            args.reorder_jitter
        );
    }
    Ok(ServerConfig {
        tls,
        tls_relay: args.tls_relay,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        max_connections: args.max_connections,
        workers_per_connection: usize::from(args.workers),
        reorder_jitter_ms: args.reorder_jitter,
        ..ServerConfig::default()
    })
}

impl Listener {
    /// Listens on `at`; a TCP address that is not loopback needs TLS (or `insecure`).
    fn bind(at: &Address, tls: bool, insecure: bool) -> Result<Listener> {
        Ok(match at {
            Address::Tcp(a) => {
                let addrs: Vec<_> = a
                    .to_socket_addrs()
                    .with_context(|| format!("resolving {a}"))?
                    .collect();
                if !tls && !insecure && addrs.iter().any(|s| !s.ip().is_loopback()) {
                    bail!(
                        "--listen tcp:{a} is not a loopback address: without TLS anyone who \
                         reaches it can write the exported disks; configure \
                         --tls-cert/--tls-key, or pass --insecure-listen to do it anyway"
                    );
                }
                Listener::Tcp(
                    TcpListener::bind(addrs.as_slice()).with_context(|| format!("binding {a}"))?,
                )
            }
            Address::Unix(p) => {
                remove_stale_socket(p)?;
                Listener::Unix(
                    UnixListener::bind(p).with_context(|| format!("binding {}", p.display()))?,
                    p.clone(),
                )
            }
        })
    }

    /// Where it listens, as `--listen` spells it (the port chosen, for `tcp:HOST:0`).
    fn shown(&self) -> Result<String> {
        Ok(match self {
            Listener::Tcp(l) => format!("tcp:{}", l.local_addr()?),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        })
    }

    /// The next connection and its peer's name; `None` (logged) if accept failed.
    fn accept(&self) -> Option<(Stream, String)> {
        let accepted = match self {
            Listener::Tcp(l) => l.accept().map(|(s, peer)| {
                let _ = s.set_nodelay(true);
                (Stream::Tcp(s), peer.to_string())
            }),
            Listener::Unix(l, p) => l
                .accept()
                .map(|(s, _)| (Stream::Unix(s), format!("unix:{}", p.display()))),
        };
        accepted.map_err(|e| log::warn!("accept: {e}")).ok()
    }
}

/// A socket file nobody listens on (left by a killed process) is replaced; a live one is not.
fn remove_stale_socket(p: &std::path::Path) -> Result<()> {
    if p.exists() {
        if UnixStream::connect(p).is_ok() {
            bail!("{} is in use by a running server", p.display());
        }
        std::fs::remove_file(p).with_context(|| format!("removing stale {}", p.display()))?;
    }
    Ok(())
}

/// SIGTERM/SIGINT: stop taking requests, answer what is in flight, flush, exit 0.
fn install_shutdown(
    server: Arc<Server>,
    listener: &Listener,
    control: Option<PathBuf>,
) -> Result<()> {
    let sock = match listener {
        Listener::Unix(_, p) => Some(p.clone()),
        Listener::Tcp(_) => None,
    };
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: shutting down (finishing requests in flight)");
                server.shutdown(Duration::from_secs(30));
                for p in sock.iter().chain(control.iter()) {
                    let _ = std::fs::remove_file(p);
                }
                log::info!("shut down");
                std::process::exit(0);
            }
        })?;
    Ok(())
}

fn start_control(server: Arc<Server>, path: PathBuf, read_only: bool) -> Result<()> {
    remove_stale_socket(&path)?;
    let l = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in l.incoming().flatten() {
                let server = server.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        let Ok(w) = conn.try_clone() else { return };
                        let mut w = w;
                        for line in BufReader::new(conn).take(1 << 20).lines() {
                            let Ok(line) = line else { return };
                            let answer = control_command(&server, line.trim(), read_only);
                            if writeln!(w, "{answer}").is_err() {
                                return;
                            }
                        }
                    });
            }
        })?;
    Ok(())
}

use std::io::Read as _;

fn control_command(server: &Server, line: &str, default_ro: bool) -> String {
    let mut words = line.split_whitespace();
    let result: Result<String> = match (words.next(), words.next(), words.next()) {
        (Some("list"), None, None) => Ok(server.export_names().join(" ")),
        (Some("add"), Some(spec), ro) => {
            let read_only = default_ro || ro == Some("ro");
            parse_export(spec, read_only)
                .and_then(|e| server.add_export(e).map_err(Into::into))
                .map(|()| format!("added {spec}"))
        }
        (Some("remove"), Some(name), None) => server
            .remove_export(name)
            .map(|n| format!("removed {name} (flushed; {n} connections closed)"))
            .map_err(Into::into),
        _ => Err(anyhow::anyhow!(
            "unknown command {line:?}; expected: add NAME=PATH [ro] | remove NAME | list"
        )),
    };
    match result {
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("error {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent_and_every_option_says_its_default() {
        control::help::assert_rule_kept(Cli::command());
    }

    #[test]
    fn zero_is_refused_where_no_limit_is_unsafe() {
        assert_eq!(parse_handshake_timeout("10"), Ok(10));
        assert!(parse_handshake_timeout("0")
            .expect_err("0")
            .contains("1 or more seconds"));
        assert!(parse_handshake_timeout("-1").is_err());
        assert_eq!(parse_max_connections("64"), Ok(64));
        assert!(parse_max_connections("0").is_err());
    }
}
