//! UDP flows as the tunnel plane sees them: every UDP service's flows by id, and the reader of the
//! datagrams an agent sends back, which delivers each to its flow's client.
//!
//! The UDP service that owns a flow (see `expose::udp`) registers it here when it opens and
//! removes it when the flow goes idle or is evicted.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use sallyport_proto::datagram::Datagram;
use sallyport_runtime::{
    flows::{Activity, Tracked},
    pace::{take_now, Pace},
    sync::lock,
};
use tokio::net::UdpSocket;
use tracing::debug;

use crate::{
    config::Service,
    metrics::Metrics,
    tunnel::closed::{Closed, ProtocolError},
};

/// One flow as both directions see it.
#[derive(Debug)]
pub(crate) struct FlowState {
    pub(crate) id: u32,
    pub(crate) client: SocketAddr,
    /// The agent has answered on this tunnel: plain `Data` datagrams suffice.
    pub(crate) confirmed: AtomicBool,
    /// The tunnel connection the flow last went out on (a new one must hear `Open` again).
    pub(crate) tunnel: AtomicU64,
    /// The last datagram either way.
    pub(crate) activity: Activity,
    /// Datagrams from the client (counting stops at 2).
    pub(crate) from_client: AtomicU32,
    /// Bytes from the client, and to it, while it has sent one datagram only.
    pub(crate) received: AtomicU64,
    pub(crate) sent: AtomicU64,
    /// The bandwidth caps of its service and agent when it opened: a datagram over one is dropped.
    pub(crate) pace: Option<Pace>,
    /// The member of the service's group that carries it now; only its answers are taken.
    pub(crate) agent: Mutex<Arc<str>>,
}

/// What a flow whose client has spoken once may be sent, at most, for each byte it sent (as QUIC
/// limits a server before the client's address is validated), on top of
/// [`UNCONFIRMED_ALLOWANCE`]. A service that streams to whoever sent it one datagram (a game
/// server, a media feed) then sends a spoofed victim no more than that until the victim speaks.
pub(crate) const UNCONFIRMED_AMPLIFICATION: u64 = 3;

/// What any flow may be sent before its client speaks again: one answer, a DNS one with EDNS
/// included.
pub(crate) const UNCONFIRMED_ALLOWANCE: u64 = 4096;

impl FlowState {
    /// Counts a datagram of `len` bytes from the client and marks the flow active.
    pub(crate) fn client_spoke(&self, len: usize) {
        self.activity.touch();
        self.received.fetch_add(len as u64, Ordering::Relaxed);
        let _ =
            self.from_client.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < 2).then_some(n + 1));
    }

    /// Whether `len` more bytes may go to the client: always once it has spoken twice (a source
    /// that answers is no spoofed victim), else within [`UNCONFIRMED_AMPLIFICATION`] times what it
    /// sent. Counts them when they may.
    pub(crate) fn may_send(&self, len: usize) -> bool {
        if self.from_client.load(Ordering::Relaxed) >= 2 {
            return true;
        }
        let received = self.received.load(Ordering::Relaxed);
        let budget = received.saturating_mul(UNCONFIRMED_AMPLIFICATION) + UNCONFIRMED_ALLOWANCE;
        self.sent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |sent| {
                let next = sent + len as u64;
                (next <= budget).then_some(next)
            })
            .is_ok()
    }
}

/// How recently an answered flow must have carried a datagram to count as established.
const ESTABLISHED_WITHIN: Duration = Duration::from_secs(10);

impl Tracked for FlowState {
    fn activity(&self) -> &Activity {
        &self.activity
    }

    /// A conversation: its client spoke more than once, the agent answered, and it was active
    /// lately. A flood of new one-datagram sources does not push it out.
    fn established(&self) -> bool {
        self.from_client.load(Ordering::Relaxed) >= 2
            && self.confirmed.load(Ordering::Relaxed)
            && self.activity.idle_for() < ESTABLISHED_WITHIN
    }

    /// A one-datagram exchange that got its answer and went quiet (a DNS query from a random
    /// port): evicting it loses nothing.
    fn done(&self) -> bool {
        self.from_client.load(Ordering::Relaxed) < 2
            && self.confirmed.load(Ordering::Relaxed)
            && self.activity.idle_for() >= DONE_AFTER
    }
}

/// How long an answered one-datagram flow stays quiet before it counts as done.
const DONE_AFTER: Duration = Duration::from_secs(1);

/// Where a flow's datagrams from the agent go.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) flow: Arc<FlowState>,
    /// The service's socket, which answers the client.
    pub(crate) socket: Arc<UdpSocket>,
    pub(crate) service: Arc<Service>,
}

/// Flows of every UDP service by id, for datagrams arriving from agents. Ids are random, so an
/// agent cannot guess the flows of another, and a new id never replaces a live flow.
#[derive(Debug, Default)]
pub(crate) struct FlowRoutes {
    by_id: Mutex<HashMap<u32, Route>>,
}

impl FlowRoutes {
    /// Registers a new flow of `service` for `client`, first carried by `agent` on tunnel `tunnel`.
    pub(crate) fn open(
        &self,
        client: SocketAddr,
        (agent, tunnel): (Arc<str>, u64),
        socket: &Arc<UdpSocket>,
        service: &Arc<Service>,
        pace: Option<Pace>,
    ) -> Arc<FlowState> {
        let mut by_id = self.lock();
        let id = loop {
            let id = fastrand::u32(1..);
            if !by_id.contains_key(&id) {
                break id;
            }
        };
        let flow = Arc::new(FlowState {
            id,
            client,
            confirmed: AtomicBool::new(false),
            tunnel: AtomicU64::new(tunnel),
            activity: Activity::default(),
            from_client: AtomicU32::new(0),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            pace,
            agent: Mutex::new(agent),
        });
        by_id.insert(id, Route { flow: flow.clone(), socket: socket.clone(), service: service.clone() });
        flow
    }

    /// The table, locked (for removing several flows at once).
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<u32, Route>> {
        lock(&self.by_id)
    }

    fn get(&self, id: u32) -> Option<Route> {
        self.lock().get(&id).cloned()
    }
}

/// Reads the datagrams an agent sends and delivers them to the flows' clients, until the tunnel
/// closes (`Ok`). A datagram that is not valid, or opens a flow (only the relay does), is a
/// protocol error (`Err`).
///
/// A datagram for a flow of another agent's service is dropped and counted
/// (`sallyport_refusals_total{reason="foreign_flow"}`): a flow is usable only by the agent that
/// carries its service.
pub(crate) async fn from_agent(
    connection: &sallyport_runtime::link::Connection,
    agent: &str,
    flows: &FlowRoutes,
    metrics: &Metrics,
) -> Result<Closed, ProtocolError> {
    loop {
        let bytes = match connection.read_datagram().await {
            Ok(bytes) => bytes,
            Err(e) => return Ok(Closed::Connection(e)),
        };
        let (id, payload) = match Datagram::decode(&bytes)? {
            Datagram::Open { .. } => return Err(ProtocolError::OpenDatagram),
            Datagram::Data { flow, payload } => (flow, Some(payload)),
            Datagram::Unknown { flow } => (flow, None),
        };
        // A flow the relay already forgot has no client any more.
        let Some(Route { flow, socket, service }) = flows.get(id) else { continue };
        if *lock(&flow.agent).as_ref() != *agent {
            metrics.refused(&service.name, "foreign_flow");
            debug!(service = %service.name, flow = id, agent, "datagram for another agent's flow: dropped");
            continue;
        }
        let Some(payload) = payload else {
            sallyport_runtime::limited!(info, service = %service.name, flow = id, "the agent lost a flow: reopening it");
            flow.confirmed.store(false, Ordering::Relaxed);
            continue;
        };
        flow.confirmed.store(true, Ordering::Relaxed);
        flow.activity.touch();
        if !flow.may_send(payload.len()) {
            metrics.refused(&service.name, "amplification_limit");
            continue;
        }
        if flow.pace.as_ref().is_some_and(|pace| !take_now(&pace.down, payload.len())) {
            metrics.refused(&service.name, "bandwidth");
            continue;
        }
        match socket.send_to(payload, flow.client).await {
            Ok(_) => metrics.udp_datagram(&service.name, false),
            Err(e) => {
                metrics.refused(&service.name, "client_send_failed");
                debug!(service = %service.name, client = %flow.client, error = %e, "datagram to client not sent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> FlowState {
        FlowState {
            id: 1,
            client: "192.0.2.1:5353".parse().expect("addr"),
            confirmed: AtomicBool::new(false),
            tunnel: AtomicU64::new(0),
            activity: Activity::default(),
            from_client: AtomicU32::new(0),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            pace: None,
            agent: Mutex::new("winbox".into()),
        }
    }

    #[test]
    fn a_source_that_spoke_once_gets_one_answer_and_three_times_what_it_sent() {
        let f = flow();
        f.client_spoke(100);
        assert!(f.may_send(4096));
        assert!(f.may_send(300), "4 KiB and 300 bytes for 100");
        assert!(!f.may_send(1), "no more: a spoofed source cannot make the relay stream to its victim");
        f.client_spoke(10);
        assert!(f.may_send(60_000), "a source that speaks again is no spoofed victim");
    }
}
