//! One tunnel per relay: connect (mutual TLS), say `Hello`, get `Welcome`, then serve data streams
//! and answer pings until the connection ends; reconnect forever with full-jitter backoff.

mod choice;
pub(crate) mod commands;
mod connect;
mod control;
mod handshake;
mod lanes;
pub(crate) mod renew;
mod replicas;
mod slot;
mod streams;

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use quinn::ConnectionError;
use sallyport_proto::{Hello, ServiceOffer, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use sallyport_runtime::{link::Transport, FrameError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::replicas::Group;
use crate::{
    config::{Live, RelayAddr},
    targets::Targets,
};
pub(crate) use connect::probe;
use slot::keep_slot;

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
    /// Rebuilt when the certificate is renewed; each new connection takes the current one.
    pub(crate) client_config: RwLock<quinn::ClientConfig>,
    /// The same identity for tunnels over TCP.
    pub(crate) tcp_config: RwLock<Arc<rustls::ClientConfig>>,
    /// The transport that last carried a tunnel to each relay (`auto` starts there).
    remembered: Mutex<BTreeMap<String, Transport>>,
    /// Validity of the current certificate (seconds since the epoch): renewal is due when a third
    /// of it is left.
    pub(crate) cert_validity: Mutex<(i64, i64)>,
    /// The key of a renewal request in flight and when it was sent, until its certificate arrives.
    pub(crate) renewal_key: Mutex<Option<(String, Instant)>>,
    /// Data streams in flight.
    pub(crate) streams: TaskTracker,
    /// Ids of container commands already run, with their expiry: a replay is refused.
    pub(crate) seen_commands: Mutex<BTreeMap<u64, u64>>,
    status: watch::Sender<BTreeMap<String, TunnelStatus>>,
}

impl Tunnels {
    pub(crate) fn new(
        config: Arc<Live>,
        targets: Arc<Targets>,
        (client_config, tcp_config): (quinn::ClientConfig, Arc<rustls::ClientConfig>),
        cert_validity: (i64, i64),
    ) -> Self {
        Self {
            config,
            offers: watch::Sender::new(0),
            targets,
            client_config: RwLock::new(client_config),
            tcp_config: RwLock::new(tcp_config),
            remembered: Mutex::default(),
            cert_validity: Mutex::new(cert_validity),
            renewal_key: Mutex::new(None),
            streams: TaskTracker::new(),
            seen_commands: Mutex::default(),
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

    fn remove_status(&self, relay: &str) {
        self.status.send_modify(|all| {
            all.remove(relay);
        });
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

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot resolve the relay address: {0}")]
    Resolve(io::Error),
    #[error("the relay address resolves to nothing")]
    NoAddress,
    #[error("cannot open a UDP socket: {0}")]
    Socket(io::Error),
    #[error("cannot start the connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The TCP transport's connect or TLS handshake failed.
    #[error("over TCP: {0}")]
    Tcp(String),
    #[error("{0}")]
    Connection(#[from] ConnectionError),
    #[error("control stream: {0}")]
    Frame(#[from] FrameError),
    #[error("the relay refused this agent: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no Welcome from the relay within {0:?}")]
    Timeout(Duration),
    #[error("no answer from the relay within {0:?}")]
    NoAnswer(Duration),
    /// The connection reached a replica the agent holds a tunnel to already.
    #[error("reached replica {0}, which this agent holds a tunnel to already")]
    Held(String),
}

impl TunnelError {
    /// Whether the error says QUIC cannot get through (no answer, UDP refused), so `auto` tries TCP.
    fn udp_blocked(&self) -> bool {
        matches!(
            self,
            Self::NoAnswer(_)
                | Self::Timeout(_)
                | Self::Socket(_)
                | Self::Connect(_)
                | Self::Connection(ConnectionError::TimedOut)
        )
    }
}

/// Keeps a tunnel to `relay` up until `stop` is cancelled; to each of its replicas, when the
/// relay runs as several behind one address.
pub(crate) async fn maintain(relay: RelayAddr, tunnels: Arc<Tunnels>, stop: CancellationToken) {
    let group = Arc::new(Group::default());
    let slots = TaskTracker::new();
    let mut changes = group.changes();
    loop {
        for slot in group.to_start() {
            slots.spawn(keep_slot(relay.clone(), tunnels.clone(), stop.clone(), group.clone(), slot));
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
    slots.close();
    slots.wait().await;
}
