//! One relay: bind, run, drain.
//!
//! [`Relay::bind`] loads the TLS material and binds every socket (failing closed with a clear
//! error); [`Relay::run`] serves until the shutdown token is cancelled and then drains.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{atomic::AtomicBool, atomic::Ordering, Arc},
    time::Duration,
};

use sallyport_proto::{codes::close, ALPN_TUNNEL};
use sallyport_runtime::{
    code,
    tls::{self, TlsFileError},
    transport, TlsError,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    config::{self, Config},
    expose::{http, https, limits, tcp, udp},
    metrics,
    ops::admin,
    trust::{enroll, pki, revocations},
    tunnel::{
        self,
        registry::{self, AgentSession, Registry},
    },
};

/// This build, as the relay describes itself to agents.
pub const SOFTWARE: &str = concat!("sallyport-relay ", env!("CARGO_PKG_VERSION"));

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsFileError),
    #[error("TLS configuration: {0}")]
    Crypto(TlsError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind { what: String, addr: SocketAddr, source: std::io::Error },
    #[error("no async runtime for QUIC")]
    Runtime,
    #[error("{}: admin token: {reason}", path.display())]
    AdminToken { path: std::path::PathBuf, reason: String },
    /// Enrollment, token or revocation state that cannot be used.
    #[error("{0}")]
    State(String),
}

/// State shared by every task of one relay.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) registry: Registry,
    pub(crate) ready: AtomicBool,
    /// Client connections in flight (drained on shutdown).
    pub(crate) clients: TaskTracker,
    /// Everything else the relay spawned.
    pub(crate) tasks: TaskTracker,
    pub(crate) connection_limit: Arc<Semaphore>,
    /// The bearer token container commands need; none configured: commands are refused.
    pub(crate) admin_token: Option<String>,
    /// The next container command id (random start, so ids do not repeat across restarts).
    pub(crate) next_command: std::sync::atomic::AtomicU64,
    pub(crate) metrics: metrics::Metrics,
    /// Each service listener's bound address (the configured port may be 0).
    pub(crate) bound: BTreeMap<String, SocketAddr>,
    /// Join tokens and the CA that signs enrolling agents' keys; `None`: enrollment is off.
    pub(crate) enrollment: Option<enroll::Enrollment>,
    pub(crate) revocations: revocations::Revocations,
    /// Host names of the HTTP and HTTPS listeners to their services.
    pub(crate) routes: Routes,
    /// Connections per client address on the HTTP and HTTPS listeners.
    pub(crate) per_ip: Arc<limits::PerIp>,
    pub(crate) http_pool: http::Pool,
    pub(crate) udp_flows: udp::Flows,
}

/// Which service each name of the HTTP and HTTPS listeners belongs to.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    pub(crate) http: std::collections::HashMap<String, Arc<config::Service>>,
    pub(crate) https: std::collections::HashMap<String, Arc<config::Service>>,
}

impl Routes {
    fn new(config: &Config) -> Self {
        let mut routes = Self::default();
        for service in config.services.values() {
            let (map, names) = match &service.listen {
                config::Listen::Http(names) => (&mut routes.http, names),
                config::Listen::Https(names) => (&mut routes.https, names),
                config::Listen::Tcp(_) | config::Listen::Udp(_) => continue,
            };
            let service = Arc::new(service.clone());
            for name in names {
                map.insert(name.clone(), service.clone());
            }
        }
        routes
    }
}

/// A relay with its sockets bound, ready to [`run`](Relay::run).
#[derive(Debug)]
pub struct Relay {
    endpoint: quinn::Endpoint,
    listeners: Vec<(Arc<config::Service>, TcpListener)>,
    udp: Vec<(Arc<config::Service>, tokio::net::UdpSocket)>,
    http: Option<TcpListener>,
    https: Option<TcpListener>,
    admin: TcpListener,
    shared: Arc<Shared>,
}

impl Relay {
    /// Loads the CA and the relay's identity and binds the QUIC endpoint, the service listeners and
    /// the admin listener. Nothing is accepted until [`run`](Relay::run).
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let tls = config.tls.load()?;
        let admin_token = load_admin_token(&config)?;
        let enrollment = load_enrollment(&config, admin_token.is_some())?;
        let crypto = if enrollment.is_some() {
            // Enrolling agents have no certificate yet and pin the CA by hash: send it along.
            let mut identity = tls.identity;
            identity.chain.push(tls.ca.clone());
            tls::server_crypto_with(
                tls.roots,
                identity,
                &[ALPN_TUNNEL, sallyport_proto::enroll::ALPN_ENROLL],
                tls::ClientCerts::Optional,
            )
        } else {
            tls::server_crypto(tls.roots, tls.identity, &[ALPN_TUNNEL])
        }
        .map_err(StartError::Crypto)?;
        let mut server = quinn::ServerConfig::with_crypto(crypto);
        server
            .transport_config(transport::relay(config.limits.idle_timeout, config.limits.congestion))
            .max_incoming(config.limits.max_incoming);

        let bind_err = |what: &str, addr| {
            let what = what.to_owned();
            move |source| StartError::Bind { what, addr, source }
        };
        let socket =
            transport::quic_socket(config.listen).map_err(bind_err("the QUIC endpoint", config.listen))?;
        let runtime = quinn::default_runtime().ok_or(StartError::Runtime)?;
        let endpoint = quinn::Endpoint::new(
            transport::endpoint_with_stable_reset(&tls.key_pem),
            Some(server),
            socket,
            runtime,
        )
        .map_err(bind_err("the QUIC endpoint", config.listen))?;

        let mut listeners = Vec::new();
        let mut udp = Vec::new();
        for service in config.services.values() {
            let what = format!("service {:?}", service.name);
            match service.listen {
                config::Listen::Tcp(addr) => {
                    let listener = tcp::bind(addr).map_err(bind_err(&what, addr))?;
                    listeners.push((Arc::new(service.clone()), listener));
                }
                config::Listen::Udp(addr) => {
                    let socket = transport::service_udp_socket(addr)
                        .and_then(tokio::net::UdpSocket::from_std)
                        .map_err(bind_err(&what, addr))?;
                    udp.push((Arc::new(service.clone()), socket));
                }
                config::Listen::Http(_) | config::Listen::Https(_) => {}
            }
        }
        let http = match config.http_listen {
            Some(addr) => Some(tcp::bind(addr).map_err(bind_err("the HTTP listener", addr))?),
            None => None,
        };
        let https = match config.https_listen {
            Some(addr) => Some(tcp::bind(addr).map_err(bind_err("the HTTPS listener", addr))?),
            None => None,
        };
        let admin =
            TcpListener::bind(config.admin).await.map_err(bind_err("the admin server", config.admin))?;

        let revocations =
            revocations::Revocations::open(config.revocations_file.clone()).map_err(StartError::State)?;
        let connection_limit = Arc::new(Semaphore::new(config.limits.max_connections));
        let shared = Arc::new(Shared {
            registry: Registry::default(),
            ready: AtomicBool::new(false),
            clients: TaskTracker::new(),
            tasks: TaskTracker::new(),
            connection_limit,
            admin_token,
            next_command: std::sync::atomic::AtomicU64::new(fastrand::u64(..u64::MAX / 2)),
            metrics: metrics::Metrics::default(),
            enrollment,
            revocations,
            bound: listeners
                .iter()
                .filter_map(|(s, l): &(Arc<config::Service>, TcpListener)| {
                    l.local_addr().ok().map(|a| (s.name.clone(), a))
                })
                .chain(udp.iter().filter_map(|(s, u)| u.local_addr().ok().map(|a| (s.name.clone(), a))))
                .collect(),
            routes: Routes::new(&config),
            per_ip: limits::PerIp::new(config.limits.max_connections_per_ip),
            http_pool: http::Pool::default(),
            udp_flows: udp::Flows::default(),
            config,
        });
        Ok(Self { endpoint, listeners, udp, http, https, admin, shared })
    }

    /// The UDP address of the QUIC endpoint.
    pub fn quic_addr(&self) -> SocketAddr {
        // Bound from a std socket: the address is known.
        self.endpoint.local_addr().unwrap_or(self.shared.config.listen)
    }

    /// The bound address of each service's own listener (TCP or UDP), by service name.
    pub fn service_addrs(&self) -> BTreeMap<String, SocketAddr> {
        self.shared.bound.clone()
    }

    /// The bound address of the HTTP listener, if there is one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound address of the HTTPS listener, if there is one.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound address of the admin server.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.shared.config.admin)
    }

    /// Connected agents, updated as they come and go.
    pub fn agents(&self) -> tokio::sync::watch::Receiver<BTreeMap<String, AgentSession>> {
        self.shared.registry.subscribe()
    }

    /// Serves until `shutdown` is cancelled, then drains: turns not-ready, stops accepting, lets
    /// client connections finish within the grace period, and closes every tunnel with
    /// "going away" so agents reconnect at once (to this relay once it is back, or another).
    pub async fn run(self, shutdown: CancellationToken) {
        let Self { endpoint, listeners, udp, http, https, admin, shared } = self;
        let admin_addr = admin.local_addr().unwrap_or(shared.config.admin);
        let admin_stop = CancellationToken::new();
        tokio::spawn(admin::serve(admin, shared.clone(), admin_stop.clone()));
        shared.tasks.spawn(tunnel::accept_loop(endpoint.clone(), shared.clone(), shutdown.clone()));
        for (service, listener) in listeners {
            if let Ok(addr) = listener.local_addr() {
                info!(service = %service.name, %addr, "service listening");
            }
            shared.tasks.spawn(tcp::serve(listener, service, shared.clone(), shutdown.clone()));
        }
        for (service, socket) in udp {
            if let Ok(addr) = socket.local_addr() {
                info!(service = %service.name, %addr, "UDP service listening");
            }
            shared.tasks.spawn(udp::serve(socket, service, shared.clone(), shutdown.clone()));
        }
        if let Some(listener) = http {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, hosts = shared.routes.http.len(), "HTTP listener routing by Host");
            }
            shared.tasks.spawn(http::serve(listener, shared.clone(), shutdown.clone()));
            let (shared, stop) = (shared.clone(), shutdown.clone());
            shared.tasks.clone().spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(15));
                loop {
                    tokio::select! {
                        _ = tick.tick() => shared.http_pool.sweep(),
                        () = stop.cancelled() => return,
                    }
                }
            });
        }
        if let Some(listener) = https {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, names = shared.routes.https.len(), "HTTPS listener routing by SNI");
            }
            shared.tasks.spawn(https::serve(listener, shared.clone(), shutdown.clone()));
        }
        shared.ready.store(true, Ordering::Release);
        if let Ok(quic) = endpoint.local_addr() {
            info!(%quic, admin = %admin_addr, services = shared.config.services.len(), "relay ready");
        }

        shutdown.cancelled().await;
        shared.ready.store(false, Ordering::Release);
        endpoint.set_server_config(None);
        let grace = shared.config.limits.drain_grace;
        info!(in_flight = shared.clients.len(), ?grace, "draining");
        shared.clients.close();
        if tokio::time::timeout(grace, shared.clients.wait()).await.is_err() {
            warn!(remaining = shared.clients.len(), "grace period over: resetting the remaining connections");
        }
        endpoint.close(code(close::GOING_AWAY), b"relay going away");
        shared.registry.clear();
        let settle = Duration::from_secs(2);
        let _ = tokio::time::timeout(settle, shared.clients.wait()).await;
        shared.tasks.close();
        let _ = tokio::time::timeout(settle, shared.tasks.wait()).await;
        let _ = tokio::time::timeout(settle, endpoint.wait_idle()).await;
        admin_stop.cancel();
        info!("relay stopped");
    }
}

/// Binds and runs a relay until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Relay::bind(config).await?.run(shutdown).await;
    Ok(())
}

/// Why a container command got no result from the agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    #[error("the agent is not connected")]
    NoAgent,
    #[error("the agent disconnected before answering")]
    Lost,
    #[error("the agent did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("{0}")]
    Failed(String),
}

/// How long a command stays valid for the agent, and how long the relay waits for its result
/// (a container start may take a while).
const COMMAND_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);
const COMMAND_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

/// Sends a container command to `agent` over its control stream and waits for the result.
pub(crate) async fn send_command(
    shared: &Shared,
    agent: &str,
    container: &str,
    action: sallyport_proto::ContainerAction,
) -> Result<String, CommandError> {
    let session = shared.registry.subscribe().borrow().get(agent).cloned().ok_or(CommandError::NoAgent)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let command = sallyport_proto::Command {
        id: shared.next_command.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        expires_unix: now + COMMAND_LIFETIME.as_secs(),
        container: container.to_owned(),
        action,
    };
    tracing::info!(agent, container, ?action, id = command.id, "container command");
    let (reply, result) = tokio::sync::oneshot::channel();
    session
        .commands
        .send(registry::PendingCommand { command, reply })
        .await
        .map_err(|_| CommandError::Lost)?;
    match tokio::time::timeout(COMMAND_WAIT, result).await {
        Err(_) => Err(CommandError::Timeout(COMMAND_WAIT)),
        Ok(Err(_)) => Err(CommandError::Lost),
        Ok(Ok(result)) => result.map_err(CommandError::Failed),
    }
}

/// Reads `relay.admin_token_file`: a token of at least 16 characters, or an error naming the file.
pub fn load_admin_token(config: &Config) -> Result<Option<String>, StartError> {
    let Some(path) = &config.admin_token_file else { return Ok(None) };
    let fail = |reason: String| StartError::AdminToken { path: path.clone(), reason };
    let token = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let token = token.trim();
    if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(fail("must hold one token of at least 16 characters, no spaces".into()));
    }
    Ok(Some(token.to_owned()))
}

/// Enrollment is on when `relay.ca_key` is set; tokens are made through the admin API, so it also
/// needs the admin token.
fn load_enrollment(config: &Config, has_admin_token: bool) -> Result<Option<enroll::Enrollment>, StartError> {
    let Some(key_path) = &config.ca_key else { return Ok(None) };
    if !has_admin_token {
        return Err(StartError::State(
            "relay.ca_key turns enrollment on, which needs relay.admin_token_file (tokens are made through the admin API)".into(),
        ));
    }
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| StartError::State(format!("{}: cannot read: {e}", path.display())))
    };
    let ca = pki::Ca::from_pem(&read(&config.tls.ca_cert)?, &read(key_path)?)
        .map_err(|e| StartError::State(format!("{}: {e}", key_path.display())))?;
    let tokens = enroll::TokenStore::open(config.tokens_file.clone()).map_err(StartError::State)?;
    Ok(Some(enroll::Enrollment { ca, tokens, validity: config.agent_cert_validity }))
}

/// Compares secrets in time independent of where they differ (lengths are not secret here).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Builds the join token string from the admin API's answer to `POST /tokens` (`ID SECRET_HEX`):
/// adds the relay addresses agents dial (default: the relay certificate's first name, port 443),
/// the name its certificate carries, and the SHA-256 of the CA certificate.
pub fn join_token(config: &Config, relays: &[String], created: &str) -> Result<String, String> {
    let mut words = created.split_whitespace();
    let (Some(id), Some(secret)) = (words.next(), words.next()) else {
        return Err(format!("unexpected answer from the admin API: {created:?}"));
    };
    let id = u64::from_str_radix(id, 16).map_err(|e| format!("token id {id:?}: {e}"))?;
    let secret: Vec<u8> = (0..secret.len())
        .step_by(2)
        .map(|i| secret.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<_>>()
        .ok_or("malformed token secret from the admin API")?;
    let secret: [u8; 32] = secret.try_into().map_err(|_| "token secret is not 32 bytes".to_owned())?;
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
    };
    let ca = tls::certs_from_pem(&read(&config.tls.ca_cert)?, "CA file").map_err(|e| e.to_string())?;
    let relay_cert =
        tls::certs_from_pem(&read(&config.tls.cert)?, "relay certificate").map_err(|e| e.to_string())?;
    let info = tls::inspect(&relay_cert[0]).map_err(|e| e.to_string())?;
    let server_name = info.sans.first().cloned().ok_or("the relay certificate has no name")?;
    let relays = if relays.is_empty() {
        vec![if server_name.contains(':') {
            format!("[{server_name}]:443")
        } else {
            format!("{server_name}:443")
        }]
    } else {
        relays.to_vec()
    };
    let token = sallyport_proto::enroll::JoinToken {
        relays,
        server_name,
        ca_sha256: tls::cert_sha256(&ca[0]),
        id,
        secret,
    };
    Ok(token.encode())
}
