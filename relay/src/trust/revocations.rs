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
    /// Per agent: certificates issued before its newest one that connected (a renewal's) are
    /// refused at the handshake; live sessions on them go on.
    #[serde(default)]
    retired: Vec<RevokedAgent>,
}

#[derive(Debug, Default)]
struct State {
    /// Per agent: certificates issued at or before this second are retired.
    retired: BTreeMap<String, u64>,
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

/// What [`Revocations::absorb`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Absorbed {
    /// Revocations (serials, or an agent's later cutoff) this replica did not hold.
    pub(crate) added: usize,
    /// Revocations this replica holds that the other list lacks (or holds with an earlier cutoff).
    pub(crate) missing: usize,
}

impl State {
    /// The union of both: every serial, and the later cutoff of each agent.
    fn absorb(&mut self, other: State) -> Absorbed {
        let mut absorbed = Absorbed::default();
        absorbed.missing += self.by_serial.keys().filter(|s| !other.by_serial.contains_key(*s)).count();
        absorbed.missing += self
            .cutoffs
            .iter()
            .filter(|(agent, cutoff)| other.cutoffs.get(*agent).is_none_or(|theirs| theirs < *cutoff))
            .count();
        for (serial, record) in other.by_serial {
            if let std::collections::btree_map::Entry::Vacant(entry) = self.by_serial.entry(serial) {
                entry.insert(record);
                absorbed.added += 1;
            }
        }
        for (agent, theirs) in other.cutoffs {
            let cutoff = self.cutoffs.entry(agent).or_insert(0);
            if theirs > *cutoff {
                *cutoff = theirs;
                absorbed.added += 1;
            }
        }
        for (agent, theirs) in other.retired {
            let retired = self.retired.entry(agent).or_insert(0);
            if theirs > *retired {
                *retired = theirs;
                absorbed.added += 1;
            }
        }
        absorbed
    }

    fn from_file(file: RevocationFile) -> Self {
        Self {
            by_serial: file.revoked.into_iter().map(|r| (r.serial.clone(), r)).collect(),
            cutoffs: file.agents.into_iter().map(|a| (a.agent, a.before_unix)).collect(),
            retired: file.retired.into_iter().map(|a| (a.agent, a.before_unix)).collect(),
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
            retired: self
                .retired
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

    /// Adds another replica's revocations to this one's, kept in this replica's file so they hold
    /// across its restarts even while the writer is away. Revocations only grow: every serial of
    /// either list is kept and each agent's later cutoff wins, so a writer that lost its file (or
    /// a forged answer) un-revokes nothing. Says what changed here and what `file` lacked.
    pub(crate) fn absorb(&self, file: RevocationFile) -> Result<Absorbed, StateError> {
        let mut state = lock(&self.state);
        let absorbed = state.absorb(State::from_file(file));
        if absorbed.added == 0 {
            return Ok(absorbed);
        }
        let saved = self.save(&state);
        drop(state);
        // Refused in memory even when the save failed.
        self.changes.send_modify(|n| *n += 1);
        saved.map(|()| absorbed)
    }

    /// Whether `cert` is refused: its serial is revoked, or its agent was revoked at or after the
    /// second it was issued.
    pub fn refuses(&self, cert: &CertId) -> bool {
        let state = lock(&self.state);
        state.by_serial.contains_key(&cert.serial)
            || state.cutoffs.get(&cert.agent).is_some_and(|&cutoff| cert.issued_unix <= cutoff as i64)
    }

    /// Refuses every certificate of `agent` issued up to now (`ahead` seconds later still, for a
    /// cluster whose replicas learn of it a moment later or run clocks a little ahead), and each of
    /// `serials` (certificates of it issued elsewhere); returns the cutoff.
    pub fn revoke_agent(&self, agent: &str, serials: &[String], ahead: u64) -> Result<u64, StateError> {
        let now = clock::unix_now();
        let until = now + ahead;
        let mut state = lock(&self.state);
        let cutoff = state.cutoffs.entry(agent.to_owned()).or_insert(0);
        *cutoff = (*cutoff).max(until);
        for serial in serials {
            let record = Revoked { serial: serial.clone(), agent: agent.to_owned(), at_unix: now };
            state.by_serial.insert(serial.clone(), record);
        }
        let saved = self.save(&state);
        drop(state);
        self.changes.send_modify(|n| *n += 1);
        saved.map(|()| until)
    }

    /// Whether `cert` was retired: its agent has since connected with a newer certificate.
    pub(crate) fn retired(&self, cert: &CertId) -> bool {
        let state = lock(&self.state);
        state.retired.get(&cert.agent).is_some_and(|&before| cert.issued_unix <= before as i64)
    }

    /// `cert` connected: every certificate of its agent issued before it is retired (a renewal
    /// replaces the certificate it renews, and a copy of the old one gets in no more). True when
    /// that retired something new.
    pub(crate) fn retire_before(&self, cert: &CertId) -> Result<bool, StateError> {
        let Ok(before) = u64::try_from(cert.issued_unix - 1) else { return Ok(false) };
        let mut state = lock(&self.state);
        let retired = state.retired.entry(cert.agent.clone()).or_insert(0);
        if *retired >= before {
            return Ok(false);
        }
        *retired = before;
        self.save(&state).map(|()| true)
    }

    fn save(&self, state: &State) -> Result<(), StateError> {
        let Some(path) = &self.path else { return Ok(()) };
        state_file::save(path, &state.to_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_certificate_retires_the_older_ones() {
        let r = Revocations::open(None).expect("open");
        let (old, renewed) = (cert("winbox", "0a", 1_000), cert("winbox", "0b", 2_000));
        assert!(!r.retired(&old));
        assert!(r.retire_before(&old).expect("retire"), "the first certificate seen retires nothing older");
        assert!(!r.retired(&old));
        assert!(r.retire_before(&renewed).expect("retire"));
        assert!(r.retired(&old) && !r.retired(&renewed));
        assert!(!r.retire_before(&old).expect("retire"), "an older one moves nothing back");
        assert!(!r.retired(&cert("nas", "0c", 1_000)), "per agent");
        assert!(!r.refuses(&old), "retired is not revoked: live sessions go on");
        // Taken by the other replicas like the rest.
        let other = Revocations::open(None).expect("open");
        other.absorb(r.snapshot()).expect("absorb");
        assert!(other.retired(&old));
    }

    #[test]
    fn revocations_only_grow_whatever_another_replica_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("revoked.toml");
        let here = Revocations::open(Some(path.clone())).expect("open");
        here.revoke_agent("winbox", &["0a".into()], 0).expect("revoke");
        let cutoff = here.snapshot().agents[0].before_unix;
        // An empty list (a writer that lost its file, or a forged answer) takes nothing away.
        let absorbed = here.absorb(RevocationFile::default()).expect("absorb");
        assert_eq!(absorbed, Absorbed { added: 0, missing: 2 });
        let issued = cert("winbox", "0b", cutoff as i64);
        assert!(here.refuses(&issued) && here.refuses(&cert("winbox", "0a", cutoff as i64 + 10)));
        // An earlier cutoff does not move it back; a later one and a new serial are taken.
        let other = RevocationFile {
            revoked: vec![Revoked { serial: "0c".into(), agent: "nas".into(), at_unix: 1 }],
            agents: vec![
                RevokedAgent { agent: "winbox".into(), before_unix: cutoff - 50 },
                RevokedAgent { agent: "nas".into(), before_unix: 7 },
            ],
            retired: Vec::new(),
        };
        assert_eq!(here.absorb(other).expect("absorb"), Absorbed { added: 2, missing: 2 });
        assert!(here.refuses(&issued) && here.refuses(&cert("nas", "0c", 100)));
        // Kept on disk.
        let reopened = Revocations::open(Some(path)).expect("reopen");
        assert_eq!(reopened.snapshot(), here.snapshot());
    }

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
        let cutoff = r.revoke_agent("winbox", &["0e".to_owned()], 0).expect("revoke");
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
