//! Tests only: plays the queues that own a mirror's connections, on a thread of its own with
//! its own io_uring, for tests that run a mirror without a ublk device (no queue threads).
//! It drives every connection of whatever mirror `current` returns with the same
//! `RingConn` the queues use, and serves what is forwarded to each.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::mirror::link::Mirror;
use crate::mirror::ring_conn::RingConn;

/// Stops the owner thread when dropped.
pub struct RingOwner {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for RingOwner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Owns every connection of the mirror `current()` returns, while this guard lives.
pub fn own_connections(current: impl Fn() -> Option<Arc<Mirror>> + Send + 'static) -> RingOwner {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || drive(&current, &flag));
    RingOwner {
        stop,
        thread: Some(thread),
    }
}

fn drive(current: &dyn Fn() -> Option<Arc<Mirror>>, stop: &AtomicBool) {
    // The queues' own kind of ring, so the tests drive the connections as the queues do.
    crate::queue_ring::init_queue_ring(256, 512).expect("ring");
    let exe = smol::LocalExecutor::new();
    let mut conns: HashMap<(u64, usize), Rc<RingConn>> = HashMap::new();
    while !stop.load(Ordering::SeqCst) {
        if let Some(m) = current() {
            for c in 0..m.connections().len() {
                let conn = conns
                    .entry((m.generation, c))
                    .or_insert_with(|| RingConn::start(m.clone(), c, &exe))
                    .clone();
                while let Some(f) = m.take_forwarded(c) {
                    let (conn, m) = (conn.clone(), m.clone());
                    exe.spawn(async move {
                        let outcome = conn.run(f.op.as_leg_op()).await;
                        m.finish_forwarded(f.reply_to, f.tag, outcome);
                    })
                    .detach();
                }
            }
        }
        while exe.try_tick() {}
        let ts = io_uring::types::Timespec::from(Duration::from_millis(2));
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        libublk::io::with_task_io_ring_mut(|r| {
            let _ = r.submitter().submit_with_args(1, &args);
            let _ = libublk::uring_async::ublk_reap_events_with_handler(r, |cqe| {
                libublk::uring_async::ublk_wake_task(cqe.user_data(), cqe)
            });
        });
        while exe.try_tick() {}
    }
}
