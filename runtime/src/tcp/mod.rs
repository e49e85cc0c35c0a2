//! A tunnel over TLS 1.3 over TCP, its streams multiplexed by HTTP/2 (the `h2` crate).
//!
//! Roles: the agent dials (TLS client) and is the HTTP/2 *server*; the relay accepts (TLS server)
//! and is the HTTP/2 *client*, because in HTTP/2 only the client opens streams and the relay opens
//! every data stream. The one stream an agent opens on a QUIC connection (its control stream, a
//! lane's first stream, the enrollment stream) the relay opens for it: the agent's
//! [`Connection::open_bi`] takes the first stream the relay opens. The relay's first stream of all is
//! the link stream (`sallyport_proto::link`): datagrams and the close code and reason.
//!
//! HTTP/2 gives each stream its own flow-control window inside the connection's, and sends the
//! streams that have data in turn, so one bulk stream does not starve the others. A stream's FIN
//! is `END_STREAM`, its reset `RST_STREAM` with the same code QUIC would carry (HTTP/2 has no
//! STOP_SENDING: stopping a stream resets it). Liveness is HTTP/2 PING, which flow control never
//! holds back: a peer that does not answer one within the idle timeout is gone.
//!
//! # Layout
//!
//! - this file: the connection ([`Connection`]), its settings and the TLS session's facts.
//! - [`setup`]: the relay's end ([`client`]) and the agent's end ([`server`]) over a TLS stream,
//!   the link stream's reader and writer, the pinger.
//! - [`streams`]: [`SendStream`] and [`RecvStream`] with quinn's semantics.
//! - [`socket`]: the TCP socket's options and each end's windows and timers.
//! - [`connect`]: the agent's one way to dial: TCP, TLS, HTTP/2.
//! - [`prefixed`]: a TCP stream whose first bytes were read already.

pub mod connect;
pub mod prefixed;
mod setup;
pub mod socket;
mod streams;

pub use prefixed::Prefixed;
pub use setup::{client, server};
pub use socket::{tcp_agent, tcp_relay, tunnel_socket, TCP_MIN_IDLE_TIMEOUT, TCP_STREAM_RECEIVE_WINDOW};
use streams::RecvState;
pub use streams::{RecvStream, SendStream};

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock, Weak,
    },
    time::Duration,
};

use bytes::Bytes;
use h2::Reason;
use quinn::{ConnectionError, ReadError, SendDatagramError, VarInt, WriteError};
use rustls::pki_types::CertificateDer;
use sallyport_proto::link::{LinkFrame, MAX_LINK_DATAGRAM};
use tokio::sync::{mpsc, Mutex as AsyncMutex};
use tokio_util::sync::CancellationToken;

use crate::sync::lock;

/// The largest HTTP/2 frame either end accepts: fewer frames in bulk, and another stream waits at
/// most one such frame for its turn.
const MAX_FRAME: u32 = 64 * 1024;
/// Streams the relay may have open on one connection (QUIC's cap on data streams).
const MAX_STREAMS: u32 = crate::limits::MAX_DATA_STREAMS;
/// Bytes of one stream buffered for sending, at most (beyond that, writes wait).
const SEND_BUFFER: usize = 512 * 1024;
/// Datagrams waiting to be sent or read, at most: beyond that they are dropped, as QUIC drops them.
const DATAGRAM_QUEUE: usize = 512;
/// How long a closing connection has to get its close frame out.
const CLOSE_GRACE: Duration = Duration::from_millis(250);

const LINK_PATH: &str = "/link";
const STREAM_PATH: &str = "/stream";

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// Timers and windows of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How often each end pings the other.
    pub keep_alive: Duration,
    /// A ping unanswered this long ends the connection.
    pub idle_timeout: Duration,
    /// Receive window of one stream.
    pub stream_window: u32,
    /// Receive window of the whole connection.
    pub connection_window: u32,
}

/// The TLS session's facts the connection keeps.
#[derive(Debug, Clone)]
pub struct Peer {
    pub remote: SocketAddr,
    pub certificates: Option<Vec<CertificateDer<'static>>>,
    pub alpn: Option<Vec<u8>>,
}

impl Peer {
    /// The facts of a TLS session, from its rustls connection.
    pub fn of(remote: SocketAddr, tls: &rustls::CommonState) -> Self {
        Self {
            remote,
            certificates: tls.peer_certificates().map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
            alpn: tls.alpn_protocol().map(<[u8]>::to_vec),
        }
    }
}

/// A tunnel connection over TCP. Dropping the last handle and the last stream closes it (code 0),
/// as with quinn: a stream keeps its connection open.
#[derive(Debug, Clone)]
pub struct Connection(Arc<Handle>);

#[derive(Debug)]
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.close(0, b"");
    }
}

#[derive(Debug)]
struct Shared {
    id: usize,
    peer: Peer,
    /// The relay's end: opens streams.
    opener: Option<h2::client::SendRequest<Bytes>>,
    /// The agent's end: the streams the relay opened, in order.
    incoming: AsyncMutex<mpsc::UnboundedReceiver<(SendStream, RecvStream)>>,
    datagrams_in: AsyncMutex<mpsc::Receiver<Bytes>>,
    datagrams_out: mpsc::Sender<Bytes>,
    /// The close frame to send before the connection goes, when this end closes it.
    close_frame: Mutex<Option<LinkFrame>>,
    reason: OnceLock<ConnectionError>,
    gone: CancellationToken,
    rtt_micros: AtomicU64,
    /// The handle streams keep, so the connection outlives none of them; weak, so the
    /// connection's own tasks do not keep it open.
    handle: OnceLock<Weak<Handle>>,
}

impl Shared {
    /// Ends the connection for `reason`, unless it has ended already.
    fn end(&self, reason: ConnectionError) {
        let _ = self.reason.set(reason);
        self.gone.cancel();
    }

    fn close(&self, code: u32, reason: &[u8]) {
        if self.reason.set(ConnectionError::LocallyClosed).is_ok() {
            *lock(&self.close_frame) =
                Some(LinkFrame::Close { code, reason: Bytes::copy_from_slice(reason) });
        }
        self.gone.cancel();
    }

    /// Why the connection is unusable: its reason once ended, else a reset (the TCP connection
    /// broke before anything said why).
    fn lost(&self) -> ConnectionError {
        self.reason.get().cloned().unwrap_or(ConnectionError::Reset)
    }

    fn write_error(&self, e: &h2::Error) -> WriteError {
        match e.reason() {
            Some(reason) if e.is_reset() && e.is_remote() => WriteError::Stopped(code_of(reason)),
            _ if self.reason.get().is_none() && !e.is_io() && !e.is_go_away() => WriteError::ClosedStream,
            _ => WriteError::ConnectionLost(self.lost()),
        }
    }

    fn read_error(&self, e: &h2::Error) -> ReadError {
        match e.reason() {
            Some(reason) if e.is_reset() && e.is_remote() => ReadError::Reset(code_of(reason)),
            _ if self.reason.get().is_none() && !e.is_io() && !e.is_go_away() => ReadError::ClosedStream,
            _ => ReadError::ConnectionLost(self.lost()),
        }
    }
}

fn code_of(reason: Reason) -> VarInt {
    VarInt::from_u32(u32::from(reason))
}

fn request(path: &str) -> http::Request<()> {
    let mut request = http::Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(if path == LINK_PATH { LINK_PATH } else { STREAM_PATH });
    request
}

fn h2_lost(e: &h2::Error) -> ConnectionError {
    if e.is_io() {
        ConnectionError::Reset
    } else {
        ConnectionError::TransportError(quinn_proto::TransportError {
            code: quinn_proto::TransportErrorCode::PROTOCOL_VIOLATION,
            frame: None,
            reason: format!("HTTP/2: {e}"),
        })
    }
}

/// The relay's end over an accepted TLS stream: the HTTP/2 client, which opens the link stream at
fn protocol_violation(reason: &str) -> ConnectionError {
    ConnectionError::TransportError(quinn_proto::TransportError {
        code: quinn_proto::TransportErrorCode::PROTOCOL_VIOLATION,
        frame: None,
        reason: reason.to_owned(),
    })
}

impl Shared {
    fn new(
        peer: Peer,
        opener: Option<h2::client::SendRequest<Bytes>>,
        incoming: mpsc::UnboundedReceiver<(SendStream, RecvStream)>,
    ) -> (Arc<Self>, (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>)) {
        let (datagrams_out, outgoing) = mpsc::channel(DATAGRAM_QUEUE);
        let (arrived, datagrams_in) = mpsc::channel(DATAGRAM_QUEUE);
        let shared = Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            peer,
            opener,
            incoming: AsyncMutex::new(incoming),
            datagrams_in: AsyncMutex::new(datagrams_in),
            datagrams_out,
            close_frame: Mutex::default(),
            reason: OnceLock::new(),
            gone: CancellationToken::new(),
            rtt_micros: AtomicU64::new(0),
            handle: OnceLock::new(),
        });
        (shared, (arrived, outgoing))
    }
}

impl Connection {
    fn new(shared: Arc<Shared>) -> Self {
        let handle = Arc::new(Handle(shared));
        let _ = handle.0.handle.set(Arc::downgrade(&handle));
        Self(handle)
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.0 .0
    }

    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        let shared = self.shared();
        let Some(opener) = shared.opener.clone() else {
            // The agent's end: the relay opened this stream for it.
            return self.next_incoming().await;
        };
        if let Some(reason) = shared.reason.get() {
            return Err(reason.clone());
        }
        let opened = async {
            let mut ready = opener.ready().await?;
            ready.send_request(request(STREAM_PATH), false)
        };
        let (response, send) = tokio::select! {
            opened = opened => opened.map_err(|e| shared.reason.get().cloned().unwrap_or_else(|| h2_lost(&e)))?,
            () = shared.gone.cancelled() => return Err(shared.lost()),
        };
        let send = Arc::new(Mutex::new(send));
        let recv =
            RecvStream { state: RecvState::Waiting(response), sender: send.clone(), link: shared.clone() };
        Ok((SendStream { inner: send, link: shared.clone(), _open: Some(self.0.clone()) }, recv))
    }

    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        if self.shared().opener.is_some() {
            // The relay's end: the stream an agent opens over QUIC, the relay opens for it.
            return self.open_bi().await;
        }
        self.next_incoming().await
    }

    async fn next_incoming(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        let shared = self.shared();
        let mut incoming = shared.incoming.lock().await;
        tokio::select! {
            next = incoming.recv() => next.ok_or_else(|| shared.lost()),
            () = shared.gone.cancelled() => Err(shared.lost()),
        }
    }

    pub fn send_datagram(&self, data: Bytes) -> Result<(), SendDatagramError> {
        let shared = self.shared();
        if let Some(reason) = shared.reason.get() {
            return Err(SendDatagramError::ConnectionLost(reason.clone()));
        }
        if data.len() > MAX_LINK_DATAGRAM {
            return Err(SendDatagramError::TooLarge);
        }
        // A full queue drops it: datagrams are unreliable on both transports.
        let _ = shared.datagrams_out.try_send(data);
        Ok(())
    }

    pub async fn read_datagram(&self) -> Result<Bytes, ConnectionError> {
        let shared = self.shared();
        let mut arrived = shared.datagrams_in.lock().await;
        tokio::select! {
            biased;
            next = arrived.recv() => next.ok_or_else(|| shared.lost()),
            () = shared.gone.cancelled() => Err(shared.lost()),
        }
    }

    pub fn close(&self, code: VarInt, reason: &[u8]) {
        self.shared().close(u32::try_from(code.into_inner()).unwrap_or(u32::MAX), reason);
    }

    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.shared().reason.get().cloned()
    }

    pub async fn closed(&self) -> ConnectionError {
        let shared = self.shared();
        shared.gone.cancelled().await;
        shared.lost()
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.shared().peer.remote
    }

    pub fn rtt(&self) -> Duration {
        Duration::from_micros(self.shared().rtt_micros.load(Ordering::Relaxed))
    }

    pub fn stable_id(&self) -> usize {
        self.shared().id
    }

    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.shared().peer.certificates.clone()
    }

    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.shared().peer.alpn.clone()
    }
}
