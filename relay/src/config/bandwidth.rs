//! Bandwidth caps as written: `bandwidth = "2MiB"` (bytes per second, each way) with an optional
//! `bandwidth_burst`, in a TCP or HTTPS service, and `[access] agent_bandwidth = { NAME = "50MiB" }`.

use std::{num::NonZeroU32, path::Path};

use sallyport_runtime::config::{self as conf, ConfigError};

use crate::access::bandwidth::ByteRate;

/// Reads a cap (`rate` at `key`) and its burst (`burst_key`).
pub(crate) fn parse(
    path: &Path,
    (key, rate): (&str, &str),
    (burst_key, burst): (&str, Option<&str>),
) -> Result<ByteRate, ConfigError> {
    let size = |key: &str, text: &str| {
        let bytes =
            conf::parse_size(text).map_err(|e| ConfigError::invalid(path, key, format!("{text:?}: {e}")))?;
        u32::try_from(bytes).ok().and_then(NonZeroU32::new).filter(|b| b.get() >= 1024).ok_or_else(|| {
            ConfigError::invalid(
                path,
                key,
                format!("{text:?} is out of range 1KiB..4GiB (bytes per second each way)"),
            )
        })
    };
    let per_second = size(key, rate)?;
    match burst {
        None => Ok(ByteRate::with_default_burst(per_second)),
        Some(text) => Ok(ByteRate { per_second, burst: size(burst_key, text)? }),
    }
}
