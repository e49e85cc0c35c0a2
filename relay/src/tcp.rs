//! TCP service listeners: each accepted client gets one data stream to the service's agent, whose
//! header is written the moment the client connects.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use sallyport_proto::{
    frame,
    net::{reset_on_close, splice, Side},
    StreamHeader, MAX_STREAM_HEADER,
};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use crate::{config::Service, metrics::Outcome, Shared};

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

/// Accepts clients of one service until `stop` is cancelled; then the listener is dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    service: Arc<Service>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            p = shared.connection_limit.clone().acquire_owned() => p,
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
                let span = info_span!("client", service = %service.name, %peer);
                let (service, shared2) = (service.clone(), shared.clone());
                shared.clients.spawn(
                    async move {
                        handle_client(stream, peer, &service, &shared2).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(service = %service.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle_client(stream: TcpStream, peer: SocketAddr, service: &Service, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    // Until the splice forwards a FIN, closing this socket (even by a crash) must reset the client.
    reset_on_close(&stream);
    let active = shared.metrics.connection(&service.name);
    let Some(connection) = shared.registry.route(&service.agent, &service.name) else {
        debug!(agent = %service.agent, "agent not connected: refusing client");
        active.end(Outcome::NoAgent, 0, 0);
        return;
    };
    let (mut send, mut recv) = match connection.open_bi().await {
        Ok(pair) => pair,
        Err(e) => {
            debug!(error = %e, "cannot open a stream to the agent: refusing client");
            active.end(Outcome::StreamFailed, 0, 0);
            return;
        }
    };
    let header = StreamHeader { service: service.name.clone(), client_addr: peer };
    let written = match frame::encode_to_vec(&header, MAX_STREAM_HEADER) {
        Ok(bytes) => send.write_all(&bytes).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = written {
        debug!(error = %e, "cannot send the stream header: refusing client");
        active.end(Outcome::StreamFailed, 0, 0);
        return;
    }
    match splice(&stream, &mut send, &mut recv, Side::Relay).await {
        Ok(done) => {
            debug!(up = done.up, down = done.down, "client connection closed");
            active.end(Outcome::Completed, done.up, done.down);
        }
        Err(e) => {
            debug!(error = %e, "client connection reset");
            active.end(Outcome::Reset, 0, 0);
        }
    }
}
