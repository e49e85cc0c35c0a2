//! What relay and agent configuration loading share: reading a TOML file into a raw model, human
//! durations, and errors that name the file, the key and the reason.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{de::DeserializeOwned, Deserialize};

/// A configuration that could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// Syntax or type errors; toml's message points at the line and key.
    #[error("{}: {source}", path.display())]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("{}: key `{key}`: {reason}", path.display())]
    Invalid { path: PathBuf, key: String, reason: String },
}

impl ConfigError {
    pub fn invalid(path: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid { path: path.to_owned(), key: key.into(), reason: reason.into() }
    }
}

/// Reads and parses `path` into the raw model `T` (which should use `deny_unknown_fields`).
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse_toml(&text, path)
}

/// Parses `text` as if read from `path`.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
}

/// Resolves a path from a config file against the file's directory.
pub fn resolve(config_path: &Path, value: &Path) -> PathBuf {
    if value.is_absolute() {
        return value.to_owned();
    }
    config_path.parent().unwrap_or(Path::new(".")).join(value)
}

/// A duration written the human way: `"30s"`, `"250ms"`, `"1h 30m"`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct HumanDuration(pub Duration);

impl TryFrom<String> for HumanDuration {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| format!("expected a duration like \"30s\" or \"250ms\", got {text:?} ({e})"))
    }
}

impl fmt::Debug for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl From<HumanDuration> for Duration {
    fn from(value: HumanDuration) -> Self {
        value.0
    }
}

/// Checks that a duration lies within `min..=max`, naming the key otherwise.
pub fn duration_in(
    path: &Path,
    key: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::invalid(
            path,
            key,
            format!(
                "{} is out of range: expected between {} and {}",
                humantime::format_duration(value),
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(value)
}

/// Checks a service or agent name, naming the key otherwise.
pub fn name(path: &Path, key: &str, value: &str) -> Result<String, ConfigError> {
    if !sallyport_proto::is_valid_name(value) {
        return Err(ConfigError::invalid(
            path,
            key,
            format!("{value:?} is not a valid name: use 1-63 of a-z, 0-9 and '-', not at either end"),
        ));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_errors_say_what_was_expected() {
        assert_eq!(HumanDuration::try_from("250ms".to_owned()).map(|d| d.0), Ok(Duration::from_millis(250)));
        assert_eq!(HumanDuration::try_from("1m 30s".to_owned()).map(|d| d.0), Ok(Duration::from_secs(90)));
        let err = HumanDuration::try_from("soon".to_owned()).err().unwrap_or_default();
        assert!(err.contains("expected a duration") && err.contains("soon"), "{err}");
    }

    #[test]
    fn out_of_range_names_file_and_key() {
        let err = duration_in(
            Path::new("/etc/x.toml"),
            "relay.idle_timeout",
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::from_secs(3),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.starts_with("/etc/x.toml: key `relay.idle_timeout`: 1s is out of range"), "{err}");
    }
}
