//! The Docker Engine API through bollard: connection (re-made after the engine went away), version
//! negotiation, and the calls the manager makes. Every container it touches is checked for the
//! agent's labels first.

use sallyport_runtime::sync::lock;
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    pin::Pin,
    sync::Mutex,
    time::Duration,
};

use bollard::{
    errors::Error as BollardError,
    models::{
        ContainerCreateBody, ContainerInspectResponse, EventMessage, HealthStatusEnum, HostConfig,
        HostConfigIsolationEnum, RestartPolicy, RestartPolicyNameEnum,
    },
    query_parameters::{
        CreateContainerOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder,
        LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    },
    Docker, API_DEFAULT_VERSION,
};
use futures_util::{Stream, StreamExt};
use tracing::{info, warn};

use super::{
    model::{ContainerError, ContainerState, LABEL_AGENT, LABEL_CONTAINER, LABEL_SPEC},
    spec::{ContainerSpec, Isolation, Restart},
};

/// The engine's address when `agent.toml` names none.
#[cfg(windows)]
pub const DEFAULT_ENDPOINT: &str = "npipe:////./pipe/docker_engine";
#[cfg(not(windows))]
pub const DEFAULT_ENDPOINT: &str = "unix:///var/run/docker.sock";

/// `[docker]` in `agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerSettings {
    /// `unix:///path`, `npipe:////./pipe/NAME` or `tcp://HOST:PORT`.
    pub endpoint: String,
    /// How long a connection waits for its container to start and be ready.
    pub start_timeout: Duration,
    /// Grace the container gets to stop before it is killed.
    pub stop_grace: Duration,
}

impl Default for DockerSettings {
    fn default() -> Self {
        Self {
            endpoint: DEFAULT_ENDPOINT.into(),
            start_timeout: Duration::from_secs(60),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// Seconds each API call may take to answer (events and logs stream beyond it).
const REQUEST_TIMEOUT: u64 = 120;

#[derive(Debug)]
pub(super) struct Engine {
    agent: String,
    settings: DockerSettings,
    client: Mutex<Option<Docker>>,
}

/// What an inspect says about a container the agent owns.
#[derive(Debug, Clone)]
pub(super) struct Inspected {
    pub running: bool,
    pub address: Option<IpAddr>,
}

/// The engine's event stream, from the moment it was opened.
pub(super) struct Events(Pin<Box<dyn Stream<Item = Result<EventMessage, BollardError>> + Send>>);

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

impl Events {
    /// The next event of one of the agent's containers; `None` once the stream ended or broke.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match self.0.next().await {
                Some(Ok(message)) => {
                    if let Some(event) = to_event(message) {
                        return Some(event);
                    }
                }
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// A container event of one of the agent's containers.
#[derive(Debug)]
pub(super) struct Event {
    pub container: String,
    pub action: String,
    pub exit_code: Option<i64>,
    pub oom_seen: bool,
}

impl Engine {
    pub fn new(agent: &str, settings: DockerSettings) -> Self {
        Self { agent: agent.to_owned(), settings, client: Mutex::new(None) }
    }

    pub fn settings(&self) -> &DockerSettings {
        &self.settings
    }

    fn unreachable(&self, reason: impl ToString) -> ContainerError {
        ContainerError::EngineUnreachable {
            endpoint: self.settings.endpoint.clone(),
            reason: reason.to_string(),
        }
    }

    /// The client, connected and version-negotiated (Docker Desktop on Windows 10 stays on older
    /// engines, so the API version is the lower of bollard's and the engine's).
    async fn client(&self) -> Result<Docker, ContainerError> {
        if let Some(client) = lock(&self.client).clone() {
            return Ok(client);
        }
        let endpoint = self.settings.endpoint.as_str();
        let connected = if let Some(path) = endpoint.strip_prefix("unix://") {
            connect_unix(path)
        } else if let Some(pipe) = endpoint.strip_prefix("npipe://") {
            connect_pipe(pipe)
        } else if endpoint.starts_with("tcp://") || endpoint.starts_with("http://") {
            Docker::connect_with_http(endpoint, REQUEST_TIMEOUT, API_DEFAULT_VERSION)
        } else {
            return Err(self.unreachable("unsupported endpoint scheme"));
        };
        let client = connected.map_err(|e| self.unreachable(e))?;
        let client = client.negotiate_version().await.map_err(|e| self.unreachable(e))?;
        *lock(&self.client) = Some(client.clone());
        Ok(client)
    }

    /// Maps an API error, forgetting the client when the engine itself is gone.
    fn failed(&self, error: BollardError) -> ContainerError {
        match error {
            BollardError::DockerResponseServerError { status_code, message } => {
                ContainerError::Docker(format!("{message} (HTTP {status_code})"))
            }
            other => {
                *lock(&self.client) = None;
                self.unreachable(other)
            }
        }
    }

    /// Container events of this agent's containers, from now on.
    pub async fn events(&self) -> Result<Events, ContainerError> {
        let client = self.client().await?;
        client.ping().await.map_err(|e| self.failed(e))?;
        let filters = HashMap::from([
            ("type", vec!["container".to_owned()]),
            ("label", vec![format!("{LABEL_AGENT}={}", self.agent)]),
        ]);
        let options = EventsOptionsBuilder::default().filters(&filters).build();
        let stream = client.events(Some(options));
        Ok(Events(Box::pin(stream)))
    }

    /// The states of the agent's containers, by their names in `agent.toml`.
    pub async fn list_owned(&self) -> Result<BTreeMap<String, ContainerState>, ContainerError> {
        let client = self.client().await?;
        let filters = HashMap::from([("label", vec![format!("{LABEL_AGENT}={}", self.agent)])]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let listed = client.list_containers(Some(options)).await.map_err(|e| self.failed(e))?;
        let mut states = BTreeMap::new();
        for summary in listed {
            let Some(name) = summary.labels.as_ref().and_then(|l| l.get(LABEL_CONTAINER)).cloned() else {
                continue;
            };
            let Some(id) = summary.id else { continue };
            let inspect = client.inspect_container(&id, None).await.map_err(|e| self.failed(e))?;
            states.insert(name, state_of(&inspect));
        }
        Ok(states)
    }

    /// Inspects the container by its Docker name; `None` when there is none; an error when one
    /// exists that this agent did not create.
    async fn inspect_owned(
        &self,
        spec: &ContainerSpec,
    ) -> Result<Option<ContainerInspectResponse>, ContainerError> {
        let client = self.client().await?;
        let name = spec.docker_name();
        match client.inspect_container(&name, None).await {
            Ok(inspect) => {
                let labels = inspect.config.as_ref().and_then(|c| c.labels.as_ref());
                let owned = labels.is_some_and(|l| {
                    l.get(LABEL_AGENT) == Some(&self.agent) && l.get(LABEL_CONTAINER) == Some(&spec.name)
                });
                if owned {
                    Ok(Some(inspect))
                } else {
                    Err(ContainerError::NotOwned(name))
                }
            }
            Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// The container's address when it runs (for a health check: nothing is created or started).
    pub async fn running_address(&self, spec: &ContainerSpec) -> Result<Option<IpAddr>, ContainerError> {
        let inspect = self.inspect_owned(spec).await?;
        Ok(inspect.filter(is_running).and_then(|i| address_of(&i, spec)))
    }

    /// The container's state now.
    pub async fn state_of(&self, spec: &ContainerSpec) -> Result<ContainerState, ContainerError> {
        Ok(self.inspect_owned(spec).await?.map_or(ContainerState::Absent, |i| state_of(&i)))
    }

    /// Makes sure the container exists as `spec` says; a stopped container created from another
    /// version of the spec is replaced.
    pub async fn ensure_created(&self, spec: &ContainerSpec) -> Result<Inspected, ContainerError> {
        let client = self.client().await?;
        if let Some(inspect) = self.inspect_owned(spec).await? {
            let current = inspect
                .config
                .as_ref()
                .and_then(|c| c.labels.as_ref())
                .and_then(|l| l.get(LABEL_SPEC))
                .is_some_and(|f| *f == spec.fingerprint());
            let running = is_running(&inspect);
            if current || running {
                if !current {
                    warn!(container = %spec.name, "container runs an older version of its config; it is replaced on its next start");
                }
                return Ok(Inspected { running, address: address_of(&inspect, spec) });
            }
            info!(container = %spec.name, "config changed: replacing the container");
            let options = RemoveContainerOptionsBuilder::default().force(true).build();
            client.remove_container(&spec.docker_name(), Some(options)).await.map_err(|e| self.failed(e))?;
        }
        let options = CreateContainerOptionsBuilder::default().name(&spec.docker_name()).build();
        match client.create_container(Some(options), self.create_body(spec)).await {
            Ok(_) => {
                info!(container = %spec.name, image = %spec.image, "container created");
                Ok(Inspected { running: false, address: None })
            }
            Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => {
                Err(ContainerError::ImageMissing { image: spec.image.clone() })
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    fn create_body(&self, spec: &ContainerSpec) -> ContainerCreateBody {
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        labels.insert(LABEL_AGENT.into(), self.agent.clone());
        labels.insert(LABEL_CONTAINER.into(), spec.name.clone());
        labels.insert(LABEL_SPEC.into(), spec.fingerprint());
        let restart = match spec.restart {
            Restart::No => RestartPolicyNameEnum::NO,
            Restart::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
            Restart::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
            Restart::Always => RestartPolicyNameEnum::ALWAYS,
        };
        let isolation = match spec.isolation {
            Isolation::Default => None,
            Isolation::Process => Some(HostConfigIsolationEnum::PROCESS),
            Isolation::Hyperv => Some(HostConfigIsolationEnum::HYPERV),
        };
        let host_config = HostConfig {
            memory: spec.memory.map(|m| m.min(i64::MAX as u64) as i64),
            nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
            binds: (!spec.mounts.is_empty()).then(|| spec.mounts.clone()),
            restart_policy: Some(RestartPolicy { name: Some(restart), maximum_retry_count: None }),
            isolation,
            network_mode: spec.network.clone(),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// Starts the created container and returns its address once it runs.
    pub async fn start(&self, spec: &ContainerSpec) -> Result<IpAddr, ContainerError> {
        let client = self.client().await?;
        let name = spec.docker_name();
        if let Err(e) = client.start_container(&name, None).await {
            return Err(match e {
                BollardError::DockerResponseServerError { status_code: 304, .. } => {
                    return self.address(spec).await
                }
                other => self.failed(other),
            });
        }
        self.address(spec).await
    }

    async fn address(&self, spec: &ContainerSpec) -> Result<IpAddr, ContainerError> {
        let inspect =
            self.inspect_owned(spec).await?.ok_or(ContainerError::Docker("container vanished".into()))?;
        self.alive(spec, &inspect)?;
        address_of(&inspect, spec).ok_or_else(|| ContainerError::NoAddress {
            name: spec.name.clone(),
            network: spec.network.clone().unwrap_or_else(|| "(its first network)".into()),
        })
    }

    /// An error when the container is no longer running (exited, out of memory).
    fn alive(&self, spec: &ContainerSpec, inspect: &ContainerInspectResponse) -> Result<(), ContainerError> {
        if is_running(inspect) {
            return Ok(());
        }
        let state = inspect.state.as_ref();
        if state.and_then(|s| s.oom_killed).unwrap_or(false) {
            let limit = spec.memory.map_or("none".into(), |m| format!("{} MiB", m >> 20));
            return Err(ContainerError::OutOfMemory { name: spec.name.clone(), limit });
        }
        Err(ContainerError::ExitedDuringStart {
            name: spec.name.clone(),
            code: state.and_then(|s| s.exit_code).unwrap_or(-1),
        })
    }

    /// An error when the container stopped while a connection waited for it.
    pub async fn check_alive(&self, spec: &ContainerSpec) -> Result<(), ContainerError> {
        let inspect =
            self.inspect_owned(spec).await?.ok_or(ContainerError::Docker("container vanished".into()))?;
        self.alive(spec, &inspect)
    }

    pub async fn is_healthy(&self, spec: &ContainerSpec) -> Result<bool, ContainerError> {
        let inspect =
            self.inspect_owned(spec).await?.ok_or(ContainerError::Docker("container vanished".into()))?;
        let health = inspect.state.as_ref().and_then(|s| s.health.as_ref()).and_then(|h| h.status);
        Ok(match health {
            Some(HealthStatusEnum::HEALTHY) => true,
            // An image without a health check counts as healthy once running.
            None | Some(HealthStatusEnum::NONE) | Some(HealthStatusEnum::EMPTY) => true,
            _ => false,
        })
    }

    /// Stops the container if it runs (not an error when it does not, or does not exist).
    pub async fn stop(&self, spec: &ContainerSpec) -> Result<(), ContainerError> {
        if self.inspect_owned(spec).await?.is_none() {
            return Ok(());
        }
        let client = self.client().await?;
        let grace = self.settings.stop_grace.as_secs().min(i32::MAX as u64) as i32;
        let options = StopContainerOptionsBuilder::default().t(grace).build();
        match client.stop_container(&spec.docker_name(), Some(options)).await {
            Ok(()) | Err(BollardError::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// The last `tail` lines the container wrote to stdout and stderr, of which at most the last
    /// `max` bytes are kept while they stream in (10,000 lines of 16 KiB would be 160 MiB).
    pub async fn logs(&self, spec: &ContainerSpec, tail: u32, max: usize) -> Result<String, ContainerError> {
        if self.inspect_owned(spec).await?.is_none() {
            return Ok(String::new());
        }
        let client = self.client().await?;
        let options = LogsOptionsBuilder::default().stdout(true).stderr(true).tail(&tail.to_string()).build();
        let mut stream = client.logs(&spec.docker_name(), Some(options));
        let mut kept = Tail::new(max);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.failed(e))?;
            kept.push(&chunk.into_bytes());
        }
        Ok(kept.text())
    }
}

/// The end of a stream of bytes: at most `max` of the last ones, and how many came before them.
#[derive(Debug)]
pub(crate) struct Tail {
    max: usize,
    kept: std::collections::VecDeque<u8>,
    dropped: usize,
}

impl Tail {
    pub(crate) fn new(max: usize) -> Self {
        Self { max, kept: std::collections::VecDeque::new(), dropped: 0 }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.kept.extend(bytes);
        let over = self.kept.len().saturating_sub(self.max);
        self.kept.drain(..over);
        self.dropped += over;
    }

    /// The kept bytes as text, after a marker saying how much was left out (if anything was).
    pub(crate) fn text(self) -> String {
        let bytes: Vec<u8> = self.kept.into();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if self.dropped == 0 {
            text
        } else {
            format!("[... {} bytes left out ...]\n{text}", self.dropped)
        }
    }
}

#[cfg(unix)]
fn connect_unix(path: &str) -> Result<Docker, BollardError> {
    Docker::connect_with_unix(path, REQUEST_TIMEOUT, API_DEFAULT_VERSION)
}

#[cfg(not(unix))]
fn connect_unix(_path: &str) -> Result<Docker, BollardError> {
    Err(BollardError::UnsupportedURISchemeError { uri: "unix://".into() })
}

#[cfg(windows)]
fn connect_pipe(pipe: &str) -> Result<Docker, BollardError> {
    Docker::connect_with_named_pipe(pipe, REQUEST_TIMEOUT, API_DEFAULT_VERSION)
}

#[cfg(not(windows))]
fn connect_pipe(_pipe: &str) -> Result<Docker, BollardError> {
    Err(BollardError::UnsupportedURISchemeError { uri: "npipe://".into() })
}

fn is_running(inspect: &ContainerInspectResponse) -> bool {
    inspect.state.as_ref().and_then(|s| s.running).unwrap_or(false)
}

fn state_of(inspect: &ContainerInspectResponse) -> ContainerState {
    let state = inspect.state.as_ref();
    if is_running(inspect) {
        let health = state
            .and_then(|s| s.health.as_ref())
            .and_then(|h| h.status)
            .filter(|s| !matches!(s, HealthStatusEnum::NONE | HealthStatusEnum::EMPTY))
            .map(|s| s.to_string());
        return ContainerState::Running { health };
    }
    ContainerState::Stopped {
        exit_code: state.and_then(|s| s.exit_code),
        oom_killed: state.and_then(|s| s.oom_killed).unwrap_or(false),
    }
}

/// The container's address on its configured network, or on its first network with one.
fn address_of(inspect: &ContainerInspectResponse, spec: &ContainerSpec) -> Option<IpAddr> {
    let networks = inspect.network_settings.as_ref()?.networks.as_ref()?;
    let mut candidates: Vec<_> = match &spec.network {
        Some(network) => networks.get(network).into_iter().collect(),
        None => {
            let mut all: Vec<_> = networks.iter().collect();
            all.sort_by(|a, b| a.0.cmp(b.0));
            all.into_iter().map(|(_, settings)| settings).collect()
        }
    };
    candidates.retain(|s| s.ip_address.as_deref().is_some_and(|ip| !ip.is_empty()));
    candidates.first()?.ip_address.as_deref()?.parse().ok()
}

fn to_event(message: EventMessage) -> Option<Event> {
    let actor = message.actor?;
    let attributes = actor.attributes.unwrap_or_default();
    let container = attributes.get(LABEL_CONTAINER)?.clone();
    let action = message.action?;
    let exit_code = attributes.get("exitCode").and_then(|c| c.parse().ok());
    Some(Event { container, oom_seen: action == "oom", action, exit_code })
}

#[cfg(test)]
mod tail_tests {
    use super::Tail;

    #[test]
    fn only_the_end_is_kept_while_it_streams() {
        let mut tail = Tail::new(10);
        for _ in 0..10_000 {
            tail.push(&[b'x'; 16 * 1024]);
            assert!(tail.kept.len() <= 10, "never more than the limit held");
        }
        tail.push(b"the end\n");
        let text = tail.text();
        assert!(text.ends_with("xxthe end\n"), "{text}");
        assert!(
            text.starts_with(&format!("[... {} bytes left out ...]", 10_000 * 16 * 1024 + 8 - 10)),
            "{text}"
        );
        let mut short = Tail::new(100);
        short.push(b"all of it\n");
        assert_eq!(short.text(), "all of it\n");
    }
}
