//! Calls from one replica to the writer's replica port: one HTTP/1.1 request (hyper) over a fresh
//! mutual-TLS connection (both ends the relay's own certificate), under a timeout.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a call to the writer got no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    /// The TLS handshake failed: the other end does not hold the relay's certificate and key.
    #[error("{addr}: TLS handshake: {source} (is it a replica of this relay, with the same certificate?)")]
    Tls { addr: String, source: std::io::Error },
    #[error("{addr}: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("{addr}: the request could not be built: {source}")]
    Request { addr: String, source: hyper::http::Error },
    /// The writer closed the connection before it answered.
    #[error("{addr} closed the connection without answering")]
    Closed { addr: String },
    #[error("{addr} did not answer within {after:?}")]
    Timeout { addr: String, after: Duration },
}

/// Sends `method path` with `body` to the replica port at `addr` (`host:port`, looked up now) over
/// TLS with `tls`; returns the status code and the body.
pub(crate) async fn call(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    method: Method,
    path: &str,
    body: String,
    timeout: Duration,
) -> Result<(u16, String), PeerError> {
    let http = |source| PeerError::Http { addr: addr.to_owned(), source };
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| PeerError::Connect { addr: addr.to_owned(), source })?;
        let _ = stream.set_nodelay(true);
        // The certificate, not the name, says who answers: every replica holds the same one.
        let name = rustls::pki_types::ServerName::try_from("sallyport-replica").expect("a DNS name");
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, stream)
            .await
            .map_err(|source| PeerError::Tls { addr: addr.to_owned(), source })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr)
            .body(Full::new(Bytes::from(body)))
            .map_err(|source| PeerError::Request { addr: addr.to_owned(), source })?;
        let answer = async {
            let response = sender.send_request(request).await.map_err(http)?;
            let status = response.status().as_u16();
            let bytes = response.into_body().collect().await.map_err(http)?.to_bytes();
            Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
        };
        // The connection is driven beside the exchange, in this task: it ends with the call.
        tokio::pin!(connection);
        tokio::select! {
            answer = answer => answer,
            ended = &mut connection => Err(match ended {
                Err(e) => http(e),
                Ok(()) => PeerError::Closed { addr: addr.to_owned() },
            }),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| PeerError::Timeout { addr: addr.to_owned(), after: timeout })?
}
