//! The relay's small state files (tokens, revocations): TOML, read whole at start, written whole
//! through a temporary file and a rename, readable by the owner only.

use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

/// Reads `path`; a missing file is the empty state.
pub(crate) fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, String> {
    let Some(path) = path else { return Ok(T::default()) };
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(format!("{}: cannot read: {e}", path.display())),
    }
}

/// Replaces `path` with `state`.
pub(crate) fn save<T: Serialize>(path: &Path, state: &T) -> Result<(), String> {
    let text = toml::to_string(state).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("tmp");
    crate::trust::pki::write_private(&tmp, &text)
        .map_err(|e| e.to_string())
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()))
        .map_err(|e| format!("{}: cannot save: {e}", path.display()))
}
