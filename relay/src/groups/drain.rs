//! Drains by agent name: which agents take no new connections, and the token that cuts what a
//! drained agent still carries once its grace is over.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sallyport_runtime::sync::lock;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Why a drain was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DrainError {
    #[error("no service names the agent {0:?}")]
    Unknown(String),
    #[error(
        "the agent {agent:?} is the last healthy member of service {service:?}: its clients would have \
         nowhere to go (drain it with force to do it anyway)"
    )]
    LastMember { agent: String, service: String },
}

/// One drain, as the status page shows it.
#[derive(Debug, Clone)]
pub(crate) struct DrainView {
    pub(crate) agent: String,
    pub(crate) since: Duration,
    /// Left of the grace; zero once what the agent carried was cut.
    pub(crate) grace_left: Duration,
}

#[derive(Debug)]
struct Drain {
    since: Instant,
    grace: Duration,
    /// Tells a drain from a later one of the same agent (the grace timer of an ended drain
    /// must not cut the next one's connections).
    generation: u64,
}

#[derive(Debug, Default)]
pub(super) struct Drains {
    drains: Arc<Mutex<HashMap<String, Drain>>>,
    /// The token each agent's connections carry now; cancelled when a drain's grace ends.
    cuts: Mutex<HashMap<String, CancellationToken>>,
    generation: std::sync::atomic::AtomicU64,
}

impl Drains {
    pub(super) fn drained(&self) -> BTreeSet<String> {
        lock(&self.drains).keys().cloned().collect()
    }

    pub(super) fn is_drained(&self, agent: &str) -> bool {
        lock(&self.drains).contains_key(agent)
    }

    pub(super) fn cut_of(&self, agent: &str) -> CancellationToken {
        lock(&self.cuts).entry(agent.to_owned()).or_default().clone()
    }

    /// Starts (or restarts) the drain of `agent`; `tasks` runs its grace timer.
    pub(super) fn start(&self, agent: &str, grace: Duration, tasks: &TaskTracker) {
        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.drains).insert(agent.to_owned(), Drain { since: Instant::now(), grace, generation });
        let (cut, drains, agent) = (self.cut_of(agent), self.drains.clone(), agent.to_owned());
        tasks.spawn(async move {
            tokio::time::sleep(grace).await;
            // An undrain, or a later drain of the same agent, ended this one.
            if lock(&drains).get(&agent).is_some_and(|d| d.generation == generation) {
                tracing::info!(%agent, ?grace, "drain grace over: the agent's remaining connections are cut");
                cut.cancel();
            }
        });
    }

    pub(super) fn end(&self, agent: &str) -> bool {
        let was = lock(&self.drains).remove(agent).is_some();
        // Connections picked from now on carry a fresh token: a grace timer still running
        // cancels only the old one.
        lock(&self.cuts).remove(agent);
        was
    }

    pub(super) fn views(&self, now: Instant) -> Vec<DrainView> {
        let mut views: Vec<DrainView> = lock(&self.drains)
            .iter()
            .map(|(agent, d)| DrainView {
                agent: agent.clone(),
                since: now.duration_since(d.since),
                grace_left: d.grace.saturating_sub(now.duration_since(d.since)),
            })
            .collect();
        views.sort_by(|a, b| a.agent.cmp(&b.agent));
        views
    }
}
