//! `[access]` and the access keys of each service: who may reach which service (allow and deny
//! lists by address, a relay-wide default), which proxies' `X-Forwarded-For` an HTTP service
//! believes, and where the access log goes.
//!
//! The rules live apart from [`Service`](super::Service): a reload that changes them applies to the
//! next connection, request or datagram, and does not retire the connections already open.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use sallyport_runtime::config::{self as conf, ConfigError};
use serde::Deserialize;

use crate::access::{
    auth::Auth,
    bandwidth::ByteRate,
    log::Destination,
    rates::{Counted, Rate},
    Rules,
};

/// The access log's rotation size when `log_max_bytes` is not set.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 100 << 20;
/// Old access log files kept when `log_keep` is not set.
pub const DEFAULT_LOG_KEEP: u32 = 5;

/// `[access]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccess {
    default: Option<Vec<String>>,
    connections_per_second: Option<u32>,
    connection_burst: Option<u32>,
    requests_per_second: Option<u32>,
    request_burst: Option<u32>,
    #[serde(default)]
    agent_bandwidth: BTreeMap<String, String>,
    log: Option<String>,
    log_max_bytes: Option<String>,
    log_keep: Option<u32>,
}

/// Rates per client address as written (in `[access]` for every service, or in one service).
#[derive(Debug, Default, Clone)]
pub(crate) struct RawRates {
    pub(crate) connections_per_second: Option<u32>,
    pub(crate) connection_burst: Option<u32>,
    pub(crate) requests_per_second: Option<u32>,
    pub(crate) request_burst: Option<u32>,
}

/// The access keys of one service as written.
#[derive(Debug, Default, Clone)]
pub(crate) struct RawServiceAccess {
    pub(crate) access: Option<Vec<String>>,
    pub(crate) trusted_proxies: Option<Vec<String>>,
    pub(crate) rates: RawRates,
    pub(crate) auth: Option<super::auth::RawAuth>,
    pub(crate) bandwidth: Option<String>,
    pub(crate) bandwidth_burst: Option<String>,
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
    /// Each agent's bandwidth cap (`agent_bandwidth`), across its services.
    pub agent_bandwidth: BTreeMap<String, ByteRate>,
    /// The rates of a service that sets none of its own.
    pub default_connections: Option<Rate>,
    pub default_requests: Option<Rate>,
}

/// One service's access keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceAccess {
    /// Its own rules (`access`), in place of the default.
    pub rules: Option<Rules>,
    /// HTTP services: the proxies whose `X-Forwarded-For` names the client (`trusted_proxies`).
    pub trusted_proxies: Option<Rules>,
    /// New connections (or UDP flows) per second per client host (`connections_per_second`,
    /// `connection_burst`).
    pub connections: Option<Rate>,
    /// HTTP requests per second per client host (`requests_per_second`, `request_burst`).
    pub requests: Option<Rate>,
    /// HTTP services: the login in front (`[services.NAME.auth]`).
    pub auth: Option<std::sync::Arc<Auth>>,
    /// Bytes per second each way (`bandwidth`, `bandwidth_burst`).
    pub bandwidth: Option<ByteRate>,
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

    /// The bandwidth cap of `service`.
    pub fn bandwidth(&self, service: &str) -> Option<ByteRate> {
        self.services.get(service).and_then(|s| s.bandwidth)
    }

    /// The bandwidth cap of `agent`, across its services.
    pub fn agent_bandwidth(&self, agent: &str) -> Option<ByteRate> {
        self.agent_bandwidth.get(agent).copied()
    }

    /// The login in front of `service`.
    pub fn auth(&self, service: &str) -> Option<&std::sync::Arc<Auth>> {
        self.services.get(service).and_then(|s| s.auth.as_ref())
    }

    /// The proxies `service` believes.
    pub fn trusted_proxies(&self, service: &str) -> Option<&Rules> {
        self.services.get(service).and_then(|s| s.trusted_proxies.as_ref())
    }

    /// The rate `service` holds each client host to for `counted`.
    pub fn rate(&self, service: &str, counted: Counted) -> Option<Rate> {
        let own = self.services.get(service);
        match counted {
            Counted::Connections => own.and_then(|s| s.connections).or(self.default_connections),
            Counted::Requests => own.and_then(|s| s.requests).or(self.default_requests),
        }
    }

    /// What the status page says of who may reach `service`: its rules, then `login`, `rate` and
    /// `cap` (a bandwidth cap of its own) when it has them (`own:2,login,rate,cap`: one word).
    pub fn summary(&self, service: &str) -> String {
        let mut words = vec![self.describe(service)];
        if self.auth(service).is_some() {
            words.push("login".into());
        }
        if self.rate(service, Counted::Connections).is_some()
            || self.rate(service, Counted::Requests).is_some()
        {
            words.push("rate".into());
        }
        if self.bandwidth(service).is_some() {
            words.push("cap".into());
        }
        words.join(",")
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
        let rates = RawRates {
            connections_per_second: raw.connections_per_second,
            connection_burst: raw.connection_burst,
            requests_per_second: raw.requests_per_second,
            request_burst: raw.request_burst,
        };
        let (default_connections, default_requests) = rates.parse(path, "access")?;
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
            let section = format!("services.{name}");
            let (connections, requests) = raw.rates.parse(path, &section)?;
            let wrong = if is_http {
                connections.map(|_| "connections_per_second")
            } else {
                requests.map(|_| "requests_per_second")
            };
            if let Some(key) = wrong {
                let why = if is_http {
                    "an HTTP service (hosts) counts requests: set requests_per_second"
                } else {
                    "only HTTP services (hosts) count requests: set connections_per_second"
                };
                return Err(ConfigError::invalid(path, format!("{section}.{key}"), why));
            }
            let auth = raw.auth.map(|a| a.parse(path, &name, is_http)).transpose()?.map(std::sync::Arc::new);
            let bandwidth = match (raw.bandwidth.as_deref(), raw.bandwidth_burst.as_deref()) {
                (None, None) => None,
                (None, Some(_)) => {
                    return Err(ConfigError::invalid(
                        path,
                        format!("{section}.bandwidth_burst"),
                        "a burst needs a cap: set bandwidth",
                    ))
                }
                (Some(rate), burst) => Some(super::bandwidth::parse(
                    path,
                    (&format!("{section}.bandwidth"), rate),
                    (&format!("{section}.bandwidth_burst"), burst),
                )?),
            };
            let entry = ServiceAccess { rules: own, trusted_proxies, connections, requests, auth, bandwidth };
            if entry != ServiceAccess::default() {
                by_service.insert(name, entry);
            }
        }
        let mut agent_bandwidth = BTreeMap::new();
        for (agent, rate) in &raw.agent_bandwidth {
            let key = format!("access.agent_bandwidth.{agent}");
            let cap = super::bandwidth::parse(path, (&key, rate), (&key, None))?;
            agent_bandwidth.insert(agent.clone(), cap);
        }
        Ok(Self {
            default,
            services: by_service,
            log,
            agent_bandwidth,
            default_connections,
            default_requests,
        })
    }
}

impl RawRates {
    /// The connection and request rates of `section`, each with its burst (twice the rate unless
    /// set).
    fn parse(&self, path: &Path, section: &str) -> Result<(Option<Rate>, Option<Rate>), ConfigError> {
        let one = |(rate_key, rate): (&str, Option<u32>), (burst_key, burst): (&str, Option<u32>)| {
            let key = |k: &str| format!("{section}.{k}");
            let Some(rate) = rate else {
                return match burst {
                    Some(_) => Err(ConfigError::invalid(
                        path,
                        key(burst_key),
                        format!("a burst needs a rate: set {rate_key}"),
                    )),
                    None => Ok(None),
                };
            };
            let per_second = std::num::NonZeroU32::new(rate).filter(|r| r.get() <= 1_000_000).ok_or_else(|| {
                ConfigError::invalid(path, key(rate_key), format!("{rate} is out of range 1..=1000000 (to refuse every client, use access = [\"deny all\"])"))
            })?;
            let burst = burst.unwrap_or(rate.saturating_mul(2));
            let burst = std::num::NonZeroU32::new(burst)
                .ok_or_else(|| ConfigError::invalid(path, key(burst_key), "0 is out of range: at least 1"))?;
            Ok(Some(Rate { per_second, burst }))
        };
        Ok((
            one(
                ("connections_per_second", self.connections_per_second),
                ("connection_burst", self.connection_burst),
            )?,
            one(("requests_per_second", self.requests_per_second), ("request_burst", self.request_burst))?,
        ))
    }
}
