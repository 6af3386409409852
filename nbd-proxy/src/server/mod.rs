//! The NBD server behind `nbd-proxy serve`: image files exported to any number of concurrent,
//! pipelined clients.
//!
//! One thread per connection reads requests; a small pool of worker threads per connection
//! executes them with pread/pwrite, so one client's slow request never blocks another client,
//! and requests of one client may complete out of order (as NBD allows). A byte budget per
//! connection bounds the memory held by queued WRITE payloads.

mod handshake;
mod transmission;
mod unpoison;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use crate::address::Stream;
use crate::file_lock::{lock, LockMode};
use crate::proto::tx_flags;
use unpoison::Unpoisoned;

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A client must finish the handshake within this time.
    pub handshake_timeout: Duration,
    /// Connections beyond this are refused at accept.
    pub max_connections: usize,
    /// Worker threads per connection (requests executed concurrently).
    pub workers_per_connection: usize,
    /// Bytes of WRITE payload a connection may hold in memory before its reader waits.
    pub connection_budget: u64,
    /// Test only: delay each request by a random 0..=N ms, so replies come out of order.
    pub reorder_jitter_ms: u64,
    /// With TLS configured, clients must STARTTLS before anything else.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// With TLS: keep every session in user space, relayed by a thread per connection,
    /// instead of moving it into the kernel (kTLS) for the transmission phase.
    pub tls_relay: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 64,
            workers_per_connection: 4,
            connection_budget: 128 << 20,
            reorder_jitter_ms: 0,
            tls: None,
            tls_relay: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export {name:?}: cannot open {path}: {source}")]
    Open {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("export {name:?}: {path} is locked by another process (a ublk-mirror daemon or another export)")]
    Locked { name: String, path: PathBuf },
    #[error("export {name:?}: {path} is not a regular file")]
    NotRegular { name: String, path: PathBuf },
    #[error("export {0:?} already exists")]
    Exists(String),
    #[error("no export named {0:?}")]
    Unknown(String),
    #[error("export name {0:?} is invalid (1..=4096 bytes of UTF-8 without NUL or '=')")]
    BadName(String),
}

/// One exported image.
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
    pub read_only: bool,
    removed: AtomicBool,
    /// Connections in the transmission phase on this export, to end them on removal.
    conns: Mutex<Vec<(u64, Stream)>>,
    conns_done: Condvar,
}

impl Export {
    /// Opens and exclusively locks `path`.
    pub fn open(name: &str, path: &Path, read_only: bool) -> Result<Export, ExportError> {
        if name.is_empty() || name.len() > 4096 || name.contains(['\0', '=']) {
            return Err(ExportError::BadName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| ExportError::Open {
                name: name.to_owned(),
                path: path.to_owned(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| ExportError::Open {
            name: name.to_owned(),
            path: path.to_owned(),
            source,
        })?;
        if !meta.is_file() {
            return Err(ExportError::NotRegular {
                name: name.to_owned(),
                path: path.to_owned(),
            });
        }
        // Read-only servers of one image may share it; a writer has it alone.
        let mode = if read_only {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        lock(&file, mode).map_err(|_| ExportError::Locked {
            name: name.to_owned(),
            path: path.to_owned(),
        })?;
        Ok(Export {
            name: name.to_owned(),
            path: path.to_owned(),
            file,
            size: meta.len(),
            read_only,
            removed: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            conns_done: Condvar::new(),
        })
    }

    /// Transmission flags advertised for this export.
    pub fn tx_flags(&self) -> u16 {
        let mut f = tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH | tx_flags::CAN_MULTI_CONN;
        if self.read_only {
            f |= tx_flags::READ_ONLY;
        } else {
            f |= tx_flags::SEND_FUA
                | tx_flags::SEND_TRIM
                | tx_flags::SEND_WRITE_ZEROES
                | tx_flags::SEND_FAST_ZERO;
        }
        f
    }

    fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
}

/// The server: its exports and its connections.
pub struct Server {
    pub config: ServerConfig,
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    shutting_down: AtomicBool,
    next_conn: AtomicU64,
    /// Live connections (any phase), to refuse beyond the limit and to wait for at shutdown.
    live: Mutex<Vec<(u64, Stream)>>,
    live_done: Condvar,
}

impl Server {
    pub fn new(config: ServerConfig) -> Arc<Server> {
        Arc::new(Server {
            config,
            exports: RwLock::new(BTreeMap::new()),
            shutting_down: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            live: Mutex::new(Vec::new()),
            live_done: Condvar::new(),
        })
    }

    pub fn add_export(&self, export: Export) -> Result<(), ExportError> {
        let mut map = self.exports.write().unpoisoned();
        if map.contains_key(&export.name) {
            return Err(ExportError::Exists(export.name));
        }
        log::info!(
            "export {:?}: {} ({} bytes{})",
            export.name,
            export.path.display(),
            export.size,
            if export.read_only { ", read-only" } else { "" }
        );
        map.insert(export.name.clone(), Arc::new(export));
        Ok(())
    }

    /// Removes an export for a cutover: no new client can open it, its connections finish what
    /// is in flight (and get their replies) and close, the image is fdatasync'ed and closed (so
    /// its lock is released). Returns the number of connections that were closed.
    pub fn remove_export(&self, name: &str) -> Result<usize, ExportError> {
        let export = self
            .exports
            .write()
            .unpoisoned()
            .remove(name)
            .ok_or_else(|| ExportError::Unknown(name.to_owned()))?;
        export.removed.store(true, Ordering::Release);
        let mut conns = export.conns.lock().unpoisoned();
        let closed = conns.len();
        for (_, s) in conns.iter() {
            let _ = s.shutdown(Shutdown::Read);
        }
        while !conns.is_empty() {
            conns = export.conns_done.wait(conns).unpoisoned();
        }
        drop(conns);
        if let Err(e) = export.file.sync_data() {
            log::error!("export {name:?}: fdatasync at removal failed: {e}");
        }
        log::info!("export {name:?} removed ({closed} connections closed)");
        Ok(closed)
    }

    pub fn export_names(&self) -> Vec<String> {
        self.exports.read().unpoisoned().keys().cloned().collect()
    }

    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        self.exports
            .read()
            .unpoisoned()
            .get(name)
            .filter(|e| !e.is_removed())
            .cloned()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Serves one accepted connection on the calling thread, start to end.
    pub fn serve_connection(self: &Arc<Server>, stream: Stream, peer: &str) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        {
            let mut live = self.live.lock().unpoisoned();
            if live.len() >= self.config.max_connections || self.is_shutting_down() {
                log::warn!("conn {id} from {peer}: refused (connection limit or shutting down)");
                return;
            }
            match stream.try_clone() {
                Ok(s) => live.push((id, s)),
                Err(e) => {
                    log::error!("conn {id} from {peer}: {e}");
                    return;
                }
            }
        }
        log::info!("conn {id}: from {peer}");
        match handshake::negotiate(self, stream, id) {
            Ok(Some((stream, export))) => transmission::run(self, stream, export, id),
            Ok(None) => log::info!("conn {id}: closed during the handshake"),
            Err(e) => log::warn!("conn {id} from {peer}: handshake failed: {e}"),
        }
        let mut live = self.live.lock().unpoisoned();
        live.retain(|(c, _)| *c != id);
        self.live_done.notify_all();
    }

    /// Graceful shutdown: stop reading new requests on every connection, let requests in flight
    /// complete and be answered, then return once every connection has closed (or `timeout`).
    pub fn shutdown(&self, timeout: Duration) {
        self.shutting_down.store(true, Ordering::Release);
        let mut live = self.live.lock().unpoisoned();
        for (_, s) in live.iter() {
            let _ = s.shutdown(Shutdown::Read);
        }
        let deadline = std::time::Instant::now() + timeout;
        while !live.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                log::warn!(
                    "shutdown: {} connections still open at the deadline",
                    live.len()
                );
                for (_, s) in live.iter() {
                    let _ = s.shutdown(Shutdown::Both);
                }
                break;
            }
            live = self.live_done.wait_timeout(live, left).unpoisoned().0;
        }
        for e in self.exports.read().unpoisoned().values() {
            if let Err(err) = e.file.sync_data() {
                log::error!("export {:?}: fdatasync at shutdown failed: {err}", e.name);
            }
        }
    }
}
