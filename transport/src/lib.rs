//! Host-to-host transport of ssi-vmm.
//!
//! One trait, [`Transport`], carries every [`proto::Message`] between the VMM processes of a
//! cluster: one-way sends, requests matched to their responses by id, and a receive path that
//! hands each incoming message to the [`Handler`] registered for its [`Service`] (DSM, vCPU, I/O,
//! control). Users (the DSM, later IPI and I/O forwarding) only see the trait, so an RDMA
//! implementation can replace [`tcp::TcpTransport`] without touching them.
//!
//! Guarantees every implementation gives:
//! - messages from one host to another arrive in the order they were sent, at most once;
//! - before any message flows, both ends proved they hold the cluster key
//!   ([`proto::handshake`]); a peer that fails is closed, logged and counted, and gets no data;
//! - a peer that dies or stops answering is reported to every handler
//!   ([`PeerEvent::Down`]) within a few seconds, and requests waiting on it fail at once;
//! - handlers are called on the transport's receive threads and must not block (no
//!   [`Transport::request`] from inside a handler).

pub mod auth;
pub mod dispatch;
pub mod tcp;

pub use dispatch::{Dispatcher, Responder, ResponseSink};
pub use proto::{HostId, Message, Service};
pub use tcp::{TcpConfig, TcpTransport};

use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Errors of the transport API.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The host is not in the cluster configuration.
    #[error("{0} is not a configured peer")]
    UnknownPeer(HostId),
    /// Sending to ourselves is not a transport operation.
    #[error("cannot send to the local host {0}")]
    SelfSend(HostId),
    /// No live connection to the peer (never came up, or died).
    #[error("{0} is down")]
    PeerDown(HostId),
    /// A request got no response in time.
    #[error("request to {peer} timed out after {timeout:?}")]
    Timeout {
        /// Peer asked.
        peer: HostId,
        /// How long we waited.
        timeout: Duration,
    },
    /// Not every peer connected in time.
    #[error("peers not connected: {}", fmt_missing(.0))]
    NotConnected(Vec<(HostId, String)>),
    /// The transport has been shut down.
    #[error("transport is shut down")]
    Shutdown,
    /// Invalid configuration.
    #[error("invalid transport configuration: {0}")]
    Config(String),
    /// Socket setup failed.
    #[error("{0}")]
    Io(String),
}

fn fmt_missing(m: &[(HostId, String)]) -> String {
    m.iter()
        .map(|(h, e)| format!("{h} ({e})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A change in a peer's reachability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// An authenticated connection to the peer is established.
    Up(HostId),
    /// The connection to the peer is gone.
    Down {
        /// Peer.
        peer: HostId,
        /// What was observed (EOF, silence, malformed frame...).
        reason: String,
    },
}

/// Receives the messages of one [`Service`]. Called on receive threads: must not block.
pub trait Handler: Send + Sync {
    /// A message arrived. `responder` is `Some` when the peer sent a request and waits for an
    /// answer: call [`Responder::reply`] (dropping it answers with an error).
    fn on_message(&self, from: HostId, msg: Message, responder: Option<Responder>);

    /// A peer came up or went down.
    fn on_peer_event(&self, _event: &PeerEvent) {}
}

/// Host-to-host messaging, independent of the network technology.
pub trait Transport: Send + Sync {
    /// This host's id.
    fn local(&self) -> HostId;

    /// Every other host of the cluster.
    fn peers(&self) -> Vec<HostId>;

    /// Queues a one-way message to `to`. Does not block on the network.
    fn send(&self, to: HostId, msg: Message) -> Result<(), Error>;

    /// Sends a request and waits for the matching response.
    fn request(&self, to: HostId, msg: Message, timeout: Duration) -> Result<Message, Error>;

    /// Routes messages of `service` to `handler`. Messages that arrived for the service before
    /// a handler existed are delivered first, in order.
    fn register(&self, service: Service, handler: Arc<dyn Handler>);

    /// Stops routing messages of `service` (later ones are buffered again).
    fn unregister(&self, service: Service);

    /// Whether an authenticated connection to `peer` is up.
    fn is_up(&self, peer: HostId) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_readable() {
        let e = Error::NotConnected(vec![(HostId(2), "connection refused".into())]);
        assert_eq!(
            e.to_string(),
            "peers not connected: host2 (connection refused)"
        );
        assert_eq!(Error::PeerDown(HostId(1)).to_string(), "host1 is down");
    }
}
