//! Two live sessions under one agent name: a copy of the agent's identity (its key and
//! certificate from a backup, an image, a stolen disk) connecting beside the real agent. The
//! relay keeps the session it has and refuses the newcomer with a reason that says so, counts it
//! (`sallyport_identity_conflicts_total{agent}`, which the operator's kit alerts on) and logs it,
//! at most once a minute per agent.
//!
//! An agent that reconnects from the address its live session came from replaces that session
//! (a restarted agent, a tunnel moving between transports); one from another address waits until
//! the live session is gone (a real agent's old session dies within its idle timeout, 1.5 s by
//! default, and the agent dials again).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use sallyport_runtime::sync::lock;

use crate::tunnel::registry::Registry;

/// How often a conflict of one agent is logged, at most (each is counted).
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Agents whose conflicts were logged, with when.
#[derive(Debug, Default)]
pub(crate) struct Conflicts {
    logged: Mutex<HashMap<String, Instant>>,
}

impl Conflicts {
    /// The live session's remote address when a new session of `name` from `remote` conflicts
    /// with it: that session is still up and came from another address.
    pub(crate) fn check(registry: &Registry, name: &str, remote: SocketAddr) -> Option<SocketAddr> {
        let live = registry.subscribe().borrow().get(name).cloned()?;
        let up = live.connection.close_reason().is_none();
        (up && live.remote.ip() != remote.ip()).then_some(live.remote)
    }

    /// Whether this conflict of `name` is to be logged (the first in a minute).
    pub(crate) fn should_log(&self, name: &str) -> bool {
        let mut logged = lock(&self.logged);
        logged.retain(|_, at| at.elapsed() < LOG_EVERY);
        if logged.contains_key(name) {
            return false;
        }
        logged.insert(name.to_owned(), Instant::now());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflict_is_logged_once_a_minute_per_agent() {
        let conflicts = Conflicts::default();
        assert!(conflicts.should_log("winbox"));
        assert!(!conflicts.should_log("winbox"));
        assert!(conflicts.should_log("nas"), "each agent has its own minute");
        lock(&conflicts.logged).insert("winbox".into(), Instant::now() - LOG_EVERY);
        assert!(conflicts.should_log("winbox"), "a minute later it is logged again");
    }
}
