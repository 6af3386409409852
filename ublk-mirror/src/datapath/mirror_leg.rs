//! A queue's side of the mirror leg: the connection it drives on its own ring (started when
//! the queue first meets a new mirror: its doorbell or its first write, whichever comes
//! first), or the forwarding hop to the queue that owns one (`mirror/link.rs` says who owns
//! what).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use crate::datapath::waiters::Waiters;
use crate::mirror::link::{LegOp, Mirror, MirrorOp, Outcome, Route};
use crate::mirror::ring_conn::RingConn;

pub struct QueueMirror {
    qid: u16,
    exe: Rc<smol::LocalExecutor<'static>>,
    /// The connection this queue drives, for the mirror (generation) it was made for. Weak:
    /// its own tasks and the requests on it keep it alive, so once it has died and they have
    /// ended it goes, and with it its hold on the mirror and so on the sockets (a strong
    /// reference here kept a stopped or failed mirror's sockets open until the next
    /// mirror-start).
    conn: RefCell<Option<(u64, Weak<RingConn>)>>,
    /// Forwarded operations this queue took and has not answered yet, by a local id: if the
    /// queue stops first, [`QueueMirror::abandon`] answers them.
    forwarded: RefCell<HashMap<u64, Taken>>,
    next_id: Cell<u64>,
}

/// A forwarded operation being sent by this queue.
struct Taken {
    mirror: Arc<Mirror>,
    reply_to: u16,
    tag: u16,
    op: Rc<MirrorOp>,
}

impl QueueMirror {
    pub fn new(qid: u16, exe: Rc<smol::LocalExecutor<'static>>) -> QueueMirror {
        QueueMirror {
            qid,
            exe,
            conn: RefCell::new(None),
            forwarded: RefCell::new(HashMap::new()),
            next_id: Cell::new(0),
        }
    }

    /// This queue's connection `conn` of `m`, started on this ring at first use; None once it
    /// has ended (the mirror failed or stopped: it is never started twice).
    fn own(&self, m: &Arc<Mirror>, conn: usize) -> Option<Rc<RingConn>> {
        let mut cur = self.conn.borrow_mut();
        if let Some((generation, c)) = cur.as_ref() {
            if *generation == m.generation {
                return c.upgrade();
            }
        }
        let c = RingConn::start(m.clone(), conn, &self.exe);
        *cur = Some((m.generation, Rc::downgrade(&c)));
        Some(c)
    }

    /// The target's part of `op` for this queue's `tag`: on this queue's own connection
    /// (sent from the tag's buffer), or forwarded (copied) to the owner of one.
    pub(super) async fn run(
        &self,
        m: &Arc<Mirror>,
        parked: &Waiters,
        tag: u16,
        op: LegOp<'_>,
    ) -> Outcome {
        match m.route(self.qid) {
            Route::Own(c) => {
                let Some(conn) = self.own(m, c) else {
                    return Outcome::Failed;
                };
                if !m.begin_job() {
                    return Outcome::Failed;
                }
                let outcome = conn.run(op).await;
                m.end_job();
                outcome
            }
            Route::Forward(c) => {
                parked.clear(tag);
                m.forward(c, self.qid, tag, op.to_owned_op());
                parked.outcome(tag).await
            }
        }
    }

    /// On the doorbell: starts this queue's connection if it has not met the mirror yet
    /// (publishing a mirror rings every doorbell, so its receive watches the target from the
    /// start: a target that dies or misbehaves while the guest is idle, or only reads, fails
    /// the mirror at once, not at the next write), then sends what other queues and the copy
    /// workers forwarded to it, each as its own task; its outcome goes back to the forwarder.
    pub(super) fn on_doorbell(self: &Rc<Self>, m: &Arc<Mirror>) {
        let Route::Own(c) = m.route(self.qid) else {
            return;
        };
        let own = self.own(m, c);
        while let Some(f) = m.take_forwarded(c) {
            let Some(conn) = own.clone() else {
                // Never sent: its data can go.
                m.finish_forwarded(f.reply_to, f.tag, Outcome::Failed);
                continue;
            };
            let id = self.next_id.get();
            self.next_id.set(id + 1);
            let op = Rc::new(f.op);
            let taken = Taken {
                mirror: m.clone(),
                reply_to: f.reply_to,
                tag: f.tag,
                op: op.clone(),
            };
            self.forwarded.borrow_mut().insert(id, taken);
            let me = self.clone();
            self.exe
                .spawn(async move {
                    let outcome = conn.run(op.as_leg_op()).await;
                    if let Some(t) = me.forwarded.borrow_mut().remove(&id) {
                        t.mirror.finish_forwarded(t.reply_to, t.tag, outcome);
                    }
                })
                .detach();
        }
    }

    /// The queue is stopping and its tasks end unfinished: every forwarded operation it took
    /// comes back Failed (its data is leaked, as a send may still read it), and the
    /// connection it owns in `current` (the mirror attached now) is orphaned, so what waits
    /// in its inbox or is forwarded later comes back Failed too and no forwarder (a copy
    /// worker) waits for ever.
    pub fn abandon(&self, current: Option<Arc<Mirror>>) {
        for (_, t) in self.forwarded.borrow_mut().drain() {
            t.mirror
                .finish_forwarded(t.reply_to, t.tag, Outcome::Failed);
            std::mem::forget(t.op);
        }
        let older = self
            .conn
            .borrow_mut()
            .take()
            .and_then(|(_, c)| c.upgrade())
            .map(|c| c.mirror().clone());
        for m in current.iter().chain(older.iter()) {
            if let Route::Own(c) = m.route(self.qid) {
                m.orphan(c);
            }
        }
    }
}
