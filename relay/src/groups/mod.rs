//! Service groups: which of a service's agents takes a new client connection (or UDP flow), from
//! the sessions connected now, the health each agent reports for the service, and drains.
//!
//! - A member is usable when its tunnel is up, it offers the service, it is not draining, and
//!   (with a health check) its last report says healthy. An agent whose tunnel is gone is out at
//!   once: its health lives in its session and goes with it.
//! - A member with a check that has not reported yet is used only when no member is healthy.
//! - Drains are the relay's, by agent name: they outlive the agent's tunnel (drain, reboot,
//!   undrain); an agent may ask for one itself (`sallyport-agent drain` on its host), which
//!   holds while it says so.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use sallyport_runtime::sync::lock;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, Group, Strategy},
    tunnel::registry::{AgentSession, Registry},
};

mod drain;
pub(crate) use drain::{DrainError, DrainView};

/// How a member of a group stands now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Takes new connections.
    Healthy,
    /// Its check has not reported yet: used only when no member is healthy.
    Unknown,
    /// Its check fails.
    Unhealthy,
    /// No new connections: an operator or the agent drains it.
    Draining,
    /// Its tunnel is down, or it does not offer the service.
    Away,
}

impl State {
    pub(crate) fn word(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unknown => "unknown",
            Self::Unhealthy => "unhealthy",
            Self::Draining => "draining",
            Self::Away => "away",
        }
    }
}

/// The member a client connection was given: its agent, the connection its data stream goes on,
/// and its place in the member's count of live connections (held as long as the connection).
#[derive(Debug)]
pub(crate) struct Picked {
    /// Shared, so a request on a kept upstream connection names its member without a copy.
    pub(crate) agent: Arc<str>,
    pub(crate) connection: sallyport_runtime::link::Connection,
    pub(crate) _live: Live,
    /// Cancelled when the agent's drain grace ends: what it still carries is cut.
    pub(crate) cut: CancellationToken,
}

/// One live connection of a member, counted until dropped.
#[derive(Debug)]
pub(crate) struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One member as the status page and metrics show it.
#[derive(Debug, Clone)]
pub(crate) struct MemberView {
    pub(crate) agent: String,
    pub(crate) state: State,
    /// The last failure's reason from the agent's check, if it gave one.
    pub(crate) detail: String,
    pub(crate) live: usize,
    /// Whether it takes new connections now (healthy; unknown only while no member is healthy).
    pub(crate) usable: bool,
}

/// The groups' state beside the configuration: drains, live counts, turns.
#[derive(Debug, Default)]
pub(crate) struct Groups {
    /// Live connections by (service, agent).
    live: Mutex<HashMap<(String, String), Arc<AtomicUsize>>>,
    /// Round-robin turns by service.
    turns: Mutex<HashMap<String, usize>>,
    drains: drain::Drains,
}

/// The state of `agent` in `group` of `service`, from its session if it has one.
fn state_of(service: &str, group: &Group, session: Option<&AgentSession>, drained: bool) -> (State, String) {
    let Some(session) = session.filter(|s| s.services.contains(service)) else {
        return (State::Away, String::new());
    };
    if drained || session.drain_asked.load(Ordering::Relaxed) {
        return (State::Draining, String::new());
    }
    if group.health.is_none() {
        return (State::Healthy, String::new());
    }
    match lock(&session.health).get(service) {
        None => (State::Unknown, String::new()),
        Some(h) if h.healthy => (State::Healthy, String::new()),
        Some(h) => (State::Unhealthy, h.detail.clone()),
    }
}

/// A stable hash of a client address and an agent's name (rendezvous hashing).
fn affinity(client: IpAddr, agent: &str) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    client.hash(&mut hasher);
    agent.hash(&mut hasher);
    hasher.finish()
}

impl Groups {
    /// The member of `service` that takes a new connection from `client` now, or `None` when no
    /// member is usable. `datagrams`: the connection is the tunnel's own (UDP flows), not the
    /// next lane.
    pub(crate) fn pick(
        &self,
        registry: &Registry,
        config: &Config,
        service: &str,
        client: IpAddr,
        datagrams: bool,
    ) -> Option<Picked> {
        let group = config.group(service)?;
        let drained = self.drains.drained();
        registry.view(|sessions| {
            let states: Vec<(usize, State)> = group
                .agents
                .iter()
                .enumerate()
                .map(|(i, a)| (i, state_of(service, group, sessions.get(a), drained.contains(a)).0))
                .collect();
            let healthy: Vec<usize> =
                states.iter().filter(|(_, s)| *s == State::Healthy).map(|(i, _)| *i).collect();
            let usable = if healthy.is_empty() {
                states.iter().filter(|(_, s)| *s == State::Unknown).map(|(i, _)| *i).collect()
            } else {
                healthy
            };
            let first = *usable.first()?;
            let chosen = match group.strategy {
                Strategy::Failover => first,
                Strategy::RoundRobin => usable[self.turn(service) % usable.len()],
                Strategy::LeastConnections => {
                    let counts: Vec<usize> = usable
                        .iter()
                        .map(|&i| self.count(service, &group.agents[i]).load(Ordering::Relaxed))
                        .collect();
                    let least = counts.iter().copied().min().unwrap_or(0);
                    let tied: Vec<usize> =
                        usable.iter().zip(&counts).filter(|(_, c)| **c == least).map(|(i, _)| *i).collect();
                    tied[self.turn(service) % tied.len()]
                }
                Strategy::ClientAddress => usable
                    .iter()
                    .copied()
                    .max_by_key(|&i| affinity(client, &group.agents[i]))
                    .unwrap_or(first),
            };
            let agent = &group.agents[chosen];
            let session = sessions.get(agent)?;
            let connection = if datagrams { session.tunnel().clone() } else { session.next_connection() };
            let count = self.count(service, agent);
            count.fetch_add(1, Ordering::Relaxed);
            Some(Picked {
                agent: Arc::from(agent.as_str()),
                connection,
                _live: Live(count),
                cut: self.drains.cut_of(agent),
            })
        })
    }

    /// The tunnel connection for the next datagram of a UDP flow of `service` from `client`
    /// carried by `current`: that member's while it may still carry it (connected, offering the
    /// service, not draining, not unhealthy), else the member the group gives now, named in the
    /// answer (the flow moves to it).
    pub(crate) fn datagram_route(
        &self,
        registry: &Registry,
        config: &Config,
        (service, client): (&str, IpAddr),
        current: Option<&str>,
    ) -> Option<(Option<Arc<str>>, sallyport_runtime::link::Connection)> {
        if let Some(agent) = current {
            let group = config.group(service).filter(|g| g.has(agent));
            let drained = group.is_some() && self.drains.is_drained(agent);
            let kept = group.and_then(|group| {
                registry.view(|sessions| {
                    let session = sessions.get(agent);
                    match state_of(service, group, session, drained).0 {
                        State::Healthy | State::Unknown => session.map(|s| s.tunnel().clone()),
                        _ => None,
                    }
                })
            });
            if let Some(connection) = kept {
                return Some((None, connection));
            }
        }
        let picked = self.pick(registry, config, service, client, true)?;
        Some((Some(picked.agent), picked.connection))
    }

    fn turn(&self, service: &str) -> usize {
        let mut turns = lock(&self.turns);
        let turn = turns.entry(service.to_owned()).or_default();
        *turn = turn.wrapping_add(1);
        *turn
    }

    fn count(&self, service: &str, agent: &str) -> Arc<AtomicUsize> {
        lock(&self.live).entry((service.to_owned(), agent.to_owned())).or_default().clone()
    }

    /// Each service's members as they stand now, by service.
    pub(crate) fn members(&self, registry: &Registry, config: &Config) -> BTreeMap<String, Vec<MemberView>> {
        let drained = self.drains.drained();
        let live = lock(&self.live).clone();
        registry.view(|sessions| {
            config
                .groups
                .iter()
                .map(|(service, group)| {
                    let mut members: Vec<MemberView> = group
                        .agents
                        .iter()
                        .map(|agent| {
                            let (state, detail) =
                                state_of(service, group, sessions.get(agent), drained.contains(agent));
                            let live = live
                                .get(&(service.clone(), agent.clone()))
                                .map_or(0, |c| c.load(Ordering::Relaxed));
                            MemberView { agent: agent.clone(), state, detail, live, usable: false }
                        })
                        .collect();
                    let healthy = members.iter().any(|m| m.state == State::Healthy);
                    for m in &mut members {
                        m.usable = m.state == State::Healthy || (!healthy && m.state == State::Unknown);
                    }
                    (service.clone(), members)
                })
                .collect()
        })
    }

    /// Why no member of `service` takes a client, for a refusal page: the agent it names (one
    /// agent), or its agents (a group).
    pub(crate) fn none_usable(&self, config: &Config, service: &str) -> String {
        match config.group(service).map(|g| g.agents.as_slice()) {
            Some([only]) => format!("the agent {only:?} of service {service:?} is not connected"),
            Some(agents) => format!(
                "no agent of service {service:?} is connected, healthy and not draining (its agents: {})",
                agents.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
            ),
            None => format!("service {service:?} has no agent"),
        }
    }

    /// Live connections of `agent` across its services.
    pub(crate) fn live_of(&self, agent: &str) -> usize {
        lock(&self.live).iter().filter(|((_, a), _)| a == agent).map(|(_, c)| c.load(Ordering::Relaxed)).sum()
    }

    /// Drains `agent`: no new connections go to it; after `grace`, what it still carries is cut.
    /// Refused when it is the last usable member of a service, unless `force`.
    pub(crate) fn drain(
        &self,
        registry: &Registry,
        config: &Config,
        agent: &str,
        grace: Duration,
        force: bool,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Result<(), DrainError> {
        if !config.knows_agent(agent) {
            return Err(DrainError::Unknown(agent.to_owned()));
        }
        if !force {
            let members = self.members(registry, config);
            for (service, members) in &members {
                let usable: Vec<&MemberView> = members.iter().filter(|m| m.usable).collect();
                if usable.len() == 1 && usable[0].agent == agent {
                    return Err(DrainError::LastMember { agent: agent.to_owned(), service: service.clone() });
                }
            }
        }
        self.drains.start(agent, grace, tasks);
        Ok(())
    }

    /// Ends the drain of `agent`; says whether it was draining.
    pub(crate) fn undrain(&self, agent: &str) -> bool {
        self.drains.end(agent)
    }

    /// The agents drained now, with when and for how long their connections may finish.
    pub(crate) fn drains(&self) -> Vec<DrainView> {
        self.drains.views(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_keeps_a_client_on_its_member_when_another_leaves() {
        let agents = ["winbox", "winbox2", "wsl-lab"];
        let best = |client: IpAddr, among: &[&str]| -> String {
            among.iter().max_by_key(|a| affinity(client, a)).map(|a| a.to_string()).unwrap_or_default()
        };
        let mut spread = BTreeMap::<String, usize>::new();
        for i in 0..300u32 {
            let client = IpAddr::from([10, 44, (i / 250) as u8, (i % 250) as u8 + 1]);
            let chosen = best(client, &agents);
            *spread.entry(chosen.clone()).or_default() += 1;
            assert_eq!(best(client, &agents), chosen, "stable");
            if chosen != "wsl-lab" {
                assert_eq!(
                    best(client, &["winbox", "winbox2"]),
                    chosen,
                    "only the leaving member's clients move"
                );
            }
        }
        assert_eq!(spread.len(), 3, "every member gets clients: {spread:?}");
        assert!(spread.values().all(|&n| n > 60), "{spread:?}");
    }
}
