//! Idle timeouts on plain HTTP client connections: once a request names its service, nothing
//! moving on the client's connection (a request body trickled slower than that, a response that
//! stalls, a kept-alive connection left open) for the service's `idle_timeout` closes it. An
//! upgraded connection leaves this watch for the splice, which has its own.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use sallyport_runtime::flows::Activity;

use crate::metrics::Outcome;
use tokio::sync::Notify;

/// The watch over one client connection.
#[derive(Debug, Default)]
pub(super) struct IdleWatch {
    /// Stamped by every byte read from or written to the client.
    pub(super) activity: Arc<Activity>,
    /// The idle timeout of the service of the latest request, in milliseconds (0: none yet, or
    /// a service that keeps quiet connections).
    limit_ms: AtomicU64,
    changed: Notify,
    fired: AtomicBool,
}

impl IdleWatch {
    /// A request for a service with `idle` began: that rules the connection from now on.
    pub(super) fn serve(&self, idle: Option<Duration>) {
        // The quiet before this request (its head, waiting for it) is not the service's to judge.
        self.activity.touch();
        let ms = idle.map_or(0, |idle| u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1));
        if self.limit_ms.swap(ms, Ordering::Relaxed) != ms {
            self.changed.notify_one();
        }
    }

    /// Completes once the connection has been quiet for the current limit, and marks it fired.
    pub(super) async fn expired(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let limit = Duration::from_millis(self.limit_ms.load(Ordering::Relaxed));
            if limit.is_zero() {
                changed.await;
                continue;
            }
            let quiet = self.activity.idle_for();
            if quiet >= limit {
                self.fired.store(true, Ordering::Relaxed);
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(limit - quiet) => {}
                () = changed => {}
            }
        }
    }

    /// Whether the connection was closed for being idle.
    pub(super) fn fired(&self) -> bool {
        self.fired.load(Ordering::Relaxed)
    }
}

/// A request's place in the figures: a request cut because its client's connection went idle
/// (a body trickled too slowly, no response in time) is counted `idle`, not `reset`.
pub(super) struct IdleAware<'a> {
    pub(super) active: Option<crate::metrics::Active<'a>>,
    pub(super) idle: &'a IdleWatch,
}

impl IdleAware<'_> {
    pub(super) fn end(mut self, outcome: Outcome) {
        if let Some(active) = self.active.take() {
            active.end(outcome, 0, 0);
        }
    }
}

impl Drop for IdleAware<'_> {
    fn drop(&mut self) {
        if let Some(active) = self.active.take() {
            if self.idle.fired() {
                active.end(Outcome::Idle, 0, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real time: the quiet is measured on the clock the watched connection stamps.
    #[tokio::test]
    async fn no_limit_waits_and_a_limit_fires_after_that_much_quiet() {
        let watch = Arc::new(IdleWatch::default());
        let waiting = tokio::spawn({
            let watch = watch.clone();
            async move { watch.expired().await }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!waiting.is_finished() && !watch.fired(), "no service yet: no limit");
        watch.serve(Some(Duration::from_secs(1)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!watch.fired(), "quiet since the start does not count before the limit is set: {watch:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        watch.activity.touch();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!waiting.is_finished(), "activity 0.6 s ago is not 1 s of quiet");
        tokio::time::timeout(Duration::from_secs(3), waiting).await.expect("fires").expect("watch");
        assert!(watch.fired());
    }

    #[tokio::test]
    async fn a_service_without_idle_timeout_lifts_the_limit() {
        let watch = Arc::new(IdleWatch::default());
        watch.serve(Some(Duration::from_millis(200)));
        watch.serve(None);
        let waited = tokio::time::timeout(Duration::from_millis(800), watch.expired()).await;
        assert!(waited.is_err() && !watch.fired());
    }
}
