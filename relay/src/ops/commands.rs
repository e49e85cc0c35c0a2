//! Container commands: sent to an agent over its control stream, answered with a result.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use sallyport_proto::{Command, ContainerAction};
use sallyport_runtime::clock;

use crate::tunnel::registry::{PendingCommand, Registry};

/// How long a command stays valid for the agent, and how long the relay waits for its result
/// (a container start may take a while).
const COMMAND_LIFETIME: Duration = Duration::from_secs(60);
const COMMAND_WAIT: Duration = Duration::from_secs(90);

/// Why a container command got no result from the agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    #[error("the agent is not connected")]
    NoAgent,
    #[error("the agent disconnected before answering")]
    Lost,
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent ran the command and it failed; its reason.
    #[error("{0}")]
    Failed(String),
}

/// Command ids, from a random start so they do not repeat across restarts.
#[derive(Debug)]
pub(crate) struct Commands {
    next: AtomicU64,
}

impl Default for Commands {
    fn default() -> Self {
        Self { next: AtomicU64::new(fastrand::u64(..u64::MAX / 2)) }
    }
}

impl Commands {
    /// Sends a container command to `agent` over its control stream and waits for the result.
    pub(crate) async fn send(
        &self,
        agents: &Registry,
        agent: &str,
        container: &str,
        action: ContainerAction,
    ) -> Result<String, CommandError> {
        let session = agents.subscribe().borrow().get(agent).cloned().ok_or(CommandError::NoAgent)?;
        let command = Command {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            expires_unix: clock::unix_now() + COMMAND_LIFETIME.as_secs(),
            container: container.to_owned(),
            action,
        };
        tracing::info!(agent, container, ?action, id = command.id, "container command");
        let (reply, result) = tokio::sync::oneshot::channel();
        session.commands.send(PendingCommand { command, reply }).await.map_err(|_| CommandError::Lost)?;
        match tokio::time::timeout(COMMAND_WAIT, result).await {
            Err(_) => Err(CommandError::Timeout(COMMAND_WAIT)),
            Ok(Err(_)) => Err(CommandError::Lost),
            Ok(Ok(result)) => result.map_err(CommandError::Failed),
        }
    }
}
