//! Keep-alive HTTP/1.1 connections to targets, carried on data streams: each client connection
//! has its own pool, by service, and it closes with that client connection.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use hyper::{body::Incoming, client::conn::http1 as client};
use sallyport_runtime::{flows::Activity, sync::lock};

/// How long a kept connection may sit unused, and how many are kept per service.
pub(super) const POOL_IDLE: Duration = Duration::from_secs(60);
const POOL_PER_KEY: usize = 32;

/// The service a connection leads to.
pub(super) type PoolKey = String;

/// One client connection's keep-alive HTTP/1.1 connections to targets, by service.
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
}
