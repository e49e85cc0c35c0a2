//! The two halves of a stream, with quinn's semantics: FIN is `END_STREAM`, a reset is
//! `RST_STREAM` with the code QUIC would carry.

use std::{
    future::{poll_fn, Future},
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use h2::Reason;
use quinn::{ReadError, ReadExactError, VarInt, WriteError};
use tokio::io::ReadBuf;

use super::{code_of, Handle, Shared};
use crate::link::ClosedStream;
use crate::sync::lock;
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

fn reason_of(code: VarInt) -> Reason {
    Reason::from(u32::try_from(code.into_inner()).unwrap_or(u32::MAX))
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
