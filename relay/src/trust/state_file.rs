//! The relay's small state files (tokens, revocations): TOML, read whole at start, written whole,
//! readable by the owner only. A save writes a temporary file, flushes it to disk, renames it over
//! the old one and flushes the directory: a crash or a power cut at any point leaves the old state
//! or the new one, never an empty or torn file.

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

/// Replaces `path` with `state`, durably.
pub(crate) fn save<T: Serialize>(path: &Path, state: &T) -> Result<(), StateError> {
    let text =
        toml::to_string(state).map_err(|source| StateError::Encode { path: path.to_owned(), source })?;
    replace_durably(path, &text).map_err(|source| StateError::Write { path: path.to_owned(), source })
}

/// Writes `text` to `path` through a temporary file: written and flushed to disk, renamed over
/// `path`, and the rename flushed by syncing the directory.
fn replace_durably(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    crate::trust::pki::write_private_io(&tmp, text)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sallyport_runtime::durable::sync_parent_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        items: Vec<String>,
    }

    #[test]
    fn a_save_replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.toml");
        assert_eq!(load::<Sample>(Some(&path)).expect("missing is empty"), Sample::default());
        let state = Sample { items: vec!["a".into(), "b".into()] };
        save(&path, &state).expect("save");
        save(&path, &state).expect("save again");
        assert_eq!(load::<Sample>(Some(&path)).expect("load"), state);
        assert!(!path.with_extension("tmp").exists());
        // A torn temporary from a crash mid-write is simply replaced by the next save.
        std::fs::write(path.with_extension("tmp"), "items = [\"tor").expect("torn");
        save(&path, &Sample { items: vec!["c".into()] }).expect("save over a torn temporary");
        assert_eq!(load::<Sample>(Some(&path)).expect("load").items, vec!["c".to_owned()]);
        std::fs::write(&path, "items = [").expect("corrupt");
        let e = load::<Sample>(Some(&path)).expect_err("a corrupt file is an error, not empty state");
        assert!(e.to_string().contains("state.toml"), "{e}");
    }
}
