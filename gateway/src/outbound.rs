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
}

impl Outbound {
    pub fn new(limit: usize) -> Self {
        Outbound { state: Mutex::new(State::default()), notify: Notify::new(), limit }
    }

    /// Queues a message.
    pub fn push(&self, m: Arc<Encoded>) -> Pushed {
        let mut s = self.state.lock();
        if s.closed || s.close.is_some() {
            return Pushed::Closed;
        }
        let len = m.raw.len();
        if s.bytes + len > self.limit {
            // Free the memory now; the writer sends 4003.
            s.queue = VecDeque::new();
            s.bytes = 0;
            s.close = Some(CloseCode::SlowConsumer);
            drop(s);
            self.notify.notify_one();
            return Pushed::Overflow;
        }
        let wake = s.queue.is_empty();
        s.bytes += len;
        s.queue.push_back(m);
        drop(s);
        if wake {
            self.notify.notify_one();
        }
        Pushed::Queued
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

    /// Takes everything queued, and the close request (which stays set).
    pub fn take(&self) -> (VecDeque<Arc<Encoded>>, Option<CloseCode>) {
        let mut s = self.state.lock();
        s.bytes = 0;
        (std::mem::take(&mut s.queue), s.close)
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
    }

    /// Resolves when something was queued or a close requested since the last wake-up.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
