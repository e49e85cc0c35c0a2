//! An IO object that stamps an [`Activity`] whenever bytes move through it, so that a copy loop
//! with no hooks of its own (an upgraded HTTP connection) can have an idle timeout.

use std::{
    io,
    ops::Deref,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::flows::Activity;

/// `inner`, with every read or write that moves bytes stamping `activity` (a reference, or an
/// `Arc` for an object that must own everything, as an upgradable HTTP connection must).
#[derive(Debug)]
pub struct Watched<A, S> {
    inner: S,
    activity: A,
}

impl<A: Deref<Target = Activity>, S> Watched<A, S> {
    pub fn new(inner: S, activity: A) -> Self {
        Self { inner, activity }
    }
}

impl<A: Deref<Target = Activity> + Unpin, S: AsyncRead + Unpin> AsyncRead for Watched<A, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<A: Deref<Target = Activity> + Unpin, S: AsyncWrite + Unpin> AsyncWrite for Watched<A, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
