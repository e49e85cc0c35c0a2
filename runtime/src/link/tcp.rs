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

use std::{
    future::{poll_fn, Future},
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock, Weak,
    },
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use h2::Reason;
use quinn::{
    ApplicationClose, ConnectionError, ReadError, ReadExactError, SendDatagramError, VarInt, WriteError,
};
use rustls::pki_types::CertificateDer;
use sallyport_proto::link::{LinkFrame, MAX_LINK_DATAGRAM};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{mpsc, Mutex as AsyncMutex},
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::ClosedStream;
use crate::sync::lock;

/// The largest HTTP/2 frame either end accepts: fewer frames in bulk, and another stream waits at
/// most one such frame for its turn.
const MAX_FRAME: u32 = 64 * 1024;
/// Streams the relay may have open on one connection (QUIC's cap on data streams).
const MAX_STREAMS: u32 = crate::transport::MAX_DATA_STREAMS;
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
/// once.
pub async fn client<IO>(io: IO, peer: Peer, settings: Settings) -> Result<Connection, ConnectionError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (opener, mut conn) = h2::client::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .initial_max_send_streams(MAX_STREAMS as usize)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| h2_lost(&e))?;
    let ping = conn.ping_pong();
    let (shared, datagrams) = Shared::new(peer, Some(opener.clone()), mpsc::unbounded_channel().1);
    let driver = shared.clone();
    tokio::spawn(async move {
        tokio::select! {
            result = &mut conn => if let Err(e) = result { driver.end(h2_lost(&e)) },
            () = driver.gone.cancelled() => {
                let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
            }
        }
        driver.end(ConnectionError::Reset);
    });
    let opened = async {
        let mut ready = opener.ready().await.map_err(|e| h2_lost(&e))?;
        ready.send_request(request(LINK_PATH), false).map_err(|e| h2_lost(&e))
    };
    let (response, send) = match opened.await {
        Ok(opened) => opened,
        Err(e) => {
            shared.end(e.clone());
            return Err(e);
        }
    };
    let send = Arc::new(Mutex::new(send));
    let recv = RecvStream { state: RecvState::Waiting(response), sender: send.clone(), link: shared.clone() };
    start(&shared, ping, settings, (send, recv), datagrams);
    Ok(Connection::new(shared))
}

/// The agent's end over a TLS stream it dialed: the HTTP/2 server, whose first stream is the
/// link stream.
pub async fn server<IO>(io: IO, peer: Peer, settings: Settings) -> Result<Connection, ConnectionError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(MAX_STREAMS)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| h2_lost(&e))?;
    let ping = conn.ping_pong();
    let (request, mut respond) = match conn.accept().await {
        Some(Ok(first)) => first,
        Some(Err(e)) => return Err(h2_lost(&e)),
        None => return Err(ConnectionError::Reset),
    };
    if request.uri().path() != LINK_PATH {
        return Err(protocol_violation("the first stream is not the link stream"));
    }
    let send = respond.send_response(http::Response::new(()), false).map_err(|e| h2_lost(&e))?;
    let (streams, incoming) = mpsc::unbounded_channel();
    let (shared, datagrams) = Shared::new(peer, None, incoming);
    let send = Arc::new(Mutex::new(send));
    let recv = RecvStream {
        state: RecvState::Body(request.into_body(), Bytes::new()),
        sender: send.clone(),
        link: shared.clone(),
    };
    let driver = shared.clone();
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                () = driver.gone.cancelled() => break,
            };
            match next {
                Some(Ok((request, mut respond))) => {
                    if request.uri().path() != STREAM_PATH {
                        respond.send_reset(Reason::PROTOCOL_ERROR);
                        continue;
                    }
                    let Ok(send) = respond.send_response(http::Response::new(()), false) else { continue };
                    let send = Arc::new(Mutex::new(send));
                    let recv = RecvStream {
                        state: RecvState::Body(request.into_body(), Bytes::new()),
                        sender: send.clone(),
                        link: driver.clone(),
                    };
                    let open = driver.handle.get().and_then(Weak::upgrade);
                    let _ =
                        streams.send((SendStream { inner: send, link: driver.clone(), _open: open }, recv));
                }
                Some(Err(e)) => {
                    driver.end(h2_lost(&e));
                    break;
                }
                None => break,
            }
        }
        // Streams nobody took hold the connection's handle: let them go with it.
        if let Ok(mut queued) = driver.incoming.try_lock() {
            while queued.try_recv().is_ok() {}
        }
        // Let the close frame out, then let go of the socket.
        conn.graceful_shutdown();
        let _ = tokio::time::timeout(CLOSE_GRACE, async { while conn.accept().await.is_some() {} }).await;
        driver.end(ConnectionError::Reset);
    });
    start(&shared, ping, settings, (send, recv), datagrams);
    Ok(Connection::new(shared))
}

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

/// Starts the link stream's reader and writer and the pinger.
fn start(
    shared: &Arc<Shared>,
    ping: Option<h2::PingPong>,
    settings: Settings,
    (send, recv): (Arc<Mutex<h2::SendStream<Bytes>>>, RecvStream),
    (arrived, outgoing): (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>),
) {
    let send = SendStream { inner: send, link: shared.clone(), _open: None };
    tokio::spawn(link_writer(shared.clone(), send, outgoing));
    tokio::spawn(link_reader(shared.clone(), recv, arrived));
    if let Some(ping) = ping {
        tokio::spawn(keep_alive(shared.clone(), ping, settings));
    }
}

async fn link_writer(shared: Arc<Shared>, mut send: SendStream, mut outgoing: mpsc::Receiver<Bytes>) {
    let mut buf = BytesMut::new();
    loop {
        let first = tokio::select! {
            first = outgoing.recv() => first,
            () = shared.gone.cancelled() => None,
        };
        let Some(first) = first else { break };
        LinkFrame::Datagram(first).encode(&mut buf);
        // Whatever queued meanwhile goes in the same write.
        while buf.len() < 64 * 1024 {
            match outgoing.try_recv() {
                Ok(more) => LinkFrame::Datagram(more).encode(&mut buf),
                Err(_) => break,
            }
        }
        let sent = tokio::select! {
            sent = send.write_chunk(buf.split().freeze()) => sent,
            () = shared.gone.cancelled() => break,
        };
        if sent.is_err() {
            break;
        }
    }
    let frame = lock(&shared.close_frame).take();
    if let Some(frame) = frame {
        frame.encode(&mut buf);
        let mut inner = lock(&send.inner);
        let _ = inner.send_data(buf.split().freeze(), true);
    }
}

async fn link_reader(shared: Arc<Shared>, mut recv: RecvStream, arrived: mpsc::Sender<Bytes>) {
    let mut buf = BytesMut::new();
    loop {
        let chunk = tokio::select! {
            chunk = recv.read_chunk() => chunk,
            () = shared.gone.cancelled() => return,
        };
        let chunk = match chunk {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return shared.end(protocol_violation("the link stream ended")),
            Err(_) => return shared.end(shared.lost()),
        };
        buf.extend_from_slice(&chunk);
        loop {
            match LinkFrame::decode(&mut buf) {
                Ok(Some(LinkFrame::Datagram(datagram))) => {
                    // A full queue drops the datagram, as QUIC's receive buffer does.
                    let _ = arrived.try_send(datagram);
                }
                Ok(Some(LinkFrame::Close { code, reason })) => {
                    let close = ApplicationClose { error_code: VarInt::from_u32(code), reason };
                    return shared.end(ConnectionError::ApplicationClosed(close));
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "invalid link frame");
                    let reason = e.to_string();
                    shared.close(sallyport_proto::codes::close::PROTOCOL_ERROR, reason.as_bytes());
                    return;
                }
            }
        }
    }
}

async fn keep_alive(shared: Arc<Shared>, mut ping: h2::PingPong, settings: Settings) {
    loop {
        let sent = Instant::now();
        let answered = tokio::select! {
            answered = tokio::time::timeout(settings.idle_timeout, ping.ping(h2::Ping::opaque())) => answered,
            () = shared.gone.cancelled() => return,
        };
        match answered {
            Ok(Ok(_)) => {
                let rtt = sent.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
                shared.rtt_micros.store(rtt.max(1), Ordering::Relaxed);
            }
            Ok(Err(_)) => return shared.end(ConnectionError::Reset),
            Err(_) => return shared.end(ConnectionError::TimedOut),
        }
        tokio::select! {
            () = tokio::time::sleep(settings.keep_alive.saturating_sub(sent.elapsed())) => {}
            () = shared.gone.cancelled() => return,
        }
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

/// The sending half of a stream.
#[derive(Debug)]
pub struct SendStream {
    inner: Arc<Mutex<h2::SendStream<Bytes>>>,
    link: Arc<Shared>,
    /// Keeps the connection open while the stream is (none for the link stream itself).
    _open: Option<Arc<Handle>>,
}

impl SendStream {
    /// Waits until the stream may send some of `want` bytes; how many.
    fn poll_room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<Result<usize, WriteError>> {
        let mut inner = lock(&self.inner);
        loop {
            inner.reserve_capacity(want);
            let room = inner.capacity();
            if room > 0 {
                return Poll::Ready(Ok(room.min(want)));
            }
            match inner.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(self.link.write_error(&e))),
                Poll::Ready(None) => return Poll::Ready(Err(WriteError::ClosedStream)),
                Poll::Pending => {}
            }
            // The peer may reset the stream while it waits for room.
            return match inner.poll_reset(cx) {
                Poll::Ready(Ok(reason)) => Poll::Ready(Err(WriteError::Stopped(code_of(reason)))),
                Poll::Ready(Err(e)) => Poll::Ready(Err(self.link.write_error(&e))),
                Poll::Pending => Poll::Pending,
            };
        }
    }

    fn send(&mut self, data: Bytes) -> Result<(), WriteError> {
        lock(&self.inner).send_data(data, false).map_err(|e| self.link.write_error(&e))
    }

    pub async fn write_chunk(&mut self, mut chunk: Bytes) -> Result<(), WriteError> {
        while !chunk.is_empty() {
            let room = poll_fn(|cx| self.poll_room(cx, chunk.len())).await?;
            let part = chunk.split_to(room);
            self.send(part)?;
        }
        Ok(())
    }

    pub fn finish(&mut self) -> Result<(), ClosedStream> {
        lock(&self.inner).send_data(Bytes::new(), true).map_err(|_| ClosedStream)
    }

    /// Waits until the peer resets the stream or the stream is over.
    pub async fn stopped(&mut self) {
        let _ = poll_fn(|cx| lock(&self.inner).poll_reset(cx)).await;
    }

    pub fn reset(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        lock(&self.inner).send_reset(reason_of(code));
        Ok(())
    }

    pub(super) fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = ready!(self.poll_room(cx, buf.len())).map_err(io::Error::from)?;
        self.send(Bytes::copy_from_slice(&buf[..room])).map_err(io::Error::from)?;
        Poll::Ready(Ok(room))
    }
}

fn reason_of(code: VarInt) -> Reason {
    Reason::from(u32::try_from(code.into_inner()).unwrap_or(u32::MAX))
}

/// The receiving half of a stream.
#[derive(Debug)]
pub struct RecvStream {
    state: RecvState,
    /// The stream's sending half, to reset it when this half stops.
    sender: Arc<Mutex<h2::SendStream<Bytes>>>,
    link: Arc<Shared>,
}

#[derive(Debug)]
enum RecvState {
    /// The relay's end of a stream it opened: the agent's response headers are still to come.
    Waiting(h2::client::ResponseFuture),
    Body(h2::RecvStream, Bytes),
    Done,
}

impl RecvStream {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, ReadError>> {
        loop {
            match &mut self.state {
                RecvState::Waiting(response) => match ready!(Pin::new(response).poll(cx)) {
                    Ok(response) => self.state = RecvState::Body(response.into_body(), Bytes::new()),
                    Err(e) => {
                        self.state = RecvState::Done;
                        return Poll::Ready(Err(self.link.read_error(&e)));
                    }
                },
                RecvState::Body(body, left) => {
                    if !left.is_empty() {
                        return Poll::Ready(Ok(Some(std::mem::take(left))));
                    }
                    match ready!(body.poll_data(cx)) {
                        Some(Ok(data)) => {
                            let _ = body.flow_control().release_capacity(data.len());
                            if !data.is_empty() {
                                return Poll::Ready(Ok(Some(data)));
                            }
                        }
                        Some(Err(e)) => {
                            let error = self.link.read_error(&e);
                            self.state = RecvState::Done;
                            return Poll::Ready(Err(error));
                        }
                        None => {
                            self.state = RecvState::Done;
                            return Poll::Ready(Ok(None));
                        }
                    }
                }
                RecvState::Done => return Poll::Ready(Ok(None)),
            }
        }
    }

    /// Puts back what a read did not take.
    fn keep(&mut self, rest: Bytes) {
        if let RecvState::Body(_, left) = &mut self.state {
            *left = rest;
        }
    }

    pub async fn read_chunk(&mut self) -> Result<Option<Bytes>, ReadError> {
        poll_fn(|cx| self.poll_chunk(cx)).await
    }

    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadExactError> {
        let mut filled = 0;
        while filled < buf.len() {
            let Some(mut chunk) = self.read_chunk().await? else {
                return Err(ReadExactError::FinishedEarly(filled));
            };
            let n = chunk.len().min(buf.len() - filled);
            buf[filled..filled + n].copy_from_slice(&chunk.split_to(n));
            filled += n;
            self.keep(chunk);
        }
        Ok(())
    }

    pub fn stop(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        self.state = RecvState::Done;
        lock(&self.sender).send_reset(reason_of(code));
        Ok(())
    }

    pub(super) fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let Some(mut chunk) = ready!(self.poll_chunk(cx)).map_err(io::Error::from)? else {
            return Poll::Ready(Ok(()));
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk.split_to(n));
        self.keep(chunk);
        Poll::Ready(Ok(()))
    }
}

/// A TCP stream some of whose first bytes were read already (a ClientHello read to route it): those
/// bytes are read again first.
#[derive(Debug)]
pub struct Prefixed<IO> {
    first: Bytes,
    io: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(first: Vec<u8>, io: IO) -> Self {
        Self { first: Bytes::from(first), io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            let part = self.first.split_to(n);
            buf.put_slice(&part);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
