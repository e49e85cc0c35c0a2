//! The relay's small state files (tokens, revocations): TOML, read whole at start, written whole
//! through a temporary file and a rename, readable by the owner only.

use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Serialize};

/// A state file that could not be read or written. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file exists but cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML of the expected shape.
    #[error("{}: {source}", path.display())]
    Parse { path: PathBuf, source: toml::de::Error },
    /// The state could not be turned into TOML.
    #[error("{}: cannot save: {source}", path.display())]
    Encode { path: PathBuf, source: toml::ser::Error },
    /// Writing the temporary file or renaming it over the old one failed.
    #[error("{}: cannot save: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// Reads `path`; a missing file is the empty state.
pub(crate) fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, StateError> {
    let Some(path) = path else { return Ok(T::default()) };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).map_err(|source| StateError::Parse { path: path.to_owned(), source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(StateError::Read { path: path.to_owned(), source }),
    }
}

/// Replaces `path` with `state`.
pub(crate) fn save<T: Serialize>(path: &Path, state: &T) -> Result<(), StateError> {
    let text =
        toml::to_string(state).map_err(|source| StateError::Encode { path: path.to_owned(), source })?;
    let tmp = path.with_extension("tmp");
    let write = |source| StateError::Write { path: path.to_owned(), source };
    crate::trust::pki::write_private_io(&tmp, &text).map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)
}
