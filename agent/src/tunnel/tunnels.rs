//! What the tunnels to every relay share: the configuration in force, the targets, the
//! credentials, the renewal state, the replay memory of commands, the tasks they started, and
//! each tunnel's status.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use sallyport_proto::{Hello, ServiceOffer, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use sallyport_runtime::{link::Transport, sync::lock};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use super::{connect::Credentials, renew::Renewal};
use crate::{config::Live, targets::Targets};

/// This build, as the agent describes itself to relays.
pub const SOFTWARE: &str = concat!("sallyport-agent ", env!("CARGO_PKG_VERSION"));

/// The state of the tunnel to one relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelStatus {
    Connecting,
    /// Up; `replica` names the replica it reached, for a relay that runs as several.
    Connected {
        remote: SocketAddr,
        published: Vec<String>,
        replica: Option<String>,
        /// The transport carrying it, and why that one.
        transport: Transport,
        why: String,
    },
    Retrying {
        error: String,
    },
}

/// What the tunnels to every relay share.
#[derive(Debug)]
pub(crate) struct Tunnels {
    /// The configuration in force (a reload of agent.toml replaces it).
    pub(crate) config: Arc<Live>,
    /// Bumped by each applied reload: every live tunnel then offers the relay its services again.
    pub(crate) offers: watch::Sender<u64>,
    /// What the relay's streams and datagrams are dialed to.
    pub(crate) targets: Arc<Targets>,
    /// The client configurations of both transports (replaced when the certificate is renewed).
    pub(crate) credentials: Credentials,
    /// The certificate's validity and the renewal in flight.
    pub(crate) renewal: Renewal,
    /// Data streams in flight.
    pub(crate) streams: TaskTracker,
    /// Work a tunnel started that may outlive a message: commands being run, tunnels a probe
    /// replaced serving their last streams. The agent waits for them (briefly) when it stops.
    pub(crate) tasks: TaskTracker,
    /// The agent asks its relays for no new connections (`sallyport-agent drain`).
    pub(crate) draining: watch::Sender<bool>,
    /// Ids of container commands already run, with their expiry: a replay is refused.
    pub(crate) seen_commands: Mutex<BTreeMap<u64, u64>>,
    /// The transport that last carried a tunnel to each relay (`auto` starts there).
    remembered: Mutex<BTreeMap<String, Transport>>,
    status: watch::Sender<BTreeMap<String, TunnelStatus>>,
}

impl Tunnels {
    pub(crate) fn new(
        config: Arc<Live>,
        targets: Arc<Targets>,
        credentials: Credentials,
        renewal: Renewal,
    ) -> Self {
        let draining = watch::Sender::new(crate::drain::is_on(&config.get().path));
        Self {
            config,
            draining,
            offers: watch::Sender::new(0),
            targets,
            credentials,
            renewal,
            streams: TaskTracker::new(),
            tasks: TaskTracker::new(),
            seen_commands: Mutex::default(),
            remembered: Mutex::default(),
            status: watch::Sender::new(BTreeMap::new()),
        }
    }

    /// The state of each tunnel, by relay address.
    pub(crate) fn status(&self) -> watch::Receiver<BTreeMap<String, TunnelStatus>> {
        self.status.subscribe()
    }

    pub(crate) fn set_status(&self, relay: &str, status: TunnelStatus) {
        self.status.send_modify(|all| {
            all.insert(relay.to_owned(), status);
        });
    }

    pub(crate) fn remove_status(&self, relay: &str) {
        self.status.send_modify(|all| {
            all.remove(relay);
        });
    }

    /// The transport that last carried a tunnel of slot `key`.
    pub(crate) fn remembered(&self, key: &str) -> Option<Transport> {
        lock(&self.remembered).get(key).copied()
    }

    pub(crate) fn remember(&self, key: &str, transport: Transport) {
        lock(&self.remembered).insert(key.to_owned(), transport);
    }

    /// The services this agent offers now.
    pub(crate) fn offers(&self) -> Vec<ServiceOffer> {
        self.config.get().services.keys().map(|name| ServiceOffer { name: name.clone() }).collect()
    }

    pub(crate) fn hello(&self) -> Hello {
        Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            software: SOFTWARE.to_owned(),
            services: self.offers(),
        }
    }
}
