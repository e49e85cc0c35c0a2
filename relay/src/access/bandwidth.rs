//! Bandwidth caps: bytes per second each way, per service and per agent, each with a burst. The
//! buckets are GCRA limiters from `governor`, one per service or agent and direction, shared by all
//! its connections; a reload that changes a cap replaces its bucket.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use governor::{clock::Clock, DefaultDirectRateLimiter, Quota, RateLimiter};
use sallyport_runtime::pace::{Bucket, Pace};

/// A cap: bytes per second, and how many may go at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl ByteRate {
    /// `per_second` with the default burst: a tenth of a second's worth, at least 64 KiB (the
    /// largest read a splice makes), at most the rate.
    pub fn with_default_burst(per_second: NonZeroU32) -> Self {
        let burst = (per_second.get() / 10).max(64 << 10).min(per_second.get());
        Self { per_second, burst: NonZeroU32::new(burst).unwrap_or(per_second) }
    }
}

/// One direction of one cap.
#[derive(Debug)]
struct Limiter {
    limiter: DefaultDirectRateLimiter,
    burst: u32,
}

impl Bucket for Limiter {
    fn take(&self, bytes: u32) -> Result<(), Duration> {
        let Some(n) = NonZeroU32::new(bytes) else { return Ok(()) };
        match self.limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                Err(not_until.wait_time_from(governor::clock::DefaultClock::default().now()))
            }
            // More than the burst at once: `Pace` asks in pieces of `most`, so this does not happen.
            Err(_) => Ok(()),
        }
    }

    fn most(&self) -> u32 {
        self.burst
    }
}

/// Caps by service or agent name: the rate each was made for, and its buckets up and down.
type Caps = HashMap<String, (ByteRate, [Arc<Limiter>; 2])>;

/// The bandwidth caps in force, by service and agent.
#[derive(Debug, Default)]
pub struct Bandwidth {
    services: Mutex<Caps>,
    agents: Mutex<Caps>,
}

impl Bandwidth {
    /// The buckets a connection of `service` (carried by `agent`) passes, each way; `None` when
    /// neither has a cap.
    pub fn pace(
        &self,
        (service, cap): (&str, Option<ByteRate>),
        (agent, agent_cap): (&str, Option<ByteRate>),
    ) -> Option<Pace> {
        if cap.is_none() && agent_cap.is_none() {
            return None;
        }
        let mut pace = Pace::default();
        for (caps, name, rate) in [(&self.services, service, cap), (&self.agents, agent, agent_cap)] {
            let Some(rate) = rate else { continue };
            let [up, down] = buckets(caps, name, rate);
            pace.up.push(up);
            pace.down.push(down);
        }
        Some(pace)
    }
}

/// The buckets of `name` in `caps` at `rate` (new ones when the rate changed; the name is copied
/// only then).
fn buckets(caps: &Mutex<Caps>, name: &str, rate: ByteRate) -> [Arc<dyn Bucket>; 2] {
    let mut caps = sallyport_runtime::sync::lock(caps);
    if let Some((current, [up, down])) = caps.get(name) {
        if *current == rate {
            return [up.clone(), down.clone()];
        }
    }
    let quota = Quota::per_second(rate.per_second).allow_burst(rate.burst);
    let new = || Arc::new(Limiter { limiter: RateLimiter::direct(quota), burst: rate.burst.get() });
    let (up, down) = (new(), new());
    caps.insert(name.to_owned(), (rate, [up.clone(), down.clone()]));
    [up, down]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_shared_by_service_and_agent_and_follow_a_reload() {
        let bandwidth = Bandwidth::default();
        let rate = ByteRate::with_default_burst(NonZeroU32::new(1 << 20).expect("rate"));
        assert_eq!(rate.burst.get(), 104_857);
        assert_eq!(ByteRate::with_default_burst(NonZeroU32::new(1000).expect("rate")).burst.get(), 1000);
        assert!(bandwidth.pace(("web", None), ("winbox", None)).is_none());
        let one = bandwidth.pace(("web", Some(rate)), ("winbox", None)).expect("a pace");
        let two = bandwidth.pace(("web", Some(rate)), ("winbox", Some(rate))).expect("a pace");
        assert_eq!((one.up.len(), two.up.len(), two.down.len()), (1, 2, 2));
        // The service's bucket is one for all its connections: the burst once, then the rate.
        assert!(one.up[0].take(rate.burst.get()).is_ok());
        assert!(two.up[0].take(rate.burst.get()).is_err(), "the second connection shares the bucket");
        assert!(one.down[0].take(rate.burst.get()).is_ok(), "each direction has its own");
        let raised = ByteRate::with_default_burst(NonZeroU32::new(100 << 20).expect("rate"));
        let three = bandwidth.pace(("web", Some(raised)), ("winbox", None)).expect("a pace");
        assert!(three.up[0].take(rate.burst.get()).is_ok(), "a new cap, a new bucket");
    }
}
