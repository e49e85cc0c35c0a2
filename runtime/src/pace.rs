//! Bandwidth caps on a splice: the buckets each direction's bytes pass through before they go on.
//! A bucket that is empty makes the splice wait, so the sender is held back by TCP's own flow
//! control (the splice reads no more until the bytes it holds have passed).

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A bucket of bytes.
pub trait Bucket: Send + Sync + std::fmt::Debug {
    /// Takes `bytes` (at most [`most`](Self::most)) now, or says how long until it could.
    fn take(&self, bytes: u32) -> Result<(), Duration>;

    /// The most one take may ask for (the bucket's burst).
    fn most(&self) -> u32;
}

/// The buckets of one splice: up (from the TCP peer into the tunnel) and down.
#[derive(Debug, Default, Clone)]
pub struct Pace {
    pub up: Vec<Arc<dyn Bucket>>,
    pub down: Vec<Arc<dyn Bucket>>,
}

impl Pace {
    pub fn is_empty(&self) -> bool {
        self.up.is_empty() && self.down.is_empty()
    }

    /// Waits until each of `buckets`, one after the other, has taken `bytes`.
    pub async fn pass(buckets: &[Arc<dyn Bucket>], bytes: usize) {
        for bucket in buckets {
            let mut left = bytes;
            while left > 0 {
                let piece = left.min(bucket.most().max(1) as usize);
                loop {
                    match bucket.take(piece as u32) {
                        Ok(()) => break,
                        Err(wait) => tokio::time::sleep(wait).await,
                    }
                }
                left -= piece;
            }
        }
    }
}

/// A byte stream whose reads (down) and writes (up) pass a [`Pace`]'s buckets. A read's or write's
/// bytes are charged once they have moved, and the next read or write in that direction waits
/// until they have passed: the stream runs at most one read or write ahead of its caps, and its
/// reader is held back by flow control as a splice's is. For streams driven by poll (an HTTP
/// client's connection) where a splice's loop cannot await the buckets.
#[derive(Debug)]
pub struct Paced<S> {
    inner: S,
    down: Owed,
    up: Owed,
}

impl<S> Paced<S> {
    /// `inner` paced by `pace` (`None`: not at all).
    pub fn new(inner: S, pace: Option<Pace>) -> Self {
        let Pace { up, down } = pace.unwrap_or_default();
        Self { inner, down: Owed::new(down), up: Owed::new(up) }
    }
}

/// One direction's buckets and what it still owes them.
#[derive(Debug)]
struct Owed {
    buckets: Vec<Arc<dyn Bucket>>,
    /// The bucket being paid, and what is left to pay it (`at` past the end: nothing owed).
    at: usize,
    left: usize,
    /// What each bucket is owed in all.
    charge: usize,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Owed {
    fn new(buckets: Vec<Arc<dyn Bucket>>) -> Self {
        let at = buckets.len();
        Self { buckets, at, left: 0, charge: 0, wait: None }
    }

    fn owe(&mut self, bytes: usize) {
        if bytes > 0 && !self.buckets.is_empty() {
            (self.at, self.left, self.charge) = (0, bytes, bytes);
        }
    }

    /// Ready once every bucket has taken what it is owed.
    fn poll_paid(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(wait) = self.wait.as_mut() {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            let Some(bucket) = self.buckets.get(self.at) else { return Poll::Ready(()) };
            if self.left == 0 {
                self.at += 1;
                self.left = self.charge;
                continue;
            }
            let piece = self.left.min(bucket.most().max(1) as usize);
            match bucket.take(piece as u32) {
                Ok(()) => self.left -= piece,
                Err(wait) => self.wait = Some(Box::pin(tokio::time::sleep(wait))),
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Paced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.down.poll_paid(cx));
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.down.owe(buf.filled().len() - before);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Paced<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.up.poll_paid(cx));
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.up.owe(written);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Takes `bytes` from each of `buckets` now, or says no (a datagram over the cap is dropped, not
/// held). A datagram larger than a bucket's burst never passes it. Buckets before the one that
/// says no keep what they took: the datagram counted against them.
pub fn take_now(buckets: &[Arc<dyn Bucket>], bytes: usize) -> bool {
    buckets
        .iter()
        .all(|bucket| u32::try_from(bytes).is_ok_and(|n| n <= bucket.most() && bucket.take(n).is_ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A bucket that refills `rate` bytes a second, starting empty.
    #[derive(Debug)]
    struct Fixed {
        rate: f64,
        most: u32,
        state: Mutex<(f64, tokio::time::Instant)>,
    }

    impl Bucket for Fixed {
        fn take(&self, bytes: u32) -> Result<(), Duration> {
            let mut state = self.state.lock().expect("state");
            let now = tokio::time::Instant::now();
            let level =
                (state.0 + now.duration_since(state.1).as_secs_f64() * self.rate).min(f64::from(self.most));
            *state = (level, now);
            if level >= f64::from(bytes) {
                state.0 -= f64::from(bytes);
                Ok(())
            } else {
                Err(Duration::from_secs_f64((f64::from(bytes) - level) / self.rate))
            }
        }

        fn most(&self) -> u32 {
            self.most
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_pass_at_the_buckets_rate_in_pieces_of_their_burst() {
        let bucket: Arc<dyn Bucket> = Arc::new(Fixed {
            rate: 1000.0,
            most: 100,
            state: Mutex::new((0.0, tokio::time::Instant::now())),
        });
        let started = tokio::time::Instant::now();
        Pace::pass(std::slice::from_ref(&bucket), 1000).await;
        let took = started.elapsed();
        assert!((Duration::from_millis(990)..=Duration::from_millis(1010)).contains(&took), "{took:?}");
        assert!(Pace::default().is_empty());
    }

    fn fixed(rate: f64, most: u32) -> Arc<dyn Bucket> {
        Arc::new(Fixed { rate, most, state: Mutex::new((0.0, tokio::time::Instant::now())) })
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_stream_runs_one_write_or_read_ahead_of_its_buckets() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (near, far) = tokio::io::duplex(1 << 16);
        // Writes pass a service's bucket and an agent's slower one: the slower sets the pace.
        let pace =
            Pace { up: vec![fixed(4000.0, 1000), fixed(1000.0, 1000)], down: vec![fixed(2000.0, 500)] };
        let mut near = Paced::new(near, Some(pace));
        let mut far = Paced::new(far, None);
        let started = tokio::time::Instant::now();
        for _ in 0..5 {
            near.write_all(&[7; 1000]).await.expect("write");
        }
        // The first write went at once; each of the four after it waited for the one before.
        let took = started.elapsed();
        assert!((Duration::from_millis(3990)..=Duration::from_millis(4010)).contains(&took), "{took:?}");
        let mut got = vec![0; 5000];
        far.read_exact(&mut got).await.expect("read");
        assert!(got.iter().all(|b| *b == 7));

        far.write_all(&[9; 4000]).await.expect("write");
        let started = tokio::time::Instant::now();
        let mut read = 0;
        while read < 4000 {
            let mut buf = [0; 1000];
            read += near.read(&mut buf).await.expect("read");
        }
        // Reads owe the down bucket (2,000 a second, 500 at once, full): the last read waited for
        // the 3,000 bytes read before it, less the 500 the bucket held.
        let took = started.elapsed();
        assert!((Duration::from_millis(1240)..=Duration::from_millis(1260)).contains(&took), "{took:?}");
    }

    #[test]
    fn a_datagram_passes_only_what_has_room_now() {
        let bucket = Arc::new(Fixed {
            rate: 1.0,
            most: 1500,
            state: Mutex::new((1500.0, tokio::time::Instant::now())),
        });
        let buckets: Vec<Arc<dyn Bucket>> = vec![bucket];
        assert!(!take_now(&buckets, 1501), "larger than the burst: never");
        assert!(take_now(&buckets, 1000));
        assert!(!take_now(&buckets, 1000), "the bucket holds 500 now");
        assert!(take_now(&buckets, 500));
    }
}
