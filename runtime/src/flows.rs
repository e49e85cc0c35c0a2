//! The one idle-flow table: UDP flows on the relay (by client address) and on the agent (by flow
//! id) live in it, and the HTTP pool measures idleness with its [`Activity`] stamps.
//!
//! Each entry carries an [`Activity`] stamp that any task holding the value may refresh without
//! the table's lock. A [`sweep`](FlowTable::sweep) removes the entries quiet for longer than the
//! idle time.
//!
//! Flows belong to groups (on the relay: the client's /24 or /64, since spoofing a source costs
//! nothing on UDP). A group holds at most its share of the table, and a new flow in a full table
//! evicts from the largest group; of groups of one size, the one whose oldest flow is oldest goes
//! first, so a flood spread over many prefixes (one flow each) pushes out its own older flows
//! before a client's newer query, and no choice of prefixes puts another sender's group first. Within a
//! group, a flow that is [done](Tracked::done) goes first (answered and quiet: a DNS query from a
//! random port, say; evicting it loses nothing), then those not [established](Tracked), oldest
//! first, and only then the oldest established one. So a flood of new sources evicts its own
//! flows, and other senders lose neither their conversations nor a pending answer.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    hash::Hash,
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

/// Milliseconds on a monotonic clock shared by the whole process.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// When something last carried a datagram or a request: refreshed lock-free from any task.
#[derive(Debug)]
pub struct Activity(AtomicU64);

impl Default for Activity {
    fn default() -> Self {
        Self(AtomicU64::new(now_ms()))
    }
}

impl Activity {
    /// Marks it active now.
    pub fn touch(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// How long it has been quiet.
    pub fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

/// Completes once `activity` has been quiet for `idle` (checking only when that could be so).
pub async fn idle_for(activity: &Activity, idle: Duration) {
    loop {
        let quiet = activity.idle_for();
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}

/// A value whose quiet time decides when the table forgets it.
pub trait Tracked {
    fn activity(&self) -> &Activity;

    /// Whether the flow has proven itself (a conversation, active lately): such flows are evicted
    /// only when no other flow of their group is left to evict.
    fn established(&self) -> bool {
        false
    }

    /// Whether the flow's exchange is over (answered, then quiet): evicting it loses nothing, so
    /// it goes first.
    fn done(&self) -> bool {
        false
    }
}

impl<T: Tracked + ?Sized> Tracked for std::sync::Arc<T> {
    fn activity(&self) -> &Activity {
        (**self).activity()
    }

    fn established(&self) -> bool {
        (**self).established()
    }

    fn done(&self) -> bool {
        (**self).done()
    }
}

/// How far an eviction looks into a group for a flow that is not established.
const EVICTION_SCAN: usize = 64;

/// Flows by key, at most `max` of them and at most `share` per group.
#[derive(Debug)]
pub struct FlowTable<K, V> {
    /// Each flow, its group and when it came (a sequence number).
    entries: HashMap<K, (V, u128, u64)>,
    /// Each group's keys, oldest first.
    groups: HashMap<u128, VecDeque<K>>,
    /// Groups by how many flows they hold, then by how old their oldest flow is (as
    /// `u64::MAX - sequence`, so the last is the largest group with the oldest flow).
    by_size: BTreeSet<(usize, u64, u128)>,
    /// The sequence number of the next flow.
    next: u64,
    max: usize,
    share: usize,
    group_of: fn(&K) -> u128,
}

impl<K: Hash + Eq + Clone, V: Tracked> FlowTable<K, V> {
    /// An empty table that holds at most `max` flows (at least one), all in one group.
    pub fn new(max: usize) -> Self {
        Self::with_groups(max, max, |_| 0)
    }

    /// An empty table of at most `max` flows, at most `share` of them in any one group.
    pub fn with_groups(max: usize, share: usize, group_of: fn(&K) -> u128) -> Self {
        let max = max.max(1);
        Self {
            entries: HashMap::new(),
            groups: HashMap::new(),
            by_size: BTreeSet::new(),
            next: 0,
            max,
            share: share.clamp(1, max),
            group_of,
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(v, _, _)| v)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn group_len(&self, group: u128) -> usize {
        self.groups.get(&group).map_or(0, VecDeque::len)
    }

    /// Adds a flow. When its group is at its share, a flow of that group makes room; when the
    /// table is full, a flow of the largest group does. The flow that made room is returned.
    pub fn insert(&mut self, key: K, value: V) -> Option<(K, V)> {
        let group = (self.group_of)(&key);
        self.insert_in(group, key, value)
    }

    /// [`insert`](Self::insert) into `group`, for keys that do not say their group (the agent's
    /// flows are keyed by id and grouped by their client's prefix).
    pub fn insert_in(&mut self, group: u128, key: K, value: V) -> Option<(K, V)> {
        if let Some(slot) = self.entries.get_mut(&key) {
            slot.0 = value;
            return None;
        }
        let evicted = if self.group_len(group) >= self.share {
            self.evict_from(group)
        } else if self.entries.len() >= self.max {
            let group = self.fullest_group();
            group.and_then(|g| self.evict_from(g))
        } else {
            None
        };
        let seq = self.next;
        self.next += 1;
        self.entries.insert(key.clone(), (value, group, seq));
        self.resize(group, |keys| keys.push_back(key));
        evicted
    }

    /// The group a full table evicts from: the largest one that holds a flow not established
    /// (among the largest few), else the largest.
    fn fullest_group(&self) -> Option<u128> {
        let largest: Vec<u128> = self.by_size.iter().rev().take(EVICTION_SCAN).map(|&(_, _, g)| g).collect();
        let entries = &self.entries;
        let unestablished = |g: &u128| {
            self.groups.get(g).is_some_and(|keys| {
                keys.iter()
                    .take(EVICTION_SCAN)
                    .any(|k| entries.get(k).is_some_and(|(v, _, _)| !v.established()))
            })
        };
        largest.iter().copied().find(unestablished).or_else(|| largest.first().copied())
    }

    /// Removes one flow of `group`: the oldest that is done, else the oldest that is not
    /// established, else the oldest.
    fn evict_from(&mut self, group: u128) -> Option<(K, V)> {
        let keys = self.groups.get(&group)?;
        let entries = &self.entries;
        let first = |pick: &dyn Fn(&V) -> bool| {
            keys.iter().take(EVICTION_SCAN).position(|k| entries.get(k).is_some_and(|(v, _, _)| pick(v)))
        };
        let victim = first(&|v| v.done()).or_else(|| first(&|v| !v.established())).unwrap_or(0);
        let mut key = None;
        self.resize(group, |keys| key = keys.remove(victim));
        let key = key?;
        // The key leaves the group first, so the size index read the entry's age while it was there.
        self.entries.remove(&key).map(|(v, _, _)| (key, v))
    }

    /// Where `keys` (one group's, oldest first) stands in the size index.
    fn rank(entries: &HashMap<K, (V, u128, u64)>, keys: &VecDeque<K>, group: u128) -> (usize, u64, u128) {
        let oldest = keys.front().and_then(|k| entries.get(k)).map_or(0, |(_, _, seq)| *seq);
        (keys.len(), u64::MAX - oldest, group)
    }

    /// Changes the keys of `group` and keeps the size index and the group map in step (the
    /// entries of the keys before and after the change must be in the table).
    fn resize(&mut self, group: u128, change: impl FnOnce(&mut VecDeque<K>)) {
        let keys = self.groups.entry(group).or_default();
        if !keys.is_empty() {
            self.by_size.remove(&Self::rank(&self.entries, keys, group));
        }
        change(keys);
        if keys.is_empty() {
            self.groups.remove(&group);
        } else {
            self.by_size.insert(Self::rank(&self.entries, keys, group));
        }
    }

    /// Removes the flows quiet for `idle` or longer and returns them.
    pub fn sweep(&mut self, idle: Duration) -> Vec<(K, V)> {
        let quiet: Vec<K> = self
            .entries
            .iter()
            .filter(|(_, (v, _, _))| v.activity().idle_for() >= idle)
            .map(|(k, _)| k.clone())
            .collect();
        if quiet.is_empty() {
            return Vec::new();
        }
        // The size index is keyed by each touched group's oldest flow: take them out while their
        // entries are still here.
        let touched: BTreeSet<u128> =
            quiet.iter().filter_map(|k| self.entries.get(k)).map(|(_, g, _)| *g).collect();
        for group in &touched {
            if let Some(keys) = self.groups.get(group) {
                self.by_size.remove(&Self::rank(&self.entries, keys, *group));
            }
        }
        let removed: Vec<(K, V)> =
            quiet.into_iter().filter_map(|k| self.entries.remove(&k).map(|(v, _, _)| (k, v))).collect();
        for group in touched {
            let entries = &self.entries;
            let mut keys = self.groups.remove(&group).unwrap_or_default();
            keys.retain(|k| entries.contains_key(k));
            if !keys.is_empty() {
                self.by_size.insert(Self::rank(&self.entries, &keys, group));
                self.groups.insert(group, keys);
            }
        }
        removed
    }

    /// Empties the table, returning every flow.
    pub fn drain(&mut self) -> impl Iterator<Item = (K, V)> + '_ {
        self.groups.clear();
        self.by_size.clear();
        self.entries.drain().map(|(k, (v, _, _))| (k, v))
    }
}

/// The group of a client address: its /24 (IPv4) or /64 (IPv6), where one sender usually sits.
pub fn source_prefix(addr: &std::net::SocketAddr) -> u128 {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => u128::from(u32::from(v4) >> 8),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4) >> 8),
            None => (u128::from(v6) >> 64) | (1 << 64),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    impl<K: Hash + Eq + Clone + std::fmt::Debug, V: Tracked> FlowTable<K, V> {
        /// The size index holds exactly each group's size and oldest flow.
        fn check(&self) {
            let expected: BTreeSet<_> =
                self.groups.iter().map(|(g, keys)| Self::rank(&self.entries, keys, *g)).collect();
            assert_eq!(self.by_size, expected);
            assert_eq!(self.groups.values().map(VecDeque::len).sum::<usize>(), self.entries.len());
        }
    }

    #[derive(Debug, Default)]
    struct Flow(Activity, bool, bool);
    impl Tracked for Flow {
        fn activity(&self) -> &Activity {
            &self.0
        }
        fn established(&self) -> bool {
            self.1
        }
        fn done(&self) -> bool {
            self.2
        }
    }

    #[test]
    fn answered_and_quiet_flows_go_first() {
        let mut t = FlowTable::new(3);
        t.insert(1, Flow::default());
        t.insert(2, Flow(Activity::default(), false, true));
        t.insert(3, established());
        assert_eq!(
            t.insert(4, Flow::default()).map(|(k, _)| k),
            Some(2),
            "the done flow, not the pending one"
        );
        assert_eq!(t.insert(5, Flow::default()).map(|(k, _)| k), Some(1), "then the oldest pending");
    }

    #[test]
    fn of_groups_of_one_size_the_one_with_the_oldest_flow_gives_first() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        // Prefixes above and below: the numbers do not matter, the age does.
        for (older, newer) in [("10.0.9.5:53", "10.0.1.5:53"), ("10.0.1.5:53", "10.0.9.5:53")] {
            let mut t: FlowTable<SocketAddr, Flow> = FlowTable::with_groups(2, 1, source_prefix);
            t.insert(addr(older), Flow::default());
            t.insert(addr(newer), Flow::default());
            let evicted = t.insert(addr("10.0.5.5:53"), Flow::default()).map(|(k, _)| k);
            assert_eq!(evicted, Some(addr(older)));
            t.check();
        }
        // A spread flood, one flow per prefix, evicts its own older flows, not a newer query.
        let mut t: FlowTable<SocketAddr, Flow> = FlowTable::with_groups(64, 16, source_prefix);
        for i in 0..64u32 {
            t.insert(
                SocketAddr::new(std::net::Ipv4Addr::from(0x0a00_0001 + (i << 8)).into(), 53),
                Flow::default(),
            );
        }
        let query = addr("192.0.2.7:5353");
        t.insert(query, Flow::default());
        for i in 64..120u32 {
            t.insert(
                SocketAddr::new(std::net::Ipv4Addr::from(0x0a00_0001 + (i << 8)).into(), 53),
                Flow::default(),
            );
            t.check();
        }
        assert!(t.contains(&query), "56 newer flood flows evicted older ones");
    }

    #[test]
    fn the_size_index_stays_in_step_through_inserts_evictions_and_sweeps() {
        let mut t: FlowTable<u32, Flow> = FlowTable::with_groups(50, 10, |k| u128::from(k % 7));
        let mut x = 12_345u32;
        for round in 0..2_000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let flow = match x % 5 {
                0 => established(),
                1 => Flow(Activity(AtomicU64::new(0)), false, true),
                _ => Flow::default(),
            };
            t.insert((x >> 8) % 300, flow);
            if round % 97 == 0 {
                t.sweep(Duration::from_secs(3600));
            }
            t.check();
            assert!(t.len() <= 50);
        }
    }

    fn established() -> Flow {
        Flow(Activity::default(), true, false)
    }

    #[test]
    fn a_full_table_evicts_the_oldest_flow() {
        let mut t = FlowTable::new(2);
        assert!(t.insert(1, Flow::default()).is_none());
        assert!(t.insert(2, Flow::default()).is_none());
        assert!(t.insert(2, Flow::default()).is_none(), "replacing a key evicts nothing");
        assert_eq!(t.insert(3, Flow::default()).map(|(k, _)| k), Some(1));
        assert!(!t.contains(&1) && t.contains(&2) && t.contains(&3));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn established_flows_go_last() {
        let mut t = FlowTable::new(3);
        t.insert(1, established());
        t.insert(2, Flow::default());
        t.insert(3, established());
        assert_eq!(t.insert(4, Flow::default()).map(|(k, _)| k), Some(2), "the unestablished flow");
        assert_eq!(t.insert(5, Flow::default()).map(|(k, _)| k), Some(4));
        t.insert(6, established());
        let mut all_established = FlowTable::new(2);
        all_established.insert(1, established());
        all_established.insert(2, established());
        assert_eq!(all_established.insert(3, Flow::default()).map(|(k, _)| k), Some(1), "else the oldest");
    }

    #[test]
    fn a_flood_from_one_prefix_evicts_its_own_flows_only() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let mut t: FlowTable<SocketAddr, Flow> = FlowTable::with_groups(100, 25, source_prefix);
        let client = addr("192.0.2.7:5353");
        t.insert(client, established());
        // One sender's many ports stop at its share and then replace their own flows.
        for port in 1..=1000u16 {
            t.insert(SocketAddr::new(addr("198.51.100.9:0").ip(), port), Flow::default());
        }
        assert_eq!(t.len(), 26);
        // Many senders fill the table; the fullest group makes room, never the lone client.
        for i in 0..2000u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8) + 1);
            t.insert(SocketAddr::new(ip.into(), 53), Flow::default());
        }
        assert_eq!(t.len(), 100);
        assert!(t.contains(&client), "the client's flow survived the flood");
        let v6 = |s: &str| source_prefix(&addr(s));
        assert_eq!(v6("[2001:db8:1:2::1]:1"), v6("[2001:db8:1:2::ff]:9"));
        assert_ne!(v6("[2001:db8:1:2::1]:1"), v6("[2001:db8:1:3::1]:1"));
        assert_eq!(source_prefix(&addr("[::ffff:10.1.2.3]:1")), source_prefix(&addr("10.1.2.99:1")));
    }

    #[test]
    fn sweep_removes_only_quiet_flows() {
        let mut t = FlowTable::new(10);
        t.insert("old", Flow(Activity(AtomicU64::new(0)), false, false));
        t.insert("new", Flow::default());
        std::thread::sleep(Duration::from_millis(5));
        if let Some(f) = t.get(&"new") {
            f.0.touch();
        }
        let gone: Vec<_> = t.sweep(Duration::from_millis(3)).into_iter().map(|(k, _)| k).collect();
        assert_eq!(gone, vec!["old"]);
        assert!(t.contains(&"new"));
        // The swept key no longer stands in its group.
        t.insert("x", Flow::default());
        assert_eq!(t.len(), 2);
        assert_eq!(t.group_len(0), 2);
    }
}
