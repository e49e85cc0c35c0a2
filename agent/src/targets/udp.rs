//! The agent's side of UDP services: datagrams from the relay open flows (one socket each toward
//! the service's UDP target) and carry their payloads; the target's answers go back as datagrams
//! of the same flow. A flow quiet for `agent.udp_flow_idle` is closed. Flows are grouped by their
//! client's prefix as the relay's are: one prefix holds at most a quarter of `agent.udp_max_flows`,
//! and a new flow in a full table closes a flow of the fullest prefix, not-yet-answered and quiet
//! ones first, so a flood of new clients does not close the flows of others.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::BytesMut;
use sallyport_proto::{
    codes::close,
    datagram::{data_header, Datagram, DATA_OVERHEAD},
};
use sallyport_runtime::link::Connection;
use sallyport_runtime::{
    code,
    flows::{source_prefix, Activity, FlowTable, Tracked},
};
use tokio::net::UdpSocket;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::{config::Target, targets::Targets};

#[derive(Debug)]
struct Flow {
    socket: Arc<UdpSocket>,
    live: Arc<Liveness>,
    reader: tokio::task::JoinHandle<()>,
    /// What the flow was opened for, to open it again on a fresh socket.
    service: String,
    client: SocketAddr,
}

/// What a flow's table entry and its reader task share.
#[derive(Debug, Default)]
struct Liveness {
    /// The last datagram either way.
    activity: Activity,
    /// The target has answered.
    answered: AtomicBool,
    /// Datagrams carried to the target (counting stops at 2).
    sent: AtomicU32,
    /// The target's host said "port unreachable" to this socket: the next datagram goes out on a
    /// fresh one (a socket told that may report nothing the target sends later: wine's Windows
    /// sockets stop there).
    unreachable: AtomicBool,
}

/// Whether an error of a flow's socket is the target's host saying "port unreachable" (ICMP):
/// ECONNREFUSED on Linux, WSAECONNRESET on Windows.
fn is_unreachable(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset)
}

/// How recently an answered flow must have carried a datagram to count as established.
const ESTABLISHED_WITHIN: Duration = Duration::from_secs(10);

/// The share of the flow table one client prefix (/24, /64) may hold.
const PREFIX_SHARE: usize = 4;

impl Tracked for Flow {
    fn activity(&self) -> &Activity {
        &self.live.activity
    }

    /// A conversation: its client spoke more than once, its target answered, and it was active
    /// lately. A flood of new one-datagram flows does not push it out.
    fn established(&self) -> bool {
        let live = &self.live;
        live.sent.load(Ordering::Relaxed) >= 2
            && live.answered.load(Ordering::Relaxed)
            && live.activity.idle_for() < ESTABLISHED_WITHIN
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Serves the relay's datagrams on `connection` until it closes.
pub(crate) async fn serve(connection: &Connection, targets: &Arc<Targets>) {
    let config = targets.config.get();
    let (idle, max) = (config.agent.udp_flow_idle, config.agent.udp_max_flows);
    drop(config);
    // Grouped by the client's prefix (from the relay's `Open`), like the relay's own table.
    let mut flows: FlowTable<u32, Flow> = FlowTable::with_groups(max, max / PREFIX_SHARE, |_| 0);
    let mut sweep = tokio::time::interval((idle / 4).max(Duration::from_millis(250)));
    // Each flow's reader: aborted when its flow goes, and all of them with the connection.
    let readers = TaskTracker::new();
    loop {
        let bytes = tokio::select! {
            d = connection.read_datagram() => match d {
                Ok(bytes) => bytes,
                Err(_) => return,
            },
            _ = sweep.tick() => {
                flows.sweep(idle);
                continue;
            }
        };
        let (id, payload) = match Datagram::decode(&bytes) {
            Ok(Datagram::Data { flow, payload }) => (flow, payload),
            Ok(Datagram::Open { flow, service, client, payload }) => {
                if !flows.contains(&flow) {
                    let Some(new) = open(connection, targets, flow, service, client, &readers).await else {
                        continue;
                    };
                    if let Some((oldest, _)) = flows.insert_in(source_prefix(&client), flow, new) {
                        debug!(flow = oldest, "too many UDP flows: closed the oldest");
                    }
                }
                (flow, payload)
            }
            Ok(Datagram::Unknown { .. }) => continue,
            Err(e) => {
                warn!(error = %e, "invalid datagram from the relay: closing the tunnel");
                connection.close(code(close::PROTOCOL_ERROR), b"invalid datagram");
                return;
            }
        };
        let Some(mut flow) = flows.get(&id) else {
            // Closed here (idle or over the cap) but still known to the relay: ask it to reopen.
            let mut out = BytesMut::with_capacity(DATA_OVERHEAD);
            Datagram::Unknown { flow: id }.encode(&mut out);
            let _ = connection.send_datagram(out.freeze());
            continue;
        };
        if flow.live.unreachable.load(Ordering::Relaxed) {
            let (service, client) = (flow.service.clone(), flow.client);
            debug!(flow = id, "the target was unreachable: the flow goes on from a fresh socket");
            let Some(fresh) = open(connection, targets, id, &service, client, &readers).await else {
                continue;
            };
            flows.insert_in(source_prefix(&client), id, fresh);
            let Some(reopened) = flows.get(&id) else { continue };
            flow = reopened;
        }
        flow.live.activity.touch();
        let _ =
            flow.live.sent.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < 2).then_some(n + 1));
        if let Err(e) = flow.socket.send(payload).await {
            debug!(flow = id, error = %e, "datagram to the target not sent");
            if is_unreachable(&e) {
                flow.live.unreachable.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Opens flow `id` of `service` toward its target, with a task that carries the target's answers.
async fn open(
    connection: &Connection,
    targets: &Arc<Targets>,
    id: u32,
    service: &str,
    client: SocketAddr,
    readers: &TaskTracker,
) -> Option<Flow> {
    let config = targets.config.get();
    let Some(declared) = config.services.get(service) else {
        debug!(service, "UDP flow for a service this agent does not declare: dropped");
        return None;
    };
    let target = match &declared.target {
        Target::Udp { host, port } => match tokio::net::lookup_host((host.as_str(), *port)).await {
            Ok(mut addrs) => addrs.next(),
            Err(e) => {
                sallyport_runtime::limited!(warn, service, target = %declared.target, error = %e, "cannot resolve the UDP target");
                None
            }
        },
        Target::Wsl { distro, port } => match targets.wsl(distro) {
            Some(resolver) => match resolver.address(None).await {
                Ok(ip) => Some(SocketAddr::new(ip, *port)),
                Err(e) => {
                    sallyport_runtime::limited!(warn, service, error = %e, "no WSL2 address for the UDP target");
                    None
                }
            },
            None => None,
        },
        Target::Tcp { .. } | Target::Container { .. } => {
            sallyport_runtime::limited!(warn, service, target = %declared.target, "the relay sent UDP for a service whose target is not UDP: dropped");
            None
        }
    }?;
    let socket = match UdpSocket::bind(sallyport_runtime::addr::unspecified_like(target)).await {
        Ok(socket) => socket,
        Err(e) => {
            sallyport_runtime::limited!(warn, service, error = %e, "cannot open a UDP socket for a flow");
            return None;
        }
    };
    if let Err(e) = socket.connect(target).await {
        sallyport_runtime::limited!(warn, service, %target, error = %e, "cannot reach the UDP target");
        return None;
    }
    sallyport_runtime::limited!(info, service, %client, flow = id, %target, "UDP flow opened");
    let socket = Arc::new(socket);
    let live = Arc::new(Liveness::default());
    let reader = readers.spawn(answers(connection.clone(), socket.clone(), id, live.clone()));
    Some(Flow { socket, live, reader, service: service.to_owned(), client })
}

/// Carries the target's datagrams of one flow to the relay. Each gets a buffer the size the tunnel
/// can carry, allocated when the socket is readable, so an idle flow holds no buffer.
async fn answers(connection: Connection, socket: Arc<UdpSocket>, id: u32, live: Arc<Liveness>) {
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let Some(max) = connection.max_datagram_size() else { return };
        // One byte more than fits: a datagram that fills it was too large (and maybe cut).
        let mut buf = BytesMut::zeroed(max + 1);
        let len = match socket.try_recv(&mut buf[DATA_OVERHEAD..]) {
            Ok(len) => len,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if is_unreachable(&e) => {
                // The target is not there (yet): the next datagram opens a fresh socket, with a
                // reader of its own.
                debug!(flow = id, error = %e, "UDP target unreachable");
                live.unreachable.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                debug!(flow = id, error = %e, "UDP target error");
                continue;
            }
        };
        if DATA_OVERHEAD + len > max {
            debug!(flow = id, len, max, "datagram from the target too large for the tunnel: dropped");
            continue;
        }
        buf.truncate(DATA_OVERHEAD + len);
        buf[..DATA_OVERHEAD].copy_from_slice(&data_header(id));
        live.activity.touch();
        live.answered.store(true, Ordering::Relaxed);
        if connection.send_datagram(buf.freeze()).is_err() {
            return;
        }
    }
}
