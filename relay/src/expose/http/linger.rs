//! A lingering close for HTTP client connections: once a response went out, the relay closes its
//! side for writing and reads what the client still sends (a request body it is not waiting for)
//! for a short while before it lets the socket go.
//!
//! Closing a socket with unread bytes in its receive buffer makes the kernel send a reset, and a
//! reset makes the client's kernel throw away what it received and had not handed to the client
//! yet: a client still uploading a body (curl after `Expect: 100-continue`, a browser posting a
//! form) would see its connection reset instead of the 502, 403 or 413 the relay answered. Web
//! servers linger for this reason (Apache's `lingering_close`, nginx's `lingering_close`).

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

/// How long a closed connection is drained at most.
const LINGER: Duration = Duration::from_secs(2);

/// How much a lingering connection reads at most before it gives up.
const LINGER_BYTES: usize = 16 << 20;

/// Connections lingering at once, at most (past it, a connection closes at once as before).
const MAX_LINGERING: usize = 1024;

static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// A client's TCP stream that lingers when dropped after something was written to it.
#[derive(Debug)]
pub(crate) struct Lingering {
    stream: Option<TcpStream>,
    wrote: bool,
}

impl Lingering {
    pub(super) fn new(stream: TcpStream) -> Self {
        Self { stream: Some(stream), wrote: false }
    }

    fn stream(&mut self) -> &mut TcpStream {
        // `stream` is `Some` from `new` until `drop` takes it.
        self.stream.as_mut().expect("a lingering stream is only taken when dropped")
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else { return };
        if !self.wrote {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if LINGERING.fetch_add(1, Ordering::AcqRel) >= MAX_LINGERING {
            LINGERING.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        runtime.spawn(async move {
            linger(stream).await;
            LINGERING.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Sends the FIN after what was written, then reads and drops what the client still sends until
/// it closes, [`LINGER`] has passed or [`LINGER_BYTES`] were read.
async fn linger(mut stream: TcpStream) {
    let _ = tokio::time::timeout(LINGER, async {
        if stream.shutdown().await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 16 << 10];
        let mut read = 0;
        while read < LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(self.stream()).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.wrote = true;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(self.stream()).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.wrote = true;
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }
}
