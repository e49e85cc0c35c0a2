//! UDP services: each client address on a service's UDP port is a flow, carried to the agent as
//! QUIC datagrams (see [`sallyport_proto::datagram`]).
//!
//! The service's task owns its flow table (client address to flow); the tunnel plane's
//! `FlowRoutes` maps flow ids back to socket and client for datagrams coming from agents. A flow quiet for
//! `relay.udp_flow_idle` is forgotten. One client prefix holds at most a quarter of
//! `relay.udp_max_flows`, and a new flow in a full table replaces a flow of the fullest prefix, so
//! a flood of new sources cannot push out the established flows of other clients (see
//! `sallyport_runtime::flows`).
//! A datagram too large for the tunnel's datagram size is counted and dropped, and so is one from
//! an address the service's access rules refuse, and one over the bandwidth cap of the service or
//! its agent (checked against the caps in force when its flow opened).

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use bytes::BytesMut;
use sallyport_proto::datagram::{Datagram, MAX_OPEN_OVERHEAD};
use sallyport_runtime::{
    flows::{source_prefix, FlowTable},
    pace::take_now,
};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    access::rates::Counted,
    expose::{current, gate, Exposure, Slot},
    tunnel::datagrams::{FlowRoutes, FlowState},
};

/// The share of a service's flow table one client prefix (/24, /64) may hold.
const PREFIX_SHARE: usize = 4;

/// The largest UDP payload read from a client (the IPv4 maximum).
const MAX_PAYLOAD: usize = 65_535;

/// Serves one UDP service (the one in `slot` now: a reload may change its agent, and its flows
/// follow) until `stop` is cancelled.
pub(crate) async fn serve(
    socket: UdpSocket,
    slot: Slot,
    exposure: Arc<Exposure>,
    flows: Arc<FlowRoutes>,
    stop: CancellationToken,
) {
    let socket = Arc::new(socket);
    let metrics = &exposure.runtime.metrics;
    let started = exposure.config.get();
    let max = started.relay.udp_max_flows;
    let mut table: FlowTable<SocketAddr, Arc<FlowState>> =
        FlowTable::with_groups(max, max / PREFIX_SHARE, source_prefix);
    // The payload is read after room for the largest header, which is then written in front of it.
    let mut buf = vec![0u8; MAX_OPEN_OVERHEAD + MAX_PAYLOAD];
    // Each second at most: quiet flows are forgotten, and every flow once the agent is gone.
    let mut sweep = tokio::time::interval(
        (started.relay.udp_flow_idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(1)),
    );
    drop(started);
    loop {
        let served = current(&slot);
        let service = &served.service;
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
                let quiet = table.sweep(exposure.config.get().relay.udp_flow_idle);
                if !quiet.is_empty() {
                    let mut by_id = flows.lock();
                    for (_, flow) in quiet {
                        by_id.remove(&flow.id);
                    }
                }
                metrics.udp_flows(&service.name, table.len());
                continue;
            }
            () = stop.cancelled() => break,
        };
        // Checked for every datagram: a reload's rules hold for flows already open. A refused
        // datagram is counted, not logged: its source costs a spoofer nothing.
        // A new flow also counts against the service's connection rate.
        let counted = if table.contains(&client) { None } else { Some(Counted::Connections) };
        if gate::admit(&exposure, &service.name, counted, client.ip()).is_err() {
            continue;
        }
        // A flow stays with its member while that member may carry it; else (its agent left, is
        // draining or unhealthy, or a reload took the service from it) the group gives another,
        // and the old member's answers for it are refused from then on.
        let config = exposure.config.get();
        let existing = table.get(&client).cloned();
        let carrier = existing.as_ref().map(|f| sallyport_runtime::sync::lock(&f.agent).clone());
        let route = exposure.groups.datagram_route(
            &exposure.agents,
            &config,
            (&service.name, client.ip()),
            carrier.as_deref(),
        );
        drop(config);
        let Some((moved, connection)) = route else {
            metrics.refused(&service.name, "no_agent");
            continue;
        };
        let tunnel = connection.stable_id() as u64;
        let flow = match existing {
            Some(flow) => {
                if let Some(agent) = moved {
                    debug!(service = %service.name, flow = flow.id, %agent, "the flow moves to another member of the service's group");
                    *sallyport_runtime::sync::lock(&flow.agent) = agent;
                    flow.confirmed.store(false, Ordering::Relaxed);
                }
                flow
            }
            None => {
                let agent = moved.unwrap_or_default();
                let pace = exposure.pace(service, &agent);
                let flow = flows.open(client, (agent, tunnel), &socket, service, pace);
                if let Some((_, old)) = table.insert(client, flow.clone()) {
                    flows.lock().remove(&old.id);
                    metrics.refused(&service.name, "flow_evicted");
                }
                metrics.udp_flows(&service.name, table.len());
                flow
            }
        };
        if flow.pace.as_ref().is_some_and(|pace| !take_now(&pace.up, len)) {
            metrics.refused(&service.name, "bandwidth");
            continue;
        }
        flow.client_spoke(len);
        if flow.tunnel.swap(tunnel, Ordering::Relaxed) != tunnel {
            flow.confirmed.store(false, Ordering::Relaxed);
        }
        let payload = &buf[MAX_OPEN_OVERHEAD..MAX_OPEN_OVERHEAD + len];
        let datagram = if flow.confirmed.load(Ordering::Relaxed) {
            Datagram::Data { flow: flow.id, payload }
        } else {
            Datagram::Open { flow: flow.id, service: &service.name, client, payload }
        };
        if connection.max_datagram_size().is_none_or(|max| datagram.encoded_len() > max) {
            metrics.refused(&service.name, "oversized");
            debug!(service = %service.name, len, "datagram too large for the tunnel: dropped");
            continue;
        }
        let mut out = BytesMut::with_capacity(datagram.encoded_len());
        datagram.encode(&mut out);
        match connection.send_datagram(out.freeze()) {
            Ok(()) => metrics.udp_datagram(&service.name, true),
            Err(e) => {
                metrics.refused(&service.name, "tunnel_refused");
                debug!(service = %service.name, error = %e, "datagram not sent");
            }
        }
    }
    let mut by_id = flows.lock();
    for (_, flow) in table.drain() {
        by_id.remove(&flow.id);
    }
}
