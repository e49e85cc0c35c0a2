//! Upstream HTTP/1.1 connections: each a data stream to the agent, whose first read checks the
//! agent's answer byte, so a request goes out with the stream header and no round trip is added.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{ready, Context, Poll},
};

use hyper::{body::Incoming, client::conn::http1 as client};
use hyper_util::rt::TokioIo;
use sallyport_proto::Answer;
use sallyport_runtime::{
    link::{RecvStream, SendStream},
    pace::Paced,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info_span, Instrument};

use hyper::StatusCode;

use crate::metrics::Outcome;
use crate::{config::Service, expose::Exposure, tunnel::streams};

/// A new HTTP/1.1 connection to the service's target, carried on a new data stream.
/// Its bytes each way pass the bandwidth caps of the service and its agent.
pub(super) async fn connect(
    picked: &crate::groups::Picked,
    service: &Service,
    peer: SocketAddr,
    upgrades: bool,
    exposure: &Exposure,
) -> Result<client::SendRequest<Incoming>, Failure> {
    let tasks = &exposure.runtime.clients;
    let (send, recv) = streams::open(&picked.connection, service, peer, &[])
        .await
        .map_err(|e| Failure::bad_gateway(format!("cannot open a stream to the agent: {e}")))?;
    // A client that stops reading a response holds the stream's window; cut beyond the tunnel's
    // share of stalled streams, the connection goes and its client's response fails.
    let cut = recv.stall_cut().unwrap_or_default();
    let io = TokioIo::new(Paced::new(
        AgentStream { send, recv, answered: false, failed: None },
        exposure.pace(service, &picked.agent),
    ));
    let (sender, conn) = client::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| Failure::bad_gateway(format!("HTTP handshake: {e}")))?;
    let span = info_span!("upstream", service = %service.name);
    let drained = picked.cut.clone();
    // The connection's driver is served with the client connections (drained with them).
    if upgrades {
        tasks.spawn(
            async move {
                tokio::select! {
                    ended = conn.with_upgrades() => if let Err(e) = ended {
                        debug!(error = %e, "target connection ended");
                    },
                    () = cut.cancelled() => debug!("client stopped reading: target connection cut"),
                    () = drained.cancelled() => debug!("the agent's drain grace is over: target connection cut"),
                }
            }
            .instrument(span),
        );
    } else {
        tasks.spawn(
            async move {
                tokio::select! {
                    ended = conn => if let Err(e) = ended {
                        debug!(error = %e, "target connection ended");
                    },
                    () = cut.cancelled() => debug!("client stopped reading: target connection cut"),
                    () = drained.cancelled() => debug!("the agent's drain grace is over: target connection cut"),
                }
            }
            .instrument(span),
        );
    }
    Ok(sender)
}

/// The reason to show for a failed exchange: the agent's answer when it refused the stream.
pub(super) fn reason_of(error: &hyper::Error) -> String {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(refusal) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(refusal) = refusal.downcast_ref::<Refusal>() {
                return refusal.0.to_owned();
            }
        }
        source = e.source();
    }
    if error.is_incomplete_message() {
        return "the target closed the connection before answering".into();
    }
    format!("the target connection failed: {error}")
}

/// The agent would not connect the target.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refusal(&'static str);

/// A data stream as a byte stream for hyper: the agent's one-byte answer is checked on the first
/// read, so the request goes out without waiting for it (no added round trip).
#[derive(Debug)]
struct AgentStream {
    send: SendStream,
    recv: RecvStream,
    answered: bool,
    /// A write that failed before the answer was read: the agent refused the target and stopped
    /// the stream, and its answer, on its way, says why.
    failed: Option<io::Error>,
}

impl AgentStream {
    /// Reads and checks the agent's answer byte (once).
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.answered {
            return Poll::Ready(Ok(()));
        }
        let mut byte = [0u8; 1];
        let mut one = ReadBuf::new(&mut byte);
        ready!(AsyncRead::poll_read(Pin::new(&mut self.recv), cx, &mut one))?;
        let answer = match one.filled() {
            [] => Err(Refusal("the agent closed the stream without answering")),
            [b] => match Answer::try_from(*b) {
                Ok(Answer::Connected) => Ok(()),
                Ok(other) => Err(Refusal(other.describe())),
                Err(_) => Err(Refusal("the agent answered with an invalid byte")),
            },
            _ => unreachable!("a one-byte buffer"),
        };
        answer.map_err(io::Error::other)?;
        self.answered = true;
        Poll::Ready(Ok(()))
    }

    /// After a failed write: the agent's refusal if its answer says so, else the write's error.
    fn poll_failure<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let answer = ready!(self.poll_answer(cx));
        let failed = self.failed.take().unwrap_or_else(|| io::Error::other("the stream failed"));
        Poll::Ready(Err(match answer {
            Err(refusal) if refusal.get_ref().is_some_and(|e| e.is::<Refusal>()) => refusal,
            _ => failed,
        }))
    }

    /// Runs one write; one that fails before the answer was read waits for the answer.
    fn poll_io<T>(
        &mut self,
        cx: &mut Context<'_>,
        io: impl FnOnce(Pin<&mut SendStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.failed.is_none() {
            match io(Pin::new(&mut self.send), cx) {
                Poll::Ready(Err(e)) if !self.answered => self.failed = Some(e),
                other => return other,
            }
        }
        self.poll_failure(cx)
    }
}

impl AsyncRead for AgentStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_answer(cx))?;
        AsyncRead::poll_read(Pin::new(&mut this.recv), cx, buf)
    }
}

impl AsyncWrite for AgentStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_io(cx, |send, cx| AsyncWrite::poll_write(send, cx, buf))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_io(cx, AsyncWrite::poll_flush)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_io(cx, AsyncWrite::poll_shutdown)
    }
}

/// Why a request got no response from its target.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) status: StatusCode,
    pub(super) reason: String,
    pub(super) outcome: Outcome,
}

impl Failure {
    pub(super) fn bad_gateway(reason: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_GATEWAY, reason: reason.into(), outcome: Outcome::StreamFailed }
    }
}
