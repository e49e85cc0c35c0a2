//! The HTTPS listener: routes TLS connections by the server name in the ClientHello (SNI) to the
//! service that lists it.
//!
//! - Passed through (the default): the ClientHello bytes read to find the name go to the agent
//!   with the stream header, then the connection is spliced like any TCP service, so the client
//!   completes its handshake with the target and sees the target's certificate. A client the
//!   service's access rules refuse is reset once its server name is known.
//! - Terminated (`tls = "terminate"`, [`terminate`]): the relay completes the handshake with the
//!   certificate the name picks and handles the requests as the HTTP listener does.
//!
//! A client that names no server, or a name no service lists, gets an `unrecognized_name` alert:
//! never another service's certificate.

mod terminate;

use std::{net::SocketAddr, sync::Arc};

use tokio_rustls::TlsAcceptor;

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
        http::{self, Http},
        tcp::{self, Lease},
        Exposure, LiveRoutes,
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
    let terminated = Terminated {
        acceptor: terminate::acceptor(exposure.certs.clone()),
        http: Arc::new(Http::terminated(exposure.clone(), routes.clone())),
        stop: stop.clone(),
    };
    let terminated = Arc::new(terminated);
    tcp::accept_loop(listener, "https", exposure.clone(), stop, |stream, peer, lease| {
        let (exposure, routes, terminated) = (exposure.clone(), routes.clone(), terminated.clone());
        async move {
            route(stream, peer, (&exposure, &routes), &terminated, lease).await;
        }
        .instrument(info_span!("https", %peer))
    })
    .await;
}

/// What the listener's terminated services share: the TLS side and the HTTP handling.
struct Terminated {
    acceptor: TlsAcceptor,
    http: Arc<Http>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Terminated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminated").field("http", &self.http).finish_non_exhaustive()
    }
}

async fn route(
    mut stream: TcpStream,
    peer: SocketAddr,
    (exposure, routes): (&Exposure, &LiveRoutes),
    terminated: &Terminated,
    lease: Arc<Lease>,
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
    if let (Ok(Hello::Name(name)), true) = (&hello, offers(crate::certs::challenges::ALPN_ACME_TLS)) {
        if let Some(certificate) = exposure.certs.challenges.tls_alpn_certificate(name) {
            terminate::answer_tls_alpn(stream, buf, certificate, timeout).await;
            return;
        }
    }
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
    if service.terminate.is_some() {
        let stream = http::plain(stream);
        let stop = terminated.stop.clone();
        terminate::serve(stream, buf, peer, (&terminated.acceptor, &terminated.http), lease, stop).await;
        return;
    }
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
