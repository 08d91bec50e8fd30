//! A connection's outbound queue: bounded in bytes, shared by the hub (publications) and
//! the session (replies), drained by the connection's writer.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::Mutex;
use roomcast_protocol::CloseCode;
use tokio::sync::Notify;

use crate::ws::deflate;

/// One encoded message. A publication is encoded once per encoding and the same
/// `Arc<Encoded>` is queued to every subscriber; its compressed form is made at most once,
/// by the first writer that needs it.
#[derive(Debug)]
pub struct Encoded {
    raw: Bytes,
    deflated: OnceLock<Bytes>,
}

impl Encoded {
    pub fn new(raw: Bytes) -> Arc<Self> {
        Arc::new(Encoded { raw, deflated: OnceLock::new() })
    }
    /// The message bytes.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
    /// The message compressed for permessage-deflate (no context takeover).
    pub fn deflated(&self) -> &Bytes {
        self.deflated.get_or_init(|| Bytes::from(deflate::compress(&self.raw)))
    }
}

/// A `disconnect` chosen by the server API rather than by the close table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// 4000..=4999.
    pub code: u16,
    /// At most 123 bytes (it is also the close frame's reason).
    pub reason: String,
    pub reconnect: bool,
}

/// What became of a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue went over its bound: it was emptied and the connection is closing (4003).
    Overflow,
    /// The connection is closing or closed; the message was dropped.
    Closed,
}

/// The queue. Memory is held only while messages wait: an idle connection's queue owns
/// no buffer.
#[derive(Debug)]
pub struct Outbound {
    /// Waiting messages, their byte count, and a requested close. Held only for
    /// push/take, never across an await.
    state: Mutex<State>,
    /// Wakes the writer when the queue goes from empty to non-empty or a close is
    /// requested. Lives as long as the connection.
    notify: Notify,
    /// Bound of `State::bytes`.
    limit: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Arc<Encoded>>,
    bytes: usize,
    /// The first close requested; later requests do not replace it.
    close: Option<CloseCode>,
    /// The `disconnect` sent for a close requested by the server API (any code
    /// 4000..=4999, its own reason and advice); `close` is then `DisconnectedByServer`.
    custom: Option<Disconnect>,
    /// No more messages are taken (the writer is closing or gone).
    closed: bool,
    /// Set by [`Outbound::hold`]: messages from this index on wait in the queue until
    /// [`Outbound::release`] puts the held reply in front of them.
    hold: Option<usize>,
}

impl Outbound {
    pub fn new(limit: usize) -> Self {
        Outbound { state: Mutex::new(State::default()), notify: Notify::new(), limit }
    }

    /// Queues a message.
    pub fn push(&self, m: Arc<Encoded>) -> Pushed {
        let s = self.state.lock();
        let at = s.queue.len();
        self.insert(s, at, m)
    }

    /// Queues `m` at index `at` of the queue (the end, or a released hold).
    fn insert(&self, mut s: parking_lot::MutexGuard<'_, State>, at: usize, m: Arc<Encoded>) -> Pushed {
        if s.closed || s.close.is_some() {
            return Pushed::Closed;
        }
        let len = m.raw.len();
        if s.bytes + len > self.limit {
            // Free the memory now; the writer sends 4003.
            s.queue = VecDeque::new();
            s.bytes = 0;
            s.hold = s.hold.map(|_| 0);
            s.close = Some(CloseCode::SlowConsumer);
            drop(s);
            self.notify.notify_one();
            return Pushed::Overflow;
        }
        // The writer takes only what comes before a hold: wake it when that part stops
        // being empty.
        let takeable_before = s.hold.map_or(s.queue.len(), |h| h.min(s.queue.len()));
        let wake = takeable_before == 0 && s.hold.is_none_or(|h| at < h);
        s.bytes += len;
        let at = at.min(s.queue.len());
        s.queue.insert(at, m);
        drop(s);
        if wake {
            self.notify.notify_one();
        }
        Pushed::Queued
    }

    /// Holds back every message queued from now on until [`Outbound::release`]: a command
    /// whose reply must precede what its own effect delivers to this connection (a
    /// publisher's `published` before its copy of the publication) holds the queue while
    /// it runs. The writer meanwhile sends what was queued before.
    pub fn hold(&self) {
        let mut s = self.state.lock();
        if s.hold.is_none() {
            s.hold = Some(s.queue.len());
        }
    }

    /// Ends a hold: `first` (the reply) goes before the messages held back.
    pub fn release(&self, first: Option<Arc<Encoded>>) {
        let mut s = self.state.lock();
        let at = s.hold.take().unwrap_or(s.queue.len()).min(s.queue.len());
        if let Some(m) = first {
            self.insert(s, at, m);
        } else {
            drop(s);
        }
        // Anything held is now takeable.
        self.notify.notify_one();
    }

    /// Asks the writer to flush what is queued, then send `disconnect` and close with
    /// `code`. The first request wins.
    pub fn close(&self, code: CloseCode) {
        let mut s = self.state.lock();
        if s.close.is_none() && !s.closed {
            s.close = Some(code);
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Like [`Outbound::close`] with the server API's code, reason and advice.
    pub fn close_with(&self, d: Disconnect) {
        let mut s = self.state.lock();
        if s.close.is_none() && !s.closed {
            s.close = Some(CloseCode::DisconnectedByServer);
            s.custom = Some(d);
            drop(s);
            self.notify.notify_one();
        }
    }

    /// The server API's `disconnect`, when the close was requested with
    /// [`Outbound::close_with`].
    pub fn custom_close(&self) -> Option<Disconnect> {
        self.state.lock().custom.clone()
    }

    /// The close requested, if any.
    pub fn close_requested(&self) -> Option<CloseCode> {
        self.state.lock().close
    }

    /// Takes everything queued (but what a hold keeps back), and the close request
    /// (which stays set).
    pub fn take(&self) -> (VecDeque<Arc<Encoded>>, Option<CloseCode>) {
        let mut s = self.state.lock();
        match s.hold {
            None => {
                s.bytes = 0;
                (std::mem::take(&mut s.queue), s.close)
            }
            Some(h) => {
                let h = h.min(s.queue.len());
                let rest = s.queue.split_off(h);
                let head = std::mem::replace(&mut s.queue, rest);
                s.bytes -= head.iter().map(|m| m.raw.len()).sum::<usize>();
                s.hold = Some(0);
                (head, s.close)
            }
        }
    }

    /// Whether messages are waiting.
    pub fn is_empty(&self) -> bool {
        self.state.lock().queue.is_empty()
    }

    /// Refuses every later message and drops what waits (the connection is gone).
    pub fn shut(&self) {
        let mut s = self.state.lock();
        s.closed = true;
        s.queue = VecDeque::new();
        s.bytes = 0;
        s.hold = None;
    }

    /// Resolves when something was queued or a close requested since the last wake-up.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_keeps_later_messages_behind_the_released_reply() {
        let q = super::Outbound::new(1 << 20);
        let m = |t: &'static str| super::Encoded::new(bytes::Bytes::from_static(t.as_bytes()));
        let texts = |v: std::collections::VecDeque<std::sync::Arc<super::Encoded>>| {
            v.iter().map(|e| String::from_utf8_lossy(e.raw()).to_string()).collect::<Vec<_>>()
        };
        q.push(m("before"));
        q.hold();
        q.push(m("publication"));
        assert_eq!(texts(q.take().0), ["before"]);
        assert_eq!(texts(q.take().0), Vec::<String>::new());
        q.push(m("ping"));
        q.release(Some(m("published")));
        assert_eq!(texts(q.take().0), ["published", "publication", "ping"]);
        q.push(m("after"));
        assert_eq!(texts(q.take().0), ["after"]);
    }

    fn msg(n: usize) -> Arc<Encoded> {
        Encoded::new(Bytes::from(vec![b'x'; n]))
    }

    #[test]
    fn bound_frees_and_closes() {
        let o = Outbound::new(100);
        assert_eq!(o.push(msg(60)), Pushed::Queued);
        assert_eq!(o.push(msg(30)), Pushed::Queued);
        assert_eq!(o.push(msg(30)), Pushed::Overflow);
        let (q, close) = o.take();
        assert!(q.is_empty());
        assert_eq!(close, Some(CloseCode::SlowConsumer));
        assert_eq!(o.push(msg(1)), Pushed::Closed);
    }

    #[test]
    fn take_resets_the_count() {
        let o = Outbound::new(100);
        for _ in 0..10 {
            assert_eq!(o.push(msg(60)), Pushed::Queued);
            assert_eq!(o.take().0.len(), 1);
        }
        o.close(CloseCode::Shutdown);
        o.close(CloseCode::ProtocolViolation);
        assert_eq!(o.close_requested(), Some(CloseCode::Shutdown));
    }

    #[test]
    fn shared_frames_compress_once() {
        let m = msg(1000);
        let a = m.deflated().as_ptr();
        assert_eq!(m.deflated().as_ptr(), a);
        assert!(m.deflated().len() < 100);
    }
}
