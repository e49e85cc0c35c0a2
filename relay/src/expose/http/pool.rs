//! Keep-alive HTTP/1.1 connections to targets, carried on data streams, reused per service and
//! client address; idle ones are dropped by a periodic sweep.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::{body::Incoming, client::conn::http1 as client};
use sallyport_runtime::{flows::Activity, sync::lock};
use tokio_util::sync::CancellationToken;

use super::Http;

/// How long a pooled connection may sit unused, and how many are kept per service and client.
pub(super) const POOL_IDLE: Duration = Duration::from_secs(60);
const POOL_PER_KEY: usize = 32;

pub(super) type PoolKey = (String, IpAddr);

/// Keep-alive HTTP/1.1 connections to targets, per service and client address.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
}

#[derive(Debug)]
struct Pooled {
    sender: client::SendRequest<Incoming>,
    /// The tunnel connection it rides on: an agent that reconnected makes it useless.
    tunnel: usize,
    /// When it was put back: a connection unused for [`POOL_IDLE`] is dropped.
    since: Activity,
}

impl Pooled {
    fn usable(&self, tunnel: usize) -> bool {
        !self.sender.is_closed() && self.tunnel == tunnel && self.since.idle_for() < POOL_IDLE
    }
}

impl Pool {
    /// A connection of `key` on `tunnel` that is ready for a request.
    pub(super) fn take(&self, key: &PoolKey, tunnel: usize) -> Option<client::SendRequest<Incoming>> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(key)?;
        list.retain(|p| p.usable(tunnel));
        let found = list.iter().position(|p| p.sender.is_ready()).map(|i| list.swap_remove(i).sender);
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    /// Keeps a connection whose response is on its way; it is ready again once the body is read.
    pub(super) fn put(&self, key: PoolKey, tunnel: usize, sender: client::SendRequest<Incoming>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        let list = idle.entry(key).or_default();
        if list.len() < POOL_PER_KEY {
            list.push(Pooled { sender, tunnel, since: Activity::default() });
        }
    }

    /// Drops closed and long-unused connections (their streams and target connections close).
    fn sweep(&self) {
        let mut idle = lock(&self.idle);
        idle.retain(|_, list| {
            list.retain(|p| !p.sender.is_closed() && p.since.idle_for() < POOL_IDLE);
            !list.is_empty()
        });
    }
}

/// Sweeps the pool of `http` every `period` until `stop` is cancelled.
pub(super) async fn sweep_every(period: Duration, http: Arc<Http>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => http.pool.sweep(),
            () = stop.cancelled() => return,
        }
    }
}
