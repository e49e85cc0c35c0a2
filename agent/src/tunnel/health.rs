//! The health checks the relay asks for (protocol 6 on): each runs next to its target on its own
//! interval, and the whole list of results goes to the relay when one changes state (the first
//! result of each decides at once; then `fall` failures in a row take a target out and `rise`
//! successes bring it back).

use std::{collections::BTreeMap, time::Duration};

use futures_util::future::join_all;
use sallyport_proto::{AgentMessage, HealthCheck, ServiceHealth};
use tokio::sync::{mpsc, watch, Mutex};
use tracing::info;

use crate::targets::{probe::probe, Targets};

/// Runs the checks in `checks` (replaced whole when the relay sends new ones) and reports to
/// `tx`; never ends on its own.
pub(crate) async fn run(
    tx: &mpsc::Sender<AgentMessage>,
    targets: &Targets,
    mut checks: watch::Receiver<Vec<HealthCheck>>,
) -> std::convert::Infallible {
    loop {
        let set = checks.borrow_and_update().clone();
        let results = Mutex::new(BTreeMap::new());
        let running = async {
            join_all(set.iter().map(|check| one(check, set.len(), targets, &results, tx))).await;
            // No check (or the tunnel's writer is gone): wait for the next set.
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = running => {}
            changed = checks.changed() => if changed.is_ok() { continue },
        }
        // The tunnel is ending: nothing more to do on it.
        return std::future::pending().await;
    }
}

/// One check's loop.
async fn one(
    check: &HealthCheck,
    of: usize,
    targets: &Targets,
    results: &Mutex<BTreeMap<String, ServiceHealth>>,
    tx: &mpsc::Sender<AgentMessage>,
) {
    let interval = Duration::from_millis(u64::from(check.interval_ms.max(100)));
    let timeout = Duration::from_millis(u64::from(check.timeout_ms.max(10)));
    let (mut state, mut failures, mut successes) = (None::<bool>, 0u8, 0u8);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = probe(targets, &check.service, &check.kind, timeout).await;
        let detail = match &result {
            Ok(()) => {
                (successes, failures) = (successes.saturating_add(1), 0);
                String::new()
            }
            Err(why) => {
                (successes, failures) = (0, failures.saturating_add(1));
                why.to_string()
            }
        };
        let next = match state {
            None => result.is_ok(),
            Some(true) => failures < check.fall,
            Some(false) => successes >= check.rise,
        };
        if state == Some(next) {
            continue;
        }
        state = Some(next);
        let word = if next { "healthy" } else { "unhealthy" };
        info!(service = %check.service, state = word, %detail, "health check");
        // The snapshot and its sending under one lock: reports reach the relay in order.
        let mut all = results.lock().await;
        all.insert(
            check.service.clone(),
            ServiceHealth { service: check.service.clone(), healthy: next, detail },
        );
        if all.len() == of && tx.send(AgentMessage::Health(all.values().cloned().collect())).await.is_err() {
            return;
        }
    }
}
