//! What the tunnel plane works with: the configuration, the runtime, the registry of connected
//! agents, the trust, the flow routes, renewals, the gate and the replicas.

use std::sync::Arc;

use super::{datagrams::FlowRoutes, gate::Gate, registry::Registry, renewal::Renewals};
use crate::{cluster::Cluster, config::Live, runtime::Runtime, trust::Trust};

/// What the tunnel plane works with.
#[derive(Debug)]
pub(crate) struct Tunnels {
    pub(crate) config: Arc<Live>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) trust: Arc<Trust>,
    /// UDP flows by id, for the datagrams agents send back.
    pub(crate) flows: Arc<FlowRoutes>,
    pub(crate) renewals: Renewals,
    /// Agents whose copied identities were logged lately.
    pub(crate) conflicts: super::conflicts::Conflicts,
    /// What peers that have not proven who they are may hold.
    pub(crate) gate: Arc<Gate>,
    /// This relay's replicas, when it is one of several (`[cluster]`).
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// TLS for tunnels over TCP (the same identities and trust rules as QUIC's).
    pub(crate) tcp_tls: Option<Arc<rustls::ServerConfig>>,
}
