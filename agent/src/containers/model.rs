//! What the facade, the engine adapter and the spec share: the labels that mark the agent's
//! containers, a container's state, and why a container could not serve.

use std::time::Duration;

/// Labels under this prefix are the agent's own.
pub const LABEL_PREFIX: &str = "io.sallyport.";
/// The agent that owns the container.
pub const LABEL_AGENT: &str = "io.sallyport.agent";
/// The container's name in `agent.toml`.
pub const LABEL_CONTAINER: &str = "io.sallyport.container";
/// The fingerprint of the spec the container was created from.
pub const LABEL_SPEC: &str = "io.sallyport.spec";

/// What the agent knows of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// Not looked at yet.
    Unknown,
    /// The engine cannot be reached.
    EngineDown,
    /// Not created (or removed).
    Absent,
    /// Created, not running.
    Stopped {
        exit_code: Option<i64>,
        oom_killed: bool,
    },
    /// Being started by the agent.
    Starting,
    Running {
        health: Option<String>,
    },
}

/// Why a container could not serve a connection or a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerError {
    #[error("container {0:?} is not declared in this agent's config")]
    NotDeclared(String),
    #[error("Docker engine unreachable at {endpoint}: {reason}")]
    EngineUnreachable { endpoint: String, reason: String },
    #[error("image {image:?} is not on this machine: pull or build it first")]
    ImageMissing { image: String },
    #[error("a container named {0:?} exists and was not created by this agent: it is left alone; rename or remove it")]
    NotOwned(String),
    #[error("container {name:?} ran out of memory (limit {limit})")]
    OutOfMemory { name: String, limit: String },
    #[error("container {name:?} exited during start with code {code}")]
    ExitedDuringStart { name: String, code: i64 },
    #[error("container {name:?} was not ready within {waited:?}")]
    NotReady { name: String, waited: Duration },
    #[error("container {name:?} has no address on network {network:?}")]
    NoAddress { name: String, network: String },
    #[error("Docker refused: {0}")]
    Docker(String),
    #[error("the latest start of container {0:?} failed")]
    LastStartFailed(String),
}
