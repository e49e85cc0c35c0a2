//! Streams whose reader stopped: a client that paused a download, a target that stopped reading an
//! upload. Each such stream keeps its whole receive window filled, and the connection's window is
//! shared by every stream, so enough of them would leave nothing for the others: one paused
//! browser download could freeze every service of an agent.
//!
//! Per-stream windows that grow only for drained streams would bound that, but quinn's stream
//! window is one value per connection. So each side instead bounds how many streams of a
//! connection may sit on a full window: a stream whose reader has held data without asking for
//! more for [`STALL_AFTER`] is *stalled*; the first [`STALLED_STREAMS`] stalled streams of a
//! connection (fewer when an agent's windows are shared by its lanes) keep their place and their
//! buffered data, at most half the connection's window, and a stream that stalls beyond that is
//! cut: its reader's [`cut`](Reader::cut) fires, and it resets its stream and its TCP peer, which
//! gives its window back. The other half of the window always moves the streams that are read.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{
    limits::{CONNECTION_RECEIVE_WINDOW, STREAM_RECEIVE_WINDOW},
    sync::lock,
};

/// How long a reader may hold data without asking for more before its stream counts as stalled:
/// far longer than a reader that drains takes to write what it read.
pub const STALL_AFTER: Duration = Duration::from_millis(500);

/// Stalled streams one connection keeps with its whole window: half the connection's window.
pub const STALLED_STREAMS: usize = (CONNECTION_RECEIVE_WINDOW / 2 / STREAM_RECEIVE_WINDOW) as usize;

/// How often a connection looks for stalled streams.
const SWEEP: Duration = Duration::from_millis(100);

/// The stalled-stream watch of one connection.
#[derive(Debug)]
pub struct Stalls {
    epoch: Instant,
    limit: AtomicUsize,
    readers: Mutex<Vec<Weak<Reader>>>,
    cut: AtomicU64,
}

impl Default for Stalls {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            limit: AtomicUsize::new(STALLED_STREAMS),
            readers: Mutex::new(Vec::new()),
            cut: AtomicU64::new(0),
        }
    }
}

impl Stalls {
    /// Watches one more stream's reader.
    pub fn watch(&self) -> Arc<Reader> {
        let reader = Arc::new(Reader {
            epoch: self.epoch,
            holding_since: AtomicU64::new(0),
            cut: CancellationToken::new(),
        });
        lock(&self.readers).push(Arc::downgrade(&reader));
        reader
    }

    /// Keeps `share` of a connection's window for stalled streams: the connection carries
    /// `1 / connections` of an agent's windows.
    pub fn share(&self, connections: usize) {
        self.limit.store((STALLED_STREAMS / connections.max(1)).max(1), Ordering::Relaxed);
    }

    /// Streams cut so far.
    pub fn cut_total(&self) -> u64 {
        self.cut.load(Ordering::Relaxed)
    }

    /// Looks for stalled streams every [`SWEEP`] and cuts those beyond the limit; runs until
    /// dropped (beside whatever serves the connection).
    pub async fn sweep_forever(&self) -> std::convert::Infallible {
        loop {
            tokio::time::sleep(SWEEP).await;
            self.sweep(Instant::now());
        }
    }

    /// One look: cuts the streams that stalled after the first `limit` did.
    pub fn sweep(&self, now: Instant) -> usize {
        let now = millis(self.epoch, now);
        let mut stalled = Vec::new();
        lock(&self.readers).retain(|weak| {
            let Some(reader) = weak.upgrade() else { return false };
            if let Some(since) = reader.stalled_since(now) {
                stalled.push((since, reader));
            }
            true
        });
        let limit = self.limit.load(Ordering::Relaxed);
        let since: Vec<u64> = stalled.iter().map(|(since, _)| *since).collect();
        let cut = beyond_limit(&since, limit);
        for &i in &cut {
            stalled[i].1.cut.cancel();
        }
        self.cut.fetch_add(cut.len() as u64, Ordering::Relaxed);
        cut.len()
    }
}

/// Which of the stalled streams (each given by when it stalled) to cut: all but the `limit` that
/// stalled first. The first to stall keep their place; a stream that stalls when the share is
/// taken is the one cut, so a newcomer cannot push out a reader already paused.
fn beyond_limit(since: &[u64], limit: usize) -> Vec<usize> {
    if since.len() <= limit {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..since.len()).collect();
    order.sort_by_key(|&i| (since[i], i));
    let mut cut = order.split_off(limit);
    cut.sort_unstable();
    cut
}

fn millis(epoch: Instant, at: Instant) -> u64 {
    // 0 means "not holding": every stamp is at least 1.
    at.saturating_duration_since(epoch).as_millis().min(u128::from(u64::MAX - 1)) as u64 + 1
}

/// One stream's reader, as its stall watch sees it.
#[derive(Debug)]
pub struct Reader {
    epoch: Instant,
    /// When the reader last took data without asking for more since ([`millis`]); 0 while it
    /// waits for data, or after the stream's end.
    holding_since: AtomicU64,
    cut: CancellationToken,
}

impl Reader {
    /// Fires when the stream is cut for stalling.
    pub fn cut(&self) -> CancellationToken {
        self.cut.clone()
    }

    /// A read begins: the reader asks for more. See [`Asking`].
    pub fn ask(&self) -> Asking<'_> {
        Asking { reader: self, before: self.holding_since.swap(0, Ordering::Relaxed), done: false }
    }

    /// A poll of the stream came back: with data (`true`), or waiting, ended or failed.
    pub fn polled(&self, data: bool) {
        let stamp = if data { millis(self.epoch, Instant::now()) } else { 0 };
        self.holding_since.store(stamp, Ordering::Relaxed);
    }

    fn stalled_since(&self, now: u64) -> Option<u64> {
        let since = self.holding_since.load(Ordering::Relaxed);
        let stalled = since != 0
            && !self.cut.is_cancelled()
            && now.saturating_sub(since) >= STALL_AFTER.as_millis() as u64;
        stalled.then_some(since)
    }
}

/// A read in progress. It ends with [`Asking::answered`]; a read abandoned before its answer (a
/// poll that found nothing, inside a `select!`) leaves the reader as it was.
#[derive(Debug)]
pub struct Asking<'a> {
    reader: &'a Reader,
    before: u64,
    done: bool,
}

impl Asking<'_> {
    /// The read came back: with data (`true`), or at the stream's end or with an error.
    pub fn answered(mut self, data: bool) {
        self.done = true;
        self.reader.polled(data);
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.reader.holding_since.store(self.before, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_to_stall_keep_their_place() {
        assert!(beyond_limit(&[5, 1, 3], 3).is_empty());
        assert_eq!(beyond_limit(&[5, 1, 3, 2], 2), vec![0, 2]);
        assert_eq!(beyond_limit(&[7, 7, 7], 1), vec![1, 2]);
    }

    #[test]
    fn a_reader_that_holds_data_stalls_and_one_that_asks_does_not() {
        let stalls = Stalls::default();
        stalls.share(STALLED_STREAMS);
        assert_eq!(stalls.limit.load(Ordering::Relaxed), 1);
        let start = Instant::now();
        let (held, asking, abandoned) = (stalls.watch(), stalls.watch(), stalls.watch());
        held.polled(true);
        asking.polled(true);
        let _waiting = asking.ask();
        abandoned.polled(true);
        drop(abandoned.ask()); // a select! that found nothing: still holding
        let later = start + STALL_AFTER + Duration::from_millis(10);
        // `held` and `abandoned` stalled; one is kept, the later one is cut.
        assert_eq!(stalls.sweep(later), 1);
        assert!(!asking.cut().is_cancelled());
        assert_eq!(held.cut().is_cancelled() as u8 + abandoned.cut().is_cancelled() as u8, 1);
        assert_eq!(stalls.sweep(later), 0, "a cut stream is not cut again");
        assert_eq!(stalls.cut_total(), 1);
        // A reader gone is forgotten.
        drop((held, abandoned));
        stalls.sweep(later);
        assert_eq!(lock(&stalls.readers).len(), 1);
    }

    #[test]
    fn streams_that_stalled_too_recently_are_left_alone() {
        let stalls = Stalls::default();
        stalls.share(STALLED_STREAMS);
        let start = Instant::now();
        let readers: Vec<_> = (0..3).map(|_| stalls.watch()).collect();
        for r in &readers {
            r.polled(true);
        }
        assert_eq!(stalls.sweep(start + STALL_AFTER / 2), 0);
        readers[0].polled(false);
        readers[1].polled(false);
        assert_eq!(stalls.sweep(start + STALL_AFTER * 2), 0, "one stalled stream fits the share");
    }
}
