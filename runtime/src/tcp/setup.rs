//! Setting up a connection over an established TLS stream: the relay's end (HTTP/2 client) and
//! the agent's end (HTTP/2 server), then the link stream's reader and writer and the pinger.

use std::{
    sync::{atomic::Ordering, Arc, Mutex, Weak},
    time::Instant,
};

use bytes::{Bytes, BytesMut};
use h2::Reason;
use quinn::{ApplicationClose, ConnectionError, VarInt};
use sallyport_proto::link::LinkFrame;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
};
use tracing::debug;

use super::{
    connection::{Connection, Peer, RecvState, RecvStream, SendStream, Shared},
    socket::Settings,
    wire::{
        h2_lost, protocol_violation, request, CLOSE_GRACE, DATAGRAM_RECEIVE_BUFFER, LINK_PATH, MAX_FRAME,
        MAX_HEADER_LIST, MAX_STREAMS, SEND_BUFFER, STREAM_PATH,
    },
};
use crate::sync::lock;
/// once.
pub async fn client<IO>(io: IO, peer: Peer, settings: Settings) -> Result<Connection, ConnectionError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (opener, mut conn) = h2::client::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .initial_max_send_streams(MAX_STREAMS as usize)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| h2_lost(&e))?;
    let ping = conn.ping_pong();
    let (shared, datagrams) =
        Shared::new(peer, Some(opener.clone()), mpsc::unbounded_channel().1, settings.connection_window);
    let driver = shared.clone();
    let mut window = shared.window.subscribe();
    shared.tasks.spawn(async move {
        loop {
            tokio::select! {
                result = &mut conn => {
                    if let Err(e) = result {
                        driver.end(h2_lost(&e));
                    }
                    break;
                }
                Ok(()) = window.changed() => conn.set_target_window_size(*window.borrow_and_update()),
                () = driver.gone.cancelled() => {
                    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
                    break;
                }
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
        .max_header_list_size(MAX_HEADER_LIST)
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
    let (shared, datagrams) = Shared::new(peer, None, incoming, settings.connection_window);
    let send = Arc::new(Mutex::new(send));
    let recv = RecvStream {
        state: RecvState::Body(request.into_body(), Bytes::new()),
        sender: send.clone(),
        link: shared.clone(),
    };
    let driver = shared.clone();
    shared.tasks.spawn(async move {
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

/// Starts the link stream's reader and writer and the pinger.
fn start(
    shared: &Arc<Shared>,
    ping: Option<h2::PingPong>,
    settings: Settings,
    (send, recv): (Arc<Mutex<h2::SendStream<Bytes>>>, RecvStream),
    (arrived, outgoing): (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>),
) {
    let send = SendStream { inner: send, link: shared.clone(), _open: None };
    shared.tasks.spawn(link_writer(shared.clone(), send, outgoing));
    shared.tasks.spawn(link_reader(shared.clone(), recv, arrived));
    if let Some(ping) = ping {
        shared.tasks.spawn(keep_alive(shared.clone(), ping, settings));
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
    let mut wanted = shared.wants_datagrams.subscribe();
    tokio::select! {
        wanted = wanted.wait_for(|wanted| *wanted) => if wanted.is_err() { return },
        () = shared.gone.cancelled() => return,
    }
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
                    // Counted before it is queued, so a reader never subtracts what is not yet added.
                    let len = datagram.len();
                    let queued = shared.datagram_bytes.fetch_add(len, Ordering::Relaxed) + len;
                    if queued > DATAGRAM_RECEIVE_BUFFER || arrived.try_send(datagram).is_err() {
                        shared.datagram_bytes.fetch_sub(len, Ordering::Relaxed);
                    }
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
