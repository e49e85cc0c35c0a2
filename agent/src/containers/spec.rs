//! `[containers.NAME]` in `agent.toml`: what a declared container is, validated.

use std::{collections::BTreeMap, fmt, path::Path, time::Duration};

use sallyport_runtime::config::{self as conf, parse_size, ConfigError, HumanDuration};
use serde::Deserialize;

/// A container the agent owns: created, started and stopped by it, never anything else.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// Overrides the image's command when not empty.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Bind mounts as Docker writes them: `HOST:CONTAINER[:ro]`.
    pub mounts: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub isolation: Isolation,
    pub restart: Restart,
    pub start: StartPolicy,
    /// Stop the container this long after its last connection closed (on-demand containers).
    pub idle_stop: Option<Duration>,
    pub ready: Ready,
    /// The network whose address the agent dials; the container's first network when unset.
    pub network: Option<String>,
}

/// Windows isolation of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// The engine's default (process on Windows Server, Hyper-V on Windows 10).
    Default,
    Process,
    Hyperv,
}

/// Docker's restart policy for the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    No,
    OnFailure,
    UnlessStopped,
    Always,
}

/// When the agent starts the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartPolicy {
    /// Kept running whenever the engine is up.
    Always,
    /// Started by the first connection, stopped `idle_stop` after the last.
    OnDemand,
    /// Started and stopped only by commands from the relay.
    Manual,
}

/// When a started container counts as ready for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ready {
    /// The target port accepts a TCP connection.
    Port,
    /// The image's health check reports healthy.
    Health,
}

impl fmt::Display for StartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Always => "always",
            Self::OnDemand => "on-demand",
            Self::Manual => "manual",
        })
    }
}

impl ContainerSpec {
    /// The Docker name of the container: `sallyport-NAME`.
    pub fn docker_name(&self) -> String {
        format!("sallyport-{}", self.name)
    }

    /// A digest of everything that shapes the created container: a container created from another
    /// version of the spec is replaced on its next start.
    pub fn fingerprint(&self) -> String {
        let text = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
            self.image,
            self.command,
            self.env,
            self.mounts,
            self.labels,
            self.memory,
            self.cpus,
            self.isolation,
            self.restart,
            self.network
        );
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        sallyport_runtime::hex::encode(&digest.as_ref()[..12])
    }

    pub(crate) fn from_raw(path: &Path, name: &str, raw: RawContainer) -> Result<Self, ConfigError> {
        let key = format!("containers.{name}");
        let name = conf::name(path, &key, name)?;
        let invalid =
            |field: &str, reason: String| ConfigError::invalid(path, format!("{key}.{field}"), reason);
        if raw.image.trim().is_empty() {
            return Err(invalid("image", "an image is required, e.g. \"postgres:16\"".into()));
        }
        let memory = raw
            .memory
            .as_deref()
            .map(parse_size)
            .transpose()
            .map_err(|e| invalid("memory", e.to_string()))?;
        if memory.is_some_and(|m| m < 6 * 1024 * 1024) {
            return Err(invalid("memory", "Docker's smallest memory limit is 6MiB".into()));
        }
        if let Some(cpus) = raw.cpus {
            if !(cpus > 0.0 && cpus <= 1024.0) {
                return Err(invalid("cpus", format!("{cpus} is not a CPU count between 0 and 1024")));
            }
        }
        for (i, mount) in raw.mounts.iter().enumerate() {
            // Windows paths carry a drive colon: C:\data:C:\data has three parts.
            if mount.split(':').count() < 2 {
                return Err(ConfigError::invalid(
                    path,
                    format!("{key}.mounts[{i}]"),
                    format!("{mount:?}: expected \"HOST_PATH:CONTAINER_PATH[:ro]\""),
                ));
            }
        }
        for label in raw.labels.keys() {
            if label.starts_with(super::model::LABEL_PREFIX) {
                return Err(invalid(
                    "labels",
                    format!("{label:?}: labels under {} are the agent's own", super::model::LABEL_PREFIX),
                ));
            }
        }
        let idle_stop = raw
            .idle_stop
            .map(|d| {
                let week = Duration::from_secs(7 * 86_400);
                conf::within(path, &format!("{key}.idle_stop"), d.0, Duration::from_secs(1)..=week)
            })
            .transpose()?;
        if idle_stop.is_some() && raw.start != StartPolicy::OnDemand {
            return Err(invalid("idle_stop", "applies only to start = \"on-demand\" containers".into()));
        }
        Ok(Self {
            name,
            image: raw.image,
            command: raw.command,
            env: raw.env,
            mounts: raw.mounts,
            labels: raw.labels,
            memory,
            cpus: raw.cpus,
            isolation: raw.isolation,
            restart: raw.restart,
            start: raw.start,
            idle_stop,
            ready: raw.ready,
            network: raw.network,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawContainer {
    image: String,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    mounts: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    memory: Option<String>,
    cpus: Option<f64>,
    #[serde(default = "default_isolation")]
    isolation: Isolation,
    #[serde(default = "default_restart")]
    restart: Restart,
    #[serde(default = "default_start")]
    start: StartPolicy,
    idle_stop: Option<HumanDuration>,
    #[serde(default = "default_ready")]
    ready: Ready,
    network: Option<String>,
}

fn default_isolation() -> Isolation {
    Isolation::Default
}
fn default_restart() -> Restart {
    Restart::No
}
fn default_start() -> StartPolicy {
    StartPolicy::OnDemand
}
fn default_ready() -> Ready {
    Ready::Port
}
