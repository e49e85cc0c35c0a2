//! HTTPS services the relay terminates: the TLS handshake with the certificate the server name
//! picks, then the decrypted requests go through the HTTP listener's handling (Host routing among
//! the terminated services, X-Forwarded-Proto `https`, the login gate, the access log, WebSocket).
//! HTTP/2 and HTTP/1.1 are offered by ALPN; the agent side stays HTTP/1.1 on data streams.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    certs::{Resolver, Store},
    expose::{http, tcp::Lease},
};

/// The ALPN protocols a terminated service offers, preferred first.
pub(crate) const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The TLS side of terminated services: one rustls configuration whose certificate is resolved
/// per connection from the store (so a renewed certificate serves the next handshake).
pub(crate) fn acceptor(store: Arc<Store>) -> TlsAcceptor {
    let mut config = rustls::ServerConfig::builder_with_provider(sallyport_runtime::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("the provider supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(store)));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    // No 0-RTT: early data could be replayed.
    config.max_early_data_size = 0;
    TlsAcceptor::from(Arc::new(config))
}

/// Completes the handshake (the ClientHello bytes already read come first), then serves the
/// connection's requests.
pub(crate) async fn serve(
    stream: http::Plain,
    first: Vec<u8>,
    peer: SocketAddr,
    (acceptor, listener): (&TlsAcceptor, &Arc<http::Http>),
    lease: Arc<Lease>,
    stop: CancellationToken,
) {
    let timeout = listener.exposure.config.get().relay.header_timeout;
    let replayed = Replay { first, at: 0, inner: stream };
    let tls = match tokio::time::timeout(timeout, acceptor.accept(replayed)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            sallyport_runtime::limited!(info, error = %e, "TLS handshake with a client failed");
            listener.exposure.runtime.metrics.refused("https", "tls_handshake");
            return;
        }
        Err(_) => {
            listener.exposure.runtime.metrics.refused("https", "timeout");
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    debug!(%peer, h2, "TLS terminated");
    http::connection(tls, peer, listener.clone(), lease, stop, h2).await;
}

/// Answers an ACME `tls-alpn-01` validation: the handshake with the validation certificate and
/// the `acme-tls/1` protocol, then the connection closes (RFC 8737).
pub(crate) async fn answer_tls_alpn(
    stream: tokio::net::TcpStream,
    first: Vec<u8>,
    certificate: Arc<rustls::sign::CertifiedKey>,
    timeout: std::time::Duration,
) {
    let resolver = Only(certificate);
    let mut config = rustls::ServerConfig::builder_with_provider(sallyport_runtime::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the provider supports TLS 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![crate::certs::challenges::ALPN_ACME_TLS.to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let replayed = Replay { first, at: 0, inner: stream };
    match tokio::time::timeout(timeout, acceptor.accept(replayed)).await {
        Ok(Ok(mut tls)) => {
            debug!("ACME tls-alpn-01 validation answered");
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
        }
        Ok(Err(e)) => debug!(error = %e, "ACME tls-alpn-01 validation handshake failed"),
        Err(_) => debug!("ACME tls-alpn-01 validation handshake timed out"),
    }
}

/// The one certificate of a validation handshake.
#[derive(Debug)]
struct Only(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Only {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A stream that first gives back bytes already read from it.
#[derive(Debug)]
pub(crate) struct Replay<S> {
    first: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.first.len() {
            let n = (this.first.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.first[this.at..this.at + n]);
            this.at += n;
            if this.at == this.first.len() {
                this.first = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
