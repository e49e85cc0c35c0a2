//! Container commands from the relay: refused when expired, replayed or for a container this agent
//! does not declare; otherwise run against the engine.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use sallyport_proto::{Command, ContainerAction};
use tracing::{info, warn};

use crate::tunnel::Tunnels;

/// How far in the future an expiry may lie: bounds how long an id must be remembered.
const MAX_LIFETIME_SECS: u64 = 600;

pub(crate) async fn run(command: Command, tunnels: &Tunnels) -> Result<String, String> {
    let declared = tunnels.config.containers.contains_key(&command.container);
    admit(&command, declared, &tunnels.seen_commands, now_unix())?;
    let c = &tunnels.targets.containers;
    let name = command.container.as_str();
    let result = match command.action {
        ContainerAction::Start => c.start(name).await,
        ContainerAction::Stop => c.stop(name).await,
        ContainerAction::Restart => c.restart(name).await,
        ContainerAction::Status => c.status(name).await,
        ContainerAction::Logs { tail } => c.logs(name, tail.min(10_000)).await,
    };
    match &result {
        Ok(_) => info!(id = command.id, container = name, action = ?command.action, "command done"),
        Err(e) => {
            warn!(id = command.id, container = name, action = ?command.action, error = %e, "command failed")
        }
    }
    result.map_err(|e| e.to_string())
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks expiry, replay and declaration; records the id in `seen` (ids with their expiry).
fn admit(
    command: &Command,
    declared: bool,
    seen: &Mutex<BTreeMap<u64, u64>>,
    now: u64,
) -> Result<(), String> {
    let refuse = |reason: String| {
        warn!(id = command.id, container = %command.container, %reason, "command refused");
        Err(reason)
    };
    if command.expires_unix < now {
        return refuse(format!("command {} expired {} s ago", command.id, now - command.expires_unix));
    }
    if command.expires_unix > now + MAX_LIFETIME_SECS {
        return refuse(format!("command {} expires too far in the future", command.id));
    }
    if !declared {
        return refuse(format!("container {:?} is not declared by this agent", command.container));
    }
    let Ok(mut seen) = seen.lock() else {
        return refuse("internal error".into());
    };
    seen.retain(|_, expires| *expires >= now);
    if seen.insert(command.id, command.expires_unix).is_some() {
        drop(seen);
        return refuse(format!("command {} was already run: replay refused", command.id));
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
    fn expired_replayed_far_future_and_undeclared_commands_are_refused() {
        let seen = Mutex::default();
        let now = 1_000_000;
        assert_eq!(admit(&command(1, now + 60), true, &seen, now), Ok(()));
        let replay = admit(&command(1, now + 60), true, &seen, now + 1).expect_err("replay");
        assert!(replay.contains("replay refused"), "{replay}");
        let expired = admit(&command(2, now - 5), true, &seen, now).expect_err("expired");
        assert!(expired.contains("expired 5 s ago"), "{expired}");
        let far = admit(&command(3, now + 3600), true, &seen, now).expect_err("far");
        assert!(far.contains("too far in the future"), "{far}");
        let undeclared = admit(&command(4, now + 60), false, &seen, now).expect_err("undeclared");
        assert!(undeclared.contains("not declared"), "{undeclared}");
        // Remembered ids are forgotten once their command expired: the memory stays bounded.
        assert_eq!(admit(&command(5, now + 700), true, &seen, now + 200), Ok(()));
        assert_eq!(seen.lock().map(|s| s.len()).unwrap_or(0), 1);
    }
}
