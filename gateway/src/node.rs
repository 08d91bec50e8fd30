//! The node: owns the [`Hub`], the broker and presence, and the configuration; the broker
//! feeds events back through [`NodeEvents`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use roomcast_broker::{
    BrokerEventHandler, BrokerPublication, DynBroker, HistoryOptions, MemoryBroker, RoomEvent,
};
use roomcast_presence::{DynPresence, MemoryPresence};
use roomcast_protocol::Room;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Feeds broker events to the hub.
struct NodeEvents {
    hub: Arc<Hub>,
}

impl BrokerEventHandler for NodeEvents {
    fn handle_publication(&self, p: &BrokerPublication) {
        self.hub.deliver_publication(p);
    }
    fn handle_room_event(&self, room: &Room, event: &RoomEvent) {
        self.hub.deliver_room_event(room, event);
    }
    fn handle_interruption(&self) {
        tracing::warn!("broker delivery was interrupted");
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
                // Members must be added again every `refresh_every()` or they expire.
                let presence = roomcast_presence::RedisPresence::connect_url(&url)
                    .await
                    .map_err(|e| roomcast_presence::PresenceError(Box::new(e)))?;
                Arc::new(presence)
            }
            BackendUrl::Nats(url) => {
                let config = roomcast_presence::nats::NatsPresenceConfig::new(url);
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
        let (hub, control) = Hub::new(config.max_queue_bytes);
        let hub = Arc::new(hub);
        broker.start(Arc::new(NodeEvents { hub: hub.clone() })).await?;
        let node = Arc::new(Node {
            id: config.node_id.clone().unwrap_or_else(random_id),
            config: Arc::new(config),
            namespaces,
            hub,
            broker,
            presence,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            verifier,
            limits,
        });
        tokio::spawn(run_broker_control(Arc::downgrade(&node.hub), node.broker.clone(), control));
        Ok(node)
    }

    /// The options of `room`'s namespace, or `None` when it is not configured.
    pub fn namespace(&self, room: &Room) -> Option<&Arc<NamespaceConfig>> {
        self.namespaces.get(&room.namespace().map(str::to_string))
    }

    /// History options for a namespace.
    pub fn history_options(ns: &NamespaceConfig) -> HistoryOptions {
        if ns.history_enabled() {
            HistoryOptions { size: ns.history_size, ttl: ns.history_ttl }
        } else {
            HistoryOptions::OFF
        }
    }

    /// Whether the node can take traffic.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled() && self.broker.is_ready()
    }

    /// Starts shutting down: connections are told 4000 and the listener stops.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits, up to the configured grace period, for every connection to finish.
    pub async fn drain(&self) -> bool {
        self.tasks.close();
        let grace = Duration::from_millis(self.config.shutdown_grace_ms);
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
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
