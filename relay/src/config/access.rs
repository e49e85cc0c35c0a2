//! `[access]` and the access keys of each service: who may reach which service (allow and deny
//! lists by address, a relay-wide default), which proxies' `X-Forwarded-For` an HTTP service
//! believes, and where the access log goes.
//!
//! The rules live apart from [`Service`](super::Service): a reload that changes them applies to the
//! next connection, request or datagram, and does not retire the connections already open.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use sallyport_runtime::config::{self as conf, ConfigError};
use serde::Deserialize;

use crate::access::{log::Destination, Rules};

/// The access log's rotation size when `log_max_bytes` is not set.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 100 << 20;
/// Old access log files kept when `log_keep` is not set.
pub const DEFAULT_LOG_KEEP: u32 = 5;

/// `[access]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccess {
    default: Option<Vec<String>>,
    log: Option<String>,
    log_max_bytes: Option<String>,
    log_keep: Option<u32>,
}

/// The access keys of one service as written.
#[derive(Debug, Default, Clone)]
pub(crate) struct RawServiceAccess {
    pub(crate) access: Option<Vec<String>>,
    pub(crate) trusted_proxies: Option<Vec<String>>,
}

/// Who may reach what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// The rules of a service that has none of its own; `None`: every address may.
    pub default: Option<Rules>,
    /// Each service's own rules and trusted proxies.
    pub services: BTreeMap<String, ServiceAccess>,
    /// Where the access log goes; `None`: no access log.
    pub log: Option<Destination>,
}

/// One service's access keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceAccess {
    /// Its own rules (`access`), in place of the default.
    pub rules: Option<Rules>,
    /// HTTP services: the proxies whose `X-Forwarded-For` names the client (`trusted_proxies`).
    pub trusted_proxies: Option<Rules>,
}

impl Access {
    /// Whether `ip` may reach `service`: its own rules, else the default, else yes.
    pub fn admits(&self, service: &str, ip: IpAddr) -> bool {
        self.rules(service).is_none_or(|rules| rules.admits(ip))
    }

    /// The rules `service` is held to.
    pub fn rules(&self, service: &str) -> Option<&Rules> {
        self.services.get(service).and_then(|s| s.rules.as_ref()).or(self.default.as_ref())
    }

    /// The proxies `service` believes.
    pub fn trusted_proxies(&self, service: &str) -> Option<&Rules> {
        self.services.get(service).and_then(|s| s.trusted_proxies.as_ref())
    }

    /// What the status page says of `service`'s rules: `own:N`, `default:N` or `open`.
    pub fn describe(&self, service: &str) -> String {
        match (self.services.get(service).and_then(|s| s.rules.as_ref()), &self.default) {
            (Some(own), _) => format!("own:{}", own.len()),
            (None, Some(default)) => format!("default:{}", default.len()),
            (None, None) => "open".to_owned(),
        }
    }

    pub(crate) fn from_raw(
        path: &Path,
        raw: Option<RawAccess>,
        services: BTreeMap<String, (RawServiceAccess, bool)>,
    ) -> Result<Self, ConfigError> {
        let raw = raw.unwrap_or_default();
        let rules = |key: String, lines: &[String]| {
            Rules::parse(lines).map_err(|e| ConfigError::invalid(path, key, e.to_string()))
        };
        let default = raw.default.as_deref().map(|d| rules("access.default".into(), d)).transpose()?;
        let log = match raw.log.as_deref() {
            None => {
                for (key, set) in [
                    ("access.log_max_bytes", raw.log_max_bytes.is_some()),
                    ("access.log_keep", raw.log_keep.is_some()),
                ] {
                    if set {
                        return Err(ConfigError::invalid(
                            path,
                            key,
                            "there is no access log to rotate: set access.log",
                        ));
                    }
                }
                None
            }
            Some("stdout") => Some(Destination::Stdout),
            Some("") => {
                return Err(ConfigError::invalid(path, "access.log", "write \"stdout\" or a file's path"))
            }
            Some(file) => {
                let max_bytes = match raw.log_max_bytes.as_deref() {
                    None => DEFAULT_LOG_MAX_BYTES,
                    Some(text) => conf::parse_size(text).map_err(|e| {
                        ConfigError::invalid(path, "access.log_max_bytes", format!("{text:?}: {e}"))
                    })?,
                };
                if max_bytes < 4096 {
                    return Err(ConfigError::invalid(path, "access.log_max_bytes", "at least 4KiB"));
                }
                let keep = raw.log_keep.unwrap_or(DEFAULT_LOG_KEEP);
                if keep > 1000 {
                    return Err(ConfigError::invalid(
                        path,
                        "access.log_keep",
                        format!("{keep} is out of range 0..=1000"),
                    ));
                }
                Some(Destination::File { path: conf::resolve(path, Path::new(file)), max_bytes, keep })
            }
        };
        let mut by_service = BTreeMap::new();
        for (name, (raw, is_http)) in services {
            let own =
                raw.access.as_deref().map(|r| rules(format!("services.{name}.access"), r)).transpose()?;
            let key = format!("services.{name}.trusted_proxies");
            let trusted_proxies = match raw.trusted_proxies.as_deref() {
                None => None,
                Some(_) if !is_http => {
                    return Err(ConfigError::invalid(
                        path,
                        key,
                        "only HTTP services (hosts) read X-Forwarded-For: other kinds see the connection's source only",
                    ))
                }
                Some(lines) => Some(Rules::networks(lines).map_err(|e| ConfigError::invalid(path, key, e.to_string()))?),
            };
            if own.is_some() || trusted_proxies.is_some() {
                by_service.insert(name, ServiceAccess { rules: own, trusted_proxies });
            }
        }
        Ok(Self { default, services: by_service, log })
    }
}
