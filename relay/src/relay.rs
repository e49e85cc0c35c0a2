//! One relay: bind, run, drain.
//!
//! [`Relay::bind`] loads the TLS material and binds every socket (failing closed with a clear
//! error); [`Relay::run`] serves until the shutdown token is cancelled and then drains.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use sallyport_proto::{codes::close, ALPN_TUNNEL};
use sallyport_runtime::{
    code,
    tls::{self, IdentityError, TlsFileError},
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::access::log::{AccessLog, Destination};
use crate::{
    config::{Config, Live},
    expose::{
        listeners::{Listeners, Sockets},
        Exposure,
    },
    ops::{
        admin,
        auth::{load_admin_token, load_read_token, AdminTokenError},
        reload::{self, Reloader},
        Ops,
    },
    runtime::Runtime,
    trust::{Trust, TrustError},
    tunnel::{self, datagrams::FlowRoutes, registry::AgentSession, registry::Registry, Tunnels},
};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind { what: String, addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    AdminToken(#[from] AdminTokenError),
    /// Enrollment, token or revocation state that cannot be used.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// `[cluster]` without what it needs.
    #[error(transparent)]
    Cluster(#[from] sallyport_runtime::config::ConfigError),
    /// The access log's file cannot be opened.
    #[error("cannot open the access log {path} (key `access.log`): {source}")]
    AccessLog { path: String, source: std::io::Error },
}

impl From<TlsFileError> for StartError {
    fn from(error: TlsFileError) -> Self {
        Self::Identity(error.into())
    }
}

/// A relay with its sockets bound, ready to [`run`](Relay::run).
#[derive(Debug)]
pub struct Relay {
    endpoint: quinn::Endpoint,
    /// The tunnel's own TCP listener; `None` when the HTTPS listener shares its port.
    tunnel_tcp: Option<TcpListener>,
    tcp_tls: Arc<rustls::ServerConfig>,
    sockets: Sockets,
    admin: TcpListener,
    /// The replica port of a relay with `[cluster]`.
    replica_port: Option<ReplicaPort>,
    reloads: mpsc::Receiver<reload::Request>,
    config: Arc<Config>,
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    ops: Arc<Ops>,
    access_log: AccessLog,
}

impl Relay {
    /// Loads the CA and the relay's identity and binds the QUIC endpoint, the service listeners and
    /// the admin listener. Nothing is accepted until [`run`](Relay::run).
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let tls = config.relay.tls().load()?;
        let relay_not_after = tls.leaf.not_after_unix;
        // The intermediate the relay's certificate carries, when it has one (`init` makes one).
        let issuer_not_after =
            tls.identity.chain.get(1).and_then(|c| tls::inspect(c).ok()).map(|info| info.not_after_unix);
        let admin_token = load_admin_token(&config)?;
        let read_token = load_read_token(&config)?;
        if let (Some(admin), Some(read), Some(path)) =
            (&admin_token, &read_token, &config.relay.read_token_file)
        {
            if admin.matches(read.secret()) {
                return Err(AdminTokenError::SameAsAdmin { path: path.clone() }.into());
            }
        }
        // The replicas' mutual TLS: every replica holds this certificate and key.
        let replica_identity =
            tls::Identity { chain: tls.identity.chain.clone(), key: tls.identity.key.clone_key() };
        let (cluster, replica_port) = cluster_of(&config, replica_identity).await?;
        let trust = Trust::load(&config, admin_token.is_some())?;
        let rustls_config = if trust.enrollment.is_some() {
            // Enrolling agents have no certificate yet and pin the CA by hash: send it along.
            let mut identity = tls.identity;
            identity.chain.push(tls.ca.clone());
            tls::server_rustls(
                tls.roots,
                identity,
                &[ALPN_TUNNEL, sallyport_proto::enroll::ALPN_ENROLL],
                tls::ClientCerts::Optional,
            )
        } else {
            tls::server_rustls(tls.roots, tls.identity, &[ALPN_TUNNEL], tls::ClientCerts::Required)
        }
        .map_err(IdentityError::from)?;
        // The same identities and trust rules over TCP.
        let tcp_tls = Arc::new(rustls_config.clone());
        let crypto = tls::quic_server(rustls_config).map_err(IdentityError::from)?;
        let mut server = quinn::ServerConfig::with_crypto(crypto);
        server
            .transport_config(sallyport_runtime::quic::relay(
                config.relay.keep_alive,
                config.relay.idle_timeout,
                config.relay.congestion,
            ))
            .max_incoming(config.relay.max_incoming);

        let bind_err = |what: &str, addr| {
            let what = what.to_owned();
            move |source| StartError::Bind { what, addr, source }
        };
        let (socket, tunnel_tcp) = bind_tunnel(&config).map_err(|(what, addr, source)| StartError::Bind {
            what: what.to_owned(),
            addr,
            source,
        })?;
        let (endpoint, udp) = sallyport_runtime::quic::counted::counted_endpoint(
            sallyport_runtime::quic::socket::endpoint_with_stable_reset(&tls.key_pem),
            Some(server),
            socket,
        )
        .map_err(bind_err("the QUIC endpoint", config.relay.listen))?;

        let sockets = Sockets::bind(&config, None).map_err(|e| StartError::Bind {
            what: e.what,
            addr: e.addr,
            source: e.source,
        })?;
        let admin = TcpListener::bind(config.relay.admin)
            .await
            .map_err(bind_err("the admin server", config.relay.admin))?;

        let access_log = match &config.access.log {
            None => AccessLog::none(),
            Some(destination) => AccessLog::open(destination).map_err(|source| StartError::AccessLog {
                path: match destination {
                    Destination::Stdout => "stdout".to_owned(),
                    Destination::File { path, .. } => path.display().to_string(),
                },
                source,
            })?,
        };
        let bound = Arc::new(RwLock::new(sockets.service_addrs(&config)));
        let config = Arc::new(config);
        let (reload, reloads) = mpsc::channel(4);
        let runtime = Arc::new(Runtime::with_udp(udp));
        runtime.metrics.relay_certificate(relay_not_after, issuer_not_after);
        let registry = Arc::new(Registry::default());
        let ops = Arc::new(Ops {
            config: Live::new(config.clone()),
            runtime: runtime.clone(),
            agents: registry.clone(),
            groups: Default::default(),
            certs: Default::default(),
            trust: Arc::new(trust),
            admin_token,
            read_token,
            commands: Default::default(),
            bound,
            reload,
            cluster,
        });
        Ok(Self {
            endpoint,
            tunnel_tcp,
            tcp_tls,
            sockets,
            admin,
            replica_port,
            reloads,
            config,
            runtime,
            registry,
            ops,
            access_log,
        })
    }

    /// The UDP address of the QUIC endpoint.
    pub fn quic_addr(&self) -> SocketAddr {
        // Bound from a std socket: the address is known.
        self.endpoint.local_addr().unwrap_or(self.config.relay.listen)
    }

    /// The TCP address agents reach the tunnel at over TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.tunnel_tcp {
            Some(listener) => listener.local_addr().ok(),
            None => self.sockets.https_addr(),
        }
    }

    /// The bound address of each service's own listener (TCP or UDP), by service name.
    pub fn service_addrs(&self) -> BTreeMap<String, SocketAddr> {
        sallyport_runtime::sync::read(&self.ops.bound).clone()
    }

    /// The bound address of the HTTP listener, if there is one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.sockets.http_addr()
    }

    /// The bound address of the HTTPS listener, if there is one.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.sockets.https_addr()
    }

    /// The bound address of the admin server.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.relay.admin)
    }

    /// Connected agents, updated as they come and go.
    pub fn agents(&self) -> tokio::sync::watch::Receiver<BTreeMap<String, AgentSession>> {
        self.registry.subscribe()
    }

    /// Serves until `shutdown` is cancelled, then drains: turns not-ready, stops accepting, lets
    /// client connections finish within the grace period, and closes every tunnel with
    /// "going away" so agents reconnect at once (to this relay once it is back, or another).
    pub async fn run(self, shutdown: CancellationToken) {
        let Self {
            endpoint,
            tunnel_tcp,
            tcp_tls,
            sockets,
            admin,
            replica_port,
            reloads,
            config,
            runtime,
            registry,
            ops,
            access_log,
        } = self;
        let admin_addr = admin.local_addr().unwrap_or(config.relay.admin);
        // What runs through the drain (the admin server, a draining replica telling the writer)
        // stops after it.
        let after_drain = CancellationToken::new();
        let background = &runtime.background;
        background.spawn(admin::serve(admin, ops.clone(), after_drain.clone()));
        // Lines held back by the per-peer log budgets are counted in one line per site and period.
        let flush_until = after_drain.clone();
        background.spawn(async move {
            tokio::select! {
                () = sallyport_runtime::peer_logs::flush_every_period() => {}
                () = flush_until.cancelled() => {}
            }
        });
        if let Some((listener, tls)) = replica_port {
            background.spawn(crate::ops::replica_port::serve(
                listener,
                tls,
                ops.clone(),
                after_drain.clone(),
            ));
        }

        let live = ops.config.clone();
        let flows = Arc::new(FlowRoutes::default());
        let tunnels = Arc::new(Tunnels {
            config: live.clone(),
            runtime: runtime.clone(),
            registry: registry.clone(),
            trust: ops.trust.clone(),
            flows: flows.clone(),
            renewals: Default::default(),
            conflicts: Default::default(),
            gate: tunnel::gate(&config.relay),
            cluster: ops.cluster.clone(),
            tcp_tls: Some(tcp_tls),
        });
        let tasks = &runtime.accepting;
        background.spawn(tunnel::revoked::close_refused(
            registry.clone(),
            ops.trust.clone(),
            after_drain.clone(),
        ));
        tasks.spawn(tunnel::accept_loop(endpoint.clone(), tunnels.clone(), shutdown.clone()));
        let (handoff, handoffs) = mpsc::channel(64);
        tasks.spawn(tunnel::tcp_accept_loop(tunnel_tcp, handoffs, tunnels, shutdown.clone()));

        let exposure = Arc::new(Exposure::new(
            live.clone(),
            runtime.clone(),
            (registry.clone(), ops.groups.clone(), ops.certs.clone()),
            handoff,
            access_log,
        ));
        let mut listeners = Listeners::new(exposure, flows, shutdown.clone(), ops.bound.clone());
        listeners.apply(&config, sockets);
        let reloader =
            Reloader { live: live.clone(), listeners, registry: registry.clone(), runtime: runtime.clone() };
        background.spawn(reload::watch(reloader, reloads, shutdown.clone()));
        background.spawn(ops.certs.clone().watch(shutdown.clone()));
        background.spawn(crate::certs::acme::run(live.clone(), ops.certs.clone(), shutdown.clone()));
        let (limits, budget) = (&config.relay, config.relay.budget());
        info!(
            memory_budget_mib = limits.memory_budget >> 20,
            max_connections = limits.max_connections,
            per_connection_kib = budget.per_connection >> 10,
            "memory budget"
        );
        if limits.max_connections > budget.connections {
            warn!(
                max_connections = limits.max_connections,
                fit = budget.connections,
                "relay.max_connections is more than relay.memory_budget holds at worst: raise the budget \
                 (and the pod's memory limit) or lower the cap"
            );
        }
        runtime.set_ready(true);
        runtime.metrics.cluster(1, true);
        if let Some(cluster) = &ops.cluster {
            let registry = registry.clone();
            let local = move || registry.subscribe().borrow().keys().cloned().collect();
            let sync = crate::cluster::sync::run(
                (cluster.clone(), live.clone()),
                ops.trust.clone(),
                runtime.clone(),
                local,
                after_drain.clone(),
            );
            background.spawn(sync);
            info!(replica = %cluster.me.name, writer = %cluster.config.writer, "replica of a cluster");
        }
        if let Ok(quic) = endpoint.local_addr() {
            info!(%quic, admin = %admin_addr, services = config.services.len(), "relay ready");
        }

        shutdown.cancelled().await;
        if let Some(cluster) = &ops.cluster {
            // Out of the list of replicas serving at once, before the drain.
            cluster.drain();
        }
        drain(&endpoint, &runtime, &registry, live.get().relay.drain_grace).await;
        after_drain.cancel();
        background.close();
        if tokio::time::timeout(Duration::from_secs(2), background.wait()).await.is_err() {
            warn!(remaining = background.len(), "background tasks still running at the stop");
        }
        info!("relay stopped");
    }
}

/// Turns not-ready, stops accepting agents, lets client connections finish within `grace`, then
/// closes every tunnel with "going away".
async fn drain(endpoint: &quinn::Endpoint, runtime: &Runtime, registry: &Registry, grace: Duration) {
    runtime.set_ready(false);
    endpoint.set_server_config(None);
    let clients = &runtime.clients;
    info!(in_flight = clients.len(), ?grace, "draining");
    clients.close();
    if tokio::time::timeout(grace, clients.wait()).await.is_err() {
        warn!(remaining = clients.len(), "grace period over: resetting the remaining connections");
    }
    endpoint.close(code(close::GOING_AWAY), b"relay going away");
    registry.clear();
    let settle = Duration::from_secs(2);
    let _ = tokio::time::timeout(settle, clients.wait()).await;
    runtime.accepting.close();
    let _ = tokio::time::timeout(settle, runtime.accepting.wait()).await;
    let _ = tokio::time::timeout(settle, endpoint.wait_idle()).await;
    info!(udp = %runtime.udp.figures(), "QUIC socket");
}

/// Binds the QUIC socket and the tunnel's TCP listener. Unless `relay.tcp_listen` says otherwise,
/// TCP takes the QUIC socket's address and port (when that port is chosen by the system, one free
/// for both); no listener of its own when the HTTPS listener is at that address.
#[allow(clippy::type_complexity)]
fn bind_tunnel(
    config: &Config,
) -> Result<(std::net::UdpSocket, Option<TcpListener>), (&'static str, SocketAddr, std::io::Error)> {
    const TRIES: usize = 16;
    let quic =
        |addr| sallyport_runtime::quic::socket::quic_socket(addr).map_err(|e| ("the QUIC endpoint", addr, e));
    let tcp = |addr: SocketAddr| {
        std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(TcpListener::from_std)
            .map_err(|e| ("the tunnel's TCP listener", addr, e))
    };
    let shared = |addr: SocketAddr| config.relay.https_listen == Some(addr);
    if !config.relay.tcp_tunnel {
        return Ok((quic(config.relay.listen)?, None));
    }
    if let Some(addr) = config.relay.tcp_listen {
        let socket = quic(config.relay.listen)?;
        return Ok((socket, if shared(addr) { None } else { Some(tcp(addr)?) }));
    }
    for _ in 0..TRIES {
        let socket = quic(config.relay.listen)?;
        let port = socket.local_addr().map(|a| a.port()).unwrap_or(config.relay.listen.port());
        let addr = SocketAddr::new(config.relay.listen.ip(), port);
        if shared(config.relay.listen) {
            return Ok((socket, None));
        }
        match tcp(addr) {
            Ok(listener) => return Ok((socket, Some(listener))),
            // A port the system chose for UDP may be taken for TCP: choose again.
            Err(_) if config.relay.listen.port() == 0 => continue,
            Err(e) => return Err(e),
        }
    }
    let socket = quic(config.relay.listen)?;
    Err((
        "the tunnel's TCP listener",
        socket.local_addr().unwrap_or(config.relay.listen),
        std::io::ErrorKind::AddrInUse.into(),
    ))
}

/// The replica port: its listener and TLS.
type ReplicaPort = (tokio::net::TcpListener, Arc<rustls::ServerConfig>);

/// The relay's place in its `[cluster]`, if it has one, and its replica port (bound): it needs a
/// replica name; replicas prove themselves to each other with the relay's own certificate.
async fn cluster_of(
    config: &Config,
    identity: tls::Identity,
) -> Result<(Option<Arc<crate::cluster::Cluster>>, Option<ReplicaPort>), StartError> {
    use sallyport_runtime::{config::ConfigError, replica_tls};
    let Some(cluster) = &config.cluster else { return Ok((None, None)) };
    if cluster.replica.is_empty() {
        return Err(ConfigError::invalid(
            &config.path,
            "cluster.replica",
            "a relay of a cluster needs its replica's name: set it, or pass `serve --replica NAME` (in \
             Kubernetes, the pod's name)",
        )
        .into());
    }
    let copy = tls::Identity { chain: identity.chain.clone(), key: identity.key.clone_key() };
    let client = Arc::new(replica_tls::client(copy).map_err(IdentityError::from)?);
    let server = Arc::new(replica_tls::server(identity).map_err(IdentityError::from)?);
    let listener =
        tokio::net::TcpListener::bind(cluster.peer_listen).await.map_err(|source| StartError::Bind {
            what: "the replica port (cluster.peer_listen)".into(),
            addr: cluster.peer_listen,
            source,
        })?;
    Ok((Some(Arc::new(crate::cluster::Cluster::new(cluster.clone(), client))), Some((listener, server))))
}

/// Binds and runs a relay until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Relay::bind(config).await?.run(shutdown).await;
    Ok(())
}
