//! Keep-alive HTTP/1.1 connections to targets, carried on data streams: each client connection
//! has its own pool, by service, and it closes with that client connection. A client connection
//! keeps the upstream connection it has (its agent and its tunnel connection, lanes included) for
//! as long as that lives: state a target binds to its connection (NTLM, Negotiate) stays with it.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use hyper::{body::Incoming, client::conn::http1 as client};
use sallyport_runtime::{flows::Activity, sync::lock};

use crate::groups::Picked;

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

/// An upstream connection and the member it leads to.
#[derive(Debug)]
pub(super) struct Upstream {
    pub(super) sender: client::SendRequest<Incoming>,
    /// The group's member, the tunnel connection the stream rides on, its place in the member's
    /// count of live connections.
    pub(super) picked: Picked,
}

#[derive(Debug)]
struct Pooled {
    upstream: Upstream,
    /// When it was put back: a connection unused for [`POOL_IDLE`] is dropped.
    since: Activity,
}

impl Pooled {
    fn usable(&self) -> bool {
        !self.upstream.sender.is_closed()
            && self.upstream.picked.connection.close_reason().is_none()
            && !self.upstream.picked.cut.is_cancelled()
            && self.since.idle_for() < POOL_IDLE
    }
}

impl Pool {
    /// A kept connection of `key`, ready for a request or about to be (its last response's body
    /// may still be on its way out): the one this client connection used last.
    pub(super) fn take(&self, key: &PoolKey) -> Option<Upstream> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(key)?;
        list.retain(Pooled::usable);
        let found = list
            .iter()
            .position(|p| p.upstream.sender.is_ready())
            .or_else(|| list.len().checked_sub(1))
            .map(|i| list.swap_remove(i).upstream);
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    /// Keeps a connection whose response is on its way; it is ready again once the body is read.
    pub(super) fn put(&self, key: PoolKey, upstream: Upstream) {
        if upstream.sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        let list = idle.entry(key).or_default();
        if list.len() < POOL_PER_KEY {
            list.push(Pooled { upstream, since: Activity::default() });
        }
    }
}
