//! Revoked agent certificates, by serial number. A revoked certificate's live tunnel is closed
//! at once and its every later connection refused; the agent gets back in only with a new
//! certificate (a new join token or `agent add`). Kept in `relay.revocations_file` when set.

use std::{collections::BTreeMap, path::PathBuf, sync::Mutex};

use sallyport_runtime::{clock, sync::lock};
use serde::{Deserialize, Serialize};

use crate::trust::state_file::{self, StateError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub serial: String,
    pub agent: String,
    pub at_unix: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RevocationFile {
    #[serde(default)]
    revoked: Vec<Revoked>,
}

#[derive(Debug)]
pub(crate) struct Revocations {
    path: Option<PathBuf>,
    by_serial: Mutex<BTreeMap<String, Revoked>>,
}

impl Revocations {
    pub fn open(path: Option<PathBuf>) -> Result<Self, StateError> {
        let file: RevocationFile = state_file::load(path.as_deref())?;
        let by_serial = file.revoked.into_iter().map(|r| (r.serial.clone(), r)).collect();
        Ok(Self { path, by_serial: Mutex::new(by_serial) })
    }

    pub fn contains(&self, serial: &str) -> bool {
        lock(&self.by_serial).contains_key(serial)
    }

    pub fn revoke(&self, agent: &str, serial: &str) -> Result<(), StateError> {
        let at_unix = clock::unix_now();
        let mut all = lock(&self.by_serial);
        all.insert(
            serial.to_owned(),
            Revoked { serial: serial.to_owned(), agent: agent.to_owned(), at_unix },
        );
        match &self.path {
            Some(path) => {
                state_file::save(path, &RevocationFile { revoked: all.values().cloned().collect() })
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("revoked.toml");
        let r = Revocations::open(Some(path.clone())).expect("open");
        assert!(!r.contains("0a"));
        r.revoke("winbox", "0a").expect("revoke");
        assert!(r.contains("0a"));
        assert!(Revocations::open(Some(path)).expect("reopen").contains("0a"));
    }
}
