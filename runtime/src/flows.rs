//! The one idle-flow table: UDP flows on the relay (by client address) and on the agent (by flow
//! id) live in it, and the HTTP pool measures idleness with its [`Activity`] stamps.
//!
//! Each entry carries an [`Activity`] stamp that any task holding the value may refresh without
//! the table's lock. A [`sweep`](FlowTable::sweep) removes the entries quiet for longer than the
//! idle time; an [`insert`](FlowTable::insert) into a full table evicts the oldest entry first.

use std::{
    collections::{HashMap, VecDeque},
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

/// A value whose quiet time decides when the table forgets it.
pub trait Tracked {
    fn activity(&self) -> &Activity;
}

impl<T: Tracked + ?Sized> Tracked for std::sync::Arc<T> {
    fn activity(&self) -> &Activity {
        (**self).activity()
    }
}

/// Flows by key, at most `max` of them, oldest evicted first.
#[derive(Debug)]
pub struct FlowTable<K, V> {
    entries: HashMap<K, V>,
    /// Keys in the order they were inserted (may hold keys removed since; skipped on eviction).
    order: VecDeque<K>,
    max: usize,
}

impl<K: Hash + Eq + Clone, V: Tracked> FlowTable<K, V> {
    /// An empty table that holds at most `max` flows (at least one).
    pub fn new(max: usize) -> Self {
        Self { entries: HashMap::new(), order: VecDeque::new(), max: max.max(1) }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key)
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

    /// Adds a flow; in a full table the oldest flow makes room and is returned.
    pub fn insert(&mut self, key: K, value: V) -> Option<(K, V)> {
        let mut evicted = None;
        if !self.entries.contains_key(&key) && self.entries.len() >= self.max {
            while let Some(oldest) = self.order.pop_front() {
                if let Some(value) = self.entries.remove(&oldest) {
                    evicted = Some((oldest, value));
                    break;
                }
            }
        }
        if self.entries.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        evicted
    }

    /// Removes the flows quiet for `idle` or longer and returns them.
    pub fn sweep(&mut self, idle: Duration) -> Vec<(K, V)> {
        let quiet: Vec<K> = self
            .entries
            .iter()
            .filter(|(_, v)| v.activity().idle_for() >= idle)
            .map(|(k, _)| k.clone())
            .collect();
        let removed: Vec<(K, V)> =
            quiet.into_iter().filter_map(|k| self.entries.remove(&k).map(|v| (k, v))).collect();
        if !removed.is_empty() {
            let entries = &self.entries;
            self.order.retain(|k| entries.contains_key(k));
        }
        removed
    }

    /// Empties the table, returning every flow.
    pub fn drain(&mut self) -> impl Iterator<Item = (K, V)> + '_ {
        self.order.clear();
        self.entries.drain()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Flow(Activity);
    impl Tracked for Flow {
        fn activity(&self) -> &Activity {
            &self.0
        }
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
    fn sweep_removes_only_quiet_flows() {
        let mut t = FlowTable::new(10);
        t.insert("old", Flow(Activity(AtomicU64::new(0))));
        t.insert("new", Flow::default());
        std::thread::sleep(Duration::from_millis(5));
        if let Some(f) = t.get(&"new") {
            f.0.touch();
        }
        let gone: Vec<_> = t.sweep(Duration::from_millis(3)).into_iter().map(|(k, _)| k).collect();
        assert_eq!(gone, vec!["old"]);
        assert!(t.contains(&"new"));
        // The evicted key no longer stands in the eviction order.
        t.insert("x", Flow::default());
        assert_eq!(t.len(), 2);
    }
}
