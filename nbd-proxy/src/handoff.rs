//! `nbd-proxy connect`: dial the destination and pass the connected socket to a daemon.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use anyhow::{Context, Result};
use control::client::Client;
use control::protocol::NegotiatedNbd;
use nbd_proxy::address::{Address, Stream};
use nbd_proxy::client::Negotiator;

pub fn connect(
    to: &Address,
    export: &str,
    handoff: &Path,
    name: &str,
    negotiate: bool,
) -> Result<()> {
    // Fail early on what the daemon could not fix: a missing control socket.
    if !handoff.exists() {
        anyhow::bail!(
            "control socket {} does not exist (is the daemon running?)",
            handoff.display()
        );
    }
    let (stream, nbd) = if negotiate {
        let s = to
            .connect()
            .with_context(|| format!("cannot connect to {to}"))?;
        let (s, e) = Negotiator::start(s)
            .and_then(|n| n.go(export))
            .with_context(|| format!("NBD handshake with {to}"))?;
        let nbd = NegotiatedNbd {
            export: e.name,
            size: e.size,
            flags: e.flags,
            block_size: [
                e.block_size.minimum,
                e.block_size.preferred,
                e.block_size.maximum,
            ],
        };
        (s, Some(nbd))
    } else {
        precheck(to, export)?;
        // A fresh connection whose greeting is untouched: the daemon runs the handshake.
        (
            to.connect()
                .with_context(|| format!("cannot connect to {to}"))?,
            None,
        )
    };
    let fd: BorrowedFd<'_> = match &stream {
        Stream::Tcp(s) => s.as_fd(),
        Stream::Unix(s) => s.as_fd(),
    };
    let mut client = Client::connect(handoff)?;
    client
        .pass_fd(name, fd, nbd.clone())
        .with_context(|| format!("passing the socket to {}", handoff.display()))?;
    match nbd {
        Some(n) => println!(
            "handed off {to} export {:?} ({} bytes, negotiated) to {} as {name:?}",
            n.export,
            n.size,
            handoff.display()
        ),
        None => println!(
            "handed off {to} (export {export:?}, handshake left to the daemon) to {} as {name:?}",
            handoff.display()
        ),
    }
    Ok(())
}

/// Checks on a separate connection that the export exists, so a typo fails here, clearly,
/// and not later in the daemon. The handed-off connection is never touched.
fn precheck(to: &Address, export: &str) -> Result<()> {
    let probe = to
        .connect()
        .with_context(|| format!("cannot connect to {to}"))?;
    let mut n = Negotiator::start(probe).with_context(|| format!("NBD greeting from {to}"))?;
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
