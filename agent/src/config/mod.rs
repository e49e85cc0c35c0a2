//! `agent.toml`: the raw file model and the validated [`Config`] it is parsed into.
//!
//! The agent owns targets: what each service name means on this machine. The relay only ever sends
//! a service name, so the agent dials nothing but what is declared here.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use sallyport_runtime::{
    config::{self as conf, ConfigError, HumanDuration},
    tls::TlsFiles,
    transport::Congestion,
};
use serde::Deserialize;

use crate::containers::{spec::RawContainer, ContainerSpec, DockerSettings};

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// Every relay the agent keeps a tunnel to.
    pub relays: Vec<RelayAddr>,
    pub tls: TlsFiles,
    pub timing: Timing,
    pub services: BTreeMap<String, Service>,
    pub docker: DockerSettings,
    /// Containers the agent owns, by name.
    pub containers: BTreeMap<String, ContainerSpec>,
    /// A UDP flow with no datagram either way for this long is closed.
    pub udp_flow_idle: Duration,
    /// UDP flows open at once, at most; a new one beyond it closes the oldest.
    pub udp_max_flows: usize,
}

/// Timers of the tunnel and of target dials.
#[derive(Debug, Clone)]
pub struct Timing {
    /// QUIC keep-alive interval: well under NAT and conntrack UDP timeouts (30 s on Linux).
    pub keep_alive: Duration,
    /// A tunnel silent for this long is dead.
    pub idle_timeout: Duration,
    /// Time for the QUIC handshake plus the relay's `Welcome`.
    pub handshake_timeout: Duration,
    /// Time for a target to accept a TCP connection.
    pub connect_timeout: Duration,
    /// First reconnect delay bound; doubles per failed attempt up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Congestion controller of the agent-to-relay direction.
    pub congestion: Congestion,
}

/// A relay address as written (`HOST:PORT`), with the name its certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAddr {
    pub host: String,
    pub port: u16,
    pub server_name: String,
}

impl fmt::Display for RelayAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One service the agent carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub target: Target,
    /// Write a PROXY protocol v2 header to the target first, so it sees the client's address.
    pub proxy_protocol: bool,
}

/// What a service connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `tcp://HOST:PORT`
    Tcp { host: String, port: u16 },
    /// `container://NAME:PORT`: a port of a container declared under `[containers.NAME]`, at the
    /// address the engine gives it (looked up after every start).
    Container { name: String, port: u16 },
    /// `udp://HOST:PORT`: the target of a UDP service.
    Udp { host: String, port: u16 },
    /// `wsl://DISTRO:PORT`: a port inside a WSL2 distribution (Windows agent only): TCP through
    /// localhost forwarding, else the VM's address; UDP through the VM's address.
    Wsl { distro: String, port: u16 },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Self::Container { name, port } => write!(f, "container://{name}:{port}"),
            Self::Udp { host, port } if host.contains(':') => write!(f, "udp://[{host}]:{port}"),
            Self::Udp { host, port } => write!(f, "udp://{host}:{port}"),
            Self::Wsl { distro, port } => write!(f, "wsl://{distro}:{port}"),
        }
    }
}

impl Target {
    /// Whether this target takes UDP flows (`udp://`, `wsl://`).
    pub fn carries_udp(&self) -> bool {
        matches!(self, Self::Udp { .. } | Self::Wsl { .. })
    }

    /// Whether this target takes TCP connections (all but `udp://`).
    pub fn carries_tcp(&self) -> bool {
        !matches!(self, Self::Udp { .. })
    }

    /// Parses `tcp://HOST:PORT`, `udp://HOST:PORT`, `container://NAME:PORT` or
    /// `wsl://DISTRO:PORT`.
    pub fn parse(text: &str) -> Result<Self, String> {
        const EXPECTED: &str =
            "expected tcp://HOST:PORT, udp://HOST:PORT, container://NAME:PORT or wsl://DISTRO:PORT";
        if let Some(rest) = text.strip_prefix("container://") {
            let (name, port) = host_port(rest).map_err(|e| format!("{text:?}: {e}"))?;
            return Ok(Self::Container { name, port });
        }
        if let Some(rest) = text.strip_prefix("udp://") {
            let (host, port) = host_port(rest).map_err(|e| format!("{text:?}: {e}"))?;
            return Ok(Self::Udp { host, port });
        }
        if let Some(rest) = text.strip_prefix("wsl://") {
            let (distro, port) = host_port(rest).map_err(|e| format!("{text:?}: {e}"))?;
            if !is_valid_distro(&distro) {
                return Err(format!("{text:?}: {distro:?} is not a WSL distribution name"));
            }
            return Ok(Self::Wsl { distro, port });
        }
        let Some(rest) = text.strip_prefix("tcp://") else {
            let scheme = text.split_once("://").map_or("", |(s, _)| s);
            return Err(if scheme.is_empty() {
                format!("{text:?} has no scheme: {EXPECTED}")
            } else {
                format!("unsupported target scheme {scheme:?} in {text:?}: {EXPECTED}")
            });
        };
        let (host, port) = host_port(rest).map_err(|e| format!("{text:?}: {e}"))?;
        Ok(Self::Tcp { host, port })
    }
}

/// Splits `HOST:PORT` or `[V6]:PORT`.
fn host_port(text: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or("expected [IPV6]:PORT")?;
        (host, port)
    } else {
        text.rsplit_once(':').ok_or("expected HOST:PORT")?
    };
    if host.is_empty() || host.contains('/') {
        return Err("missing or invalid host".into());
    }
    let port: u16 = port.parse().map_err(|_| format!("invalid port {port:?}"))?;
    if port == 0 {
        return Err("port 0 is not a destination".into());
    }
    Ok((host.to_owned(), port))
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_raw(conf::read_toml(path)?, path)
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::from_raw(conf::parse_toml(text, path)?, path)
    }

    fn from_raw(raw: RawConfig, path: &Path) -> Result<Self, ConfigError> {
        let a = raw.agent;
        if a.relays.is_empty() {
            return Err(ConfigError::invalid(
                path,
                "agent.relays",
                "list at least one relay as \"HOST:PORT\"",
            ));
        }
        let relays = a
            .relays
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let (host, port) = host_port(text).map_err(|e| {
                    ConfigError::invalid(path, format!("agent.relays[{i}]"), format!("{text:?}: {e}"))
                })?;
                let server_name = a.server_name.clone().unwrap_or_else(|| host.clone());
                sallyport_runtime::tls::server_name(&server_name)
                    .map_err(|e| ConfigError::invalid(path, "agent.server_name", e.to_string()))?;
                Ok(RelayAddr { host, port, server_name })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let d = |key: &str, v: HumanDuration, min: u64, max: u64| {
            conf::duration_in(path, key, v.0, Duration::from_millis(min), Duration::from_millis(max))
        };
        let timing = Timing {
            keep_alive: d("agent.keep_alive", a.keep_alive, 100, 600_000)?,
            idle_timeout: d("agent.idle_timeout", a.idle_timeout, 1_000, 3_600_000)?,
            handshake_timeout: d("agent.handshake_timeout", a.handshake_timeout, 100, 300_000)?,
            connect_timeout: d("agent.connect_timeout", a.connect_timeout, 10, 300_000)?,
            reconnect_min: d("agent.reconnect_min", a.reconnect_min, 10, 600_000)?,
            reconnect_max: d("agent.reconnect_max", a.reconnect_max, 10, 3_600_000)?,
            congestion: a
                .congestion
                .parse()
                .map_err(|e| ConfigError::invalid(path, "agent.congestion", e))?,
        };
        if timing.keep_alive * 2 > timing.idle_timeout {
            return Err(ConfigError::invalid(
                path,
                "agent.keep_alive",
                "must be at most half of agent.idle_timeout, or a quiet tunnel is declared dead",
            ));
        }
        if timing.reconnect_min > timing.reconnect_max {
            return Err(ConfigError::invalid(
                path,
                "agent.reconnect_min",
                "must not exceed agent.reconnect_max",
            ));
        }
        let mut containers = BTreeMap::new();
        for (name, raw) in raw.containers {
            let spec = ContainerSpec::from_raw(path, &name, raw)?;
            containers.insert(spec.name.clone(), spec);
        }
        let mut services = BTreeMap::new();
        for (name, s) in raw.services {
            let key = format!("services.{name}");
            let name = conf::name(path, &key, &name)?;
            let target = Target::parse(&s.target)
                .map_err(|e| ConfigError::invalid(path, format!("{key}.target"), e))?;
            if let Target::Container { name: container, .. } = &target {
                if !containers.contains_key(container) {
                    return Err(ConfigError::invalid(
                        path,
                        format!("{key}.target"),
                        format!("no container {container:?} is declared: add [containers.{container}]"),
                    ));
                }
            }
            if matches!(target, Target::Wsl { .. }) && !cfg!(windows) {
                return Err(ConfigError::invalid(
                    path,
                    format!("{key}.target"),
                    "wsl:// targets are for the agent on Windows; an agent inside WSL2 reaches its \
                     own ports as tcp://127.0.0.1:PORT",
                ));
            }
            let proxy_protocol = match s.proxy_protocol.as_deref() {
                None => false,
                Some("v2") if target.carries_tcp() => true,
                Some("v2") => {
                    return Err(ConfigError::invalid(
                        path,
                        format!("{key}.proxy_protocol"),
                        "PROXY protocol headers go to TCP targets only",
                    ))
                }
                Some(other) => {
                    return Err(ConfigError::invalid(
                        path,
                        format!("{key}.proxy_protocol"),
                        format!("{other:?}: the supported version is \"v2\""),
                    ))
                }
            };
            services.insert(name.clone(), Service { name, target, proxy_protocol });
        }
        let docker = match raw.docker {
            None => DockerSettings::default(),
            Some(d) => {
                let defaults = DockerSettings::default();
                DockerSettings {
                    endpoint: d.endpoint.unwrap_or(defaults.endpoint),
                    start_timeout: d
                        .start_timeout
                        .map(|v| {
                            conf::duration_in(
                                path,
                                "docker.start_timeout",
                                v.0,
                                Duration::from_secs(1),
                                Duration::from_secs(3600),
                            )
                        })
                        .transpose()?
                        .unwrap_or(defaults.start_timeout),
                    stop_grace: d
                        .stop_grace
                        .map(|v| {
                            conf::duration_in(
                                path,
                                "docker.stop_grace",
                                v.0,
                                Duration::ZERO,
                                Duration::from_secs(3600),
                            )
                        })
                        .transpose()?
                        .unwrap_or(defaults.stop_grace),
                }
            }
        };
        if !["unix://", "npipe://", "tcp://", "http://"].iter().any(|p| docker.endpoint.starts_with(p)) {
            return Err(ConfigError::invalid(
                path,
                "docker.endpoint",
                format!(
                    "{:?}: expected unix:///PATH, npipe:////./pipe/NAME or tcp://HOST:PORT",
                    docker.endpoint
                ),
            ));
        }
        Ok(Self {
            path: path.to_owned(),
            relays,
            tls: TlsFiles {
                ca_cert: conf::resolve(path, &a.ca_cert),
                cert: conf::resolve(path, &a.cert),
                key: conf::resolve(path, &a.key),
            },
            timing,
            services,
            docker,
            containers,
            udp_flow_idle: d("agent.udp_flow_idle", a.udp_flow_idle, 1_000, 3_600_000)?,
            udp_max_flows: match a.udp_max_flows {
                n @ 1..=1_000_000 => n,
                n => {
                    return Err(ConfigError::invalid(
                        path,
                        "agent.udp_max_flows",
                        format!("{n} is out of range (1 to 1000000)"),
                    ))
                }
            },
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: RawAgent,
    #[serde(default)]
    services: BTreeMap<String, RawService>,
    docker: Option<RawDocker>,
    #[serde(default)]
    containers: BTreeMap<String, RawContainer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocker {
    endpoint: Option<String>,
    start_timeout: Option<HumanDuration>,
    stop_grace: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    relays: Vec<String>,
    server_name: Option<String>,
    ca_cert: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default = "default_keep_alive")]
    keep_alive: HumanDuration,
    #[serde(default = "default_idle_timeout")]
    idle_timeout: HumanDuration,
    #[serde(default = "default_handshake_timeout")]
    handshake_timeout: HumanDuration,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: HumanDuration,
    #[serde(default = "default_reconnect_min")]
    reconnect_min: HumanDuration,
    #[serde(default = "default_reconnect_max")]
    reconnect_max: HumanDuration,
    #[serde(default = "default_congestion")]
    congestion: String,
    #[serde(default = "default_udp_flow_idle")]
    udp_flow_idle: HumanDuration,
    #[serde(default = "default_udp_max_flows")]
    udp_max_flows: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    target: String,
    proxy_protocol: Option<String>,
}

fn default_udp_flow_idle() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_udp_max_flows() -> usize {
    4096
}

fn default_keep_alive() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(20))
}
fn default_handshake_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_reconnect_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(250))
}
fn default_congestion() -> String {
    "bbr".into()
}
fn default_reconnect_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// Whether `name` can be a WSL distribution name (and is safe on a command line).
pub(crate) fn is_valid_distro(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
relays = ["192.168.4.60:443", "[fd00::1]:4433"]
server_name = "relay.lan"
ca_cert = "ca.crt"
cert = "agent.crt"
key = "agent.key"

[services.mssql]
target = "tcp://127.0.0.1:1433"
"#;

    fn err(text: &str) -> String {
        match Config::from_toml(text, Path::new("C:/ProgramData/Sallyport/agent.toml")) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn good_config() {
        let c = Config::from_toml(GOOD, Path::new("/etc/sallyport/agent.toml")).expect("valid");
        assert_eq!(
            c.relays[0],
            RelayAddr { host: "192.168.4.60".into(), port: 443, server_name: "relay.lan".into() }
        );
        assert_eq!(c.relays[1].host, "fd00::1");
        assert_eq!(c.relays[1].to_string(), "[fd00::1]:4433");
        assert_eq!(c.services["mssql"].target, Target::Tcp { host: "127.0.0.1".into(), port: 1433 });
        assert_eq!(c.tls.key, Path::new("/etc/sallyport/agent.key"));
        assert_eq!(c.timing.keep_alive, Duration::from_secs(5));
    }

    #[test]
    fn targets_parse_strictly() {
        assert_eq!(Target::parse("tcp://[::1]:80"), Ok(Target::Tcp { host: "::1".into(), port: 80 }));
        assert_eq!(
            Target::parse("tcp://db.local:5432").map(|t| t.to_string()),
            Ok("tcp://db.local:5432".into())
        );
        for (bad, why) in [
            ("127.0.0.1:80", "no scheme"),
            ("ftp://127.0.0.1:21", "unsupported target scheme \"ftp\""),
            ("wsl://Ubuntu 24.04:80", "not a WSL distribution name"),
            ("container://mssql", "expected HOST:PORT"),
            ("tcp://127.0.0.1", "expected HOST:PORT"),
            ("tcp://127.0.0.1:0", "port 0"),
            ("tcp://:80", "invalid host"),
            ("tcp://h:99999", "invalid port"),
        ] {
            let e = Target::parse(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn udp_wsl_and_proxy_protocol() {
        assert_eq!(
            Target::parse("udp://127.0.0.1:53"),
            Ok(Target::Udp { host: "127.0.0.1".into(), port: 53 })
        );
        let wsl = Target::parse("wsl://Ubuntu-24.04:5432").expect("wsl");
        assert_eq!(wsl, Target::Wsl { distro: "Ubuntu-24.04".into(), port: 5432 });
        assert_eq!(wsl.to_string(), "wsl://Ubuntu-24.04:5432");
        assert!(wsl.carries_tcp() && wsl.carries_udp());
        let c = Config::from_toml(
            &GOOD.replace(
                "target = \"tcp://127.0.0.1:1433\"",
                "target = \"tcp://127.0.0.1:1433\"\nproxy_protocol = \"v2\"",
            ),
            Path::new("a.toml"),
        )
        .expect("valid");
        assert!(c.services["mssql"].proxy_protocol);
        let e = err(&GOOD.replace(
            "target = \"tcp://127.0.0.1:1433\"",
            "target = \"udp://127.0.0.1:53\"\nproxy_protocol = \"v2\"",
        ));
        assert!(
            e.contains("key `services.mssql.proxy_protocol`: PROXY protocol headers go to TCP targets only"),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "target = \"tcp://127.0.0.1:1433\"",
            "target = \"tcp://127.0.0.1:1433\"\nproxy_protocol = \"v1\"",
        ));
        assert!(e.contains("key `services.mssql.proxy_protocol`: \"v1\""), "{e}");
        if !cfg!(windows) {
            let e = err(&GOOD.replace("tcp://127.0.0.1:1433", "wsl://Ubuntu:5432"));
            assert!(e.contains("wsl:// targets are for the agent on Windows"), "{e}");
        }
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = err(&GOOD.replace("tcp://127.0.0.1:1433", "http://x:1"));
        assert!(
            e.starts_with("C:/ProgramData/Sallyport/agent.toml: key `services.mssql.target`: unsupported"),
            "{e}"
        );
        let e = err(&GOOD.replace("192.168.4.60:443", "nohostport"));
        assert!(e.contains("key `agent.relays[0]`"), "{e}");
        let e = err(&GOOD.replace("relays = [\"192.168.4.60:443\", \"[fd00::1]:4433\"]", "relays = []"));
        assert!(e.contains("key `agent.relays`"), "{e}");
        let e = err(&GOOD.replace("key = \"agent.key\"", "key = \"agent.key\"\nkeep_alive = \"15s\""));
        assert!(e.contains("key `agent.keep_alive`: must be at most half"), "{e}");
        let e = err(&GOOD.replace("[services.mssql]", "[services.MSSQL]"));
        assert!(e.contains("key `services.MSSQL`"), "{e}");
        let e = err(&format!("{GOOD}\nsecret = 1\n"));
        assert!(e.contains("agent.toml") && e.contains("secret"), "{e}");
    }
}
