//! Rates per client address: new connections per second (TCP, HTTPS, new UDP flows) and requests
//! per second (HTTP), each per service, with a burst. GCRA buckets keyed by client host (an IPv4
//! address, an IPv6 /64), from `governor`.
//!
//! The limiters are kept per service and kind; a reload that changes a rate replaces its limiter.
//! Buckets that have refilled are forgotten every [`SWEEP_EVERY`] checks, so the memory a flood of
//! many sources costs stays what its last few seconds of sources cost.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A rate with its burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

/// What a rate counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counted {
    /// New connections (TCP, HTTPS) and new UDP flows.
    Connections,
    /// HTTP requests.
    Requests,
}

/// How often the buckets that have refilled are forgotten.
pub const SWEEP_EVERY: u64 = 4096;

type Limiter = DefaultKeyedRateLimiter<IpAddr>;

/// Each service's limiters (connections, requests), with the rate each was made for.
type Limiters = HashMap<String, [Option<(Rate, Arc<Limiter>)>; 2]>;

/// The rate limiters of every service.
#[derive(Debug, Default)]
pub struct Rates {
    limiters: Mutex<Limiters>,
    checks: AtomicU64,
}

impl Rates {
    /// Whether `ip` may open one more connection (or send one more request) to `service` under
    /// `rate`; `None` is no limit.
    pub fn allows(&self, service: &str, counted: Counted, rate: Option<Rate>, ip: IpAddr) -> bool {
        let Some(rate) = rate else { return true };
        let limiter = self.limiter(service, counted, rate);
        let allowed = limiter.check_key(&sallyport_runtime::addr::host_key(ip)).is_ok();
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        allowed
    }

    /// The limiter of `service` for `counted` at `rate` (a new one when the rate changed). The
    /// service's name is copied only the first time.
    fn limiter(&self, service: &str, counted: Counted, rate: Rate) -> Arc<Limiter> {
        let mut limiters = sallyport_runtime::sync::lock(&self.limiters);
        let slot = match counted {
            Counted::Connections => 0,
            Counted::Requests => 1,
        };
        if let Some(Some((current, limiter))) = limiters.get(service).map(|l| &l[slot]) {
            if *current == rate {
                return limiter.clone();
            }
        }
        let quota = Quota::per_second(rate.per_second).allow_burst(rate.burst);
        let limiter = Arc::new(RateLimiter::keyed(quota));
        limiters.entry(service.to_owned()).or_default()[slot] = Some((rate, limiter.clone()));
        limiter
    }

    /// Client hosts with a bucket now, across every limiter.
    pub fn tracked(&self) -> usize {
        sallyport_runtime::sync::lock(&self.limiters).values().flatten().flatten().map(|(_, l)| l.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(per_second).expect("rate"),
            burst: NonZeroU32::new(burst).expect("burst"),
        })
    }

    #[test]
    fn a_host_gets_its_burst_then_its_rate_and_others_are_apart() {
        let rates = Rates::default();
        let a: IpAddr = "192.168.4.23".parse().expect("ip");
        let b: IpAddr = "192.168.4.24".parse().expect("ip");
        let admitted = (0..50).filter(|_| rates.allows("rdp", Counted::Connections, rate(5, 10), a)).count();
        assert!((10..=11).contains(&admitted), "the burst: {admitted}");
        assert!(rates.allows("rdp", Counted::Connections, rate(5, 10), b), "another host has its own");
        assert!(rates.allows("sql", Counted::Connections, rate(5, 10), a), "another service has its own");
        assert!(rates.allows("rdp", Counted::Requests, rate(5, 10), a), "requests are counted apart");
        assert!(rates.allows("rdp", Counted::Connections, None, a), "no rate, no limit");
        // A reload that raises the rate gives a new limiter.
        assert!(rates.allows("rdp", Counted::Connections, rate(100, 200), a));
        // One IPv6 host is its /64.
        let v6 = |i: u32| format!("2001:db8:1:1::{i:x}").parse::<IpAddr>().expect("ip");
        let admitted = (1..50).filter(|i| rates.allows("web", Counted::Requests, rate(1, 5), v6(*i))).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn buckets_that_refilled_are_forgotten() {
        let rates = Rates::default();
        for i in 0..(2 * SWEEP_EVERY as u32) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            rates.allows("dns", Counted::Connections, rate(1_000_000, 1), ip);
        }
        // At a million a second, every bucket has refilled by the sweep.
        std::thread::sleep(std::time::Duration::from_millis(5));
        for i in 0..SWEEP_EVERY as u32 {
            rates.allows(
                "dns",
                Counted::Connections,
                rate(1_000_000, 1),
                IpAddr::from([10, 9, 0, (i % 200) as u8]),
            );
        }
        assert!(rates.tracked() < SWEEP_EVERY as usize, "{} buckets kept", rates.tracked());
    }
}
