//! A service's group: the agents that carry it (`agent` or `agents`), how a client is given to
//! one of them (`strategy`), and the health check each runs next to its target (`[services.NAME.health]`).
//! Kept apart from `Service`, so a reload that changes them retires no connection.

use std::{path::Path, time::Duration};

use sallyport_runtime::config::{self as conf, ConfigError, HumanDuration};
use serde::Deserialize;

/// The agents of one service and how clients are spread over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The agents allowed to carry the service, in the order written (failover's order).
    pub agents: Vec<String>,
    pub strategy: Strategy,
    /// The check each member runs; `None`: a connected member that offers the service is healthy.
    pub health: Option<Health>,
}

impl Group {
    /// Whether `agent` is a member.
    pub fn has(&self, agent: &str) -> bool {
        self.agents.iter().any(|a| a == agent)
    }
}

/// How a new client connection (or UDP flow) is given to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The first member in the written order that is healthy and not draining.
    Failover,
    /// Each member in turn.
    RoundRobin,
    /// The member carrying the fewest connections of the service now.
    LeastConnections,
    /// The same client address goes to the same member while that member is healthy (for apps
    /// that keep session state); rendezvous hashing, so a member leaving moves only its clients.
    ClientAddress,
}

impl Strategy {
    pub const WORDS: &'static str = "failover, round-robin, least-connections or client-address";

    pub fn word(self) -> &'static str {
        match self {
            Self::Failover => "failover",
            Self::RoundRobin => "round-robin",
            Self::LeastConnections => "least-connections",
            Self::ClientAddress => "client-address",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "failover" => Self::Failover,
            "round-robin" => Self::RoundRobin,
            "least-connections" => Self::LeastConnections,
            "client-address" => Self::ClientAddress,
            _ => return None,
        })
    }
}

/// The health check of a group's members, run by each agent next to its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub check: sallyport_proto::CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failures in a row that take a member out.
    pub fall: u8,
    /// Successes in a row that bring it back.
    pub rise: u8,
}

impl Health {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    pub const DEFAULT_FALL: u8 = 2;
    pub const DEFAULT_RISE: u8 = 2;

    /// The check as sent to an agent for `service`.
    pub fn for_service(&self, service: &str) -> sallyport_proto::HealthCheck {
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        sallyport_proto::HealthCheck {
            service: service.to_owned(),
            kind: self.check.clone(),
            interval_ms: ms(self.interval),
            timeout_ms: ms(self.timeout),
            fall: self.fall,
            rise: self.rise,
        }
    }
}

/// `[services.NAME.health]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    /// `tcp`, `http`, `https` or `container`.
    pub(crate) check: String,
    pub(crate) path: Option<String>,
    pub(crate) status: Option<u16>,
    pub(crate) interval: Option<HumanDuration>,
    pub(crate) timeout: Option<HumanDuration>,
    pub(crate) fall: Option<u8>,
    pub(crate) rise: Option<u8>,
}

/// What the service's table says of its group.
pub(crate) struct RawGroup {
    pub(crate) agent: Option<String>,
    pub(crate) agents: Option<Vec<String>>,
    pub(crate) strategy: Option<String>,
    pub(crate) health: Option<RawHealth>,
}

impl Group {
    /// Validates the group of service table `key` (`services.NAME`); `udp`: the service is a UDP
    /// port, whose targets only a container check can look at.
    pub(crate) fn from_raw(path: &Path, key: &str, raw: RawGroup, udp: bool) -> Result<Self, ConfigError> {
        let agents = match (raw.agent, raw.agents) {
            (Some(agent), None) => vec![conf::name(path, &format!("{key}.agent"), &agent)?],
            (None, Some(agents)) => {
                let at = format!("{key}.agents");
                if agents.is_empty() {
                    return Err(ConfigError::invalid(path, at, "name at least one agent"));
                }
                let mut out: Vec<String> = Vec::new();
                for agent in &agents {
                    let agent = conf::name(path, &at, agent)?;
                    if out.contains(&agent) {
                        return Err(ConfigError::invalid(
                            path,
                            at,
                            format!("agent {agent:?} is named twice"),
                        ));
                    }
                    out.push(agent);
                }
                out
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    path,
                    key,
                    "set `agent` (one agent) or `agents` (a group), not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    path,
                    key,
                    "name the agent that carries it: `agent = \"NAME\"`, or `agents = [...]` for a group",
                ))
            }
        };
        let strategy = match raw.strategy.as_deref() {
            None => Strategy::Failover,
            Some(word) => Strategy::parse(word).ok_or_else(|| {
                ConfigError::invalid(
                    path,
                    format!("{key}.strategy"),
                    format!("{word:?} is not a strategy: expected {}", Strategy::WORDS),
                )
            })?,
        };
        let health = raw.health.map(|h| health(path, &format!("{key}.health"), h, udp)).transpose()?;
        Ok(Self { agents, strategy, health })
    }
}

fn health(path: &Path, key: &str, raw: RawHealth, udp: bool) -> Result<Health, ConfigError> {
    let at = |k: &str| format!("{key}.{k}");
    let http = |tls| -> Result<sallyport_proto::CheckKind, ConfigError> {
        let path_ = raw.path.clone().unwrap_or_else(|| "/".to_owned());
        if !path_.starts_with('/') || path_.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err(ConfigError::invalid(
                path,
                at("path"),
                format!("{path_:?}: expected an absolute path such as \"/healthz\""),
            ));
        }
        let status = raw.status.unwrap_or(200);
        if !(100..=599).contains(&status) {
            return Err(ConfigError::invalid(path, at("status"), format!("{status} is not an HTTP status")));
        }
        Ok(sallyport_proto::CheckKind::Http { path: path_, status, tls })
    };
    let check = match raw.check.as_str() {
        "tcp" => sallyport_proto::CheckKind::Tcp,
        "http" => http(false)?,
        "https" => http(true)?,
        "container" => sallyport_proto::CheckKind::Container,
        other => {
            return Err(ConfigError::invalid(
                path,
                at("check"),
                format!("{other:?} is not a check: expected tcp, http, https or container"),
            ))
        }
    };
    if udp && check != sallyport_proto::CheckKind::Container {
        return Err(ConfigError::invalid(
            path,
            at("check"),
            format!(
                "a {} check cannot look at a UDP target: use check = \"container\" (its container runs), \
                 or no health check",
                raw.check
            ),
        ));
    }
    if !matches!(check, sallyport_proto::CheckKind::Http { .. }) {
        for (name, set) in [("path", raw.path.is_some()), ("status", raw.status.is_some())] {
            if set {
                return Err(ConfigError::invalid(path, at(name), "only http and https checks take it"));
            }
        }
    }
    let interval = conf::within(
        path,
        &at("interval"),
        raw.interval.map_or(Health::DEFAULT_INTERVAL, Duration::from),
        Duration::from_millis(100)..=Duration::from_secs(3600),
    )?;
    let timeout = conf::within(
        path,
        &at("timeout"),
        raw.timeout.map_or(Health::DEFAULT_TIMEOUT.min(interval), Duration::from),
        Duration::from_millis(10)..=interval,
    )?;
    let count = |name: &str, value: Option<u8>, default: u8| -> Result<u8, ConfigError> {
        let value = value.unwrap_or(default);
        if !(1..=10).contains(&value) {
            return Err(ConfigError::invalid(path, at(name), format!("{value} is out of range (1 to 10)")));
        }
        Ok(value)
    };
    Ok(Health {
        check,
        interval,
        timeout,
        fall: count("fall", raw.fall, Health::DEFAULT_FALL)?,
        rise: count("rise", raw.rise, Health::DEFAULT_RISE)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(agent: Option<&str>, agents: Option<&[&str]>, strategy: Option<&str>) -> Result<Group, String> {
        let raw = RawGroup {
            agent: agent.map(str::to_owned),
            agents: agents.map(|a| a.iter().map(|s| s.to_string()).collect()),
            strategy: strategy.map(str::to_owned),
            health: None,
        };
        Group::from_raw(Path::new("relay.toml"), "services.web", raw, false).map_err(|e| e.to_string())
    }

    fn health_of(text: &str, udp: bool) -> Result<Health, String> {
        let raw: RawHealth = toml::from_str(text).map_err(|e| e.to_string())?;
        health(Path::new("relay.toml"), "services.web.health", raw, udp).map_err(|e| e.to_string())
    }

    #[test]
    fn members_and_strategies() {
        let one = group(Some("winbox"), None, None).expect("one agent");
        assert_eq!((one.agents, one.strategy), (vec!["winbox".to_owned()], Strategy::Failover));
        let two = group(None, Some(&["winbox", "winbox2"]), Some("round-robin")).expect("a group");
        assert_eq!(two.strategy, Strategy::RoundRobin);
        assert!(two.has("winbox2") && !two.has("other"));
        let e = group(None, Some(&["winbox", "winbox"]), None).unwrap_err();
        assert!(e.contains("services.web.agents") && e.contains("\"winbox\" is named twice"), "{e}");
        let e = group(Some("a"), Some(&["b"]), None).unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = group(None, None, None).unwrap_err();
        assert!(e.contains("name the agent"), "{e}");
        let e = group(None, Some(&[]), None).unwrap_err();
        assert!(e.contains("at least one agent"), "{e}");
        let e = group(Some("winbox"), None, Some("random")).unwrap_err();
        assert!(e.contains("services.web.strategy") && e.contains("\"random\" is not a strategy"), "{e}");
    }

    #[test]
    fn health_checks_with_defaults_and_their_refusals() {
        let h = health_of("check = \"http\"\npath = \"/healthz\"", false).expect("http");
        assert_eq!(
            h.check,
            sallyport_proto::CheckKind::Http { path: "/healthz".into(), status: 200, tls: false }
        );
        assert_eq!(
            (h.interval, h.timeout, h.fall, h.rise),
            (Health::DEFAULT_INTERVAL, Health::DEFAULT_TIMEOUT, 2, 2)
        );
        let h = health_of("check = \"tcp\"\ninterval = \"500ms\"", false).expect("tcp");
        assert_eq!(h.timeout, Duration::from_millis(500), "the timeout never exceeds the interval");
        assert!(health_of("check = \"container\"", true).is_ok(), "a UDP service's container");
        let e = health_of("check = \"tcp\"", true).unwrap_err();
        assert!(e.contains("services.web.health.check") && e.contains("UDP target"), "{e}");
        let e = health_of("check = \"ping\"", false).unwrap_err();
        assert!(e.contains("\"ping\" is not a check"), "{e}");
        let e = health_of("check = \"tcp\"\npath = \"/x\"", false).unwrap_err();
        assert!(e.contains("services.web.health.path") && e.contains("only http"), "{e}");
        let e = health_of("check = \"http\"\npath = \"healthz\"", false).unwrap_err();
        assert!(e.contains("absolute path"), "{e}");
        let e = health_of("check = \"http\"\nstatus = 99", false).unwrap_err();
        assert!(e.contains("not an HTTP status"), "{e}");
        let e = health_of("check = \"tcp\"\ninterval = \"1s\"\ntimeout = \"2s\"", false).unwrap_err();
        assert!(e.contains("services.web.health.timeout"), "{e}");
        let e = health_of("check = \"tcp\"\nfall = 0", false).unwrap_err();
        assert!(e.contains("services.web.health.fall"), "{e}");
    }
}
