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

use sallyport_runtime::config::{self as conf, ConfigError, HumanDuration};
use serde::Deserialize;

use crate::containers::{spec::RawContainer, ContainerSpec, DockerSettings};

mod agent_keys;
mod target;

use agent_keys::RawAgent;
pub use agent_keys::{default_lanes, AgentKeys, TransportChoice, QUIC_WAIT};

use target::host_port;
pub use target::{AddressError, Target, TargetError};

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// The first 12 hex digits of the SHA-256 of the file's text: which configuration is live.
    pub hash: String,
    /// Every relay the agent keeps a tunnel to (from `agent.relays` and `agent.server_name`).
    pub relays: Vec<RelayAddr>,
    /// The `[agent]` table: the identity, the timers, the transport, the lanes, UDP flows.
    pub agent: AgentKeys,
    pub services: BTreeMap<String, Service>,
    pub docker: DockerSettings,
    /// Containers the agent owns, by name.
    pub containers: BTreeMap<String, ContainerSpec>,
}

const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);

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

/// The agent's configuration in force: read for each stream and flow, replaced whole by a reload.
pub type Live = sallyport_runtime::live::Live<Config>;

/// One service the agent carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub target: Target,
    /// Write a PROXY protocol v2 header to the target first, so it sees the client's address.
    pub proxy_protocol: bool,
}

/// The host of a plaintext Docker endpoint (`tcp://`, `http://`) that is not on loopback.
fn plaintext_remote_engine(endpoint: &str) -> Option<String> {
    let rest = endpoint.strip_prefix("tcp://").or_else(|| endpoint.strip_prefix("http://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| host.to_owned())
}

/// `[docker]` as written, each absent key from [`DockerSettings::default`].
fn docker_settings(raw: RawDocker, path: &Path) -> Result<DockerSettings, ConfigError> {
    let d = DockerSettings::default();
    let docker = conf::Section::new(path, "docker");
    Ok(DockerSettings {
        endpoint: raw.endpoint.unwrap_or(d.endpoint),
        start_timeout: docker.bounded("start_timeout", raw.start_timeout, d.start_timeout, SECOND..=HOUR)?,
        stop_grace: docker.bounded("stop_grace", raw.stop_grace, d.stop_grace, Duration::ZERO..=HOUR)?,
    })
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text, path)
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::from_raw(conf::parse_toml(text, path)?, path, sallyport_runtime::live::hash(text.as_bytes()))
    }

    /// Why `new` cannot replace this configuration while the agent runs: the first key it changes
    /// that only a restart applies (the `[agent]` keys declared `restart`: the relays, the
    /// identity, the timers, the transport; `[docker]`; which containers are declared), as an
    /// error naming the file and the key.
    pub fn reload_refusal(&self, new: &Config) -> Option<ConfigError> {
        let key = self.agent.restart_needed(&new.agent).or_else(|| {
            if self.docker != new.docker {
                Some("docker")
            } else if !self.containers.keys().eq(new.containers.keys()) {
                Some("containers (which are declared)")
            } else {
                None
            }
        });
        key.map(|key| {
            ConfigError::invalid(
                &new.path,
                key,
                "cannot change while the agent runs: restart it to apply this (the running configuration stays)",
            )
        })
    }

    fn from_raw(raw: RawConfig, path: &Path, hash: String) -> Result<Self, ConfigError> {
        let agent = AgentKeys::from_raw(&raw.agent, conf::Section::new(path, "agent"))?;
        let relays = agent
            .relays
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let (host, port) = host_port(text).map_err(|e| {
                    ConfigError::invalid(path, format!("agent.relays[{i}]"), format!("{text:?}: {e}"))
                })?;
                let server_name = agent.server_name.clone().unwrap_or_else(|| host.clone());
                sallyport_runtime::tls::server_name(&server_name)
                    .map_err(|e| ConfigError::invalid(path, "agent.server_name", e.to_string()))?;
                Ok(RelayAddr { host, port, server_name })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
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
                .map_err(|e| ConfigError::invalid(path, format!("{key}.target"), e.to_string()))?;
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
        let docker = docker_settings(raw.docker.unwrap_or_default(), path)?;
        if let Some(host) = plaintext_remote_engine(&docker.endpoint) {
            return Err(ConfigError::invalid(
                path,
                "docker.endpoint",
                format!(
                    "{:?}: the Docker API over plain TCP to {host:?} would let anyone on that path run \
                     containers as the engine's user; use the named pipe or socket, or a loopback address",
                    docker.endpoint
                ),
            ));
        }
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
        Ok(Self { path: path.to_owned(), hash, relays, agent, services, docker, containers })
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocker {
    endpoint: Option<String>,
    start_timeout: Option<HumanDuration>,
    stop_grace: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    target: String,
    proxy_protocol: Option<String>,
}

impl sallyport_runtime::live::Sourced for Config {
    fn path(&self) -> &Path {
        &self.path
    }

    fn hash(&self) -> &str {
        &self.hash
    }
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
        assert_eq!(c.agent.key, Path::new("/etc/sallyport/agent.key"));
        assert_eq!(c.agent.keep_alive, Duration::from_secs(1));
        assert_eq!(c.agent.idle_timeout, Duration::from_millis(1500));
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
    fn a_plaintext_docker_endpoint_must_be_on_loopback() {
        for remote in ["tcp://192.0.2.10:2375", "http://docker.lan:2375", "tcp://[2001:db8::1]:2375"] {
            let e = err(&format!("{GOOD}\n[docker]\nendpoint = \"{remote}\"\n"));
            assert!(e.contains("key `docker.endpoint`") && e.contains("plain TCP"), "{remote}: {e}");
        }
        for local in [
            "tcp://127.0.0.1:2375",
            "http://localhost:2375",
            "tcp://[::1]:2375",
            "unix:///var/run/docker.sock",
        ] {
            let text = format!("{GOOD}\n[docker]\nendpoint = \"{local}\"\n");
            assert!(Config::from_toml(&text, Path::new("a.toml")).is_ok(), "{local}");
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
        assert!(e.contains("key `agent.keep_alive`: must be at most two thirds"), "{e}");
        let e = err(&GOOD.replace("[services.mssql]", "[services.MSSQL]"));
        assert!(e.contains("key `services.MSSQL`"), "{e}");
        let e = err(&format!("{GOOD}\nsecret = 1\n"));
        assert!(e.contains("agent.toml") && e.contains("secret"), "{e}");
    }
}
