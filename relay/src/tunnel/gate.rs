//! The gate in front of the handshake: what peers that have not proven who they are may hold.
//! A connection counts as unauthenticated from its first packet until its certificate names an
//! admitted agent (or its enrollment ends). At most `relay.max_unauthenticated_per_ip` of them come
//! from one address, and one address may start at most `relay.handshakes_per_ip_per_second`
//! handshakes (bursts of twice that). At most `relay.max_unauthenticated` are held at once: a new
//! one beyond that closes the oldest, so a flood from many addresses cannot keep an agent out (its
//! handshake takes a round trip; a flood's connections wait to be pushed out).

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

#[derive(Debug, Default)]
struct State {
    sources: HashMap<IpAddr, Source>,
    /// Unauthenticated connections held now, oldest first, with what closes each.
    held: BTreeMap<u64, CancellationToken>,
    next: u64,
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
        let mut state = lock(&self.state);
        let state = &mut *state;
        if state.sources.len() >= MAX_TRACKED && !state.sources.contains_key(&ip) {
            let rate = self.rate;
            state.sources.retain(|_, s| s.open > 0 || refill(s, rate) < 2.0 * rate);
        }
        let burst = 2.0 * self.rate;
        let source = state.sources.entry(ip).or_insert_with(|| Source {
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
            if let Some((_, oldest)) = state.held.pop_first() {
                oldest.cancel();
                pushed_out = true;
            }
        }
        let seq = state.next;
        state.next += 1;
        let closed = CancellationToken::new();
        state.held.insert(seq, closed.clone());
        Ok((Pass { gate: self.clone(), ip, seq, closed, held: true }, pushed_out))
    }

    fn leave(&self, ip: IpAddr, seq: u64) {
        let mut state = lock(&self.state);
        state.held.remove(&seq);
        if let Some(source) = state.sources.get_mut(&ip) {
            source.open = source.open.saturating_sub(1);
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
    seq: u64,
    /// Cancelled when newer connections push this one out.
    pub(crate) closed: CancellationToken,
    held: bool,
}

impl Pass {
    /// The peer proved who it is: its place is free for the next unknown peer.
    pub(crate) fn authenticated(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.gate.leave(self.ip, self.seq);
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
        b1.authenticated();
        let (_c2, pushed) = g.enter(c).expect("room again");
        assert!(!pushed && !c1.closed.is_cancelled());
        assert_eq!(lock(&g.state).held.len(), 3);
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
