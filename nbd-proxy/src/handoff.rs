//! `nbd-proxy connect`: dial the destination and pass the connected socket to a daemon.

use std::io::Write as _;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use control::client::Client;
use control::protocol::NegotiatedNbd;
use nbd_proxy::address::{Address, Stream};
use nbd_proxy::client::{Export, Negotiator};

/// TLS settings of `connect`.
pub struct TlsClient {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
    pub hostname: Option<String>,
    /// Relay through a thread here even where the kernel could carry the session (kTLS).
    pub relay: bool,
}

/// `connect --connections N`: N connections, each handed over as NAME.i (or NAME when N is
/// 1). With TLS each is set up on a thread of its own; one relayed in user space keeps its
/// thread, and this returns when all have ended.
pub fn connect_n(
    to: &Address,
    export: &str,
    handoff: &Path,
    name: &str,
    connections: u16,
    negotiate: bool,
    tls: Option<TlsClient>,
) -> Result<()> {
    if connections <= 1 {
        return connect(to, export, handoff, name, negotiate, tls);
    }
    let names: Vec<String> = (0..connections).map(|i| format!("{name}.{i}")).collect();
    let Some(tls) = tls else {
        for n in &names {
            connect(to, export, handoff, n, negotiate, None)?;
        }
        return Ok(());
    };
    let tls = std::sync::Arc::new(tls);
    let relays: Vec<_> = names
        .into_iter()
        .map(|n| {
            let (to, export, handoff, tls) = (
                to.clone(),
                export.to_owned(),
                handoff.to_owned(),
                tls.clone(),
            );
            std::thread::spawn(move || connect_tls(&to, &export, &handoff, &n, &tls))
        })
        .collect();
    let mut first_err = None;
    for r in relays {
        let res = r
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a relay thread panicked")));
        if let Err(e) = res {
            log::error!("{e:#}");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

pub fn connect(
    to: &Address,
    export: &str,
    handoff: &Path,
    name: &str,
    negotiate: bool,
    tls: Option<TlsClient>,
) -> Result<()> {
    // Fail early on what the daemon could not fix: a missing control socket.
    if !handoff.exists() {
        anyhow::bail!(
            "control socket {} does not exist (is the daemon running?)",
            handoff.display()
        );
    }
    if let Some(tls) = tls {
        return connect_tls(to, export, handoff, name, &tls);
    }
    if negotiate {
        let s = to
            .connect()
            .with_context(|| format!("cannot connect to {to}"))?;
        let (s, e) = Negotiator::start(s)
            .and_then(|n| n.go(export))
            .with_context(|| format!("NBD handshake with {to}"))?;
        let nbd = describe(e);
        pass(handoff, name, &s, Some(nbd.clone()))?;
        println!(
            "handed off {to} export {:?} ({} bytes, negotiated) to {} as {name:?}",
            nbd.export,
            nbd.size,
            handoff.display()
        );
    } else {
        precheck(to, export)?;
        // A fresh connection whose greeting is untouched: the daemon runs the handshake.
        let s = to
            .connect()
            .with_context(|| format!("cannot connect to {to}"))?;
        pass(handoff, name, &s, None)?;
        println!(
            "handed off {to} (export {export:?}, handshake left to the daemon) to {} as {name:?}",
            handoff.display()
        );
    }
    Ok(())
}

fn describe(e: Export) -> NegotiatedNbd {
    NegotiatedNbd {
        export: e.name,
        size: e.size,
        flags: e.flags,
        block_size: e.block_size.to_array(),
    }
}

fn pass(handoff: &Path, name: &str, stream: &Stream, nbd: Option<NegotiatedNbd>) -> Result<()> {
    let fd: BorrowedFd<'_> = match stream {
        Stream::Tcp(s) => s.as_fd(),
        Stream::Unix(s) => s.as_fd(),
    };
    Client::connect(handoff)?
        .pass_fd::<control::client::Ignored>(name, fd, nbd)
        .with_context(|| format!("passing the socket to {}", handoff.display()))?;
    Ok(())
}

/// Checks on a separate connection that the export exists, so a typo fails here, clearly,
/// and not later in the daemon. The handed-off connection is never touched.
fn precheck(to: &Address, export: &str) -> Result<()> {
    let probe = to
        .connect()
        .with_context(|| format!("cannot connect to {to}"))?;
    let mut n = Negotiator::start(probe).with_context(|| format!("NBD greeting from {to}"))?;
    if n.is_oldstyle() {
        // Its one export came with the greeting; there is no name to get wrong.
        let (_, e) = n.go(export)?;
        log::info!(
            "{to} speaks the oldstyle handshake: one export, {} bytes, flags {:#x}",
            e.size,
            e.flags
        );
        return Ok(());
    }
    match n.info(export) {
        Ok(e) => log::info!(
            "export {export:?} on {to}: {} bytes, flags {:#x}",
            e.size,
            e.flags
        ),
        Err(nbd_proxy::client::ClientError::Refused { reply, .. })
            if reply == nbd_proxy::proto::rep::ERR_UNSUP =>
        {
            log::info!("{to} does not support NBD_OPT_INFO; not pre-checking export {export:?}")
        }
        Err(e) => return Err(e).with_context(|| format!("checking export {export:?} on {to}")),
    }
    let _ = n.abort();
    Ok(())
}

/// With TLS: negotiate here (STARTTLS, then GO), then hand the daemon the TCP socket with the
/// session moved into the kernel (kTLS) and return; or, where the kernel cannot carry it (or
/// with `relay`), the plain end of a socketpair, relaying until either side closes.
fn connect_tls(
    to: &Address,
    export: &str,
    handoff: &Path,
    name: &str,
    tls: &TlsClient,
) -> Result<()> {
    let cfg = nbd_proxy::tls::client_config(
        &tls.ca,
        tls.identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path())),
    )?;
    let host = tls.hostname.clone().unwrap_or_else(|| match to {
        Address::Tcp(a) => a
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .unwrap_or_default(),
        Address::Unix(_) => "localhost".to_owned(),
    });
    let wire = to
        .connect()
        .with_context(|| format!("cannot connect to {to}"))?;
    let (wire, flags) = Negotiator::start(wire)
        .and_then(|n| n.starttls())
        .with_context(|| format!("NBD_OPT_STARTTLS with {to}"))?;
    // A server that stalls in the TLS handshake or GO cannot hang connect.
    wire.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let session = nbd_proxy::tls::client_session(&cfg, nbd_proxy::tls::server_name(&host)?)?;
    let verifying = || format!("TLS handshake with {to} (verifying {host:?})");
    let session = nbd_proxy::tls::Session::handshake(session, wire).with_context(verifying)?;
    let (session, e) = Negotiator::with_flags(session, flags)
        .go(export)
        .with_context(|| format!("NBD handshake over TLS with {to} (verifying {host:?})"))?;
    let label = format!("relay to {to}");
    let (stream, carrier) = session
        .into_transmission(tls.relay, &label)
        .with_context(|| format!("TLS with {to}: setting up the transmission phase"))?;
    stream
        .set_read_timeout(None)
        .context("clearing the handshake's read timeout")?;
    let nbd = describe(e);
    pass(handoff, name, &stream, Some(nbd.clone()))?;
    // The daemon holds its own copy of the fd now; ours would keep the socket open after it.
    drop(stream);
    let (how, relaying) = match &carrier {
        nbd_proxy::tls::Carrier::Kernel => ("TLS in the kernel", ""),
        nbd_proxy::tls::Carrier::Relay(_) => ("TLS", "; relaying"),
    };
    println!(
        "handed off {to} export {:?} ({} bytes, {how}, negotiated) to {} as {name:?}{relaying}",
        nbd.export,
        nbd.size,
        handoff.display()
    );
    let nbd_proxy::tls::Carrier::Relay(pump) = carrier else {
        return Ok(());
    };
    let _ = std::io::stdout().flush();
    let _ = pump.join();
    log::info!("relay to {to} ended");
    Ok(())
}

/// How long the server has, after STARTTLS, to finish the TLS handshake and answer GO
/// (generous: the daemon's own plain handshake has 10 s, TLS under emulation is slower).
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
