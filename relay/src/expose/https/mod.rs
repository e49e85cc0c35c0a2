//! The HTTPS listener: routes TLS connections by the server name in the ClientHello (SNI) to the
//! service that lists it, without terminating TLS. The ClientHello bytes read to find the name go
//! to the agent with the stream header, then the connection is spliced like any TCP service, so the
//! client completes its handshake with the target and sees the target's certificate. A client
//! the service's access rules refuse is reset once its server name is known.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{info_span, Instrument};

use crate::{
    access::rates::Counted,
    expose::{
        gate::{self, Entry},
        tcp, Exposure, LiveRoutes,
    },
    metrics::Outcome,
    tunnel::Handoff,
};
use sallyport_proto::client_hello::{self, Hello};

/// Accepts TLS clients until `stop` is cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    exposure: Arc<Exposure>,
    routes: LiveRoutes,
    stop: CancellationToken,
) {
    tcp::accept_loop(listener, "https", exposure.clone(), stop, |stream, peer, lease| {
        let (exposure, routes) = (exposure.clone(), routes.clone());
        async move {
            route(stream, peer, &exposure, &routes, lease).await;
        }
        .instrument(info_span!("https", %peer))
    })
    .await;
}

async fn route<L>(
    mut stream: TcpStream,
    peer: SocketAddr,
    exposure: &Exposure,
    routes: &LiveRoutes,
    lease: L,
) {
    let timeout = exposure.config.get().relay.header_timeout;
    let metrics = &exposure.runtime.metrics;
    let mut buf = Vec::with_capacity(2048);
    let mut reader = client_hello::HelloReader::default();
    let hello = tokio::time::timeout(timeout, async {
        loop {
            match reader.advance(&buf) {
                Hello::Incomplete if buf.len() > client_hello::MAX_HELLO + 64 => {
                    return Hello::NotTls("ClientHello too large")
                }
                Hello::Incomplete => {}
                done => return done,
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Hello::NotTls("the client closed before its ClientHello was whole"),
                Ok(_) => {}
            }
        }
    })
    .await;
    let offers = |p: &[u8]| reader.offers(p);
    if matches!(hello, Ok(Hello::Name(_) | Hello::NoName))
        && (offers(sallyport_proto::ALPN_TUNNEL) || offers(sallyport_proto::enroll::ALPN_ENROLL))
        && exposure.config.get().relay.tunnel_shares_https()
    {
        // An agent's tunnel over TCP, on the port it shares with this listener.
        let handoff = Handoff { stream, peer, first: buf };
        drop(lease);
        let _ = exposure.tunnel_handoff.send(handoff).await;
        return;
    }
    let name = match hello {
        Ok(Hello::Name(name)) => name,
        Ok(Hello::NoName) => {
            sallyport_runtime::limited!(info, "TLS client sent no server name (SNI): closing");
            metrics.refused("https", "no_sni");
            let _ = stream.write_all(&client_hello::UNRECOGNIZED_NAME_ALERT).await;
            return;
        }
        Ok(Hello::NotTls(reason)) => {
            sallyport_runtime::limited!(info, reason, "not a TLS ClientHello: closing");
            metrics.refused("https", "not_tls");
            return;
        }
        Ok(Hello::Incomplete) => return,
        Err(_) => {
            sallyport_runtime::limited!(info, ?timeout, "no whole ClientHello in time: closing");
            metrics.refused("https", "timeout");
            return;
        }
    };
    let Some(served) = sallyport_runtime::sync::read(routes).get(&name).cloned() else {
        sallyport_runtime::limited!(info, server_name = %name, "no service is published under this server name: closing");
        metrics.refused("https", "unknown_sni");
        let _ = stream.write_all(&client_hello::UNRECOGNIZED_NAME_ALERT).await;
        return;
    };
    let service = &served.service;
    let mut entry = Entry::new(service, "https", peer);
    entry.server_name = Some(&name);
    if let Err(reason) = gate::admit(exposure, &service.name, Some(Counted::Connections), peer.ip()) {
        sallyport_runtime::limited!(debug, service = %service.name, reason, "refused by the service's access rules or rate: reset");
        sallyport_runtime::reset_on_close(&stream);
        drop(stream);
        entry.log(exposure, reason, 0, 0, None);
        return;
    }
    let span = info_span!("client", service = %service.name, server_name = %name);
    let (outcome, up, down) = tokio::select! {
        carried = tcp::carry(stream, peer, service, exposure, &buf, &mut entry.agent).instrument(span) => carried,
        () = served.retired.cancelled() => (Outcome::Reset, 0, 0),
    };
    entry.log(exposure, gate::result_of(outcome), up, down, None);
}
