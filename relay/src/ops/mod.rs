//! The operator's surface: the admin API and its auth, container commands, the status page.

pub(crate) mod admin;
pub mod auth;
pub(crate) mod commands;
mod drain;
pub(crate) mod reload;
pub(crate) mod replica_port;
mod replicas;
pub(crate) mod status;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use tokio::sync::mpsc;

use crate::{config::Live, runtime::Runtime, trust::Trust, tunnel::registry::Registry};

/// What the admin API works with.
#[derive(Debug)]
pub(crate) struct Ops {
    pub(crate) config: Arc<Live>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) agents: Arc<Registry>,
    /// Service groups: drains, live connections per member.
    pub(crate) groups: Arc<crate::groups::Groups>,
    /// The certificates of terminated HTTPS services.
    pub(crate) certs: Arc<crate::certs::Store>,
    pub(crate) trust: Arc<Trust>,
    /// The bearer token operator calls need; none configured: they are refused.
    pub(crate) admin_token: Option<auth::AdminToken>,
    /// The bearer token that only reads (`/agents`, `/metrics`, the status pages).
    pub(crate) read_token: Option<auth::AdminToken>,
    pub(crate) commands: commands::Commands,
    /// Each service listener's bound address (the configured port may be 0).
    pub(crate) bound: Arc<RwLock<BTreeMap<String, SocketAddr>>>,
    /// Where `POST /reload` asks for a reload.
    pub(crate) reload: mpsc::Sender<reload::Request>,
    /// This relay's replicas, when it is one of several (`[cluster]`).
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Ops {
    /// Whether the relay takes clients (`/readyz`): serving, and in a cluster warm (it holds the
    /// agents the other replicas hold).
    pub(crate) fn is_ready(&self) -> bool {
        self.runtime.is_ready() && self.cluster.as_ref().is_none_or(|c| c.is_warm())
    }
}
