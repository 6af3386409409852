//! Events for `watch`: the parts that change what an orchestrator waits for (the device's
//! pause and unpause, the mirror's start, failure and stop) publish one here, and every
//! watcher gets a copy. Publishing never blocks (a mirror failure publishes from a queue
//! thread): each watcher has a bounded backlog, and one that falls that far behind is cut
//! off (its connection then ends with a `lagged` line). The copy's progress is sampled by the
//! watchers themselves (`ctl/watch.rs`), at most once a second.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use control::protocol::Event;

use crate::lock::lock;

/// Watchers at once; they do not count against the control socket's client cap.
pub const MAX_WATCHERS: usize = 8;
/// Events a watcher may have unread before it is cut off.
pub const BACKLOG: usize = 256;

/// A new watcher's end: its events, and whether it was cut off for falling behind.
pub struct Subscription {
    pub events: Receiver<Event>,
    pub lagged: Arc<AtomicBool>,
    gone: Arc<AtomicBool>,
}

/// A watcher that ends frees its place at once, not at the next event.
impl Drop for Subscription {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::SeqCst);
    }
}

struct Watcher {
    tx: SyncSender<Event>,
    lagged: Arc<AtomicBool>,
    gone: Arc<AtomicBool>,
}

#[derive(Default)]
pub struct Events {
    watchers: Mutex<Vec<Watcher>>,
}

impl Events {
    /// A new watcher, unless `MAX_WATCHERS` are watching.
    pub fn subscribe(&self) -> Option<Subscription> {
        let mut w = lock(&self.watchers);
        w.retain(|x| !x.lagged.load(Ordering::SeqCst) && !x.gone.load(Ordering::SeqCst));
        if w.len() >= MAX_WATCHERS {
            return None;
        }
        let (tx, events) = sync_channel(BACKLOG);
        let (lagged, gone) = (Arc::default(), Arc::<AtomicBool>::default());
        w.push(Watcher {
            tx,
            lagged: Arc::clone(&lagged),
            gone: Arc::clone(&gone),
        });
        Some(Subscription {
            events,
            lagged,
            gone,
        })
    }

    /// An event of `kind` at the current time; `fill` sets its other fields. Its sequence
    /// number is the watcher's to give, as it writes it.
    pub fn make(kind: &str, fill: impl FnOnce(&mut Event)) -> Event {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut ev = Event {
            seq: 0,
            time,
            event: kind.to_owned(),
            state: None,
            mirror: None,
            reason: None,
            copy: None,
        };
        fill(&mut ev);
        ev
    }

    /// Sends an event of `kind` to every watcher (none: nothing is built).
    pub fn publish(&self, kind: &str, fill: impl FnOnce(&mut Event)) {
        let mut w = lock(&self.watchers);
        if w.is_empty() {
            return;
        }
        let ev = Events::make(kind, fill);
        w.retain(|x| match x.tx.try_send(ev.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                x.lagged.store(true, Ordering::SeqCst);
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_watcher_gets_each_event_in_order_and_a_slow_one_is_cut_off() {
        let events = Events::default();
        let fast = events.subscribe().expect("one");
        let slow = events.subscribe().expect("two");
        for i in 0..BACKLOG {
            events.publish("paused", |e| e.reason = Some(i.to_string()));
            let ev = fast.events.recv().expect("event");
            assert_eq!(ev.reason, Some(i.to_string()), "in order");
        }
        assert!(
            !slow.lagged.load(Ordering::SeqCst),
            "a full backlog is still kept"
        );
        events.publish("unpaused", |_| {});
        assert!(slow.lagged.load(Ordering::SeqCst), "one more cuts it off");
        assert_eq!(fast.events.recv().expect("fast").event, "unpaused");
        // The slow one still reads what it had, then sees the end.
        assert_eq!(slow.events.iter().count(), BACKLOG);
    }

    #[test]
    fn at_most_max_watchers() {
        let events = Events::default();
        let subs: Vec<_> = (0..MAX_WATCHERS).map(|_| events.subscribe()).collect();
        assert!(subs.iter().all(Option::is_some));
        assert!(events.subscribe().is_none());
        drop(subs);
        assert!(
            events.subscribe().is_some(),
            "ended watchers free their places"
        );
    }
}
