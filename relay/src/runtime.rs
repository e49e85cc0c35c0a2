//! The relay's small runtime: what every plane shares while the relay runs, apart from the
//! immutable [`Config`](crate::config::Config) and the state each listener owns.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use sallyport_runtime::quic::counted::UdpCounters;

use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

#[derive(Debug, Default)]
pub(crate) struct Runtime {
    pub(crate) metrics: Metrics,
    /// The QUIC socket's system calls and datagrams.
    pub(crate) udp: Arc<UdpCounters>,
    /// Serving (true) or not yet, or draining (false): what `/readyz` says.
    ready: AtomicBool,
    /// What accepts new work: the accept loops and the listeners. They stop when the shutdown
    /// starts.
    pub(crate) accepting: TaskTracker,
    /// Client connections in flight and what serves them (upstream connections): drained on
    /// shutdown within the grace period.
    pub(crate) clients: TaskTracker,
    /// What runs through the drain: the admin server and its connections, the revocation watch,
    /// the cluster's sync, the reload watcher, the drains of replaced tunnels. Stopped after it.
    pub(crate) background: TaskTracker,
}

impl Runtime {
    /// A runtime whose QUIC socket counts into `udp`.
    pub(crate) fn with_udp(udp: Arc<UdpCounters>) -> Self {
        Self { udp, ..Self::default() }
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}
