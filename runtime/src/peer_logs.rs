//! Log budgets kept per peer (an agent, a client address), for lines a peer can cause at will: a
//! refused renewal, a failed handshake, a revoked certificate. Each peer has a few lines per
//! period of its own, so one peer's flood never hides another's events; a site also has a ceiling
//! for many peers at once. What is held back is not dropped: [`flush`] (every [`PERIOD`], from
//! the relay and the agent) writes one line per site with how many events from how many peers
//! were left out, and the metrics count every one.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

/// How often [`flush`] runs: the period of every budget.
pub const PERIOD: Duration = Duration::from_secs(10);
/// Lines one peer may cause at one site per period.
pub const PER_PEER: u32 = 3;
/// Lines all peers together may cause at one site per period.
pub const PER_SITE: u32 = 30;
/// Peers tracked one by one per site and period; more share the site's ceiling only.
const MAX_PEERS: usize = 1024;

/// The budget of one call site.
#[derive(Debug)]
pub struct PeerBudget {
    site: &'static str,
    per_peer: u32,
    per_site: u32,
    state: Mutex<Window>,
    registered: OnceLock<()>,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    written: u32,
    by_peer: BTreeMap<u64, u32>,
    /// Held back since the last flush, and from which peers (up to `MAX_PEERS` of them).
    left_out: u64,
    left_out_peers: BTreeSet<u64>,
}

/// What a flush found held back at one site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    pub site: &'static str,
    pub lines: u64,
    /// Distinct peers among them, counted up to 1024.
    pub peers: usize,
}

fn registry() -> &'static Mutex<Vec<&'static PeerBudget>> {
    static BUDGETS: OnceLock<Mutex<Vec<&'static PeerBudget>>> = OnceLock::new();
    BUDGETS.get_or_init(Mutex::default)
}

fn peer_hash(peer: &impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    peer.hash(&mut hasher);
    hasher.finish()
}

impl PeerBudget {
    /// A budget for the call site named `site` (the log line's message).
    pub const fn new(site: &'static str) -> Self {
        Self::with_limits(site, PER_PEER, PER_SITE)
    }

    pub const fn with_limits(site: &'static str, per_peer: u32, per_site: u32) -> Self {
        Self {
            site,
            per_peer,
            per_site,
            state: Mutex::new(Window {
                start: None,
                written: 0,
                by_peer: BTreeMap::new(),
                left_out: 0,
                left_out_peers: BTreeSet::new(),
            }),
            registered: OnceLock::new(),
        }
    }

    /// Whether a line `peer` caused may be written now; a line held back is counted for
    /// [`flush`]. A budget in a `static` registers itself for [`flush`] on first use.
    pub fn allow(&'static self, peer: &impl Hash) -> bool {
        self.registered.get_or_init(|| crate::sync::lock(registry()).push(self));
        self.allow_at(peer_hash(peer), Instant::now())
    }

    fn allow_at(&self, peer: u64, now: Instant) -> bool {
        let mut w = crate::sync::lock(&self.state);
        if w.start.is_none_or(|start| now.saturating_duration_since(start) >= PERIOD) {
            w.start = Some(now);
            w.written = 0;
            w.by_peer.clear();
        }
        let tracked = w.by_peer.len() < MAX_PEERS || w.by_peer.contains_key(&peer);
        let peer_lines = if tracked { w.by_peer.get(&peer).copied().unwrap_or(0) } else { self.per_peer };
        if w.written >= self.per_site || peer_lines >= self.per_peer {
            w.left_out += 1;
            if w.left_out_peers.len() < MAX_PEERS {
                w.left_out_peers.insert(peer);
            }
            return false;
        }
        w.written += 1;
        *w.by_peer.entry(peer).or_insert(0) += 1;
        true
    }

    /// What was held back since the last call, and forgets it.
    fn take_left_out(&self) -> Option<LeftOut> {
        let mut w = crate::sync::lock(&self.state);
        if w.left_out == 0 {
            return None;
        }
        let lines = std::mem::take(&mut w.left_out);
        let peers = std::mem::take(&mut w.left_out_peers).len();
        Some(LeftOut { site: self.site, lines, peers })
    }
}

/// Writes one line per site that held lines back since the last flush: the site, how many lines,
/// from how many peers. Returns what it wrote.
pub fn flush() -> Vec<LeftOut> {
    let budgets: Vec<&'static PeerBudget> = crate::sync::lock(registry()).clone();
    let left_out: Vec<LeftOut> = budgets.iter().filter_map(|b| b.take_left_out()).collect();
    for l in &left_out {
        tracing::warn!(
            site = l.site,
            left_out = l.lines,
            peers = l.peers,
            "log lines held back in the last period (each peer's first ones were written; the metrics count all)"
        );
    }
    left_out
}

/// Flushes every [`PERIOD`] until the task is dropped.
pub async fn flush_every_period() {
    let mut every = tokio::time::interval(PERIOD);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        flush();
    }
}

/// Writes a log line at `$level` that peer `$peer` (anything hashable: an agent's name, an
/// address) caused, within that peer's share of its call site's budget:
/// `limited_per!(cert.id.agent, warn, serial = %s, "revoked certificate refused")`.
#[macro_export]
macro_rules! limited_per {
    ($peer:expr, $level:ident, $($rest:tt)+) => {{
        static BUDGET: $crate::peer_logs::PeerBudget =
            $crate::peer_logs::PeerBudget::new(concat!(module_path!(), ":", line!()));
        if BUDGET.allow(&$peer) {
            $crate::tracing::$level!($($rest)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peers_flood_leaves_the_others_their_lines() {
        let budget = PeerBudget::with_limits("test", 3, 30);
        let t0 = Instant::now();
        let (flooder, other) = (peer_hash(&"flooder"), peer_hash(&"other"));
        let written = (0..10_000).filter(|_| budget.allow_at(flooder, t0)).count();
        assert_eq!(written, 3, "a peer gets its own few lines");
        assert!(budget.allow_at(other, t0), "another peer's event is still written");
        assert_eq!(budget.take_left_out(), Some(LeftOut { site: "test", lines: 9_997, peers: 1 }));
        assert_eq!(budget.take_left_out(), None, "a flush forgets what it reported");
        // The next period: the flooder gets lines again.
        assert!(budget.allow_at(flooder, t0 + PERIOD));
    }

    #[test]
    fn many_peers_at_once_meet_the_sites_ceiling_and_are_counted() {
        let budget = PeerBudget::with_limits("test", 3, 30);
        let t0 = Instant::now();
        let written = (0..5_000u64).filter(|p| budget.allow_at(peer_hash(p), t0)).count();
        assert_eq!(written, 30);
        let left = budget.take_left_out().expect("left out");
        assert_eq!(left.lines, 4_970);
        assert_eq!(left.peers, MAX_PEERS, "peers are counted up to a bound");
    }

    #[test]
    fn a_static_budget_registers_for_the_flush() {
        static BUDGET: PeerBudget = PeerBudget::with_limits("registered", 1, 30);
        assert!(BUDGET.allow(&"a"));
        assert!(!BUDGET.allow(&"a"));
        let flushed = flush();
        assert!(flushed.contains(&LeftOut { site: "registered", lines: 1, peers: 1 }), "{flushed:?}");
    }
}
