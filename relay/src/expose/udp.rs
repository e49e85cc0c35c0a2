//! UDP services: each client address on a service's UDP port is a flow, carried to the agent as
//! QUIC datagrams (see [`sallyport_proto::datagram`]).
//!
//! The service's task owns its flow table (client address to flow); the relay-wide [`Flows`] maps
//! flow ids back to socket and client for datagrams coming from agents. A flow quiet for
//! `relay.udp_flow_idle` is forgotten; a new flow beyond `relay.udp_max_flows` replaces the oldest.
//! A datagram too large for the tunnel's datagram size is counted and dropped.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use sallyport_proto::datagram::{Datagram, MAX_OPEN_OVERHEAD};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::{config::Service, relay::Shared};

/// The largest UDP payload read from a client (the IPv4 maximum).
const MAX_PAYLOAD: usize = 65_535;

/// One flow as both directions see it.
#[derive(Debug)]
struct FlowState {
    id: u32,
    client: SocketAddr,
    /// The agent has answered on this tunnel: plain `Data` datagrams suffice.
    confirmed: AtomicBool,
    /// The tunnel connection the flow last went out on (a new one must hear `Open` again).
    tunnel: AtomicU64,
    /// Milliseconds since the relay's start of the last datagram either way.
    last: AtomicU64,
}

/// Where a flow's datagrams from the agent go: the flow, its service's socket, the service.
type Route = (Arc<FlowState>, Arc<UdpSocket>, Arc<Service>);

/// Flows of every UDP service by id, for datagrams arriving from agents.
#[derive(Debug)]
pub(crate) struct Flows {
    by_id: Mutex<HashMap<u32, Route>>,
    next: AtomicU32,
    epoch: Instant,
}

impl Default for Flows {
    fn default() -> Self {
        Self { by_id: Mutex::new(HashMap::new()), next: AtomicU32::new(1), epoch: Instant::now() }
    }
}

impl Flows {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Route>> {
        self.by_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Serves one UDP service until `stop` is cancelled.
pub(crate) async fn serve(
    socket: UdpSocket,
    service: Arc<Service>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let socket = Arc::new(socket);
    let limits = &shared.config.limits;
    let flows = &shared.udp_flows;
    let mut table: HashMap<SocketAddr, Arc<FlowState>> = HashMap::new();
    let mut order: VecDeque<SocketAddr> = VecDeque::new();
    // The payload is read after room for the largest header, which is then written in front of it.
    let mut buf = vec![0u8; MAX_OPEN_OVERHEAD + MAX_PAYLOAD];
    let mut sweep = tokio::time::interval((limits.udp_flow_idle / 4).max(Duration::from_millis(250)));
    loop {
        let (len, client) = tokio::select! {
            r = socket.recv_from(&mut buf[MAX_OPEN_OVERHEAD..]) => match r {
                Ok(got) => got,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on some systems: not fatal.
                    debug!(service = %service.name, error = %e, "UDP receive error");
                    continue;
                }
            },
            _ = sweep.tick() => {
                let idle = limits.udp_flow_idle.as_millis() as u64;
                let now = flows.now();
                let mut by_id = flows.lock();
                table.retain(|_, flow| {
                    let keep = now.saturating_sub(flow.last.load(Ordering::Relaxed)) < idle;
                    if !keep {
                        by_id.remove(&flow.id);
                    }
                    keep
                });
                drop(by_id);
                order.retain(|addr| table.contains_key(addr));
                shared.metrics.udp_flows(&service.name, table.len());
                continue;
            }
            () = stop.cancelled() => break,
        };
        let Some(connection) = shared.registry.route(&service.agent, &service.name) else {
            shared.metrics.refused(&service.name, "no_agent");
            continue;
        };
        let flow = match table.get(&client) {
            Some(flow) => flow.clone(),
            None => {
                if table.len() >= limits.udp_max_flows {
                    if let Some(oldest) = order.pop_front() {
                        if let Some(old) = table.remove(&oldest) {
                            flows.lock().remove(&old.id);
                        }
                        shared.metrics.refused(&service.name, "flow_evicted");
                    }
                }
                let flow = Arc::new(FlowState {
                    id: flows.next.fetch_add(1, Ordering::Relaxed),
                    client,
                    confirmed: AtomicBool::new(false),
                    tunnel: AtomicU64::new(connection.stable_id() as u64),
                    last: AtomicU64::new(flows.now()),
                });
                flows.lock().insert(flow.id, (flow.clone(), socket.clone(), service.clone()));
                table.insert(client, flow.clone());
                order.push_back(client);
                shared.metrics.udp_flows(&service.name, table.len());
                flow
            }
        };
        flow.last.store(flows.now(), Ordering::Relaxed);
        if flow.tunnel.swap(connection.stable_id() as u64, Ordering::Relaxed) != connection.stable_id() as u64
        {
            flow.confirmed.store(false, Ordering::Relaxed);
        }
        let payload = &buf[MAX_OPEN_OVERHEAD..MAX_OPEN_OVERHEAD + len];
        let datagram = if flow.confirmed.load(Ordering::Relaxed) {
            Datagram::Data { flow: flow.id, payload }
        } else {
            Datagram::Open { flow: flow.id, service: &service.name, client, payload }
        };
        if connection.max_datagram_size().is_none_or(|max| datagram.encoded_len() > max) {
            shared.metrics.refused(&service.name, "oversized");
            debug!(service = %service.name, len, "datagram too large for the tunnel: dropped");
            continue;
        }
        let mut out = BytesMut::with_capacity(datagram.encoded_len());
        datagram.encode(&mut out);
        match connection.send_datagram(out.freeze()) {
            Ok(()) => shared.metrics.udp_datagram(&service.name, true),
            Err(e) => {
                shared.metrics.refused(&service.name, "tunnel_refused");
                debug!(service = %service.name, error = %e, "datagram not sent");
            }
        }
    }
    let mut by_id = flows.lock();
    for flow in table.values() {
        by_id.remove(&flow.id);
    }
}

/// Reads the datagrams an agent sends and delivers them to the flows' clients, until the tunnel
/// closes (`Ok` with why). A datagram that is not valid, or opens a flow (only the relay does), is a
/// protocol error (`Err`).
pub(crate) async fn from_agent(connection: &quinn::Connection, shared: &Shared) -> Result<String, String> {
    let flows = &shared.udp_flows;
    loop {
        let bytes = match connection.read_datagram().await {
            Ok(bytes) => bytes,
            Err(e) => return Ok(e.to_string()),
        };
        let (id, payload) = match Datagram::decode(&bytes) {
            Ok(Datagram::Open { .. }) => return Err("the agent sent a flow-opening datagram".into()),
            Ok(Datagram::Data { flow, payload }) => (flow, Some(payload)),
            Ok(Datagram::Unknown { flow }) => (flow, None),
            Err(e) => return Err(format!("invalid datagram: {e}")),
        };
        // A flow the relay already forgot has no client any more.
        let Some((flow, socket, service)) = flows.lock().get(&id).cloned() else { continue };
        let Some(payload) = payload else {
            info!(service = %service.name, flow = id, "the agent lost a flow: reopening it");
            flow.confirmed.store(false, Ordering::Relaxed);
            continue;
        };
        flow.confirmed.store(true, Ordering::Relaxed);
        flow.last.store(flows.now(), Ordering::Relaxed);
        match socket.send_to(payload, flow.client).await {
            Ok(_) => shared.metrics.udp_datagram(&service.name, false),
            Err(e) => {
                shared.metrics.refused(&service.name, "client_send_failed");
                debug!(service = %service.name, client = %flow.client, error = %e, "datagram to client not sent");
            }
        }
    }
}
