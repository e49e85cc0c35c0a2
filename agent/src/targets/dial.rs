//! One data stream: read the header the relay wrote, dial the declared target, answer, splice.

use std::{io, sync::Arc, time::Duration};

use sallyport_proto::{codes, Answer, StreamHeader, MAX_STREAM_HEADER};
use sallyport_runtime::link::{RecvStream, SendStream};
use sallyport_runtime::{code, read_frame, splice, Side};
use tokio::net::TcpStream;
use tracing::{debug, info_span, Instrument};

use crate::{config::Target, containers::ContainerError, targets::Targets};

/// The relay writes the header as the stream opens; anything slower is a broken relay.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn handle_stream(mut send: SendStream, mut recv: RecvStream, targets: Arc<Targets>) {
    let mut buf = Vec::new();
    let header = match tokio::time::timeout(
        HEADER_TIMEOUT,
        read_frame::<StreamHeader>(&mut recv, MAX_STREAM_HEADER, &mut buf),
    )
    .await
    {
        Ok(Ok(Some(header))) => header,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            sallyport_runtime::limited!(warn, error = %e, "bad data stream header: resetting the stream");
            let _ = send.reset(code(codes::stream::INTERNAL));
            let _ = recv.stop(code(codes::stream::INTERNAL));
            return;
        }
        Err(_) => {
            sallyport_runtime::limited!(warn, "no data stream header in time: resetting the stream");
            let _ = send.reset(code(codes::stream::INTERNAL));
            let _ = recv.stop(code(codes::stream::INTERNAL));
            return;
        }
    };
    let span = info_span!("stream", service = %header.service, client = %header.client_addr);
    serve(header, send, recv, targets).instrument(span).await;
}

async fn serve(header: StreamHeader, mut send: SendStream, mut recv: RecvStream, targets: Arc<Targets>) {
    // The service as configured now (a reload may have added, changed or removed it; a stream
    // already open goes on with what it started with).
    let config = targets.config.get();
    let Some(service) = config.services.get(&header.service) else {
        sallyport_runtime::limited!(warn, "relay asked for a service this agent does not declare");
        refuse(&mut send, &mut recv, Answer::UnknownService).await;
        return;
    };
    // A container connection holds its lease until the splice ends.
    let (mut tcp, _lease) = match &service.target {
        Target::Tcp { host, port } => match dial(host, *port, config.agent.connect_timeout).await {
            Ok(tcp) => (tcp, None),
            Err(answer) => {
                debug!(target = %service.target, reason = answer.describe(), "dial failed");
                refuse(&mut send, &mut recv, answer).await;
                return;
            }
        },
        // Boxed: the container path (Docker API calls) would otherwise size every stream's task.
        Target::Container { name, port } => match Box::pin(targets.containers.connect(name, *port)).await {
            Ok((tcp, lease)) => {
                prepare(&tcp);
                (tcp, Some(lease))
            }
            Err(e) => {
                sallyport_runtime::limited!(warn, target = %service.target, error = %e, "container not available: refusing the connection");
                let answer = match e {
                    ContainerError::NotReady { .. } => Answer::TimedOut,
                    _ => Answer::Unreachable,
                };
                refuse(&mut send, &mut recv, answer).await;
                return;
            }
        },
        Target::Wsl { distro, port } => {
            let Some(resolver) = targets.wsl(distro) else {
                refuse(&mut send, &mut recv, Answer::UnknownService).await;
                return;
            };
            let timeout = config.agent.connect_timeout;
            match resolver.connect_tcp(*port, Some(crate::targets::wsl::LOCALHOST), timeout).await {
                Ok(tcp) => {
                    prepare(&tcp);
                    (tcp, None)
                }
                Err(e) => {
                    sallyport_runtime::limited!(warn, target = %service.target, error = %e, "WSL2 target not reachable");
                    refuse(&mut send, &mut recv, answer_for(&e)).await;
                    return;
                }
            }
        }
        Target::Udp { .. } => {
            sallyport_runtime::limited!(warn, target = %service.target, "the relay opened a TCP stream for a UDP target: refused");
            refuse(&mut send, &mut recv, Answer::UnknownService).await;
            return;
        }
    };
    if service.proxy_protocol {
        // The target sees the client's address; the destination is the target itself.
        let destination = tcp.peer_addr().unwrap_or(header.client_addr);
        let proxy = sallyport_proto::proxy::header(
            header.client_addr,
            destination,
            sallyport_proto::proxy::Transport::Stream,
        );
        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut tcp, &proxy).await {
            debug!(error = %e, "cannot write the PROXY header");
            refuse(&mut send, &mut recv, Answer::Unreachable).await;
            return;
        }
    }
    if send.write_all(&[Answer::Connected as u8]).await.is_err() {
        return;
    }
    match splice(&mut tcp, &mut send, &mut recv, Side::Agent).await {
        Ok(done) => debug!(up = done.up, down = done.down, "stream finished"),
        Err(e) => debug!(error = %e, "stream reset"),
    }
}

/// Tells the relay why the target is not connected and ends the stream.
async fn refuse(send: &mut SendStream, recv: &mut RecvStream, answer: Answer) {
    if send.write_all(&[answer as u8]).await.is_ok() {
        let _ = send.finish();
    }
    let _ = recv.stop(code(codes::stream::PEER_RESET));
}

/// Socket options of every target connection.
fn prepare(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    // Until the splice forwards a FIN, closing this socket (even by a crash) resets the target.
    sallyport_runtime::reset_on_close(tcp);
}

/// Connects to a declared host target, mapping failures to the answer the relay gets.
async fn dial(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, Answer> {
    match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Ok(Ok(tcp)) => {
            prepare(&tcp);
            Ok(tcp)
        }
        Ok(Err(e)) => Err(answer_for(&e)),
        Err(_) => Err(Answer::TimedOut),
    }
}

/// The answer the relay gets for a failed dial.
fn answer_for(e: &io::Error) -> Answer {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Answer::Refused,
        io::ErrorKind::TimedOut => Answer::TimedOut,
        _ => Answer::Unreachable,
    }
}
