//! Per-address connection caps, shared by every listener: one client address cannot hold more
//! than `relay.max_connections_per_ip` connections, however slowly it speaks.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use sallyport_runtime::sync::lock;

/// Open connections per client address.
#[derive(Debug)]
pub(crate) struct PerIp {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max, open: Mutex::new(HashMap::new()) })
    }

    /// Counts one more connection from `ip`, or `None` if that address is at its cap.
    pub(crate) fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = lock(&self.open);
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
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
    fn cap_is_per_address_and_slots_come_back() {
        let limits = PerIp::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let one = limits.enter(a).unwrap();
        let _two = limits.enter(a).unwrap();
        assert!(limits.enter(a).is_none());
        let _other = limits.enter(b).unwrap();
        drop(one);
        assert!(limits.enter(a).is_some());
        assert_eq!(limits.open.lock().unwrap().len(), 2);
    }
}
