//! TCP service listeners: each accepted client gets one data stream to the service's agent, whose
//! header is written the moment the client connects.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use sallyport_runtime::{reset_on_close, splice, Side};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use crate::{
    config::Service,
    expose::{limits::PerIp, Exposure},
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

/// Accepts connections on `listener` until `stop` is cancelled, each under the relay's global
/// connection cap (and, when given, the per-address cap), and runs `handle` for each in the
/// relay's client tracker (drained on shutdown).
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: &str,
    per_ip: Option<Arc<PerIp>>,
    exposure: Arc<Exposure>,
    stop: CancellationToken,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let permit = tokio::select! {
            p = exposure.connections.clone().acquire_owned() => p,
            () = stop.cancelled() => break,
        };
        // The semaphore is never closed, so acquiring only fails if that invariant breaks.
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let slot = match &per_ip {
                    None => None,
                    Some(limits) => match limits.enter(peer.ip()) {
                        Some(slot) => Some(slot),
                        None => {
                            debug!(listener = name, %peer, "too many connections from this address: closing");
                            exposure.runtime.metrics.refused(name, "per_ip_cap");
                            continue;
                        }
                    },
                };
                let work = handle(stream, peer);
                exposure.runtime.clients.spawn(async move {
                    work.await;
                    drop((permit, slot));
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Accepts clients of one TCP service until `stop` is cancelled; then the listener is dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    service: Arc<Service>,
    exposure: Arc<Exposure>,
    stop: CancellationToken,
) {
    let name = service.name.clone();
    accept_loop(listener, &name, None, exposure.clone(), stop, |stream, peer| {
        let (service, exposure) = (service.clone(), exposure.clone());
        let span = info_span!("client", service = %service.name, %peer);
        async move { carry(stream, peer, &service, &exposure, &[]).await }.instrument(span)
    })
    .await;
}

/// Carries one client connection of `service` over a new data stream: the header and `first`
/// (bytes already read from the client) go out together, then the splice.
pub(crate) async fn carry(
    mut stream: TcpStream,
    peer: SocketAddr,
    service: &Service,
    exposure: &Exposure,
    first: &[u8],
) {
    let _ = stream.set_nodelay(true);
    // Until the splice forwards a FIN, closing this socket (even by a crash) must reset the client.
    reset_on_close(&stream);
    let active = exposure.runtime.metrics.connection(&service.name);
    let Some(connection) = exposure.agents.route(&service.agent, &service.name) else {
        debug!(agent = %service.agent, "agent not connected: refusing client");
        active.end(Outcome::NoAgent, 0, 0);
        return;
    };
    let (mut send, mut recv) = match streams::open(&connection, service, peer, first).await {
        Ok(pair) => pair,
        Err(e) => {
            debug!(error = %e, "cannot open a stream to the agent: refusing client");
            active.end(Outcome::StreamFailed, 0, 0);
            return;
        }
    };
    match splice(&mut stream, &mut send, &mut recv, Side::Relay).await {
        Ok(done) => {
            let up = done.up + first.len() as u64;
            debug!(up, down = done.down, "client connection closed");
            active.end(Outcome::Completed, up, done.down);
        }
        Err(e) => {
            debug!(error = %e, "client connection reset");
            active.end(Outcome::Reset, 0, 0);
        }
    }
}
