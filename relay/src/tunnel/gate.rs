//! The gate in front of the handshake: what peers that have not proven who they are may hold.
//! A connection counts as unauthenticated from its first packet until its certificate names an
//! admitted agent (or its enrollment ends). At most `relay.max_unauthenticated_per_ip` of them come
//! from one host, and one host may start at most `relay.handshakes_per_ip_per_second` handshakes
//! (bursts of twice that); a host is an IPv4 address or an IPv6 /64 (`runtime::addr::host_key`).
//! At most `relay.max_unauthenticated` are held at once: a new one beyond that closes the oldest
//! connection of the fullest group (/24 or /64), never one from an address an agent was admitted
//! from lately while others are held. So a flood from many addresses pushes out its own
//! connections, and an agent reconnecting (its handshake takes a round trip) keeps its place.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use sallyport_runtime::sync::lock;
use tokio_util::sync::CancellationToken;

use crate::config::RelayKeys;

/// Addresses remembered at most (idle ones are forgotten first).
const MAX_TRACKED: usize = 16 * 1024;

/// Addresses agents were admitted from, remembered at most (the oldest forgotten first).
const MAX_KNOWN: usize = 4096;

/// Why a new connection was turned away before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("too many unauthenticated connections from this address")]
    PerAddress,
    #[error("too many handshakes from this address")]
    Rate,
}

impl Refused {
    pub(crate) fn metric(self) -> &'static str {
        match self {
            Self::PerAddress => "unauthenticated_per_ip_cap",
            Self::Rate => "handshake_rate",
        }
    }
}

#[derive(Debug)]
struct Source {
    /// Unauthenticated connections from this address now.
    open: usize,
    /// Handshake tokens left, refilled over time.
    tokens: f64,
    refilled: Instant,
}

/// One unauthenticated connection held.
#[derive(Debug)]
struct Held {
    closed: CancellationToken,
    /// Its /24 or /64.
    group: u128,
    /// Whether an agent was admitted from its address lately.
    known: bool,
}

#[derive(Debug, Default)]
struct State {
    sources: HashMap<IpAddr, Source>,
    /// Unauthenticated connections held now, oldest first.
    held: BTreeMap<u64, Held>,
    /// Addresses agents were admitted from, with when (the latest of each).
    known: HashMap<IpAddr, u64>,
    next: u64,
}

impl State {
    /// The connection to push out for a newcomer: the oldest of the fullest group among those not
    /// from a known agent's address; the oldest of all when every one is.
    fn victim(&self) -> Option<u64> {
        let mut sizes: HashMap<u128, usize> = HashMap::new();
        for held in self.held.values().filter(|h| !h.known) {
            *sizes.entry(held.group).or_default() += 1;
        }
        let fullest = sizes.into_iter().max_by_key(|&(group, size)| (size, std::cmp::Reverse(group)));
        match fullest {
            Some((group, _)) => {
                self.held.iter().find(|(_, h)| !h.known && h.group == group).map(|(&seq, _)| seq)
            }
            None => self.held.keys().next().copied(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Gate {
    max: usize,
    per_ip: usize,
    rate: f64,
    state: Mutex<State>,
}

impl Gate {
    pub(crate) fn new(limits: &RelayKeys) -> Arc<Self> {
        Arc::new(Self {
            max: limits.max_unauthenticated,
            per_ip: limits.max_unauthenticated_per_ip,
            rate: limits.handshakes_per_ip_per_second as f64,
            state: Mutex::new(State::default()),
        })
    }

    /// Lets a new connection from `ip` in, or says why not. The pass is held until the peer is
    /// authenticated ([`Pass::authenticated`]) or the connection ends; its `closed` token is
    /// cancelled if newer connections push it out. Returns whether an older one was pushed out.
    pub(crate) fn enter(self: &Arc<Self>, ip: IpAddr) -> Result<(Pass, bool), Refused> {
        let host = sallyport_runtime::addr::host_key(ip);
        let mut state = lock(&self.state);
        let state = &mut *state;
        let known = state.known.contains_key(&ip);
        if state.sources.len() >= MAX_TRACKED && !state.sources.contains_key(&host) {
            let rate = self.rate;
            state.sources.retain(|_, s| s.open > 0 || refill(s, rate) < 2.0 * rate);
        }
        let burst = 2.0 * self.rate;
        let source = state.sources.entry(host).or_insert_with(|| Source {
            open: 0,
            tokens: burst,
            refilled: Instant::now(),
        });
        refill(source, self.rate);
        if source.tokens < 1.0 {
            return Err(Refused::Rate);
        }
        source.tokens -= 1.0;
        if source.open >= self.per_ip {
            return Err(Refused::PerAddress);
        }
        source.open += 1;
        let mut pushed_out = false;
        while state.held.len() >= self.max {
            let Some(victim) = state.victim() else { break };
            if let Some(held) = state.held.remove(&victim) {
                held.closed.cancel();
                pushed_out = true;
            }
        }
        let seq = state.next;
        state.next += 1;
        let closed = CancellationToken::new();
        let group = sallyport_runtime::flows::source_prefix(&std::net::SocketAddr::new(ip, 0));
        state.held.insert(seq, Held { closed: closed.clone(), group, known });
        Ok((Pass { gate: self.clone(), ip, host, seq, closed, held: true }, pushed_out))
    }

    fn leave(&self, host: IpAddr, seq: u64) {
        let mut state = lock(&self.state);
        state.held.remove(&seq);
        if let Some(source) = state.sources.get_mut(&host) {
            source.open = source.open.saturating_sub(1);
        }
    }

    /// An agent was admitted from `ip`: its next handshakes from there keep their place.
    fn admitted(&self, ip: IpAddr) {
        let mut state = lock(&self.state);
        let seq = state.next;
        state.known.insert(ip, seq);
        if state.known.len() > MAX_KNOWN {
            if let Some(oldest) = state.known.iter().min_by_key(|(_, &at)| at).map(|(&ip, _)| ip) {
                state.known.remove(&oldest);
            }
        }
    }
}

/// Adds the tokens earned since the last refill (up to the burst); returns the tokens now.
fn refill(source: &mut Source, rate: f64) -> f64 {
    let now = Instant::now();
    let earned = now.duration_since(source.refilled).as_secs_f64() * rate;
    source.tokens = (source.tokens + earned).min(2.0 * rate);
    source.refilled = now;
    source.tokens
}

/// One unauthenticated connection's place behind the gate.
#[derive(Debug)]
pub(crate) struct Pass {
    gate: Arc<Gate>,
    ip: IpAddr,
    /// What the per-host cap and rate count `ip` as.
    host: IpAddr,
    seq: u64,
    /// Cancelled when newer connections push this one out.
    pub(crate) closed: CancellationToken,
    held: bool,
}

impl Pass {
    /// The peer is an admitted agent: its place is free, and its address is remembered as an
    /// agent's (its reconnects are not pushed out while strangers' handshakes are held).
    pub(crate) fn admitted_agent(mut self) {
        self.gate.admitted(self.ip);
        self.release();
    }

    fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.gate.leave(self.host, self.seq);
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(global: usize, per_ip: usize, rate: usize) -> Arc<Gate> {
        let limits = RelayKeys {
            max_unauthenticated: global,
            max_unauthenticated_per_ip: per_ip,
            handshakes_per_ip_per_second: rate,
            ..RelayKeys::default()
        };
        Gate::new(&limits)
    }

    #[test]
    fn one_address_holds_its_share_and_a_full_gate_pushes_out_the_oldest() {
        let g = gate(3, 2, 100);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let (a1, _) = g.enter(a).expect("a1");
        let (a2, _) = g.enter(a).expect("a2");
        assert_eq!(g.enter(a).err(), Some(Refused::PerAddress));
        let (b1, pushed) = g.enter(b).expect("b1");
        assert!(!pushed);
        let (c1, pushed) = g.enter(c).expect("a full gate takes the newcomer");
        assert!(pushed && a1.closed.is_cancelled(), "the oldest was pushed out");
        assert!(!a2.closed.is_cancelled() && !b1.closed.is_cancelled());
        drop(a1);
        b1.admitted_agent();
        let (_c2, pushed) = g.enter(c).expect("room again");
        assert!(!pushed && !c1.closed.is_cancelled());
        assert_eq!(lock(&g.state).held.len(), 3);
    }

    #[test]
    fn a_slash_64_counts_as_one_host() {
        let g = gate(1000, 8, 100);
        let admitted = (1..=200)
            .filter_map(|i| g.enter(format!("2001:db8:0:7::{i:x}").parse().unwrap()).ok().map(|(p, _)| p))
            .collect::<Vec<_>>();
        assert_eq!(admitted.len(), 8, "a /64 holds one host's share");
        assert!(g.enter("2001:db8:0:8::1".parse().unwrap()).is_ok(), "the next /64 is another host");
    }

    #[test]
    fn a_full_gate_pushes_out_the_fullest_group_and_spares_agents_addresses() {
        let g = gate(10, 8, 1000);
        let agent: IpAddr = "10.0.9.5".parse().unwrap();
        // The agent was admitted from its address before.
        g.enter(agent).expect("agent").0.admitted_agent();
        let (returning, _) = g.enter(agent).expect("the agent reconnects");
        let (neighbour, _) = g.enter("10.0.7.5".parse().unwrap()).expect("a client of another /24");
        // A flood from 30 addresses of one /24, each under its own cap.
        let flood: Vec<_> = (1..=30)
            .filter_map(|i| g.enter(format!("10.0.1.{i}").parse().unwrap()).ok().map(|(p, _)| p))
            .collect();
        assert_eq!(flood.len(), 30, "each address is under its cap");
        assert!(!returning.closed.is_cancelled(), "the agent's reconnect keeps its place");
        assert!(!neighbour.closed.is_cancelled(), "the flood pushed out its own /24 first");
        assert_eq!(flood.iter().filter(|p| !p.closed.is_cancelled()).count(), 8);
        // The pushed out were the flood's oldest.
        assert!(flood[..22].iter().all(|p| p.closed.is_cancelled()));
    }

    #[test]
    fn one_address_gets_its_burst_of_handshakes_then_its_rate() {
        let g = gate(1000, 1000, 5);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let admitted = (0..50).filter_map(|_| g.enter(ip).ok()).count();
        assert!((10..=11).contains(&admitted), "a burst of twice the rate: {admitted}");
        assert_eq!(g.enter(ip).err(), Some(Refused::Rate));
        assert!(g.enter("10.0.0.10".parse().unwrap()).is_ok(), "other addresses are not slowed");
    }
}
