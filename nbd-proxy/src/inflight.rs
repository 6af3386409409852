//! The requests in flight on one NBD connection, by cookie.
//!
//! One table per connection, owning what it tracks: [`Inflight<T>`] keeps, for every request
//! sent and not yet answered, the caller's `T` (for [`crate::client::Connection`] nothing; for
//! the daemon's mirror link, once issue 13 moves it onto io_uring, the guest request's queue
//! and tag and the buffer lent to the kernel), the READ payload its reply will carry, and when
//! it was sent.
//!
//! The contract, for a driver that lends `T`'s buffers to the kernel:
//! - [`Inflight::insert`] is bounded and strict: a full table or a cookie already in flight is
//!   refused *with the value handed back*, so the caller still owns it and can complete its
//!   request with the error; nothing is lost on a refused insert.
//! - [`Inflight::complete`] hands the value back exactly once, when the server's reply names
//!   its cookie; a reply to no request in flight is a protocol error (the server is broken).
//! - [`Inflight::drain`] hands back every value still in flight, when the connection is gone.
//! - Dropping the table drops what it still holds. A driver whose buffers are still owned by
//!   the kernel must cancel and reap them, then drain, before dropping the table.
//! - [`Inflight::oldest`] says which request has waited longest, for the mirror timeout.

use std::collections::HashMap;
use std::time::Instant;

use crate::proto::{ProtoError, SimpleReply};

/// Why a request could not be put in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InflightError {
    /// The table holds its limit of requests already.
    #[error("too many requests in flight ({0})")]
    Full(usize),
    /// A request with this cookie is in flight already.
    #[error("cookie {0:#x} is already in flight")]
    DuplicateCookie(u64),
}

/// A refused [`Inflight::insert`]: why, and the value, handed back.
#[derive(Debug)]
pub struct Refused<T> {
    pub error: InflightError,
    pub value: T,
}

/// A request whose reply came: what [`Inflight::complete`] hands back.
#[derive(Debug, PartialEq, Eq)]
pub struct Done<T> {
    pub value: T,
    /// Bytes of READ data that follow the reply: the request's read length if it is a
    /// successful READ, else 0.
    pub data_len: u32,
    /// When the request was put in flight.
    pub sent: Instant,
}

#[derive(Debug)]
struct Entry<T> {
    value: T,
    read_len: u32,
    sent: Instant,
    /// Insertion order, so the oldest is well-defined even when two `sent` times are equal.
    seq: u64,
}

/// Requests in flight on one connection: cookie -> the caller's value, READ length, send time.
/// Bounded, so a server cannot make it grow, and strict: a reply must match a request.
#[derive(Debug)]
pub struct Inflight<T = ()> {
    pending: HashMap<u64, Entry<T>>,
    limit: usize,
    next_seq: u64,
}

impl<T> Inflight<T> {
    /// A table that holds at most `limit` requests.
    pub fn new(limit: usize) -> Inflight<T> {
        Inflight {
            pending: HashMap::with_capacity(limit.min(1024)),
            limit,
            next_seq: 0,
        }
    }

    /// Puts `cookie` in flight with `value`; `read_len` is the READ length (0 for anything
    /// else). Refused, with `value` handed back, if the table is full or the cookie is in
    /// flight already.
    pub fn insert(&mut self, cookie: u64, read_len: u32, value: T) -> Result<(), Refused<T>> {
        let error = if self.pending.len() >= self.limit {
            InflightError::Full(self.limit)
        } else if self.pending.contains_key(&cookie) {
            InflightError::DuplicateCookie(cookie)
        } else {
            let seq = self.next_seq;
            self.next_seq += 1;
            let sent = Instant::now();
            let entry = Entry {
                value,
                read_len,
                sent,
                seq,
            };
            self.pending.insert(cookie, entry);
            return Ok(());
        };
        Err(Refused { error, value })
    }

    /// Matches a reply to its request and hands the request's value back; a cookie not in
    /// flight is [`ProtoError::UnknownCookie`] (and the table is unchanged).
    pub fn complete(&mut self, reply: &SimpleReply) -> Result<Done<T>, ProtoError> {
        let e = self
            .pending
            .remove(&reply.cookie)
            .ok_or(ProtoError::UnknownCookie(reply.cookie))?;
        Ok(Done {
            value: e.value,
            data_len: if reply.error == 0 { e.read_len } else { 0 },
            sent: e.sent,
        })
    }

    /// The request in flight longest: its cookie and when it was sent (a scan: the table is
    /// small, and timeouts are checked on a timer, not per request).
    pub fn oldest(&self) -> Option<(u64, Instant)> {
        self.pending
            .iter()
            .min_by_key(|(_, e)| e.seq)
            .map(|(&cookie, e)| (cookie, e.sent))
    }

    /// The value of the request in flight under `cookie`.
    pub fn get(&self, cookie: u64) -> Option<&T> {
        self.pending.get(&cookie).map(|e| &e.value)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The most requests the table holds.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Forgets every request (the connection is gone) and hands back their cookies and
    /// values, oldest first.
    pub fn drain(&mut self) -> Vec<(u64, T)> {
        let mut all: Vec<(u64, Entry<T>)> = self.pending.drain().collect();
        all.sort_by_key(|(_, e)| e.seq);
        all.into_iter().map(|(c, e)| (c, e.value)).collect()
    }
}

#[cfg(test)]
mod tests;
