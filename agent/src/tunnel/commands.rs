//! Container commands from the relay: refused when expired, replayed or for a container this agent
//! does not declare; otherwise run against the engine.

use std::{collections::BTreeMap, sync::Mutex};

use sallyport_proto::{Command, ContainerAction};
use sallyport_runtime::{clock, sync::lock};
use tracing::{info, warn};

use super::tunnels::Tunnels;
use crate::containers::ContainerError;

/// How far in the future an expiry may lie: bounds how long an id must be remembered.
const MAX_LIFETIME_SECS: u64 = 600;

/// The most of a command's output or error that goes back to the relay: the result travels in one
/// control frame, which has room for a little more.
pub(crate) const MAX_RESULT: usize = sallyport_proto::MAX_CONTROL_FRAME - 4 * 1024;

/// `text`, or its end with a marker saying how much was left out when it is over `max` bytes (the
/// end of a log is what an operator reads).
pub(crate) fn bounded(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let marker_room = 64;
    let mut start = text.len() - max.saturating_sub(marker_room);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {start} bytes left out ...]\n{}", &text[start..])
}

/// Why a command from the relay was not run (the relay is told this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("command {id} expired {ago} s ago")]
    Expired { id: u64, ago: u64 },
    #[error("command {0} expires too far in the future")]
    TooFarAhead(u64),
    #[error("container {0:?} is not declared by this agent")]
    Undeclared(String),
    #[error("command {0} was already run: replay refused")]
    Replay(u64),
}

/// Why a command from the relay did not succeed (the relay is told this text).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandFailed {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Container(#[from] ContainerError),
}

/// Runs a command from the relay if it is admitted; the answer for the relay, bounded to fit a
/// control frame.
pub(crate) async fn answer(command: Command, tunnels: &Tunnels) -> Result<String, String> {
    match run(command, tunnels).await {
        Ok(output) => Ok(bounded(output, MAX_RESULT)),
        Err(e) => Err(bounded(e.to_string(), MAX_RESULT)),
    }
}

/// Runs a command from the relay if it is admitted.
async fn run(command: Command, tunnels: &Tunnels) -> Result<String, CommandFailed> {
    let declared = tunnels.config.get().containers.contains_key(&command.container);
    admit(&command, declared, &tunnels.seen_commands, clock::unix_now())?;
    let c = &tunnels.targets.containers;
    let name = command.container.as_str();
    let result = match command.action {
        ContainerAction::Start => c.start(name).await,
        ContainerAction::Stop => c.stop(name).await,
        ContainerAction::Restart => c.restart(name).await,
        ContainerAction::Status => c.status(name).await,
        // Cut while it streams in, with room for the marker `bounded` would add.
        ContainerAction::Logs { tail } => c.logs(name, tail.min(10_000), MAX_RESULT - 64).await,
    };
    match &result {
        Ok(_) => info!(id = command.id, container = name, action = ?command.action, "command done"),
        Err(e) => {
            warn!(id = command.id, container = name, action = ?command.action, error = %e, "command failed")
        }
    }
    Ok(result?)
}

/// Checks expiry, replay and declaration; records the id in `seen` (ids with their expiry).
fn admit(
    command: &Command,
    declared: bool,
    seen: &Mutex<BTreeMap<u64, u64>>,
    now: u64,
) -> Result<(), Refused> {
    let refuse = |refused: Refused| {
        warn!(id = command.id, container = %command.container, reason = %refused, "command refused");
        Err(refused)
    };
    if command.expires_unix < now {
        return refuse(Refused::Expired { id: command.id, ago: now - command.expires_unix });
    }
    if command.expires_unix > now + MAX_LIFETIME_SECS {
        return refuse(Refused::TooFarAhead(command.id));
    }
    if !declared {
        return refuse(Refused::Undeclared(command.container.clone()));
    }
    let mut seen = lock(seen);
    seen.retain(|_, expires| *expires >= now);
    if seen.insert(command.id, command.expires_unix).is_some() {
        drop(seen);
        return refuse(Refused::Replay(command.id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(id: u64, expires_unix: u64) -> Command {
        Command { id, expires_unix, container: "sql".into(), action: ContainerAction::Status }
    }

    #[test]
    fn results_are_cut_to_their_end_with_a_marker() {
        assert_eq!(bounded("short".into(), 100), "short");
        let long = format!("{}THE END", "é".repeat(50_000));
        let cut = bounded(long.clone(), 1_000);
        assert!(cut.len() <= 1_000 && cut.ends_with("THE END"), "{} bytes", cut.len());
        assert!(cut.starts_with("[... ") && cut.contains(" bytes left out ...]\n"), "{}", &cut[..40]);
        let result = sallyport_proto::AgentMessage::CommandResult {
            id: u64::MAX,
            result: Ok(bounded(long, MAX_RESULT)),
        };
        assert!(sallyport_proto::frame::encode_to_vec(&result, sallyport_proto::MAX_CONTROL_FRAME).is_ok());
    }

    #[test]
    fn expired_replayed_far_future_and_undeclared_commands_are_refused() {
        let seen = Mutex::default();
        let now = 1_000_000;
        assert_eq!(admit(&command(1, now + 60), true, &seen, now), Ok(()));
        let replay = admit(&command(1, now + 60), true, &seen, now + 1);
        assert_eq!(replay, Err(Refused::Replay(1)));
        let expired = admit(&command(2, now - 5), true, &seen, now).expect_err("expired");
        assert_eq!(expired.to_string(), "command 2 expired 5 s ago");
        let far = admit(&command(3, now + 3600), true, &seen, now);
        assert_eq!(far, Err(Refused::TooFarAhead(3)));
        let undeclared = admit(&command(4, now + 60), false, &seen, now).expect_err("undeclared");
        assert!(undeclared.to_string().contains("not declared"), "{undeclared}");
        // Remembered ids are forgotten once their command expired: the memory stays bounded.
        assert_eq!(admit(&command(5, now + 700), true, &seen, now + 200), Ok(()));
        assert_eq!(lock(&seen).len(), 1);
    }
}
