//! One agent: its identity loaded, then a tunnel to each relay until shutdown.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use sallyport_proto::ALPN_TUNNEL;
use sallyport_runtime::{
    link::Transport,
    tls::{self, IdentityError, TlsFileError},
};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{Config, Live},
    containers::Containers,
    targets::Targets,
    tunnel::{
        self,
        renew::{self, Renewal},
        Credentials, Dialer, Timers, TunnelStatus, Tunnels,
    },
};

/// Why the agent could not start: its TLS identity is not usable.
pub type StartError = IdentityError;

/// The agent's identity as its certificate states it.
#[derive(Debug, Clone)]
pub struct IdentityInfo {
    pub name: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// Whole days of validity left (negative once expired).
    pub days_left: i64,
}

/// An agent with its identity loaded, ready to [`run`](Agent::run).
#[derive(Debug)]
pub struct Agent {
    tunnels: Arc<Tunnels>,
    identity: IdentityInfo,
    reloads: Arc<tokio::sync::Notify>,
}

impl Agent {
    /// Loads the CA and the agent's identity and checks that they belong together. Fails closed:
    /// without a certificate from the relay's CA there is no tunnel.
    pub fn new(config: Config) -> Result<Self, StartError> {
        let (rustls_config, identity) = load_identity(&config)?;
        let credentials = Credentials::new(Dialer::new(rustls_config, Timers::from(&config.agent))?);
        let containers =
            Containers::new(&identity.name, config.docker.clone(), config.containers.values().cloned());
        let config = Live::new(Arc::new(config));
        let targets = Arc::new(Targets::new(config.clone(), containers));
        let renewal = Renewal::new((identity.not_before_unix, identity.not_after_unix));
        let tunnels = Arc::new(Tunnels::new(config, targets, credentials, renewal));
        Ok(Self { tunnels, identity, reloads: Arc::default() })
    }

    /// Notifying it makes the running agent read its agent.toml again (the Windows service's
    /// parameter-change control does; SIGHUP and a change of the file do it on their own).
    pub fn reload_trigger(&self) -> Arc<tokio::sync::Notify> {
        self.reloads.clone()
    }

    /// Tries each relay over each transport (a handshake, nothing more): for `check --connect`.
    pub async fn probe_transports(
        &self,
    ) -> Vec<(String, Transport, Result<std::time::Duration, tunnel::TunnelError>)> {
        let mut out = Vec::new();
        for relay in self.tunnels.config.get().relays.clone() {
            for transport in [Transport::Quic, Transport::Tcp] {
                let result = crate::tunnel::probe(&relay, transport, &self.tunnels).await;
                out.push((relay.to_string(), transport, result));
            }
        }
        out
    }

    pub fn identity(&self) -> &IdentityInfo {
        &self.identity
    }

    /// The state of each tunnel, by relay address.
    pub fn status(&self) -> watch::Receiver<BTreeMap<String, TunnelStatus>> {
        self.tunnels.status()
    }

    /// The manager of the declared containers.
    pub fn containers(&self) -> Containers {
        self.tunnels.targets.containers.clone()
    }

    /// Keeps a tunnel to every relay until `shutdown` is cancelled, then closes them.
    pub async fn run(self, shutdown: CancellationToken) {
        let tunnels = TaskTracker::new();
        tunnels.spawn(self.tunnels.targets.containers.clone().run(shutdown.clone()));
        let config = self.tunnels.config.get();
        tracing::info!(agent = %self.identity.name, relays = config.relays.len(), "agent starting");
        for relay in &config.relays {
            tunnels.spawn(tunnel::maintain(relay.clone(), self.tunnels.clone(), shutdown.clone()));
        }
        tunnels.spawn(crate::reload::watch(self.tunnels.clone(), self.reloads.clone(), shutdown.clone()));
        tunnels.spawn(crate::drain::watch(
            config.path.clone(),
            self.tunnels.draining.clone(),
            shutdown.clone(),
        ));
        tunnels.close();
        tunnels.wait().await;
        self.tunnels.streams.close();
        self.tunnels.tasks.close();
        let finished = async { tokio::join!(self.tunnels.streams.wait(), self.tunnels.tasks.wait()) };
        let _ = tokio::time::timeout(Duration::from_secs(1), finished).await;
        tracing::info!("agent stopped");
    }
}

/// Builds and runs an agent until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Agent::new(config)?.run(shutdown).await;
    Ok(())
}

type Crypto = rustls::ClientConfig;

fn load_identity(config: &Config) -> Result<(Crypto, IdentityInfo), StartError> {
    // A renewal a crash interrupted is finished or undone first: key and certificate must match.
    let files = config.agent.tls();
    match renew::recover_identity(&files) {
        Ok(renew::Recovered::Nothing) => {}
        Ok(recovered) => tracing::warn!(?recovered, "an interrupted certificate renewal was recovered"),
        Err(e) => {
            return Err(TlsFileError {
                path: config.agent.cert.clone(),
                reason: format!("cannot recover an interrupted renewal: {e}"),
            }
            .into())
        }
    }
    let tls = files.load()?;
    let name = tls.leaf.dns_name.clone().ok_or_else(|| TlsFileError {
        path: config.agent.cert.clone(),
        reason: "certificate names no agent".into(),
    })?;
    let crypto = tls::client_rustls(tls.roots, tls.identity, &[ALPN_TUNNEL])?;
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
