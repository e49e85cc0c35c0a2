//! Joining a TCP connection to a tunnel's bidirectional stream (QUIC, or HTTP/2 over TCP), in both directions, with the failure
//! semantics users rely on: each direction ends either with all bytes then EOF, or with a reset.
//!
//! - TCP EOF becomes a stream FIN; a stream FIN becomes a TCP write shutdown (half-close both ways).
//! - A TCP error becomes a stream reset (and STOP_SENDING); a stream reset, a lost connection or a
//!   refusal becomes a TCP RST (`SO_LINGER` 0), never a clean close after a short transfer.
//!
//! Both directions run in the caller's task: no task is spawned per connection, and a connection
//! holds no buffer of its own between reads.

use std::io;

use bytes::BytesMut;
use quinn::{ConnectionError, ReadError, VarInt, WriteError};
use tokio::{
    io::AsyncReadExt,
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpStream,
    },
};

use tokio_util::sync::CancellationToken;

use crate::{
    flows::Activity,
    link::{code, RecvStream, SendStream},
    pace::Pace,
};
use sallyport_proto::{codes, stream::InvalidAnswer, Answer};

/// Bytes read from TCP in one go: the first read and after small ones, and the most (also what
/// one direction of a splice holds while the other end's flow control holds it back).
const MIN_READ: usize = 4 * 1024;
pub use crate::limits::MAX_READ;

/// Which end of the tunnel is splicing: the relay's stream starts with the agent's answer byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The relay: TCP is the client; the stream's first byte is the agent's [`Answer`].
    Relay,
    /// The agent: TCP is the target; the answer has already been written.
    Agent,
}

/// Bytes carried by a splice that ended cleanly in both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spliced {
    /// From the TCP side into the tunnel.
    pub up: u64,
    /// From the tunnel to the TCP side.
    pub down: u64,
}

/// How a splice failed; the name says which side failed.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// The TCP peer (client at the relay, target at the agent) reset or failed.
    #[error("TCP peer failed: {0}")]
    Tcp(io::Error),
    /// The other end of the tunnel reset the stream: its TCP peer failed.
    #[error("tunnel peer reset the stream (code {0})")]
    Reset(VarInt),
    /// The other end of the tunnel stopped reading.
    #[error("tunnel peer stopped the stream (code {0})")]
    Stopped(VarInt),
    /// The tunnel connection is gone.
    #[error("tunnel connection lost: {0}")]
    Connection(#[from] ConnectionError),
    /// The agent did not connect the target.
    #[error("agent answered: {}", .0.describe())]
    Refused(Answer),
    /// The agent's answer byte is not one this build knows.
    #[error("agent sent an invalid answer: {0}")]
    BadAnswer(#[from] InvalidAnswer),
    /// The stream ended before the agent answered.
    #[error("stream ended before the agent answered")]
    NoAnswer,
    /// The stream was already closed locally (a bug on our side).
    #[error("stream closed locally")]
    Closed,
    /// The TCP peer stopped reading while the connection's share of stalled streams was taken
    /// ([`crate::stall`]).
    #[error("the TCP peer stopped reading while other streams of the tunnel had stalled too: cut")]
    Stalled,
}

impl From<WriteError> for SpliceError {
    fn from(err: WriteError) -> Self {
        match err {
            WriteError::Stopped(code) => Self::Stopped(code),
            WriteError::ConnectionLost(e) => Self::Connection(e),
            WriteError::ClosedStream | WriteError::ZeroRttRejected => Self::Closed,
        }
    }
}

impl From<ReadError> for SpliceError {
    fn from(err: ReadError) -> Self {
        match err {
            ReadError::Reset(code) => Self::Reset(code),
            ReadError::ConnectionLost(e) => Self::Connection(e),
            ReadError::ClosedStream | ReadError::IllegalOrderedRead | ReadError::ZeroRttRejected => {
                Self::Closed
            }
        }
    }
}

/// Joins `tcp` with the stream (`send`, `recv`) until both directions end. On any failure both
/// stream halves are reset and `tcp` is set to send a RST when the caller drops it.
///
/// Callers set [`reset_on_close`] on `tcp` as soon as they have it, so that if this process dies
/// (a crash, `kill -9`) the kernel resets the peer instead of closing cleanly; the splice restores
/// a graceful close only just before it forwards a FIN.
///
/// Cancel safety: dropping the future leaves the stream halves to quinn's drop behaviour (reset and
/// stop); the caller should then drop `tcp` after [`reset_on_close`].
pub async fn splice(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    side: Side,
) -> Result<Spliced, SpliceError> {
    splice_watched(tcp, send, recv, side, None).await
}

/// [`splice`], stamping `activity` whenever bytes move either way (for idle timeouts).
pub async fn splice_watched(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    side: Side,
    activity: Option<&Activity>,
) -> Result<Spliced, SpliceError> {
    splice_paced(tcp, send, recv, side, activity, None).await
}

/// [`splice_watched`] with bandwidth caps: each direction's bytes pass `pace`'s buckets before
/// they go on.
pub async fn splice_paced(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    side: Side,
    activity: Option<&Activity>,
    pace: Option<&Pace>,
) -> Result<Spliced, SpliceError> {
    let (mut reader, writer) = tcp.split();
    let cut = recv.stall_cut();
    let result = tokio::try_join!(
        tcp_to_stream(&mut reader, send, activity, pace),
        stream_to_tcp(&writer, recv, side, activity, cut.as_ref(), pace)
    );
    match result {
        Ok((up, down)) => Ok(Spliced { up, down }),
        Err(err) => {
            let reason = match err {
                SpliceError::Tcp(_) => codes::stream::PEER_RESET,
                _ => codes::stream::INTERNAL,
            };
            // Either half may already be closed; a reset of a finished stream is allowed until it
            // is acknowledged, and an error here only means there is nothing left to reset.
            let _ = send.reset(code(reason));
            let _ = recv.stop(code(reason));
            reset_on_close(tcp);
            Err(err)
        }
    }
}

/// Makes the socket send a RST instead of a FIN when it is closed (`SO_LINGER` with a zero timeout;
/// with zero, close never blocks).
pub fn reset_on_close(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

async fn tcp_to_stream(
    tcp: &mut ReadHalf<'_>,
    send: &mut SendStream,
    activity: Option<&Activity>,
    pace: Option<&Pace>,
) -> Result<u64, SpliceError> {
    let mut want = MIN_READ;
    let mut total = 0u64;
    loop {
        // Waiting for data holds no buffer.
        tcp.readable().await.map_err(SpliceError::Tcp)?;
        // A fresh buffer per read, handed to quinn whole. A read through `AsyncRead` that comes
        // back short marks the socket drained, so the next round waits for the kernel instead of
        // trying a read that can only fail with EAGAIN: a third of the system calls of a
        // request/response exchange.
        let mut buf = BytesMut::with_capacity(want);
        match tcp.read_buf(&mut buf).await.map_err(SpliceError::Tcp)? {
            0 => {
                send.finish().map_err(|_| SpliceError::Closed)?;
                return Ok(total);
            }
            n => {
                total += n as u64;
                if let Some(activity) = activity {
                    activity.touch();
                }
                want = next_read_size(want, n);
                if let Some(pace) = pace {
                    Pace::pass(&pace.up, n).await;
                }
                send.write_chunk(buf.freeze()).await?;
            }
        }
    }
}

/// Grows the read size while reads fill it (bulk), shrinks it when they come back small
/// (interactive), between [`MIN_READ`] and [`MAX_READ`].
fn next_read_size(want: usize, got: usize) -> usize {
    if got == want {
        (want * 2).min(MAX_READ)
    } else if got < want / 4 {
        (want / 2).max(MIN_READ)
    } else {
        want
    }
}

async fn stream_to_tcp(
    tcp: &WriteHalf<'_>,
    recv: &mut RecvStream,
    side: Side,
    activity: Option<&Activity>,
    cut: Option<&CancellationToken>,
    pace: Option<&Pace>,
) -> Result<u64, SpliceError> {
    if side == Side::Relay {
        read_answer(recv).await?;
    }
    let mut total = 0u64;
    // Waiting for data holds no buffer; once a chunk is there, the chunks already received join it
    // (each is about one packet's payload) and go out in one vectored write: far fewer syscalls
    // and receiver wakeups in bulk, and nothing waits for more data.
    while let Some(first) = recv.read_chunk().await? {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            // `read_chunk` is cancel-safe: a poll that finds nothing takes nothing.
            let more = tokio::select! {
                biased;
                more = recv.read_chunk() => more?,
                () = std::future::ready(()) => break,
            };
            match more {
                Some(chunk) => batch.push(chunk),
                None => break,
            }
        }
        let bytes: usize = batch.iter().map(bytes::Bytes::len).sum();
        total += bytes as u64;
        if let Some(activity) = activity {
            activity.touch();
        }
        if let Some(pace) = pace {
            Pace::pass(&pace.down, bytes).await;
        }
        match cut {
            None => write_all_vectored(tcp, &batch).await?,
            Some(cut) => tokio::select! {
                written = write_all_vectored(tcp, &batch) => written?,
                () = cut.cancelled() => return Err(SpliceError::Stalled),
            },
        }
    }
    let socket = socket2::SockRef::from(tcp.as_ref());
    // A FIN is due now: let the kernel deliver what is queued instead of discarding it on close.
    socket.set_linger(None).map_err(SpliceError::Tcp)?;
    match socket.shutdown(std::net::Shutdown::Write) {
        Ok(()) => Ok(total),
        // The TCP peer already closed both ways: nothing is left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(total),
        Err(e) => Err(SpliceError::Tcp(e)),
    }
}

async fn read_answer(recv: &mut RecvStream) -> Result<(), SpliceError> {
    let mut byte = [0u8; 1];
    match recv.read_exact(&mut byte).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(SpliceError::NoAnswer),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    match Answer::try_from(byte[0])? {
        Answer::Connected => Ok(()),
        refused => Err(SpliceError::Refused(refused)),
    }
}

/// Chunks written to TCP in one vectored write, at most.
const MAX_BATCH: usize = 32;

async fn write_all_vectored(tcp: &WriteHalf<'_>, chunks: &[bytes::Bytes]) -> Result<(), SpliceError> {
    let mut slices: Vec<io::IoSlice<'_>> = chunks.iter().map(|c| io::IoSlice::new(c)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        tcp.writable().await.map_err(SpliceError::Tcp)?;
        match tcp.try_write_vectored(slices) {
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(SpliceError::Tcp(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_size_adapts_between_bounds() {
        let mut want = MIN_READ;
        for _ in 0..10 {
            want = next_read_size(want, want);
        }
        assert_eq!(want, MAX_READ, "full reads grow to the maximum");
        for _ in 0..10 {
            want = next_read_size(want, 1);
        }
        assert_eq!(want, MIN_READ, "small reads shrink to the minimum");
        assert_eq!(next_read_size(16 * 1024, 8 * 1024), 16 * 1024, "half-full reads keep the size");
    }
}
