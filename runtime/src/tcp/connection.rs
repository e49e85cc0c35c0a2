//! The connection and its streams: `Connection` with quinn's methods and error types, the two
//! halves of a stream (FIN is `END_STREAM`, a reset `RST_STREAM` with the code QUIC would carry),
//! and the TLS session's facts.

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
    time::Duration,
};

use bytes::Bytes;
use quinn::{ConnectionError, ReadError, ReadExactError, SendDatagramError, VarInt, WriteError};
use rustls::pki_types::CertificateDer;
use sallyport_proto::link::{LinkFrame, MAX_LINK_DATAGRAM};
use tokio::{
    io::ReadBuf,
    sync::{mpsc, watch, Mutex as AsyncMutex},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::wire::{
    code_of, h2_lost, reason_of, request, DATAGRAM_QUEUE, DATAGRAM_RECEIVE_BUFFER, STREAM_PATH,
};
use crate::sync::lock;

pub(super) static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// A stream half that was already finished or reset.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the stream is closed")]
pub struct ClosedStream;

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
pub(super) struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.close(0, b"");
    }
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) id: usize,
    pub(super) peer: Peer,
    /// The relay's end: opens streams.
    pub(super) opener: Option<h2::client::SendRequest<Bytes>>,
    /// The agent's end: the streams the relay opened, in order.
    pub(super) incoming: AsyncMutex<mpsc::UnboundedReceiver<(SendStream, RecvStream)>>,
    pub(super) datagrams_in: AsyncMutex<mpsc::Receiver<Bytes>>,
    pub(super) datagrams_out: mpsc::Sender<Bytes>,
    /// The close frame to send before the connection goes, when this end closes it.
    pub(super) close_frame: Mutex<Option<LinkFrame>>,
    pub(super) reason: OnceLock<ConnectionError>,
    pub(super) gone: CancellationToken,
    pub(super) rtt_micros: AtomicU64,
    /// The handle streams keep, so the connection outlives none of them; weak, so the
    /// connection's own tasks do not keep it open.
    pub(super) handle: OnceLock<Weak<Handle>>,
    /// The connection's own tasks: the HTTP/2 driver, the link stream's reader and writer, the
    /// pinger. Each ends when the connection is gone.
    pub(super) tasks: TaskTracker,
    /// Whether the link stream is read: on the agent's end always; on the relay's only once the
    /// connection is an agent's tunnel ([`Connection::accept_datagrams`]). Until then a peer's
    /// datagrams stay in the link stream's small window and cost the relay nothing to decrypt.
    pub(super) wants_datagrams: watch::Sender<bool>,
    /// Bytes of datagrams queued for reading.
    pub(super) datagram_bytes: AtomicUsize,
    /// The connection window the HTTP/2 driver keeps (an agent's lanes share one tunnel's).
    pub(super) window: watch::Sender<u32>,
}

impl Shared {
    /// Ends the connection for `reason`, unless it has ended already.
    pub(super) fn end(&self, reason: ConnectionError) {
        let _ = self.reason.set(reason);
        self.gone.cancel();
    }

    pub(super) fn close(&self, code: u32, reason: &[u8]) {
        if self.reason.set(ConnectionError::LocallyClosed).is_ok() {
            *lock(&self.close_frame) =
                Some(LinkFrame::Close { code, reason: Bytes::copy_from_slice(reason) });
        }
        self.gone.cancel();
    }

    /// Why the connection is unusable: its reason once ended, else a reset (the TCP connection
    /// broke before anything said why).
    pub(super) fn lost(&self) -> ConnectionError {
        self.reason.get().cloned().unwrap_or(ConnectionError::Reset)
    }

    pub(super) fn write_error(&self, e: &h2::Error) -> WriteError {
        match e.reason() {
            Some(reason) if e.is_reset() && e.is_remote() => WriteError::Stopped(code_of(reason)),
            _ if self.reason.get().is_none() && !e.is_io() && !e.is_go_away() => WriteError::ClosedStream,
            _ => WriteError::ConnectionLost(self.lost()),
        }
    }

    pub(super) fn read_error(&self, e: &h2::Error) -> ReadError {
        match e.reason() {
            Some(reason) if e.is_reset() && e.is_remote() => ReadError::Reset(code_of(reason)),
            _ if self.reason.get().is_none() && !e.is_io() && !e.is_go_away() => ReadError::ClosedStream,
            _ => ReadError::ConnectionLost(self.lost()),
        }
    }
}

impl Shared {
    pub(super) fn new(
        peer: Peer,
        opener: Option<h2::client::SendRequest<Bytes>>,
        incoming: mpsc::UnboundedReceiver<(SendStream, RecvStream)>,
        window: u32,
    ) -> (Arc<Self>, (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>)) {
        // The agent's end reads the relay's datagrams from the start.
        let wants_datagrams = opener.is_none();
        let (datagrams_out, outgoing) = mpsc::channel(DATAGRAM_QUEUE);
        // Bounded in bytes by `datagram_bytes`; in number, by the smallest datagram's share.
        let (arrived, datagrams_in) = mpsc::channel(DATAGRAM_RECEIVE_BUFFER / 64);
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
            tasks: TaskTracker::new(),
            wants_datagrams: watch::channel(wants_datagrams).0,
            datagram_bytes: AtomicUsize::new(0),
            window: watch::channel(window).0,
        });
        (shared, (arrived, outgoing))
    }
}

impl Connection {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
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
        let next = tokio::select! {
            biased;
            next = arrived.recv() => next.ok_or_else(|| shared.lost()),
            () = shared.gone.cancelled() => Err(shared.lost()),
        }?;
        shared.datagram_bytes.fetch_sub(next.len(), Ordering::Relaxed);
        Ok(next)
    }

    /// Reads the peer's link stream, and keeps its datagrams, from now on: the relay calls it on
    /// an agent's tunnel; any other connection's link stream (enrollment, a lane, a peer not yet
    /// admitted) is left unread, its window soon full.
    pub fn accept_datagrams(&self) {
        self.shared().wants_datagrams.send_replace(true);
    }

    /// Sets the connection-level receive window this end grants (an agent's lanes share one
    /// tunnel's window).
    pub fn set_receive_window(&self, window: u32) {
        self.shared().window.send_replace(window);
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
    pub(super) inner: Arc<Mutex<h2::SendStream<Bytes>>>,
    pub(super) link: Arc<Shared>,
    /// Keeps the connection open while the stream is (none for the link stream itself).
    pub(super) _open: Option<Arc<Handle>>,
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

    pub(crate) fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = ready!(self.poll_room(cx, buf.len())).map_err(io::Error::from)?;
        self.send(Bytes::copy_from_slice(&buf[..room])).map_err(io::Error::from)?;
        Poll::Ready(Ok(room))
    }
}

/// The receiving half of a stream.
#[derive(Debug)]
pub struct RecvStream {
    pub(super) state: RecvState,
    /// The stream's sending half, to reset it when this half stops.
    pub(super) sender: Arc<Mutex<h2::SendStream<Bytes>>>,
    pub(super) link: Arc<Shared>,
}

#[derive(Debug)]
pub(super) enum RecvState {
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

    pub(crate) fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let Some(mut chunk) = ready!(self.poll_chunk(cx)).map_err(io::Error::from)? else {
            return Poll::Ready(Ok(()));
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk.split_to(n));
        self.keep(chunk);
        Poll::Ready(Ok(()))
    }
}
