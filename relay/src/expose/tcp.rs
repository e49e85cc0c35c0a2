//! TCP service listeners: each accepted client gets one data stream to the service's agent, whose
//! header is written the moment the client connects; a client the service's access rules refuse
//! is reset at once.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use sallyport_proto::codes;
use sallyport_runtime::{
    code,
    flows::{self, Activity},
    reset_on_close, splice_paced, Side, SpliceError,
};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use crate::{
    access::rates::Counted,
    config::Service,
    expose::{
        current,
        gate::{self, Entry},
        limits::{Count, CountSlot, IpSlot},
        Exposure, Slot,
    },
    metrics::Outcome,
    tunnel::streams,
};

/// Pending connections the kernel queues per listener (bore and rathole use 128 and stall at a
/// burst of 1,000 connects).
const BACKLOG: u32 = 4096;

/// Binds a TCP listener with a deep backlog.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// What one client connection counts against, for as long as it lives (an upgraded HTTP
/// connection keeps it past its request): the relay-wide cap, its listener's share of it, and the
/// per-address cap.
#[derive(Debug)]
pub(crate) struct Lease {
    _global: CountSlot,
    _listener: CountSlot,
    _address: IpSlot,
}

/// One listener may hold at most this share of the relay-wide connection cap, so one busy or
/// attacked listener leaves room for the others.
const LISTENER_SHARE: usize = 2;

/// Accepts connections on `listener` until `stop` is cancelled and runs `handle` for each in the
/// relay's client tracker (drained on shutdown). A connection over the relay-wide cap, its
/// listener's share or its address's cap is reset at once, counted, and does not hold up the
/// accept loop.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: &str,
    exposure: Arc<Exposure>,
    stop: CancellationToken,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<Lease>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let share = Arc::new(Count::default());
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let lease = match lease(&exposure, &share, peer) {
                    Ok(lease) => Arc::new(lease),
                    Err(reason) => {
                        debug!(listener = name, %peer, reason, "over a connection cap: reset");
                        exposure.runtime.metrics.refused(name, reason);
                        reset_on_close(&stream);
                        continue;
                    }
                };
                exposure.runtime.clients.spawn(handle(stream, peer, lease));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Takes the caps' places for a connection from `peer`, or says which cap is full (the caps in
/// force now).
fn lease(exposure: &Exposure, share: &Arc<Count>, peer: SocketAddr) -> Result<Lease, &'static str> {
    let config = exposure.config.get();
    let limits = &config.relay;
    let address = exposure.per_ip.enter(peer.ip(), limits.max_connections_per_ip).ok_or("per_ip_cap")?;
    let global = exposure.connections.enter(limits.max_connections).ok_or("global_cap")?;
    let listener = share.enter((limits.max_connections / LISTENER_SHARE).max(1)).ok_or("listener_share")?;
    Ok(Lease { _global: global, _listener: listener, _address: address })
}

/// Accepts clients of one TCP service (the one in `slot` when each client arrives) until `stop`
/// is cancelled; then the listener is dropped. A connection ends early when its service is
/// retired by a reload.
pub(crate) async fn serve(
    listener: TcpListener,
    slot: Slot,
    exposure: Arc<Exposure>,
    stop: CancellationToken,
) {
    let name = current(&slot).service.name.clone();
    accept_loop(listener, &name, exposure.clone(), stop, |stream, peer, lease| {
        let (served, exposure) = (current(&slot), exposure.clone());
        let span = info_span!("client", service = %served.service.name, %peer);
        async move {
            let service = &served.service;
            let mut entry = Entry::new(service, "tcp", peer);
            if let Err(reason) = gate::admit(&exposure, &service.name, Some(Counted::Connections), peer.ip())
            {
                debug!(reason, "refused by the service's access rules or rate: reset");
                reset_on_close(&stream);
                drop(stream);
                entry.log(&exposure, reason, 0, 0, None);
                return;
            }
            let (outcome, up, down) = tokio::select! {
                carried = carry(stream, peer, service, &exposure, &[], &mut entry.agent) => carried,
                () = served.retired.cancelled() => {
                    debug!("service removed by a reload: connection ended");
                    (Outcome::Reset, 0, 0)
                }
            };
            entry.log(&exposure, gate::result_of(outcome), up, down, None);
            drop(lease);
        }
        .instrument(span)
    })
    .await;
}

/// Carries one client connection of `service` over a new data stream to the member of its group
/// that takes it (its name goes to `agent`): the header and `first` (bytes already read from the
/// client) go out together, then the splice. Says how it ended and the bytes carried up and down.
pub(crate) async fn carry(
    mut stream: TcpStream,
    peer: SocketAddr,
    service: &Service,
    exposure: &Exposure,
    first: &[u8],
    agent: &mut Option<std::sync::Arc<str>>,
) -> (Outcome, u64, u64) {
    let _ = stream.set_nodelay(true);
    // Until the splice forwards a FIN, closing this socket (even by a crash) must reset the client.
    reset_on_close(&stream);
    let active = exposure.runtime.metrics.connection(&service.name);
    let Some(picked) = exposure.pick(service, peer.ip()) else {
        debug!("no agent of the service is connected and healthy: refusing client");
        active.end(Outcome::NoAgent, 0, 0);
        return (Outcome::NoAgent, 0, 0);
    };
    *agent = Some(picked.agent.clone());
    let (mut send, mut recv) = match streams::open(&picked.connection, service, peer, first).await {
        Ok(pair) => pair,
        Err(e) => {
            debug!(error = %e, "cannot open a stream to the agent: refusing client");
            active.end(Outcome::StreamFailed, 0, 0);
            return (Outcome::StreamFailed, 0, 0);
        }
    };
    let activity = Activity::default();
    let pace = exposure.pace(service, &picked.agent);
    let pace = pace.as_ref();
    let idle = async {
        match service.idle_timeout {
            Some(idle) => flows::idle_for(&activity, idle).await,
            None => std::future::pending().await,
        }
    };
    let watched = service.idle_timeout.is_some().then_some(&activity);
    let spliced = tokio::select! {
        r = splice_paced(&mut stream, &mut send, &mut recv, Side::Relay, watched, pace) => r,
        () = idle => {
            debug!(idle = ?service.idle_timeout, "client connection idle: reset");
            let _ = send.reset(code(codes::stream::INTERNAL));
            let _ = recv.stop(code(codes::stream::INTERNAL));
            active.end(Outcome::Idle, 0, 0);
            return (Outcome::Idle, 0, 0);
        }
        () = picked.cut.cancelled() => {
            debug!(agent = %picked.agent, "the agent's drain grace is over: reset");
            let _ = send.reset(code(codes::stream::INTERNAL));
            let _ = recv.stop(code(codes::stream::INTERNAL));
            active.end(Outcome::Reset, 0, 0);
            return (Outcome::Reset, 0, 0);
        }
    };
    drop(picked);
    match spliced {
        Ok(done) => {
            let up = done.up + first.len() as u64;
            debug!(up, down = done.down, "client connection closed");
            active.end(Outcome::Completed, up, done.down);
            (Outcome::Completed, up, done.down)
        }
        Err(SpliceError::Stalled) => {
            debug!("client stopped reading while the tunnel's stalled streams were at their share: reset");
            active.end(Outcome::Stalled, 0, 0);
            (Outcome::Stalled, 0, 0)
        }
        Err(e) => {
            debug!(error = %e, "client connection reset");
            active.end(Outcome::Reset, 0, 0);
            (Outcome::Reset, 0, 0)
        }
    }
}
