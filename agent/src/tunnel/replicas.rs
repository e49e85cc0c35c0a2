//! A relay that runs as several replicas behind one address: the agent keeps a tunnel to each.
//!
//! Every tunnel to one relay address is a slot. Slot 0 always runs; after each `Welcome` the relay
//! says which replica the connection reached and which replicas serve, and the group runs one slot
//! per replica it knows of. Through the shared address (kube-proxy's random choice, a new one per
//! UDP flow) a new connection lands on any replica, so a slot looking for one opens a new socket
//! for each attempt and names the replicas the agent holds already in `Seek`: a held replica
//! answers `Held` and the slot dials again, at once for a few tries, then backing off to a few
//! seconds; a change to the list of replicas serving starts it over at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
    time::Duration,
};

use sallyport_proto::Replica;
use sallyport_runtime::sync::lock;
use tokio::sync::watch;

/// The tunnels to one relay address.
#[derive(Debug, Default)]
pub(crate) struct Group {
    state: Mutex<State>,
    /// Bumped when the replicas serving change: slots waiting to dial again go at once.
    changes: watch::Sender<u64>,
    /// Held by a slot from its dial until it knows which replica it reached, so two slots never
    /// land on one replica unawares.
    pub(crate) dialing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    /// The replicas serving, as the relay last said (empty: a relay that runs alone).
    serving: Vec<Replica>,
    /// Which replica each slot with a live tunnel holds.
    held: BTreeMap<usize, String>,
    /// Slots running now.
    running: BTreeSet<usize>,
}

impl State {
    /// One slot per replica serving or held (at least one).
    fn wanted(&self) -> usize {
        let names: BTreeSet<&str> = self
            .serving
            .iter()
            .map(|r| r.name.as_str())
            .chain(self.held.values().map(String::as_str))
            .collect();
        names.len().max(1)
    }
}

impl Group {
    /// Whether the relay runs as several replicas (it named one).
    pub(crate) fn replicated(&self) -> bool {
        let state = lock(&self.state);
        !state.serving.is_empty() || !state.held.is_empty()
    }

    /// The replicas slots other than `slot` hold: what a new connection of `slot` names in `Seek`.
    pub(crate) fn held_by_others(&self, slot: usize) -> Vec<String> {
        lock(&self.state).held.iter().filter(|(s, _)| **s != slot).map(|(_, name)| name.clone()).collect()
    }

    /// `slot` reached replica `this`; the relay says `serving` serve.
    pub(crate) fn landed(&self, slot: usize, this: &str, serving: Vec<Replica>) {
        let mut state = lock(&self.state);
        if !this.is_empty() {
            state.held.insert(slot, this.to_owned());
        }
        Self::observe_locked(&mut state, serving, &self.changes);
    }

    /// The relay says `serving` serve now.
    pub(crate) fn observe(&self, serving: Vec<Replica>) {
        Self::observe_locked(&mut lock(&self.state), serving, &self.changes);
    }

    fn observe_locked(state: &mut State, mut serving: Vec<Replica>, changes: &watch::Sender<u64>) {
        serving.sort();
        if state.serving != serving {
            state.serving = serving;
            changes.send_modify(|n| *n += 1);
        }
    }

    /// `slot`'s tunnel ended.
    pub(crate) fn lost(&self, slot: usize) {
        lock(&self.state).held.remove(&slot);
    }

    /// Whether `slot` (between tunnels) should keep running: there is a replica for it to hold
    /// that no other slot holds. If not, it is taken off the running slots.
    pub(crate) fn keeps(&self, slot: usize) -> bool {
        let mut state = lock(&self.state);
        let others = state.held.keys().filter(|s| **s != slot).count();
        let keep = others < state.wanted();
        if !keep {
            state.running.remove(&slot);
        }
        keep
    }

    /// The slots to start now, so that as many run as are wanted (marked running).
    pub(crate) fn to_start(&self) -> Vec<usize> {
        let mut state = lock(&self.state);
        let need = state.wanted().saturating_sub(state.running.len());
        let start: Vec<usize> = (0..).filter(|s| !state.running.contains(s)).take(need).collect();
        state.running.extend(&start);
        start
    }

    /// A receiver that sees every change of the replicas serving.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Replica names: which replica each slot holds, for the log.
    pub(crate) fn held(&self) -> Vec<String> {
        lock(&self.state).held.values().cloned().collect()
    }
}

/// How long a slot waits before dialing again after landing on a replica it holds already
/// (`tries` such landings in a row): at once for a few tries, then about every 100 ms for some
/// 2.5 s, then doubling up to 5 s.
///
/// The agent hears of a new replica from the writer's list as soon as the replica reports, which
/// can be before the load balancer sends it connections (kube-proxy programs a new endpoint
/// within about a second; the lab's emulation polls every 100 ms): the steady phase keeps
/// seeking through that gap instead of having backed off already.
pub(crate) fn seek_delay(tries: u32) -> Duration {
    const QUICK: u32 = 8;
    const STEADY: u32 = 32;
    if tries < QUICK {
        return Duration::from_millis(fastrand::u64(5..40));
    }
    if tries < STEADY {
        return Duration::from_millis(fastrand::u64(75..=125));
    }
    let base =
        Duration::from_millis(200).saturating_mul(1 << (tries - STEADY).min(6)).min(Duration::from_secs(5));
    base / 2 + Duration::from_millis(fastrand::u64(0..=base.as_millis() as u64 / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str) -> Replica {
        Replica { name: name.into(), boot: 1 }
    }

    #[test]
    fn a_group_runs_a_slot_per_replica_and_seeks_past_those_it_holds() {
        let group = Group::default();
        assert_eq!(group.to_start(), [0]);
        assert!(!group.replicated() && group.to_start().is_empty());
        // A relay alone: nothing changes.
        group.landed(0, "", Vec::new());
        assert!(!group.replicated() && group.to_start().is_empty());
        let changes = group.changes();
        group.landed(0, "relay-1", vec![replica("relay-0"), replica("relay-1")]);
        assert!(changes.has_changed().unwrap_or(false));
        assert_eq!(group.to_start(), [1]);
        assert_eq!(group.held_by_others(1), ["relay-1"]);
        assert!(group.held_by_others(0).is_empty());
        group.landed(1, "relay-0", vec![replica("relay-0"), replica("relay-1")]);
        assert_eq!(group.held_by_others(0), ["relay-0"]);
        // A third replica joins: a third slot.
        group.observe(vec![replica("relay-0"), replica("relay-1"), replica("relay-2")]);
        assert_eq!(group.to_start(), [2]);
        // relay-2 leaves before it was found: its slot stops at its next turn.
        group.observe(vec![replica("relay-0"), replica("relay-1")]);
        assert!(!group.keeps(2) && group.keeps(1) && group.keeps(0));
        // relay-1 drains while slot 0's tunnel to it is still up: both slots stay.
        group.observe(vec![replica("relay-0")]);
        assert!(group.keeps(1));
        // Then that tunnel ends: slot 0 has nothing left to hold and stops; slot 1 stays.
        group.lost(0);
        assert!(!group.keeps(0) && group.keeps(1));
        assert!(group.to_start().is_empty());
        // relay-1 is back: a slot starts again.
        group.observe(vec![replica("relay-0"), replica("relay-1")]);
        assert_eq!(group.to_start(), [0]);
    }

    #[test]
    fn seeking_is_quick_then_backs_off_to_a_few_seconds() {
        assert!(seek_delay(0) < Duration::from_millis(50));
        assert!(seek_delay(7) < Duration::from_millis(50));
        for tries in 8..32 {
            let d = seek_delay(tries);
            assert!(d >= Duration::from_millis(75) && d <= Duration::from_millis(125), "{tries}: {d:?}");
        }
        // The quick and steady phases together seek for about 2.5 s.
        let seeking: Duration = (0..32).map(seek_delay).sum();
        assert!(
            seeking >= Duration::from_millis(1800) && seeking <= Duration::from_millis(3400),
            "{seeking:?}"
        );
        assert!(seek_delay(32) >= Duration::from_millis(100) && seek_delay(32) <= Duration::from_millis(200));
        for tries in 37..60 {
            let d = seek_delay(tries);
            assert!(d >= Duration::from_millis(2500) && d <= Duration::from_secs(5), "{tries}: {d:?}");
        }
    }
}
