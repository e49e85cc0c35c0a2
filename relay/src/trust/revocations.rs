//! Revoked agent certificates, by serial number. A revoked certificate's live tunnel is closed
//! at once and its every later connection refused; the agent gets back in only with a new
//! certificate (a new join token or `agent add`). Kept in `relay.revocations_file` when set.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

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
    pub fn open(path: Option<PathBuf>) -> Result<Self, String> {
        let file: RevocationFile = crate::trust::state_file::load(path.as_deref())?;
        let by_serial = file.revoked.into_iter().map(|r| (r.serial.clone(), r)).collect();
        Ok(Self { path, by_serial: Mutex::new(by_serial) })
    }

    pub fn contains(&self, serial: &str) -> bool {
        self.by_serial.lock().map(|r| r.contains_key(serial)).unwrap_or(true)
    }

    pub fn revoke(&self, agent: &str, serial: &str) -> Result<(), String> {
        let at_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut all = self.by_serial.lock().map_err(|_| "internal error".to_owned())?;
        all.insert(
            serial.to_owned(),
            Revoked { serial: serial.to_owned(), agent: agent.to_owned(), at_unix },
        );
        match &self.path {
            Some(path) => crate::trust::state_file::save(
                path,
                &RevocationFile { revoked: all.values().cloned().collect() },
            ),
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
