//! The node: owns the [`Hub`], the broker and presence, and the configuration; the broker
//! feeds events back through [`NodeEvents`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use roomcast_broker::{
    BrokerEventHandler, BrokerPublication, DynBroker, HistoryOptions, Idempotent, MemoryBroker, RoomEvent,
};
use roomcast_presence::{DynPresence, MemoryPresence, NodeInfo};
use roomcast_protocol::{CloseCode, Data, ErrorCode, Position, Room};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::control::Control;
use crate::api::rpc::RpcTarget;
use crate::config::{BackendUrl, Config, ConfigError, NamespaceConfig};
use crate::hub::{BrokerState, ControlOp, Hub};

/// Why a node could not start.
#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{what} {url}: this build supports only \"memory\" so far")]
    Unsupported { what: &'static str, url: String },
    #[error("broker: {0}")]
    Broker(#[from] roomcast_broker::BrokerError),
    #[error("presence: {0}")]
    Presence(#[from] roomcast_presence::PresenceError),
    #[error("backend API over NATS ({url}): {message}")]
    Api { url: String, message: String },
}

/// Why a publication (from a client or the backend API) was not published.
#[derive(Debug, Error)]
pub enum PublishFailure {
    /// Refused before reaching the broker: unknown namespace (102), data too large (106).
    #[error("{1}")]
    Refused(ErrorCode, String),
    #[error(transparent)]
    Broker(#[from] roomcast_broker::BrokerError),
}

/// One gateway process.
pub struct Node {
    /// This node's id in the cluster.
    pub id: String,
    pub config: Arc<Config>,
    /// Namespace options by name (`None` for the default namespace).
    namespaces: HashMap<Option<String>, Arc<NamespaceConfig>>,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn DynBroker>,
    pub presence: Arc<dyn DynPresence>,
    /// Cancelled when the node starts shutting down: every connection is sent 4000 and
    /// the listener stops accepting.
    pub shutdown: CancellationToken,
    /// Every connection task, so that shutdown can wait for them to finish.
    pub tasks: TaskTracker,
    /// Token verification; `None` when no key is configured.
    pub verifier: Option<Arc<roomcast_auth::Verifier>>,
    /// Abuse limits and their counters.
    pub limits: Arc<crate::limits::Limits>,
    /// Stops the cluster task (heartbeats, reaping) once connections have drained.
    cluster_stop: CancellationToken,
    /// Where client `rpc` calls go; `None` when the node has no API NATS server.
    pub rpc: Option<RpcTarget>,
    /// When the last presence heartbeat went through (ms since `started`). Older than
    /// [`Node::presence_stale_after`] (heartbeats failing or hanging): the presence backend
    /// is unreachable and the node is not ready (`/readyz` 503).
    presence_ok_at: std::sync::atomic::AtomicU64,
    /// When the node was made (the origin of `presence_ok_at`).
    started: std::time::Instant,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Feeds broker events to the hub.
struct NodeEvents {
    hub: Arc<Hub>,
    /// The node, set once it exists (after the broker started), for what needs more than
    /// the hub (the interruption check).
    node: std::sync::OnceLock<std::sync::Weak<Node>>,
}

impl BrokerEventHandler for NodeEvents {
    fn handle_publication(&self, p: &BrokerPublication) {
        self.hub.deliver_publication(p);
    }
    fn handle_room_event(&self, room: &Room, event: &RoomEvent) {
        self.hub.deliver_room_event(room, event);
    }
    fn handle_interruption(&self) {
        tracing::warn!("broker delivery was interrupted; checking every room for missed publications");
        if let Some(node) = self.node.get().and_then(std::sync::Weak::upgrade) {
            tokio::spawn(check_missed(node));
        }
    }
    /// A control message from `Broker::publish_control` (sent by any node, this one
    /// included): the backend API's `send`, `disconnect`, `unsubscribe` for this node's
    /// connections. Only queues.
    fn handle_control(&self, payload: &[u8]) {
        crate::api::control::apply(&self.hub, payload);
    }
}

/// How long in-flight deliveries get to reach the broker's position after an interruption.
const IN_FLIGHT: Duration = Duration::from_secs(2);

/// After a broker interruption: compares, for every local room with history, the broker's
/// position with the last publication fanned out here. A room still behind once in-flight
/// deliveries had time to arrive lost its tail: its live subscribers are closed with 4000
/// so they reconnect and recover (a gap inside the stream is caught by the hub itself, at
/// the next publication).
async fn check_missed(node: Arc<Node>) {
    let mut behind = Vec::new();
    for room in node.hub.rooms() {
        let Some(ns) = node.namespace(&room) else { continue };
        if !ns.history_enabled() {
            continue;
        }
        let query = roomcast_broker::HistoryQuery { since: None, limit: Some(0), reverse: false };
        match node.broker.history(&room, query, Node::history_options(ns)).await {
            Ok(page) if page.position.offset > 0 => behind.push((room, page.position)),
            Ok(_) => {}
            Err(e) => tracing::warn!(room = %room, error = %e, "cannot check a room after the interruption"),
        }
    }
    let deadline = tokio::time::Instant::now() + IN_FLIGHT;
    loop {
        behind.retain(|(room, pos)| {
            let Some(rs) = node.hub.room(room) else { return false };
            match rs.last_position() {
                Some((epoch, offset)) => *epoch != *pos.epoch || offset < pos.offset,
                None => false,
            }
        });
        if behind.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (room, pos) in behind {
        if let Some(rs) = node.hub.room(&room) {
            let closed = rs.close_live();
            tracing::warn!(room = %room, offset = pos.offset, closed, "publications were lost in the interruption; subscribers reconnect and recover");
        }
    }
}

/// A random id of 16 hex digits.
pub fn random_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Node {
    /// Builds a node from a validated configuration and starts its broker.
    pub async fn start(config: Config) -> Result<Arc<Node>, NodeError> {
        config.validate()?;
        let id = config.node_id.clone().unwrap_or_else(random_id);
        // This run's identity in the presence registry: a restart is a new incarnation.
        let incarnation = roomcast_presence::incarnation_of(&id);
        let broker: Arc<dyn DynBroker> = match config.broker_url()? {
            BackendUrl::Memory => Arc::new(MemoryBroker::new()),
            BackendUrl::Redis(url) => {
                let broker = roomcast_broker::RedisBroker::connect_url(&url)
                    .await
                    .map_err(|e| roomcast_broker::BrokerError(Box::new(e)))?;
                Arc::new(broker)
            }
            BackendUrl::Nats(url) => {
                let config = roomcast_broker::nats::NatsBrokerConfig::new(url);
                let broker = roomcast_broker::NatsBroker::connect(config)
                    .await
                    .map_err(|e| roomcast_broker::BrokerError(Box::new(e)))?;
                Arc::new(broker)
            }
        };
        let presence: Arc<dyn DynPresence> = match config.presence_url()? {
            BackendUrl::Memory => Arc::new(MemoryPresence::new()),
            BackendUrl::Redis(url) => {
                // It adds this node's members again every `refresh_every()` by itself.
                let mut config = roomcast_presence::redis::RedisPresenceConfig::from_url(&url)
                    .map_err(|e| roomcast_presence::PresenceError(Box::new(e)))?;
                config.node = incarnation.clone();
                let presence = roomcast_presence::RedisPresence::connect(config)
                    .await
                    .map_err(|e| roomcast_presence::PresenceError(Box::new(e)))?;
                Arc::new(presence)
            }
            BackendUrl::Nats(url) => {
                let mut config = roomcast_presence::nats::NatsPresenceConfig::new(url);
                config.node = incarnation.clone();
                let presence = roomcast_presence::NatsPresence::connect(config)
                    .await
                    .map_err(|e| roomcast_presence::PresenceError(Box::new(e)))?;
                Arc::new(presence)
            }
        };
        let mut namespaces = HashMap::new();
        namespaces.insert(None, Arc::new(config.default_namespace.clone()));
        for (name, ns) in &config.namespaces {
            namespaces.insert(Some(name.clone()), Arc::new(ns.clone()));
        }
        let verifier = config.verifier()?.map(Arc::new);
        if let Some(v) = &verifier {
            // Ends by itself when the verifier is dropped.
            v.start_background();
        }
        let limits = Arc::new(crate::limits::Limits::new(config.limits.clone(), config.client_ip_resolver()));
        let api_nats = match config.api_nats_url() {
            Some(url) => {
                let dropped = limits.clone();
                let client = async_nats::ConnectOptions::new()
                    .name(format!("roomcast-api {id}"))
                    // The API subscription's buffer (the client's only subscription; RPC
                    // answers arrive on its request multiplexer).
                    .subscription_capacity(config.api.max_queued)
                    .event_callback(move |event| {
                        let limits = dropped.clone();
                        async move {
                            match event {
                                async_nats::Event::SlowConsumer(_) => {
                                    crate::limits::LimitCounters::inc(&limits.counters.api_requests_dropped);
                                }
                                async_nats::Event::Disconnected | async_nats::Event::Connected => {
                                    tracing::info!(%event, "backend API NATS connection");
                                }
                                other => tracing::debug!(event = %other, "backend API NATS event"),
                            }
                        }
                    })
                    .connect(url.as_str())
                    .await
                    .map_err(|e| NodeError::Api { url: url.clone(), message: e.to_string() })?;
                Some((url, client))
            }
            None => None,
        };
        let rpc = api_nats.as_ref().map(|(_, client)| RpcTarget {
            client: client.clone(),
            subject_prefix: format!("{}.rpc.", config.api.prefix),
            timeout: Duration::from_millis(config.api.rpc_timeout_ms),
            max_answer: config.max_message_size,
        });
        let (hub, control) = Hub::new(config.max_queue_bytes);
        let hub = Arc::new(hub);
        let events = Arc::new(NodeEvents { hub: hub.clone(), node: std::sync::OnceLock::new() });
        broker.start(events.clone()).await?;
        let node = Arc::new(Node {
            id,
            config: Arc::new(config),
            namespaces,
            hub,
            broker,
            presence,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            verifier,
            limits,
            cluster_stop: CancellationToken::new(),
            rpc,
            presence_ok_at: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
        });
        tokio::spawn(run_broker_control(Arc::downgrade(&node.hub), node.broker.clone(), control));
        tokio::spawn(run_cluster(Arc::downgrade(&node), node.cluster_stop.clone()));
        let _ = events.node.set(Arc::downgrade(&node));
        if let Some((url, client)) = api_nats {
            crate::api::nats::start(&node, client)
                .await
                .map_err(|e| NodeError::Api { url, message: e.to_string() })?;
        }
        Ok(node)
    }

    /// The options of `room`'s namespace, or `None` when it is not configured.
    pub fn namespace(&self, room: &Room) -> Option<&Arc<NamespaceConfig>> {
        self.namespaces.get(&room.namespace().map(str::to_string))
    }

    /// The namespace of a publication about to be published, after the checks every
    /// publisher passes (client or backend): the namespace is configured (else 102) and
    /// `data` is within `max_data_size` (else 106).
    pub fn publication_namespace(
        &self,
        room: &Room,
        data: &Data,
    ) -> Result<Arc<NamespaceConfig>, PublishFailure> {
        let ns = self.namespace(room).cloned().ok_or_else(|| {
            PublishFailure::Refused(
                ErrorCode::UnknownNamespace,
                format!("namespace {:?} is not configured", room.namespace().unwrap_or("")),
            )
        })?;
        if data.wire_len() > self.config.max_data_size {
            crate::limits::LimitCounters::inc(&self.limits.counters.data_too_large);
            return Err(PublishFailure::Refused(
                ErrorCode::LimitExceeded,
                format!("data is larger than {} bytes", self.config.max_data_size),
            ));
        }
        Ok(ns)
    }

    /// Publishes (checked with [`Node::publication_namespace`]); with an idempotency key,
    /// at most once per key within `api.idempotency_window_ms`, cluster-wide (a repeat
    /// answers the first publication's position).
    pub async fn publish(
        &self,
        publication: BrokerPublication,
        ns: &NamespaceConfig,
        idempotency_key: Option<&str>,
    ) -> Result<Option<Position>, PublishFailure> {
        let history = Self::history_options(ns);
        match idempotency_key {
            None => Ok(self.broker.publish(publication, history).await?),
            Some(key) => {
                let window = Duration::from_millis(self.config.api.idempotency_window_ms);
                let done = self.broker.publish_idempotent(publication, history, key, window).await;
                match done {
                    Ok(Idempotent::Published(p) | Idempotent::Duplicate(p)) => Ok(p),
                    Err(e) => match e.invalid_request() {
                        Some(why) => Err(PublishFailure::Refused(ErrorCode::BadRequest, why.to_string())),
                        None => Err(e.into()),
                    },
                }
            }
        }
    }

    /// Sends a control message to every node (this one included), for their connections.
    pub async fn publish_control(&self, control: &Control) -> Result<(), roomcast_broker::BrokerError> {
        self.broker.publish_control(control.encode()).await
    }

    /// History options for a namespace.
    pub fn history_options(ns: &NamespaceConfig) -> HistoryOptions {
        if ns.history_enabled() {
            HistoryOptions { size: ns.history_size, ttl: ns.history_ttl }
        } else {
            HistoryOptions::OFF
        }
    }

    /// Whether the node can take traffic: not shutting down, its broker connected, and its
    /// last presence heartbeat went through.
    pub fn is_ready(&self) -> bool {
        let since_ok = (self.started.elapsed().as_millis() as u64)
            .saturating_sub(self.presence_ok_at.load(std::sync::atomic::Ordering::Relaxed));
        !self.shutdown.is_cancelled()
            && self.broker.is_ready()
            && Duration::from_millis(since_ok) <= self.presence_stale_after()
    }

    /// How long without a successful presence heartbeat makes the node not ready: three
    /// heartbeats, at least 2 s.
    fn presence_stale_after(&self) -> Duration {
        Duration::from_millis(self.config.heartbeat_ms.saturating_mul(3).max(2_000))
    }

    /// Notes a presence heartbeat that went through.
    fn presence_ok_now(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.presence_ok_at.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Starts shutting down: connections are told 4000 and the listener stops.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits, up to the configured grace period, for every connection to finish, then
    /// leaves the cluster's registry of nodes.
    pub async fn drain(&self) -> bool {
        self.tasks.close();
        let grace = Duration::from_millis(self.config.shutdown_grace_ms);
        let drained = tokio::time::timeout(grace, self.tasks.wait()).await.is_ok();
        self.cluster_stop.cancel();
        if let Err(e) = self.presence.deregister().await {
            tracing::warn!(error = %e, "leaving the node registry failed; other nodes will time this node out");
        }
        drained
    }

    /// Whether presence is shared with other nodes (Redis, NATS) rather than this node's.
    pub fn shared_presence(&self) -> bool {
        !matches!(self.config.presence_url(), Ok(BackendUrl::Memory))
    }

    /// How long a node may stay silent before the cluster counts it dead.
    pub fn node_timeout(&self) -> Duration {
        Duration::from_millis(self.config.node_timeout_ms)
    }

    /// The live nodes of the cluster, from the presence registry (this one included once
    /// it sent its first heartbeat).
    pub async fn live_nodes(&self) -> Result<Vec<NodeInfo>, roomcast_presence::PresenceError> {
        self.presence.nodes(self.node_timeout()).await
    }

    /// This node's counts, as its heartbeats report them.
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            id: self.id.clone(),
            connections: self.hub.session_count() as u64,
            rooms: self.hub.room_count() as u64,
        }
    }
}

/// The cluster task: every heartbeat, tells the registry this node is alive and reaps the
/// members of nodes silent for longer than the node timeout, announcing a `leave` for each
/// (the registry hands each reaped member to exactly one node). Ends when `stop` is
/// cancelled (after the connections drained) or the node is dropped.
///
/// A node whose own heartbeats failed for longer than the timeout may have been reaped by
/// the others: when it gets through again it closes its connections with 4000, so that
/// their clients reconnect, rejoin presence and recover what they missed.
async fn run_cluster(node: std::sync::Weak<Node>, stop: CancellationToken) {
    let Some((every, timeout)) =
        node.upgrade().map(|n| (Duration::from_millis(n.config.heartbeat_ms), n.node_timeout()))
    else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ok = tokio::time::Instant::now();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(node) = node.upgrade() else {
            return;
        };
        match node.presence.heartbeat(&node.info()).await {
            Ok(()) => {
                if last_ok.elapsed() > timeout {
                    tracing::warn!(
                        silent_ms = last_ok.elapsed().as_millis() as u64,
                        "this node was cut off from presence for longer than the node timeout; \
                         closing its connections (4000) so their clients rejoin"
                    );
                    node.hub.for_each_subscriber(|_, s| s.outbound.close(CloseCode::Shutdown));
                }
                if failing {
                    tracing::info!("presence heartbeats go through again");
                    failing = false;
                }
                node.presence_ok_now();
                last_ok = tokio::time::Instant::now();
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "presence heartbeat failed; not ready until it goes through");
                    failing = true;
                }
                continue;
            }
        }
        match node.presence.reap(timeout).await {
            Ok(reaped) => {
                if !reaped.is_empty() {
                    tracing::info!(members = reaped.len(), "removed the members of dead nodes");
                }
                for r in reaped {
                    let announce = node.namespace(&r.room).is_some_and(|ns| ns.join_leave);
                    if announce
                        && let Err(e) = node.broker.publish_event(&r.room, RoomEvent::Leave(r.member)).await
                    {
                        tracing::warn!(room = %r.room, error = %e, "leave of a dead node's member not published");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reaping dead nodes' members failed"),
        }
    }
}

/// Keeps the node's broker subscriptions in step with the hub, one request at a time so
/// that a subscribe and an unsubscribe of one room never overtake each other. Ends when
/// the hub is dropped.
async fn run_broker_control(
    hub: std::sync::Weak<Hub>,
    broker: Arc<dyn DynBroker>,
    mut rx: mpsc::Receiver<ControlOp>,
) {
    while let Some(op) = rx.recv().await {
        match op {
            ControlOp::Subscribe(rs) => {
                let state = match broker.subscribe(&rs.room).await {
                    Ok(()) => BrokerState::Ready,
                    Err(e) => {
                        tracing::warn!(room = %rs.room, error = %e, "broker subscribe failed");
                        BrokerState::Failed(e.to_string())
                    }
                };
                rs.broker.send_replace(state);
            }
            ControlOp::Unsubscribe(room) => {
                let Some(hub) = hub.upgrade() else {
                    return;
                };
                if hub.has_room(&room) {
                    continue;
                }
                if let Err(e) = broker.unsubscribe(&room).await {
                    tracing::warn!(room = %room, error = %e, "broker unsubscribe failed");
                }
            }
        }
    }
}
