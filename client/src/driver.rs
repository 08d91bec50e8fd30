//! The background task behind a [`crate::Client`]: owns the WebSocket, opens it (rotating
//! through the URLs, backing off between attempts), and moves data between the socket,
//! the handles' op channel, a clock tick and the [`Machine`]. All decisions are the
//! machine's; this module only waits and does I/O.

use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::backoff::{Backoff, BackoffConfig};
use crate::codec;
use crate::framing::{self, Incoming, Ws};
use crate::machine::{Action, LOCAL_CLOSE_CODE, LOCAL_CLOSE_REASON, Machine, Op};

/// How often the machine's deadlines and sweeps run.
const TICK: Duration = Duration::from_millis(100);

/// Connection settings of the driver.
#[derive(Debug, Clone)]
pub(crate) struct DriverConfig {
    /// Tried in turn, one per attempt. Never empty (checked by the builder).
    pub urls: Vec<String>,
    /// Limit on opening the socket (TCP + WebSocket handshake), and on one write: a node
    /// that stops reading must not stall the driver (and its liveness checks) forever.
    pub io_timeout: Duration,
    pub backoff: BackoffConfig,
    /// Failed attempts to open the first connection before `connect` gives up.
    pub connect_attempts: usize,
}

/// How a connection ended.
enum End {
    Lost {
        code: Option<u16>,
        reason: String,
        reconnect: bool,
    },
    /// The client is closed and everything answered.
    Shutdown,
}

/// Runs until the client is closed: by the application, by every handle being dropped,
/// or by the node (a close that says not to reconnect).
pub(crate) async fn run(mut m: Machine, mut ops: mpsc::Receiver<Op>, cfg: DriverConfig) {
    let enc = m.encoding();
    let mut backoff = Backoff::new(cfg.backoff);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut attempt = 0usize;
    let mut initial_failures = 0usize;
    loop {
        let Some(url) = cfg.urls.get(attempt % cfg.urls.len().max(1)).cloned() else {
            m.fail_initial(crate::ClientError::NoUrls);
            return;
        };
        attempt = attempt.wrapping_add(1);
        let opened =
            match wait_down(&mut m, &mut ops, &mut tick, framing::open(&url, enc, cfg.io_timeout)).await {
                Some(r) => r,
                None => return,
            };
        match opened {
            Ok(mut ws) => {
                let started = Instant::now();
                tracing::debug!(%url, "socket open");
                m.on_open(started);
                match run_connection(&mut m, &mut ops, &mut tick, &mut ws, cfg.io_timeout).await {
                    End::Shutdown => return,
                    End::Lost { code, reason, reconnect } => {
                        tracing::info!(%url, ?code, %reason, reconnect, "connection lost");
                        if started.elapsed() >= backoff.stable_after() {
                            backoff.reset();
                        }
                        if !m.on_disconnect(code, reason, reconnect) {
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(%url, error = %e, "cannot connect");
                if m.is_initial() {
                    initial_failures += 1;
                    if initial_failures >= cfg.connect_attempts.max(1) {
                        m.fail_initial(e);
                        return;
                    }
                }
            }
        }
        let delay = backoff.next_delay(&mut rand::rng());
        tracing::debug!(?delay, "reconnecting after");
        if wait_down(&mut m, &mut ops, &mut tick, tokio::time::sleep(delay)).await.is_none() {
            return;
        }
    }
}

/// Waits for `fut` (opening a socket, or a backoff sleep) while still serving the
/// handles. `None`: the client was closed meanwhile.
async fn wait_down<F: Future>(
    m: &mut Machine,
    ops: &mut mpsc::Receiver<Op>,
    tick: &mut Interval,
    fut: F,
) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return Some(out),
            op = ops.recv() => match op {
                Some(op) => m.on_op(op),
                None => m.request_shutdown(),
            },
            _ = tick.tick() => m.on_tick(Instant::now()),
        }
        // Nothing can be sent without a connection; the machine queues instead.
        m.take_outbox();
        if let Some(Action::Shutdown { done }) = m.take_action() {
            m.close_all(LOCAL_CLOSE_CODE, LOCAL_CLOSE_REASON.to_string());
            if let Some(done) = done {
                let _ = done.send(());
            }
            return None;
        }
    }
}

/// Serves one open connection until it ends.
async fn run_connection(
    m: &mut Machine,
    ops: &mut mpsc::Receiver<Op>,
    tick: &mut Interval,
    ws: &mut Ws,
    io_timeout: Duration,
) -> End {
    let enc = m.encoding();
    loop {
        let out = m.take_outbox();
        if !out.is_empty() {
            let frames = codec::frames(enc, out, codec::MAX_COALESCED_FRAME);
            let sent = tokio::time::timeout(io_timeout, framing::send(ws, enc, frames))
                .await
                .unwrap_or_else(|_| Err(format!("a write did not complete within {io_timeout:?}")));
            if let Err(e) = sent {
                return End::Lost { code: None, reason: e, reconnect: true };
            }
        }
        match m.take_action() {
            Some(Action::Drop { code, reason, reconnect }) => {
                framing::close(ws, LOCAL_CLOSE_CODE, "").await;
                return End::Lost { code, reason, reconnect };
            }
            Some(Action::Shutdown { done }) => {
                framing::close(ws, LOCAL_CLOSE_CODE, LOCAL_CLOSE_REASON).await;
                m.close_all(LOCAL_CLOSE_CODE, LOCAL_CLOSE_REASON.to_string());
                if let Some(done) = done {
                    let _ = done.send(());
                }
                return End::Shutdown;
            }
            None => {}
        }
        tokio::select! {
            item = ws.next() => match framing::classify(item) {
                Incoming::Frame { binary, data } => m.on_frame(Instant::now(), binary, &data),
                Incoming::Control => m.touch(Instant::now()),
                Incoming::Closed { code, reason } => {
                    framing::close(ws, LOCAL_CLOSE_CODE, "").await;
                    return End::Lost { code, reconnect: Machine::close_reconnects(code), reason };
                }
            },
            op = ops.recv() => match op {
                Some(op) => m.on_op(op),
                None => m.request_shutdown(),
            },
            _ = tick.tick() => m.on_tick(Instant::now()),
        }
    }
}
