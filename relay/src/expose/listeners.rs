//! The client listeners of a running relay, and how a new configuration changes them without
//! touching what it leaves alone.
//!
//! A service with a port of its own keeps its listener for as long as the configuration has a
//! service on that address: a changed definition (another agent, another idle timeout) goes into
//! the listener's [`Slot`] and applies to the next client. A service on the shared HTTP or HTTPS
//! listener is found by name for each request or connection ([`LiveRoutes`]). What a reload
//! removes or changes stops taking new clients at once; its connections in flight keep going for
//! `drain_grace` and are then ended (its [`Served::retired`] token).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use sallyport_runtime::sync::{read, write};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    config::{Config, Listen, Service},
    expose::{current, http, https, routes, tcp, udp, Exposure, LiveRoutes, Served, Slot},
    tunnel::datagrams::FlowRoutes,
};

/// A service's own listener, by its protocol and configured address; with port 0 (any free port,
/// a new one at each bind) also by the service's name.
type Key = (Proto, SocketAddr, Option<String>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Proto {
    Tcp,
    Udp,
}

fn key(service: &Service) -> Option<Key> {
    let (proto, addr) = match service.listen {
        Listen::Tcp(addr) => (Proto::Tcp, addr),
        Listen::Udp(addr) => (Proto::Udp, addr),
        Listen::Http(_) | Listen::Https(_) => return None,
    };
    Some((proto, addr, (addr.port() == 0).then(|| service.name.clone())))
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind {what} on {addr}: {source}")]
pub(crate) struct BindError {
    pub(crate) what: String,
    pub(crate) addr: SocketAddr,
    pub(crate) source: std::io::Error,
}

/// Sockets bound for a configuration before it takes effect: binding everything first lets a
/// configuration whose address is taken be refused whole.
#[derive(Debug, Default)]
pub(crate) struct Sockets {
    own: HashMap<Key, Own>,
    http: Option<TcpListener>,
    https: Option<TcpListener>,
}

#[derive(Debug)]
enum Own {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Own {
    fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(l) => l.local_addr().ok(),
            Self::Udp(u) => u.local_addr().ok(),
        }
    }
}

impl Sockets {
    /// Binds the listeners `config` has and `running` does not (everything when nothing runs).
    pub(crate) fn bind(config: &Config, running: Option<&Listeners>) -> Result<Self, BindError> {
        let bind_err = |what: String, addr| move |source| BindError { what, addr, source };
        let mut sockets = Self::default();
        for service in config.services.values() {
            let Some(key) = key(service) else { continue };
            if running.is_some_and(|r| r.own.contains_key(&key)) {
                continue;
            }
            let what = format!("service {:?}", service.name);
            let socket = match key {
                (Proto::Tcp, addr, _) => Own::Tcp(tcp::bind(addr).map_err(bind_err(what, addr))?),
                (Proto::Udp, addr, _) => Own::Udp(
                    sallyport_runtime::quic::socket::service_udp_socket(addr)
                        .and_then(UdpSocket::from_std)
                        .map_err(bind_err(what, addr))?,
                ),
            };
            sockets.own.insert(key, socket);
        }
        let shared = |wanted: Option<SocketAddr>, now: Option<SocketAddr>, what: &str| match wanted {
            Some(addr) if wanted != now => tcp::bind(addr).map(Some).map_err(bind_err(what.to_owned(), addr)),
            _ => Ok(None),
        };
        sockets.http = shared(
            config.relay.http_listen,
            running.and_then(|r| r.http.as_ref().map(|l| l.configured)),
            "the HTTP listener",
        )?;
        sockets.https = shared(
            config.relay.https_listen,
            running.and_then(|r| r.https.as_ref().map(|l| l.configured)),
            "the HTTPS listener",
        )?;
        Ok(sockets)
    }

    /// The bound address of each new service listener of `config`, by service name.
    pub(crate) fn service_addrs(&self, config: &Config) -> BTreeMap<String, SocketAddr> {
        config
            .services
            .values()
            .filter_map(|s| Some((s.name.clone(), self.own.get(&key(s)?)?.local_addr()?)))
            .collect()
    }

    pub(crate) fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub(crate) fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|l| l.local_addr().ok())
    }
}

#[derive(Debug)]
struct Running {
    slot: Slot,
    stop: CancellationToken,
    bound: Option<SocketAddr>,
}

#[derive(Debug)]
struct SharedListener {
    configured: SocketAddr,
    stop: CancellationToken,
}

/// The listeners serving now.
#[derive(Debug)]
pub(crate) struct Listeners {
    exposure: Arc<Exposure>,
    flows: Arc<FlowRoutes>,
    shutdown: CancellationToken,
    own: HashMap<Key, Running>,
    http: Option<SharedListener>,
    https: Option<SharedListener>,
    http_routes: LiveRoutes,
    https_routes: LiveRoutes,
    /// Each service listener's bound address, by service name (for the status page).
    pub(crate) bound: Arc<RwLock<BTreeMap<String, SocketAddr>>>,
}

/// What a reload changed, for its log line.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub(crate) added: Vec<String>,
    pub(crate) removed: Vec<String>,
    pub(crate) changed: Vec<String>,
}

impl Listeners {
    pub(crate) fn new(
        exposure: Arc<Exposure>,
        flows: Arc<FlowRoutes>,
        shutdown: CancellationToken,
        bound: Arc<RwLock<BTreeMap<String, SocketAddr>>>,
    ) -> Self {
        Self {
            exposure,
            flows,
            shutdown,
            own: HashMap::new(),
            http: None,
            https: None,
            http_routes: Default::default(),
            https_routes: Default::default(),
            bound,
        }
    }

    /// Serves `config` with `sockets` (bound for it by [`Sockets::bind`] against these listeners).
    pub(crate) fn apply(&mut self, config: &Config, mut sockets: Sockets) -> Changes {
        let grace = config.relay.drain_grace;
        // The certificates first: a terminated service is routed only once its certificate is held.
        self.exposure.certs.apply(config);
        let tasks = self.exposure.runtime.accepting.clone();
        let retire = |served: Arc<Served>| retire(&tasks, served, grace);
        let mut changes = Changes::default();
        let wanted: HashMap<Key, &Service> =
            config.services.values().filter_map(|s| Some((key(s)?, s))).collect();

        // Own listeners whose address is gone: stop accepting, drain, end.
        self.own.retain(|key, running| {
            if wanted.contains_key(key) {
                return true;
            }
            running.stop.cancel();
            let old = current(&running.slot);
            info!(service = %old.service.name, "service removed: its listener is closed");
            changes.removed.push(old.service.name.clone());
            retire(old);
            false
        });
        for (key, service) in &wanted {
            if let Some(running) = self.own.get(key) {
                let old = current(&running.slot);
                if *old.service != **service {
                    *write(&running.slot) = Served::new(service);
                    info!(service = %service.name, "service changed: new clients get the new definition");
                    changes.changed.push(service.name.clone());
                    if old.service.name != service.name {
                        changes.removed.push(old.service.name.clone());
                    }
                    retire(old);
                }
                continue;
            }
            let Some(socket) = sockets.own.remove(key) else { continue };
            let bound = socket.local_addr();
            let slot: Slot = Arc::new(RwLock::new(Served::new(service)));
            let stop = self.shutdown.child_token();
            let tasks = &self.exposure.runtime.accepting;
            match socket {
                Own::Tcp(listener) => {
                    if let Some(addr) = bound {
                        info!(service = %service.name, %addr, "service listening");
                    }
                    tasks.spawn(tcp::serve(listener, slot.clone(), self.exposure.clone(), stop.clone()));
                }
                Own::Udp(socket) => {
                    if let Some(addr) = bound {
                        info!(service = %service.name, %addr, "UDP service listening");
                    }
                    tasks.spawn(udp::serve(
                        socket,
                        slot.clone(),
                        self.exposure.clone(),
                        self.flows.clone(),
                        stop.clone(),
                    ));
                }
            }
            changes.added.push(service.name.clone());
            self.own.insert(key.clone(), Running { slot, stop, bound });
        }
        *write(&self.bound) = self
            .own
            .values()
            .filter_map(|r| Some((current(&r.slot).service.name.clone(), r.bound?)))
            .collect();

        // Names on the shared listeners: unchanged services keep their connections.
        let (old_http, old_https) = (read(&self.http_routes).clone(), read(&self.https_routes).clone());
        let (new_http, new_https) = routes(config, &[&old_http, &old_https]);
        let mut gone: Vec<Arc<Served>> = Vec::new();
        for served in old_http.values().chain(old_https.values()) {
            let kept = new_http.values().chain(new_https.values()).any(|s| Arc::ptr_eq(s, served));
            if !kept && !gone.iter().any(|g| Arc::ptr_eq(g, served)) {
                gone.push(served.clone());
            }
        }
        for served in new_http.values().chain(new_https.values()) {
            let known = old_http.values().chain(old_https.values()).any(|s| Arc::ptr_eq(s, served));
            let name = &served.service.name;
            if !known && !changes.added.contains(name) && !changes.changed.contains(name) {
                if gone.iter().any(|g| g.service.name == *name) {
                    changes.changed.push(name.clone());
                } else {
                    changes.added.push(name.clone());
                }
            }
        }
        for served in gone {
            let name = &served.service.name;
            if !changes.changed.contains(name) {
                changes.removed.push(name.clone());
            }
            retire(served);
        }
        let (hosts, names) = (new_http.len(), new_https.len());
        *write(&self.http_routes) = new_http;
        *write(&self.https_routes) = new_https;

        let (exposure, http_routes) = (self.exposure.clone(), self.http_routes.clone());
        let https_routes = self.https_routes.clone();
        let running = self.http.take();
        self.http = self.shared(running, config.relay.http_listen, sockets.http.take(), |listener, stop| {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, hosts, "HTTP listener routing by Host");
            }
            exposure.runtime.accepting.spawn(http::serve(
                listener,
                exposure.clone(),
                (http_routes, https_routes),
                stop,
            ));
        });
        let (exposure, https_routes) = (self.exposure.clone(), self.https_routes.clone());
        let running = self.https.take();
        self.https =
            self.shared(running, config.relay.https_listen, sockets.https.take(), |listener, stop| {
                if let Ok(addr) = listener.local_addr() {
                    info!(%addr, names, "HTTPS listener routing by SNI");
                }
                exposure.runtime.accepting.spawn(https::serve(
                    listener,
                    exposure.clone(),
                    https_routes,
                    stop,
                ));
            });
        changes
    }

    /// The shared listener for `wanted`: the running one if its address is the same, else the
    /// running one closed and (if wanted) a new one started on `socket`.
    fn shared(
        &self,
        running: Option<SharedListener>,
        wanted: Option<SocketAddr>,
        socket: Option<TcpListener>,
        start: impl FnOnce(TcpListener, CancellationToken),
    ) -> Option<SharedListener> {
        if running.as_ref().map(|r| r.configured) == wanted {
            return running;
        }
        if let Some(old) = running {
            info!(addr = %old.configured, "shared listener closed");
            old.stop.cancel();
        }
        let (configured, listener) = (wanted?, socket?);
        let stop = self.shutdown.child_token();
        start(listener, stop.clone());
        Some(SharedListener { configured, stop })
    }
}

/// Ends `served`'s connections once `grace` has passed (they stopped getting new clients already).
fn retire(tasks: &tokio_util::task::TaskTracker, served: Arc<Served>, grace: Duration) {
    tasks.spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(grace) => served.retired.cancel(),
            () = served.retired.cancelled() => {}
        }
    });
}
