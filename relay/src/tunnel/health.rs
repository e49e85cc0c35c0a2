//! A member's health as its agent reports it (protocol 6 on): the checks the relay asks the agent
//! to run for the services published to it (sent after `Welcome` and again when a reload changes
//! them), and the results the agent sends as they change, kept in its session (and so gone with
//! its tunnel: an agent that disappears takes its members out at once, whatever they last said).

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc, Mutex},
};

use sallyport_proto::{HealthCheck, RelayMessage, ServiceHealth};
use sallyport_runtime::sync::lock;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::{config::Config, tunnel::state::Tunnels};

/// The checks `agent` runs: one for each service published to it whose group has one.
pub(crate) fn checks_for(
    config: &Config,
    agent: &str,
    published: &std::collections::BTreeSet<String>,
) -> Vec<HealthCheck> {
    published
        .iter()
        .filter_map(|service| {
            let group = config.group(service).filter(|g| g.has(agent))?;
            Some(group.health.as_ref()?.for_service(service))
        })
        .collect()
}

/// Sends the agent its checks now and after every change (a reload, or the services published to
/// it); never ends on its own. An agent before version 6 runs no checks: in a group with a check
/// it stays `unknown`, used only when no member is healthy.
pub(crate) async fn push_checks(
    tunnels: &Tunnels,
    (agent, id, version): (&str, u64, u16),
    replies: mpsc::Sender<RelayMessage>,
) -> std::convert::Infallible {
    if version < 6 {
        return std::future::pending().await;
    }
    let mut reloads = tunnels.config.subscribe();
    let mut sessions = tunnels.registry.subscribe();
    let mut sent: Option<Vec<HealthCheck>> = None;
    loop {
        let published =
            sessions.borrow_and_update().get(agent).filter(|s| s.id == id).map(|s| s.services.clone());
        let Some(published) = published else { return std::future::pending().await };
        let checks = checks_for(&tunnels.config.get(), agent, &published);
        if sent.as_ref() != Some(&checks) {
            debug!(checks = checks.len(), "health checks sent to the agent");
            if replies.send(RelayMessage::Checks(checks.clone())).await.is_err() {
                return std::future::pending().await;
            }
            sent = Some(checks);
        }
        tokio::select! {
            r = reloads.changed() => if r.is_err() { return std::future::pending().await },
            r = sessions.changed() => if r.is_err() { return std::future::pending().await },
        }
    }
}

/// Keeps the agent's report: the services it checks, each healthy or not. A report names only
/// services the relay asked about; anything else is dropped. The registry's watchers are told, so
/// a change shows at once.
pub(crate) fn report(
    tunnels: &Tunnels,
    agent: &str,
    kept: &Arc<Mutex<BTreeMap<String, ServiceHealth>>>,
    report: Vec<ServiceHealth>,
) {
    let config = tunnels.config.get();
    let mut kept = lock(kept);
    for mut health in report {
        if !config.group(&health.service).is_some_and(|g| g.has(agent) && g.health.is_some()) {
            continue;
        }
        health.detail = sallyport_runtime::logs::printable(&health.detail, 200);
        let was = kept.get(&health.service).map(|h| h.healthy);
        if was != Some(health.healthy) {
            let state = if health.healthy { "healthy" } else { "unhealthy" };
            info!(service = %health.service, state, detail = %health.detail, "member health changed");
        }
        kept.insert(health.service.clone(), health);
    }
}

/// The agent asks to be drained, or no longer (`sallyport-agent drain` on its host).
pub(crate) fn drain_asked(flag: &std::sync::atomic::AtomicBool, draining: bool) {
    if flag.swap(draining, Ordering::Relaxed) != draining {
        let what = if draining {
            "the agent asks to be drained: no new connections go to it"
        } else {
            "the agent's drain is over: it takes new connections again"
        };
        info!("{what}");
    }
}
