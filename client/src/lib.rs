//! Rust client SDK for roomcast (wire protocol v1, `shared/spec/protocol.md`): one
//! [`Client`] per connection to a cluster, which reconnects with backoff, resubscribes with
//! recovery, and delivers every publication offset exactly once, in order.
//!
//! ```no_run
//! # async fn demo() -> Result<(), roomcast_client::ClientError> {
//! use roomcast_client::{Client, Data, SubscriptionEvent};
//! let client = Client::builder(vec!["ws://127.0.0.1:8000/ws".into()]).connect().await?;
//! let mut sub = client.subscribe("chat:lobby").await?;
//! client.publish("chat:lobby", Data::from_json(r#"{"text":"hi"}"#)?).await?;
//! while let Some(ev) = sub.next().await {
//!     if let SubscriptionEvent::Publication(p) = ev {
//!         println!("{:?} {:?}", p.offset, p.data);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Module map, by layer:
//! - `client.rs`: the handles the application holds:
//!   [`ClientBuilder`], [`Client`], [`Subscription`]. They talk to the driver task over
//!   bounded channels.
//! - `driver.rs`: the background task. Owns the socket, opens it (rotating through the
//!   URLs, with backoff), and moves inputs into the state machine and its outputs onto
//!   the socket. Waits and does I/O; decides nothing.
//! - `machine.rs` (behaviour): the state machine, with no socket and no timers: request
//!   ids and pending replies, the connect handshake, subscriptions and their resubscribe
//!   and recovery, liveness and handshake deadlines, what to do on close codes. Unit
//!   tested without a socket.
//! - `tracker.rs` (behaviour): exactly-once per offset for one subscription: duplicates,
//!   gaps, `skip_self` offsets, epoch changes. Pure.
//! - `backoff.rs`: reconnect delays (exponential, full jitter). Pure.
//! - `codec.rs` (protocol): requests to bytes, messages coalesced into frames, frames to
//!   [`roomcast_protocol::ServerMessage`]s.
//! - `framing.rs` (framing): the WebSocket (tokio-tungstenite): open with the
//!   subprotocol, send frames, classify what arrives.
//! - `types.rs`: options, results and events ([`SubscriptionEvent`], [`ConnectionEvent`]).
//! - `error.rs`: [`ClientError`].
//! - [`cli`] (feature `cli`, on by default): the `roomcast sub|pub|history|presence`
//!   command-line front end.

mod backoff;
mod client;
mod codec;
mod driver;
mod error;
mod framing;
mod machine;
mod tracker;
mod types;

#[cfg(feature = "cli")]
pub mod cli;

pub use backoff::BackoffConfig;
pub use client::{Client, ClientBuilder, DEFAULT_SUBSCRIPTION_BUFFER, Subscription};
pub use error::ClientError;
pub use roomcast_protocol::{Data, DataError, Encoding, Member, Position, Publication, PublisherInfo};
pub use types::{ConnectionEvent, HistoryOptions, HistoryResult, SubscribeOptions, SubscriptionEvent};
