//! One agent: its identity loaded, then a tunnel to each relay until shutdown.
use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use sallyport_proto::{Hello, ServiceOffer, ALPN_TUNNEL, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use sallyport_runtime::{
    tls::{self, TlsFileError},
    transport, TlsError,
};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{self, Config},
    containers::Containers,
    targets::wsl,
    tunnel,
};

/// This build, as the agent describes itself to relays.
pub const SOFTWARE: &str = concat!("sallyport-agent ", env!("CARGO_PKG_VERSION"));

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsFileError),
    #[error("TLS configuration: {0}")]
    Crypto(TlsError),
}

/// The state of the tunnel to one relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelStatus {
    Connecting,
    Connected { remote: SocketAddr, published: Vec<String> },
    Retrying { error: String },
}

/// The agent's identity as its certificate states it.
#[derive(Debug, Clone)]
pub struct IdentityInfo {
    pub name: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// Whole days of validity left (negative once expired).
    pub days_left: i64,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// Rebuilt when the certificate is renewed; each new connection takes the current one.
    pub(crate) client_config: std::sync::RwLock<quinn::ClientConfig>,
    /// Validity of the current certificate (seconds since the epoch): renewal is due when a third
    /// of it is left.
    pub(crate) cert_validity: std::sync::Mutex<(i64, i64)>,
    /// The key of a renewal request in flight and when it was sent, until its certificate arrives.
    pub(crate) renewal_key: std::sync::Mutex<Option<(String, std::time::Instant)>>,
    pub(crate) streams: TaskTracker,
    pub(crate) containers: Containers,
    /// Ids of container commands already run, with their expiry: a replay is refused.
    pub(crate) seen_commands: std::sync::Mutex<BTreeMap<u64, u64>>,
    /// The VM address of each WSL distribution a `wsl://` target names.
    pub(crate) wsl: BTreeMap<String, wsl::Resolver>,
    status: watch::Sender<BTreeMap<String, TunnelStatus>>,
}

impl Shared {
    pub(crate) fn set_status(&self, relay: &str, status: TunnelStatus) {
        self.status.send_modify(|all| {
            all.insert(relay.to_owned(), status);
        });
    }

    pub(crate) fn hello(&self) -> Hello {
        Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            software: SOFTWARE.to_owned(),
            services: self.config.services.keys().map(|name| ServiceOffer { name: name.clone() }).collect(),
        }
    }
}

/// An agent with its identity loaded, ready to [`run`](Agent::run).
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
    identity: IdentityInfo,
}

impl Agent {
    /// Loads the CA and the agent's identity and checks that they belong together. Fails closed:
    /// without a certificate from the relay's CA there is no tunnel.
    pub fn new(config: Config) -> Result<Self, StartError> {
        let (crypto, identity) = load_identity(&config)?;
        let mut client_config = quinn::ClientConfig::new(crypto);
        let timing = &config.timing;
        client_config.transport_config(transport::agent(
            timing.keep_alive,
            timing.idle_timeout,
            timing.congestion,
        ));
        let containers =
            Containers::new(&identity.name, config.docker.clone(), config.containers.values().cloned());
        let config_dir = config.path.parent().unwrap_or(std::path::Path::new(".")).to_owned();
        let wsl = config
            .services
            .values()
            .filter_map(|s| match &s.target {
                config::Target::Wsl { distro, .. } => {
                    Some((distro.clone(), wsl::Resolver::new(distro, &config_dir)))
                }
                _ => None,
            })
            .collect();
        let shared = Arc::new(Shared {
            wsl,
            config,
            client_config: std::sync::RwLock::new(client_config),
            cert_validity: std::sync::Mutex::new((identity.not_before_unix, identity.not_after_unix)),
            renewal_key: std::sync::Mutex::new(None),
            streams: TaskTracker::new(),
            containers,
            seen_commands: std::sync::Mutex::default(),
            status: watch::Sender::new(BTreeMap::new()),
        });
        Ok(Self { shared, identity })
    }

    pub fn identity(&self) -> &IdentityInfo {
        &self.identity
    }

    /// The state of each tunnel, by relay address.
    pub fn status(&self) -> watch::Receiver<BTreeMap<String, TunnelStatus>> {
        self.shared.status.subscribe()
    }

    /// The manager of the declared containers.
    pub fn containers(&self) -> Containers {
        self.shared.containers.clone()
    }

    /// Keeps a tunnel to every relay until `shutdown` is cancelled, then closes them.
    pub async fn run(self, shutdown: CancellationToken) {
        let tunnels = TaskTracker::new();
        tunnels.spawn(self.shared.containers.clone().run(shutdown.clone()));
        tracing::info!(agent = %self.identity.name, relays = self.shared.config.relays.len(), "agent starting");
        for relay in &self.shared.config.relays {
            tunnels.spawn(tunnel::maintain(relay.clone(), self.shared.clone(), shutdown.clone()));
        }
        tunnels.close();
        tunnels.wait().await;
        self.shared.streams.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.streams.wait()).await;
        tracing::info!("agent stopped");
    }
}

/// Builds and runs an agent until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Agent::new(config)?.run(shutdown).await;
    Ok(())
}

type Crypto = Arc<quinn::crypto::rustls::QuicClientConfig>;

fn load_identity(config: &Config) -> Result<(Crypto, IdentityInfo), StartError> {
    let tls = config.tls.load()?;
    let name = tls.leaf.dns_name.clone().ok_or_else(|| TlsFileError {
        path: config.tls.cert.clone(),
        reason: "certificate names no agent".into(),
    })?;
    let crypto = tls::client_crypto(tls.roots, tls.identity, &[ALPN_TUNNEL]).map_err(StartError::Crypto)?;
    Ok((
        crypto,
        IdentityInfo {
            name,
            not_before_unix: tls.leaf.not_before_unix,
            not_after_unix: tls.leaf.not_after_unix,
            days_left: tls.leaf.days_left(),
        },
    ))
}
