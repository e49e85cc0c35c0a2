//! A tunnel connection over either transport: QUIC (quinn), or TLS over TCP with its streams
//! multiplexed by HTTP/2 ([`crate::tcp`]). Relay and agent speak the same protocol on both: the same
//! control stream, stream header and answer, half-close and reset, datagrams and close codes.
//!
//! The types mirror quinn's and report quinn's error types, so code above them does not care
//! which transport carries a tunnel.

use std::{
    fmt, io,
    net::SocketAddr,
    pin::Pin,
    str::FromStr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
pub use quinn::{ConnectionError, ReadError, ReadExactError, SendDatagramError, VarInt, WriteError};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::{
    stall::{Reader, Stalls},
    tcp,
};

/// Which transport carries a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// QUIC over UDP: the first choice.
    Quic,
    /// TLS 1.3 over TCP, streams multiplexed by HTTP/2: for networks where UDP does not get out.
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transport name that is neither `quic` nor `tcp`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport {0:?} (quic or tcp)")]
pub struct UnknownTransport(pub String);

impl FromStr for Transport {
    type Err = UnknownTransport;
    fn from_str(s: &str) -> Result<Self, UnknownTransport> {
        match s {
            "quic" => Ok(Self::Quic),
            "tcp" => Ok(Self::Tcp),
            other => Err(UnknownTransport(other.to_owned())),
        }
    }
}

pub use crate::tcp::ClosedStream;

/// Turns one of the protocol's `u32` codes into a QUIC variable-length integer.
pub fn code(value: u32) -> quinn::VarInt {
    quinn::VarInt::from_u32(value)
}

/// A tunnel connection, and the watch on its streams' readers ([`crate::stall`]).
#[derive(Debug, Clone)]
pub struct Connection {
    inner: Inner,
    stalls: Arc<Stalls>,
}

#[derive(Debug, Clone)]
enum Inner {
    Quic(quinn::Connection),
    Tcp(tcp::Connection),
}

impl From<quinn::Connection> for Connection {
    fn from(c: quinn::Connection) -> Self {
        Self { inner: Inner::Quic(c), stalls: Arc::default() }
    }
}

impl From<tcp::Connection> for Connection {
    fn from(c: tcp::Connection) -> Self {
        Self { inner: Inner::Tcp(c), stalls: Arc::default() }
    }
}

impl Connection {
    /// Watches the reader of a data stream of this connection: if it stalls beyond the
    /// connection's share, the stream's [`RecvStream::stall_cut`] fires.
    pub fn watch(&self, recv: &mut RecvStream) {
        recv.reader = Some(self.stalls.watch());
    }

    /// Cuts the data streams that stall beyond the connection's share, until dropped: run it
    /// beside whatever serves the connection.
    pub async fn sweep_stalls(&self) -> std::convert::Infallible {
        self.stalls.sweep_forever().await
    }

    /// Keeps the peer's datagrams for reading: an agent's tunnel, once admitted. A QUIC connection
    /// keeps them in its bounded receive buffer anyway; over TCP they are dropped until then.
    pub fn accept_datagrams(&self) {
        if let Inner::Tcp(c) = &self.inner {
            c.accept_datagrams();
        }
    }

    /// Data streams cut for stalling so far.
    pub fn stalls_cut(&self) -> u64 {
        self.stalls.cut_total()
    }

    pub fn transport(&self) -> Transport {
        match &self.inner {
            Inner::Quic(_) => Transport::Quic,
            Inner::Tcp(_) => Transport::Tcp,
        }
    }

    /// The QUIC connection, for QUIC-only tuning.
    pub fn quic(&self) -> Option<&quinn::Connection> {
        match &self.inner {
            Inner::Quic(c) => Some(c),
            Inner::Tcp(_) => None,
        }
    }

    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match &self.inner {
            Inner::Quic(c) => c.open_bi().await.map(|(s, r)| (SendStream::Quic(s), RecvStream::from(r))),
            Inner::Tcp(c) => c.open_bi().await.map(|(s, r)| (SendStream::Tcp(s), RecvStream::from(r))),
        }
    }

    /// Accepts the peer's next bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match &self.inner {
            Inner::Quic(c) => c.accept_bi().await.map(|(s, r)| (SendStream::Quic(s), RecvStream::from(r))),
            Inner::Tcp(c) => c.accept_bi().await.map(|(s, r)| (SendStream::Tcp(s), RecvStream::from(r))),
        }
    }

    /// Sends a datagram; like QUIC's, it may be dropped (the link is busy).
    pub fn send_datagram(&self, data: Bytes) -> Result<(), SendDatagramError> {
        match &self.inner {
            Inner::Quic(c) => c.send_datagram(data),
            Inner::Tcp(c) => c.send_datagram(data),
        }
    }

    /// The peer's next datagram.
    pub async fn read_datagram(&self) -> Result<Bytes, ConnectionError> {
        match &self.inner {
            Inner::Quic(c) => c.read_datagram().await,
            Inner::Tcp(c) => c.read_datagram().await,
        }
    }

    /// The largest datagram the connection carries now.
    pub fn max_datagram_size(&self) -> Option<usize> {
        match &self.inner {
            Inner::Quic(c) => c.max_datagram_size(),
            Inner::Tcp(_) => Some(sallyport_proto::link::MAX_LINK_DATAGRAM),
        }
    }

    /// Closes the connection with an application code and reason the peer sees.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        match &self.inner {
            Inner::Quic(c) => c.close(code, reason),
            Inner::Tcp(c) => c.close(code, reason),
        }
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        match &self.inner {
            Inner::Quic(c) => c.close_reason(),
            Inner::Tcp(c) => c.close_reason(),
        }
    }

    /// Waits until the connection ends.
    pub async fn closed(&self) -> ConnectionError {
        match &self.inner {
            Inner::Quic(c) => c.closed().await,
            Inner::Tcp(c) => c.closed().await,
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match &self.inner {
            Inner::Quic(c) => c.remote_address(),
            Inner::Tcp(c) => c.remote_address(),
        }
    }

    /// The path's round-trip time as last measured.
    pub fn rtt(&self) -> Duration {
        match &self.inner {
            Inner::Quic(c) => c.rtt(),
            Inner::Tcp(c) => c.rtt(),
        }
    }

    /// A number no other live connection of this process has.
    pub fn stable_id(&self) -> usize {
        match &self.inner {
            Inner::Quic(c) => c.stable_id(),
            Inner::Tcp(c) => c.stable_id(),
        }
    }

    /// The packet size path MTU discovery has reached (QUIC only: TCP segments on its own).
    pub fn path_mtu(&self) -> Option<u16> {
        self.quic().map(|c| c.stats().path.current_mtu)
    }

    /// Lets the peer open up to `limit` bidirectional streams at once (QUIC; an HTTP/2 link
    /// carries the relay's streams up to its fixed limit).
    pub fn set_max_concurrent_bi_streams(&self, limit: VarInt) {
        if let Inner::Quic(c) = &self.inner {
            c.set_max_concurrent_bi_streams(limit);
        }
    }

    /// The certificate chain the peer presented in the handshake.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        match &self.inner {
            Inner::Quic(c) => c
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                .map(|certs| *certs),
            Inner::Tcp(c) => c.peer_certificates(),
        }
    }

    /// The application protocol the handshake agreed on.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        match &self.inner {
            Inner::Quic(c) => c
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol),
            Inner::Tcp(c) => c.alpn(),
        }
    }
}

/// The sending half of a stream.
#[derive(Debug)]
pub enum SendStream {
    Quic(quinn::SendStream),
    Tcp(tcp::SendStream),
}

impl SendStream {
    pub async fn write_all(&mut self, buf: &[u8]) -> Result<(), WriteError> {
        match self {
            Self::Quic(s) => s.write_all(buf).await,
            Self::Tcp(s) => s.write_chunk(Bytes::copy_from_slice(buf)).await,
        }
    }

    /// Writes `chunk` whole, without copying it.
    pub async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), WriteError> {
        match self {
            Self::Quic(s) => s.write_chunk(chunk).await,
            Self::Tcp(s) => s.write_chunk(chunk).await,
        }
    }

    /// Ends the stream after what was written (half-close).
    pub fn finish(&mut self) -> Result<(), ClosedStream> {
        match self {
            Self::Quic(s) => s.finish().map_err(|_| ClosedStream),
            Self::Tcp(s) => s.finish(),
        }
    }

    /// Waits until the peer has read the stream to its end, or stopped or reset it.
    pub async fn stopped(&mut self) {
        match self {
            Self::Quic(s) => {
                let _ = s.stopped().await;
            }
            Self::Tcp(s) => s.stopped().await,
        }
    }

    /// Abandons the stream: the peer's reads fail with `code`.
    pub fn reset(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        match self {
            Self::Quic(s) => s.reset(code).map_err(|_| ClosedStream),
            Self::Tcp(s) => s.reset(code),
        }
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Quic(s) => AsyncWrite::poll_write(Pin::new(s), cx, buf),
            Self::Tcp(s) => s.poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(s) => AsyncWrite::poll_flush(Pin::new(s), cx),
            Self::Tcp(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(s) => AsyncWrite::poll_shutdown(Pin::new(s), cx),
            Self::Tcp(s) => Poll::Ready(s.finish().or(Ok(()))),
        }
    }
}

/// The receiving half of a stream; a data stream's reader is watched for stalls.
#[derive(Debug)]
pub struct RecvStream {
    inner: RecvInner,
    reader: Option<Arc<Reader>>,
}

#[derive(Debug)]
enum RecvInner {
    Quic(quinn::RecvStream),
    Tcp(tcp::RecvStream),
}

impl From<quinn::RecvStream> for RecvStream {
    fn from(r: quinn::RecvStream) -> Self {
        Self { inner: RecvInner::Quic(r), reader: None }
    }
}

impl From<tcp::RecvStream> for RecvStream {
    fn from(r: tcp::RecvStream) -> Self {
        Self { inner: RecvInner::Tcp(r), reader: None }
    }
}

impl RecvStream {
    /// The next chunk of the stream in order; `None` at its end.
    pub async fn read_chunk(&mut self) -> Result<Option<Bytes>, ReadError> {
        let asking = self.reader.as_deref().map(Reader::ask);
        let result = match &mut self.inner {
            RecvInner::Quic(r) => r.read_chunk(usize::MAX, true).await.map(|c| c.map(|c| c.bytes)),
            RecvInner::Tcp(r) => r.read_chunk().await,
        };
        if let Some(asking) = asking {
            asking.answered(matches!(result, Ok(Some(_))));
        }
        result
    }

    /// Fills `buf` whole.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadExactError> {
        let asking = self.reader.as_deref().map(Reader::ask);
        let result = match &mut self.inner {
            RecvInner::Quic(r) => r.read_exact(buf).await,
            RecvInner::Tcp(r) => r.read_exact(buf).await,
        };
        // A header or an answer byte: what the reader does next (dial a target, wait for its
        // answer) is not a stall.
        if let Some(asking) = asking {
            asking.answered(false);
        }
        result
    }

    /// Tells the peer to stop sending: its writes fail with `code`.
    pub fn stop(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        match &mut self.inner {
            RecvInner::Quic(r) => r.stop(code).map_err(|_| ClosedStream),
            RecvInner::Tcp(r) => r.stop(code),
        }
    }

    /// Fires when this data stream is cut for stalling ([`crate::stall`]); `None` for a stream
    /// nobody watches.
    pub fn stall_cut(&self) -> Option<CancellationToken> {
        self.reader.as_ref().map(|r| r.cut())
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.inner {
            RecvInner::Quic(r) => AsyncRead::poll_read(Pin::new(r), cx, buf),
            RecvInner::Tcp(r) => r.poll_read(cx, buf),
        };
        if let Some(reader) = &this.reader {
            reader.polled(matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before);
        }
        polled
    }
}

/// Gives each of an agent's `connections` (its tunnel and lanes) an equal share of one tunnel's
/// windows, and of the stalled streams they may hold, on either transport.
pub fn share_agent_windows(connection: &Connection, connections: usize) {
    connection.stalls.share(connections);
    match &connection.inner {
        Inner::Quic(c) => crate::quic::share_windows(c, connections),
        Inner::Tcp(c) => {
            let n = u32::try_from(connections.max(1)).unwrap_or(u32::MAX);
            c.set_receive_window(crate::limits::CONNECTION_RECEIVE_WINDOW / n);
        }
    }
}
