//! The replica port (`cluster.peer_listen`): where the writer takes the other replicas' calls, over
//! mutual TLS with the relay's own certificate (`sallyport_runtime::replica_tls`). A caller that
//! does not hold the relay's key gets no handshake; one that does is a replica, and its forwarded
//! writes were authorized by its operator's admin token where they were made.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::ops::{
    admin::{revoke_agent_for, tokens_for},
    replicas, Ops,
};

/// Time for a replica's TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves the replica port until `stop` is cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ops: Arc<Ops>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "replica port listening");
    }
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "replica port: accept failed");
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let (acceptor, ops, stop) = (acceptor.clone(), ops.clone(), stop.clone());
        ops.runtime.background.clone().spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    sallyport_runtime::limited!(warn, %remote, error = %e, "replica port: a caller without the relay's certificate refused");
                    ops.runtime.metrics.handshake_failed("replica_port");
                    return;
                }
                Err(_) => return,
            };
            let service = service_fn(move |req| {
                let ops = ops.clone();
                async move { Ok::<_, Infallible>(respond(req, &ops).await) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(tls), service);
            tokio::pin!(connection);
            tokio::select! {
                served = &mut connection => if let Err(e) = served {
                    debug!(error = %e, "replica connection ended with an error");
                },
                () = stop.cancelled() => connection.as_mut().graceful_shutdown(),
            }
        });
    }
}

async fn respond(req: Request<Incoming>, ops: &Ops) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let (status, body) = match (&method, path.as_str()) {
        (&Method::POST, "/cluster/v1/sync") => replicas::sync(req, ops).await,
        (&Method::POST, "/cluster/v1/redeem") => replicas::redeem(req, ops).await,
        (method, p)
            if replicas::is_write(method, p) && ops.cluster.as_ref().is_some_and(|c| c.is_writer()) =>
        {
            if p.starts_with("/tokens") {
                tokens_for(&req, ops)
            } else {
                revoke_agent_for(&req, ops)
            }
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
