//! Agents over QUIC: accepting them, their identity from the certificate, admission, the control
//! loop that lasts as long as the connection, the registry of connected agents, opening data
//! streams to them, and the datagrams they send.

mod accept;
mod admission;
mod control;
pub(crate) mod datagrams;
mod gate;
mod lanes;
pub(crate) mod registry;
mod renewal;
pub(crate) mod revoked;
pub(crate) mod streams;

use std::sync::Arc;

pub(crate) use accept::{accept_loop, tcp_accept_loop, Handoff};

/// The gate in front of the handshake, for `limits`.
pub(crate) fn gate(limits: &crate::config::Limits) -> Arc<gate::Gate> {
    gate::Gate::new(limits)
}
pub use admission::SOFTWARE;

use crate::{cluster::Cluster, config::Live, runtime::Runtime, trust::Trust};

/// What the tunnel plane works with.
#[derive(Debug)]
pub(crate) struct Tunnels {
    pub(crate) config: Arc<Live>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) registry: Arc<registry::Registry>,
    pub(crate) trust: Arc<Trust>,
    /// UDP flows by id, for the datagrams agents send back.
    pub(crate) flows: Arc<datagrams::FlowRoutes>,
    pub(crate) renewals: renewal::Renewals,
    /// What peers that have not proven who they are may hold.
    pub(crate) gate: Arc<gate::Gate>,
    /// This relay's replicas, when it is one of several (`[cluster]`).
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// TLS for tunnels over TCP (the same identities and trust rules as QUIC's).
    pub(crate) tcp_tls: Option<Arc<rustls::ServerConfig>>,
}
