//! Control-stream messages: one enum per direction.
//!
//! The control stream is the first bidirectional stream of a tunnel connection, opened by the agent.
//! The agent's first message is [`AgentMessage::Hello`]; the relay answers with
//! [`RelayMessage::Welcome`] or [`RelayMessage::Refused`] and then both sides exchange messages until
//! the connection closes. Each message travels as one frame of at most
//! [`MAX_CONTROL_FRAME`](crate::MAX_CONTROL_FRAME) body bytes.

use serde::{Deserialize, Serialize};

/// Messages from the agent to the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message: the protocol versions the agent speaks and the services it offers.
    Hello(Hello),
    /// Answer to a [`RelayMessage::Ping`], echoing its nonce.
    Pong { nonce: u64 },
    /// The outcome of a [`RelayMessage::Command`]: its output, or why it failed.
    CommandResult { id: u64, result: Result<String, String> },
    /// The state of each declared container, sent after `Welcome` and whenever one changes.
    Containers(Vec<ContainerReport>),
    /// A certificate request for a new key, sent when a third of the current certificate's
    /// lifetime is left; answered with [`RelayMessage::Renewed`].
    Renew { csr_pem: String },
    /// The services the agent offers now, after its configuration was reloaded (version 2 on);
    /// answered with [`RelayMessage::Published`].
    Offer(Vec<ServiceOffer>),
    /// First message of a lane (version 3 on): another connection of the agent whose tunnel is
    /// session `session`, carrying data streams beside it. Answered with
    /// [`RelayMessage::LaneAccepted`] or [`RelayMessage::Refused`].
    Lane { session: u64 },
    /// First message of a further tunnel to a relay that runs as several replicas behind one
    /// address (version 4 on), followed by `Hello`: the replicas the agent holds a tunnel to
    /// already. A replica named here answers [`RelayMessage::Held`] and closes this connection,
    /// leaving the agent's tunnel to it alone; any other replica reads the `Hello` that follows.
    Seek { held: Vec<String> },
    /// For each declared container, how many of its starts failed since the agent started (the
    /// engine refused, the image is missing, ...); sent (version 4 on) whenever a count changes.
    StartFailures(Vec<(String, u64)>),
    /// The transport carrying this tunnel as the agent sees it (`quic` or `tcp`) and why the agent
    /// chose it (for example "auto: QUIC got no answer within 3s"); sent after `Welcome` (version 5
    /// on), for the relay's listing and status page.
    Transport { transport: String, why: String },
    /// How each checked service fares (version 6 on): the whole list, sent once the first check
    /// of each has run and again whenever one changes.
    Health(Vec<crate::health::ServiceHealth>),
    /// The agent asks to be drained (no new connections; those it carries go on) or no longer
    /// (version 6 on): `sallyport-agent drain` on its host, before a reboot. Sent after `Welcome`
    /// while it holds, and at every change.
    Drain { draining: bool },
}

/// Messages from the relay to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayMessage {
    /// The agent is accepted: the version in use and the relay's verdict on each offered service.
    Welcome(Welcome),
    /// The agent is not accepted; the relay closes the connection after sending this.
    Refused { reason: String },
    /// Liveness probe of the control stream; the agent answers with [`AgentMessage::Pong`].
    Ping { nonce: u64 },
    /// A container command from an operator; answered with [`AgentMessage::CommandResult`].
    Command(Command),
    /// The new client certificate (PEM), or why the relay would not issue one.
    Renewed(Result<String, String>),
    /// The relay's verdict on each service of an [`AgentMessage::Offer`], in the order offered.
    Published(Vec<ServiceVerdict>),
    /// Sent after `Welcome` (version 3 on): the tunnel's session number and how many connections
    /// in all (this one included) the relay spreads the agent's data streams over. The agent may
    /// open up to `max - 1` lanes, each naming `session`.
    Lanes { session: u64, max: u16 },
    /// The relay took the lane into the session.
    LaneAccepted,
    /// Sent right after `Welcome` (version 4 on), and by a relay that runs as several replicas
    /// again whenever the set changes: which replica this connection reached and which replicas
    /// are serving now. The agent keeps a tunnel to each of them. A relay that runs alone sends
    /// an empty name and list, once.
    Replicas(Replicas),
    /// This connection reached a replica the agent holds a tunnel to already (its `Seek` named
    /// it), or a lane reached a replica that does not hold its session: the relay closes it, and
    /// the agent dials again (through the shared address it lands on a replica at random).
    Held { replica: String },
    /// The health checks the agent runs for the services published to it (version 6 on): sent
    /// after `Welcome` and again when a reload changes them; an empty list stops them all.
    Checks(Vec<crate::health::HealthCheck>),
}

/// The replicas of a relay, as one of them sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replicas {
    /// The replica this connection reached.
    pub this: String,
    /// Every replica serving now, this one included, sorted by name.
    pub serving: Vec<Replica>,
}

/// One relay replica.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Replica {
    /// Its stable name (in Kubernetes, the StatefulSet pod's name).
    pub name: String,
    /// Random per start of the replica: a replica that restarted under the same name differs.
    pub boot: u64,
}

/// The agent's introduction. Its identity is not here: it is the name in its client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the agent speaks.
    pub min_version: u16,
    /// Newest protocol version the agent speaks.
    pub max_version: u16,
    /// Free-form build description, for logs and listings (e.g. `sallyport-agent 0.1.0`).
    pub software: String,
    /// The services the agent has targets for.
    pub services: Vec<ServiceOffer>,
}

/// A service the agent can carry: the name is the join key with the relay's exposure config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceOffer {
    pub name: String,
}

/// The relay's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version both sides use from now on.
    pub version: u16,
    /// Free-form build description of the relay.
    pub software: String,
    /// One verdict per offered service, in the order offered.
    pub services: Vec<ServiceVerdict>,
}

/// Whether the relay publishes one offered service, and why not if it does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceVerdict {
    pub name: String,
    /// `None` when published; otherwise why the relay will not route this service to the agent.
    pub refused: Option<String>,
}

impl Welcome {
    /// The services the relay publishes.
    pub fn published(&self) -> impl Iterator<Item = &str> {
        self.services.iter().filter(|v| v.refused.is_none()).map(|v| v.name.as_str())
    }

    /// The services the relay refused, each with its reason.
    pub fn refused(&self) -> impl Iterator<Item = (&str, &str)> {
        self.services.iter().filter_map(|v| v.refused.as_deref().map(|r| (v.name.as_str(), r)))
    }
}

/// A container command. The agent refuses one whose expiry has passed or whose id it has already
/// seen, so a recorded command cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Unique per relay process (random start, then counting).
    pub id: u64,
    /// Seconds since the Unix epoch after which the command is void.
    pub expires_unix: u64,
    /// A container declared in the agent's config.
    pub container: String,
    pub action: ContainerAction,
}

/// What to do with a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerAction {
    Start,
    Stop,
    Restart,
    Status,
    /// The last `tail` lines of its output.
    Logs {
        tail: u32,
    },
}

impl ContainerAction {
    /// Parses the action word of the CLI and admin API (`logs` takes its tail separately).
    pub fn parse(word: &str, tail: u32) -> Option<Self> {
        Some(match word {
            "start" => Self::Start,
            "stop" => Self::Stop,
            "restart" => Self::Restart,
            "status" => Self::Status,
            "logs" => Self::Logs { tail },
            _ => return None,
        })
    }
}

/// One container as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerReport {
    pub name: String,
    /// `running`, `stopped (exit 0)`, `absent`, `engine-down`, ...
    pub state: String,
    /// The latest cold start, from the start request to the first accepted connection.
    pub cold_start_ms: Option<u64>,
}
