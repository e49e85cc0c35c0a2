//! Revoked agent certificates. `agent revoke NAME` refuses every certificate of that agent issued
//! up to the revocation (renewals included, whoever holds them) and closes its live tunnel; single
//! certificates can also be revoked by serial. The agent gets back in only with a certificate
//! issued afterwards (a new join token or `agent add`). Kept in `relay.revocations_file`, which a
//! relay that can revoke must have.

use std::{collections::BTreeMap, path::PathBuf, sync::Mutex};

use sallyport_runtime::{clock, sync::lock};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::trust::state_file::{self, StateError};

/// One certificate revoked by serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub serial: String,
    pub agent: String,
    pub at_unix: u64,
}

/// Every certificate of `agent` issued at or before `before_unix` is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedAgent {
    pub agent: String,
    pub before_unix: u64,
}

/// Every revocation, as kept on disk and as the writer replica hands it to the others.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RevocationFile {
    #[serde(default)]
    revoked: Vec<Revoked>,
    #[serde(default)]
    agents: Vec<RevokedAgent>,
}

#[derive(Debug, Default)]
struct State {
    by_serial: BTreeMap<String, Revoked>,
    /// Per agent: certificates issued at or before this second are refused.
    cutoffs: BTreeMap<String, u64>,
}

/// A certificate as the relay judges it: whose, which, and when it was issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertId {
    pub(crate) agent: String,
    pub(crate) serial: String,
    /// Its `notBefore`: the relay issues agent certificates valid from the second of issue.
    pub(crate) issued_unix: i64,
}

#[derive(Debug)]
pub(crate) struct Revocations {
    path: Option<PathBuf>,
    state: Mutex<State>,
    /// Bumped by every change, so live tunnels of newly refused certificates can be closed.
    changes: watch::Sender<u64>,
}

impl State {
    fn from_file(file: RevocationFile) -> Self {
        Self {
            by_serial: file.revoked.into_iter().map(|r| (r.serial.clone(), r)).collect(),
            cutoffs: file.agents.into_iter().map(|a| (a.agent, a.before_unix)).collect(),
        }
    }

    fn to_file(&self) -> RevocationFile {
        RevocationFile {
            revoked: self.by_serial.values().cloned().collect(),
            agents: self
                .cutoffs
                .iter()
                .map(|(agent, &before_unix)| RevokedAgent { agent: agent.clone(), before_unix })
                .collect(),
        }
    }
}

impl Revocations {
    pub fn open(path: Option<PathBuf>) -> Result<Self, StateError> {
        let file: RevocationFile = state_file::load(path.as_deref())?;
        Ok(Self { path, state: Mutex::new(State::from_file(file)), changes: watch::Sender::new(0) })
    }

    /// A receiver that sees every change.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Every revocation, for the other replicas.
    pub(crate) fn snapshot(&self) -> RevocationFile {
        lock(&self.state).to_file()
    }

    /// Takes the writer replica's revocations as this replica's own, kept in this replica's file
    /// so they hold across its restarts even while the writer is away; true if anything changed.
    pub(crate) fn replace(&self, file: RevocationFile) -> Result<bool, StateError> {
        let mut state = lock(&self.state);
        if state.to_file() == file {
            return Ok(false);
        }
        *state = State::from_file(file);
        let saved = self.save(&state);
        drop(state);
        // Refused in memory even when the save failed.
        self.changes.send_modify(|n| *n += 1);
        saved.map(|()| true)
    }

    /// Whether `cert` is refused: its serial is revoked, or its agent was revoked at or after the
    /// second it was issued.
    pub fn refuses(&self, cert: &CertId) -> bool {
        let state = lock(&self.state);
        state.by_serial.contains_key(&cert.serial)
            || state.cutoffs.get(&cert.agent).is_some_and(|&cutoff| cert.issued_unix <= cutoff as i64)
    }

    /// Refuses every certificate of `agent` issued up to now, and each of `serials` (certificates
    /// of it issued elsewhere); returns the cutoff.
    pub fn revoke_agent(&self, agent: &str, serials: &[String]) -> Result<u64, StateError> {
        let now = clock::unix_now();
        let mut state = lock(&self.state);
        let cutoff = state.cutoffs.entry(agent.to_owned()).or_insert(0);
        *cutoff = (*cutoff).max(now);
        for serial in serials {
            let record = Revoked { serial: serial.clone(), agent: agent.to_owned(), at_unix: now };
            state.by_serial.insert(serial.clone(), record);
        }
        let saved = self.save(&state);
        drop(state);
        self.changes.send_modify(|n| *n += 1);
        saved.map(|()| now)
    }

    fn save(&self, state: &State) -> Result<(), StateError> {
        let Some(path) = &self.path else { return Ok(()) };
        state_file::save(path, &state.to_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(agent: &str, serial: &str, issued_unix: i64) -> CertId {
        CertId { agent: agent.into(), serial: serial.into(), issued_unix }
    }

    #[test]
    fn revocations_persist_and_cover_every_earlier_certificate_of_the_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("revoked.toml");
        let r = Revocations::open(Some(path.clone())).expect("open");
        let now = clock::unix_now() as i64;
        let earlier = cert("winbox", "0a", now - 100);
        let renewed = cert("winbox", "0b", now);
        let later = cert("winbox", "0c", now + 5);
        let other = cert("nas", "0d", now - 100);
        assert!(!r.refuses(&earlier) && !r.refuses(&renewed));
        let cutoff = r.revoke_agent("winbox", &["0e".to_owned()]).expect("revoke");
        assert!(cutoff as i64 >= now);
        for refused in [&earlier, &renewed, &cert("winbox", "0e", now + 50)] {
            assert!(r.refuses(refused), "{refused:?}");
        }
        assert!(!r.refuses(&later) && !r.refuses(&other));
        let reopened = Revocations::open(Some(path)).expect("reopen");
        assert!(reopened.refuses(&earlier) && reopened.refuses(&renewed));
        assert!(!reopened.refuses(&later));
    }
}
