//! Bandwidth caps on a splice: the buckets each direction's bytes pass through before they go on.
//! A bucket that is empty makes the splice wait, so the sender is held back by TCP's own flow
//! control (the splice reads no more until the bytes it holds have passed).

use std::{sync::Arc, time::Duration};

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
}
