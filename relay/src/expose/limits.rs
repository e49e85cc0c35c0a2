//! Connection caps, counted against the limits in force (a reload that changes a cap applies to
//! the next connection): the relay-wide cap and each listener's share ([`Count`]), and the
//! per-address cap shared by every listener ([`PerIp`]: one client address cannot hold more than
//! `relay.max_connections_per_ip` connections, however slowly it speaks).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

/// Connections open under one cap.
#[derive(Debug, Default)]
pub(crate) struct Count {
    open: AtomicUsize,
}

impl Count {
    /// Counts one more connection, or `None` if `max` are open already.
    pub(crate) fn enter(self: &Arc<Self>, max: usize) -> Option<CountSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < max).then_some(open + 1))
            .ok()?;
        Some(CountSlot(self.clone()))
    }

    /// Connections open now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One counted connection; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct CountSlot(Arc<Count>);

impl Drop for CountSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

use sallyport_runtime::sync::lock;

/// Open connections per client host (an IPv4 address, an IPv6 /64).
#[derive(Debug, Default)]
pub(crate) struct PerIp {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    /// Counts one more connection from `ip`, or `None` if that host (an IPv4 address, an IPv6
    /// /64) has `max` open already.
    pub(crate) fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let ip = sallyport_runtime::addr::host_key(ip);
        let mut open = lock(&self.open);
        let count = open.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(IpSlot { limits: self.clone(), ip })
    }
}

/// One counted connection; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct IpSlot {
    limits: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.limits.open);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ipv6_host_is_its_slash_64() {
        let limits = Arc::new(PerIp::default());
        let held: Vec<_> =
            (1..=10).filter_map(|i| limits.enter(format!("2001:db8:5:5::{i}").parse().unwrap(), 4)).collect();
        assert_eq!(held.len(), 4, "addresses of one /64 share one host's cap");
        assert!(limits.enter("2001:db8:5:6::1".parse().unwrap(), 4).is_some());
        drop(held);
        assert!(limits.enter("2001:db8:5:5::99".parse().unwrap(), 4).is_some(), "slots come back");
    }

    #[test]
    fn cap_is_per_address_and_slots_come_back() {
        let limits = Arc::new(PerIp::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let one = limits.enter(a, 2).unwrap();
        let _two = limits.enter(a, 2).unwrap();
        assert!(limits.enter(a, 2).is_none());
        let _other = limits.enter(b, 2).unwrap();
        drop(one);
        assert!(limits.enter(a, 2).is_some());
        assert_eq!(limits.open.lock().unwrap().len(), 2);
        // A cap raised by a reload holds from the next connection on.
        assert!(limits.enter(a, 3).is_some());
    }

    #[test]
    fn a_count_holds_the_cap_in_force() {
        let count = Arc::new(Count::default());
        let held: Vec<_> = (0..3).map(|_| count.enter(3).unwrap()).collect();
        assert!(count.enter(3).is_none());
        assert!(count.enter(4).is_some(), "a raised cap admits one more");
        assert!(count.enter(2).is_none(), "a lowered cap admits none until enough have ended");
        drop(held);
        assert_eq!(count.open(), 0);
    }
}
