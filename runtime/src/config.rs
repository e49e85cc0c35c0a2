//! What relay and agent configuration loading share: reading a TOML file into a raw model, human
//! durations, and errors that name the file, the key and the reason.

use std::{
    fmt,
    ops::RangeInclusive,
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

/// A value a config key bounds: a count or a duration.
pub trait Bounded: PartialOrd + Copy {
    /// Why `self` lies outside `min..=max`.
    fn out_of_range(self, min: Self, max: Self) -> String;
}

impl Bounded for Duration {
    fn out_of_range(self, min: Self, max: Self) -> String {
        format!(
            "{} is out of range: expected between {} and {}",
            humantime::format_duration(self),
            humantime::format_duration(min),
            humantime::format_duration(max)
        )
    }
}

impl Bounded for usize {
    fn out_of_range(self, min: Self, max: Self) -> String {
        if max == usize::MAX {
            format!("must be at least {min}")
        } else {
            format!("{self} is out of range ({min} to {max})")
        }
    }
}

/// The one bounds check every numeric key goes through: `value` within `bounds`, or an error that
/// names the file and the key.
pub fn within<T: Bounded>(
    path: &Path,
    key: &str,
    value: T,
    bounds: RangeInclusive<T>,
) -> Result<T, ConfigError> {
    let (min, max) = bounds.into_inner();
    if value < min || value > max {
        return Err(ConfigError::invalid(path, key, value.out_of_range(min, max)));
    }
    Ok(value)
}

/// One `[section]` of a file: its keys as written, or the section's defaults, each checked
/// against its bounds by [`within`].
#[derive(Debug, Clone, Copy)]
pub struct Section<'a> {
    path: &'a Path,
    name: &'static str,
}

impl<'a> Section<'a> {
    pub fn new(path: &'a Path, name: &'static str) -> Self {
        Self { path, name }
    }

    /// The file, for errors of its own.
    pub fn path(&self) -> &'a Path {
        self.path
    }

    /// The full key of `key` in this section (`relay.idle_timeout`).
    pub fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.name)
    }

    /// `raw` (or `default` when the key is absent), checked against `bounds`.
    pub fn bounded<T: Bounded, R: Into<T>>(
        &self,
        key: &str,
        raw: Option<R>,
        default: T,
        bounds: RangeInclusive<T>,
    ) -> Result<T, ConfigError> {
        within(self.path, &self.key(key), raw.map_or(default, Into::into), bounds)
    }

    /// `raw` (or `default`) parsed by its `FromStr`, whose error text becomes the reason.
    pub fn parsed<T: std::str::FromStr>(
        &self,
        key: &str,
        raw: Option<&str>,
        default: T,
    ) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        match raw {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|e: T::Err| ConfigError::invalid(self.path, self.key(key), e.to_string())),
        }
    }
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

/// Why a size could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{text:?}: unknown unit {unit:?}; use e.g. \"512MiB\" or \"20GiB\"")]
    Unit { text: String, unit: String },
    #[error("{0:?} is not a size like \"20GiB\"")]
    NotASize(String),
    #[error("{0:?} is out of range")]
    OutOfRange(String),
}

/// Parses a size: bytes, or a number with KiB/MiB/GiB/TiB (powers of 1024) or KB/MB/GB/TB (of 1000).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(SizeError::Unit { text: text.to_owned(), unit: other.to_owned() }),
    };
    let value: f64 = number.parse().map_err(|_| SizeError::NotASize(text.to_owned()))?;
    let bytes = value * multiplier as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(SizeError::OutOfRange(text.to_owned()));
    }
    Ok(bytes as u64)
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
        let path = Path::new("/etc/x.toml");
        let secs = Duration::from_secs;
        let err = within(path, "relay.idle_timeout", secs(1), secs(2)..=secs(3)).map_err(|e| e.to_string());
        assert_eq!(
            err,
            Err("/etc/x.toml: key `relay.idle_timeout`: 1s is out of range: expected between 2s and 3s"
                .into())
        );
        let err = within(path, "relay.udp_max_flows", 0usize, 1..=10).map_err(|e| e.to_string());
        assert_eq!(err, Err("/etc/x.toml: key `relay.udp_max_flows`: 0 is out of range (1 to 10)".into()));
        let err = within(path, "relay.max_incoming", 0usize, 1..=usize::MAX).map_err(|e| e.to_string());
        assert_eq!(err, Err("/etc/x.toml: key `relay.max_incoming`: must be at least 1".into()));
        assert_eq!(within(path, "k", secs(2), secs(2)..=secs(3)).ok(), Some(secs(2)));
    }

    #[test]
    fn a_section_takes_the_default_for_an_absent_key_and_checks_both() {
        let section = Section::new(Path::new("a.toml"), "agent");
        let secs = Duration::from_secs;
        let default = section.bounded("keep_alive", None::<HumanDuration>, secs(5), secs(1)..=secs(9));
        assert_eq!(default.ok(), Some(secs(5)));
        let written = section.bounded("keep_alive", Some(HumanDuration(secs(7))), secs(5), secs(1)..=secs(9));
        assert_eq!(written.ok(), Some(secs(7)));
        let bad = section.bounded("keep_alive", Some(HumanDuration(secs(70))), secs(5), secs(1)..=secs(9));
        assert!(bad.is_err_and(|e| e.to_string().contains("key `agent.keep_alive`: 1m 10s is out of range")));
        let parsed: Result<u8, _> = section.parsed("n", Some("x"), 3);
        assert!(parsed.is_err_and(|e| e.to_string().starts_with("a.toml: key `agent.n`: ")));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "GiB", "12 parsecs", "-1GiB", "0"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
