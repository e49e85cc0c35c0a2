//! Configuration keys declared once. One [`config_section!`](crate::config_section) row says all
//! there is to say of a key: its documentation, its type, its default, what the file writes (the
//! raw type), the rule that checks it (bounds, a parser, a path) and whether a reload applies it.
//! From the rows come the section's raw serde model (unknown keys refused), its typed struct and
//! `Default`, the reading with errors naming file and key, the reload's refusal of restart-only
//! keys (values compared, not their text) and the documentation table.

use std::{
    net::SocketAddr,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

/// When a changed key takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// A reload applies it (from the next connection on).
    Live,
    /// Only a restart applies it: a reload that changes it is refused.
    Restart,
}

/// What the documentation says of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDoc {
    /// `section.key`.
    pub key: &'static str,
    /// Its doc comment, one line.
    pub doc: String,
    /// Its default as the file would write it (or `required`, or what derives it).
    pub default: String,
    /// What the file may write.
    pub accepted: String,
    pub reload: Reload,
}

/// A value as a configuration file writes it.
pub trait Shown {
    fn shown(&self) -> String;
}

impl Shown for Duration {
    fn shown(&self) -> String {
        // In the largest unit that writes it whole, as the file would (humantime reads them all).
        let (secs, nanos) = (self.as_secs(), self.subsec_nanos());
        if nanos != 0 {
            return match nanos % 1_000_000 {
                0 => format!("{}ms", self.as_millis()),
                _ => humantime::format_duration(*self).to_string().replace(' ', ""),
            };
        }
        match secs {
            0 => "0s".to_owned(),
            s if s % 86_400 == 0 => format!("{}d", s / 86_400),
            s if s % 3_600 == 0 => format!("{}h", s / 3_600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    }
}

macro_rules! shown_by_display {
    ($($t:ty),*) => {$(
        impl Shown for $t {
            fn shown(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
shown_by_display!(usize, u64, u32, u16, bool, String, SocketAddr);

impl Shown for PathBuf {
    fn shown(&self) -> String {
        self.display().to_string()
    }
}

impl<T: Shown> Shown for Option<T> {
    fn shown(&self) -> String {
        self.as_ref().map_or_else(|| "none".to_owned(), Shown::shown)
    }
}

impl<T: Shown> Shown for Vec<T> {
    fn shown(&self) -> String {
        format!("[{}]", self.iter().map(Shown::shown).collect::<Vec<_>>().join(", "))
    }
}

/// `min to max` (or `at least min`), for the documentation.
pub fn range_text<T: Shown + PartialEq>(range: &RangeInclusive<T>, unbounded: Option<&T>) -> String {
    if unbounded == Some(range.end()) {
        format!("at least {}", range.start().shown())
    } else {
        format!("{} to {}", range.start().shown(), range.end().shown())
    }
}

/// A count's "no upper bound" and a duration's, for [`range_text`].
pub trait Unbounded: Sized {
    const MAX: Option<Self>;
}

impl Unbounded for usize {
    const MAX: Option<Self> = Some(usize::MAX);
}

impl Unbounded for Duration {
    const MAX: Option<Self> = None;
}

/// A path the file writes, resolved against the file's folder.
pub fn path(config: &Path, raw: Option<PathBuf>) -> Option<PathBuf> {
    raw.map(|p| crate::config::resolve(config, &p))
}

/// A path the file must write, resolved against the file's folder.
pub fn required_path(
    section: &crate::config::Section<'_>,
    key: &str,
    raw: Option<PathBuf>,
) -> Result<PathBuf, crate::config::ConfigError> {
    match raw {
        Some(p) => Ok(crate::config::resolve(section.path(), &p)),
        None => Err(crate::config::ConfigError::invalid(
            section.path(),
            section.key(key),
            "missing: this key is required",
        )),
    }
}

/// The documentation table of `keys`: key, default, what the file may write, reload, meaning.
pub fn markdown(keys: &[KeyDoc]) -> String {
    let mut out =
        String::from("| key | default | accepted | a reload | what it does |\n|---|---|---|---|---|\n");
    for k in keys {
        let reload = match k.reload {
            Reload::Live => "applies",
            Reload::Restart => "needs a restart",
        };
        let cell = |s: &str| s.replace('|', "\\|");
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            k.key,
            cell(&k.default),
            cell(&k.accepted),
            reload,
            cell(&k.doc)
        ));
    }
    out
}

/// A guide's key table that is not the one the declarations make.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the table between {begin} and {end} must read:\n{table}")]
pub struct GuideDiffers {
    pub begin: String,
    pub end: String,
    /// The table the declarations make.
    pub table: String,
}

/// Whether `guide` holds, between `<!-- [SECTION] keys: made from SOURCE -->` and
/// `<!-- end of [SECTION] keys -->`, the table `keys` make; if not, what it should hold.
pub fn guide_lists(guide: &str, section: &str, source: &str, keys: &[KeyDoc]) -> Result<(), GuideDiffers> {
    let (begin, end) = (
        format!("<!-- [{section}] keys: made from {source} -->"),
        format!("<!-- end of [{section}] keys -->"),
    );
    let written =
        guide.split_once(&begin).and_then(|(_, rest)| rest.split_once(&end)).map(|(table, _)| table.trim());
    let table = markdown(keys);
    if written == Some(table.trim()) {
        return Ok(());
    }
    Err(GuideDiffers { begin, end, table })
}

/// Declares the keys of one TOML table of a configuration file. Each row:
///
/// ```text
/// /// What it does (one line or more: the documentation's cell).
/// name: TypedType = default_expression, from RawType, rule, live|restart;
/// ```
///
/// A default that depends on the machine (or reads badly as a value) says how it is made:
/// `name: T = expression, shown "half the cores", from R, rule, reload;`.
///
/// Rules: `within(RANGE)` (bounds; the raw value converts `Into` the typed one), `parsed("what")`
/// (`FromStr` of a string), `size` (a byte size like `"512MiB"`), `value("what")` (taken as
/// written), `path` (optional, resolved against the file's folder), `required_path` (the same,
/// required), `custom(FUNCTION, "what")` (`FUNCTION(&section, key, raw, default)`).
///
/// Generates `pub struct $typed` (with `Default` from the defaults), `pub struct $raw` (serde,
/// unknown keys refused), `$typed::read(&raw, path)`, `$typed::keys()` (the documentation) and
/// `$typed::restart_needed(&old, &new)` (the first restart-only key whose value changed).
#[macro_export]
macro_rules! config_section {
    (
        $(#[$meta:meta])*
        $vis:vis struct $typed:ident from $raw:ident in $section:literal {
            $(
                $(#[doc = $doc:literal])*
                $name:ident : $ty:ty = $default:expr, $(shown $shown:literal,)? from $rawty:ty, $rule:ident $( ( $($arg:expr),* ) )?, $reload:ident;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        $vis struct $typed {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        /// The table as the file writes it.
        #[derive(Debug, Default, ::serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        $vis struct $raw {
            $( pub $name: Option<$rawty>, )*
        }

        impl Default for $typed {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        impl $typed {

            /// The table as written, each absent key from its default, each checked by its rule.
            pub fn read(raw: &$raw, path: &::std::path::Path) -> Result<Self, $crate::config::ConfigError> {
                let section = $crate::config::Section::new(path, $section);
                Ok(Self {
                    $( $name: $crate::__config_key_read!(
                        section, stringify!($name), raw.$name.clone(), $default, $rule $( ( $($arg),* ) )?
                    )?, )*
                })
            }

            /// What the documentation says of each key.
            pub fn keys() -> Vec<$crate::keys::KeyDoc> {
                vec![ $( $crate::keys::KeyDoc {
                    key: concat!($section, ".", stringify!($name)),
                    doc: [$($doc),*].iter().map(|line: &&str| line.trim()).collect::<Vec<_>>().join(" "),
                    default: $crate::__config_key_default!($ty, $default, $rule, $($shown)?),
                    accepted: $crate::__config_key_accepted!($ty, $rule $( ( $($arg),* ) )?),
                    reload: $crate::__config_key_reload!($reload),
                }, )* ]
            }

            /// The first key only a restart applies whose value `new` changes, as `section.key`.
            pub fn restart_needed(&self, new: &Self) -> Option<&'static str> {
                $(
                    if $crate::__config_key_reload!($reload) == $crate::keys::Reload::Restart
                        && self.$name != new.$name
                    {
                        return Some(concat!($section, ".", stringify!($name)));
                    }
                )*
                None
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __config_key_reload {
    (live) => {
        $crate::keys::Reload::Live
    };
    (restart) => {
        $crate::keys::Reload::Restart
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __config_key_read {
    ($s:ident, $key:expr, $raw:expr, $default:expr, within($range:expr)) => {
        $s.bounded($key, $raw, $default, $range)
    };
    ($s:ident, $key:expr, $raw:expr, $default:expr, parsed($what:expr)) => {
        $s.parsed($key, $raw.as_deref(), $default)
    };
    ($s:ident, $key:expr, $raw:expr, $default:expr, size) => {
        match $raw.as_deref() {
            None => Ok($default),
            Some(text) => $crate::config::parse_size(text)
                .map_err(|e| $crate::config::ConfigError::invalid($s.path(), $s.key($key), e.to_string())),
        }
    };
    ($s:ident, $key:expr, $raw:expr, $default:expr, value($what:expr)) => {
        Ok::<_, $crate::config::ConfigError>($raw.map(Into::into).unwrap_or($default))
    };
    ($s:ident, $key:expr, $raw:expr, $default:expr, path) => {
        Ok::<_, $crate::config::ConfigError>($crate::keys::path($s.path(), $raw))
    };
    ($s:ident, $key:expr, $raw:expr, $default:expr, required_path) => {
        $crate::keys::required_path(&$s, $key, $raw)
    };
    ($s:ident, $key:expr, $raw:expr, $default:expr, custom($f:expr, $what:expr)) => {
        $f(&$s, $key, $raw, $default)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __config_key_default {
    ($ty:ty, $default:expr, $rule:ident, $shown:literal) => {
        $shown.to_owned()
    };
    ($ty:ty, $default:expr, required_path,) => {
        "required".to_owned()
    };
    ($ty:ty, $default:expr, $rule:ident,) => {{
        let default: $ty = $default;
        $crate::keys::Shown::shown(&default)
    }};
}

#[doc(hidden)]
#[macro_export]
macro_rules! __config_key_accepted {
    ($ty:ty, within($range:expr)) => {
        $crate::keys::range_text(&$range, <$ty as $crate::keys::Unbounded>::MAX.as_ref())
    };
    ($ty:ty, parsed($what:expr)) => {
        ($what).to_owned()
    };
    ($ty:ty, size) => {
        "a size like \"512MiB\"".to_owned()
    };
    ($ty:ty, value($what:expr)) => {
        ($what).to_owned()
    };
    ($ty:ty, path) => {
        "a path, relative to the file's folder".to_owned()
    };
    ($ty:ty, required_path) => {
        "a path, relative to the file's folder".to_owned()
    };
    ($ty:ty, custom($f:expr, $what:expr)) => {
        ($what).to_owned()
    };
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    crate::config_section! {
        /// A section for the tests.
        pub struct Sample from RawSample in "sample" {
            /// How long to wait.
            wait: Duration = SECOND * 10, from crate::config::HumanDuration, within(SECOND..=SECOND * 60), restart;
            /// How many at most.
            most: usize = 8, from usize, within(1..=usize::MAX), live;
            /// Where the key is.
            key: PathBuf = PathBuf::new(), from PathBuf, required_path, restart;
            /// Where to listen.
            listen: Option<SocketAddr> = None, from SocketAddr, value("an address host:port"), live;
        }
    }

    fn read(text: &str) -> Result<Sample, crate::config::ConfigError> {
        #[derive(serde::Deserialize)]
        struct File {
            sample: RawSample,
        }
        let file: File = crate::config::parse_toml(text, Path::new("/etc/s.toml"))?;
        Sample::read(&file.sample, Path::new("/etc/s.toml"))
    }

    #[test]
    fn a_row_gives_the_default_the_bounds_the_reload_rule_and_the_documentation() {
        let s = read("[sample]\nkey = \"k.pem\"").expect("valid");
        assert_eq!(
            (s.wait, s.most, s.key.clone(), s.listen),
            (SECOND * 10, 8, PathBuf::from("/etc/k.pem"), None)
        );
        let e = read("[sample]\nkey = \"k\"\nwait = \"2m\"").expect_err("out of bounds").to_string();
        assert!(e.contains("sample.wait") && e.contains("between 1s and 1m"), "{e}");
        let e = read("[sample]\nwait = \"2s\"").expect_err("required").to_string();
        assert!(e.contains("sample.key") && e.contains("required"), "{e}");
        let e = read("[sample]\nkey = \"k\"\nnope = 1").expect_err("unknown").to_string();
        assert!(e.contains("nope"), "{e}");
        let mut changed = s.clone();
        changed.most = 9;
        assert_eq!(s.restart_needed(&changed), None, "a live key");
        changed.wait = SECOND;
        assert_eq!(s.restart_needed(&changed), Some("sample.wait"));
        let table = markdown(&Sample::keys());
        assert!(
            table.contains("| `sample.wait` | 10s | 1s to 1m | needs a restart | How long to wait. |"),
            "{table}"
        );
        assert!(
            table.contains("| `sample.most` | 8 | at least 1 | applies | How many at most. |"),
            "{table}"
        );
        assert!(table.contains("| `sample.key` | required |"), "{table}");
    }
}
