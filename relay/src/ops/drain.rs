//! `POST /agents/AGENT/drain[?grace=DURATION&force=true]` and `POST /agents/AGENT/undrain`, with
//! the admin bearer token (`sallyport-relay agent drain|undrain NAME`): an agent taken out of its
//! services' groups for maintenance and brought back.

use std::time::Duration;

use hyper::{body::Incoming, Request, StatusCode};

use crate::ops::{auth::authorize_with, Ops};

/// The longest grace a drain takes.
const MAX_GRACE: Duration = Duration::from_secs(7 * 86_400);

pub(crate) fn drain(req: &Request<Incoming>, ops: &Ops) -> (StatusCode, String) {
    if let Err(refusal) = authorize_with(req, ops.admin_token.as_ref(), ops.read_token.as_ref()) {
        return refusal;
    }
    let parts: Vec<&str> = req.uri().path().trim_start_matches('/').split('/').collect();
    let (agent, on) = match parts.as_slice() {
        ["agents", agent, "drain"] => (*agent, true),
        ["agents", agent, "undrain"] => (*agent, false),
        _ => {
            return (StatusCode::NOT_FOUND, "expected /agents/AGENT/drain or /agents/AGENT/undrain\n".into())
        }
    };
    if !sallyport_proto::is_valid_name(agent) {
        return (StatusCode::BAD_REQUEST, format!("{agent:?} is not an agent name\n"));
    }
    if !on {
        let was = ops.groups.undrain(agent);
        tracing::info!(agent, was_draining = was, "agent undrained: it takes new connections again");
        let said = if was { "takes new connections again" } else { "was not draining" };
        return (StatusCode::OK, format!("agent {agent}: {said}\n"));
    }
    let config = ops.config.get();
    let grace = match query(req, "grace") {
        None => config.relay.drain_grace,
        Some(text) => match humantime::parse_duration(text) {
            Ok(grace) if grace <= MAX_GRACE => grace,
            Ok(_) => return (StatusCode::BAD_REQUEST, "grace: at most 7 days\n".into()),
            Err(e) => return (StatusCode::BAD_REQUEST, format!("grace {text:?}: {e}\n")),
        },
    };
    let force = matches!(query(req, "force"), Some("true" | "1"));
    match ops.groups.drain(&ops.agents, &config, agent, grace, force, &ops.runtime.background) {
        Ok(()) => {
            let live = ops.groups.live_of(agent);
            tracing::info!(agent, ?grace, force, live, "agent draining: no new connections go to it");
            (
                StatusCode::OK,
                format!(
                    "agent {agent}: draining; no new connections go to it, the {live} it carries may finish \
                     within {}\n",
                    humantime::format_duration(grace)
                ),
            )
        }
        Err(e @ crate::groups::DrainError::Unknown(_)) => (StatusCode::NOT_FOUND, format!("{e}\n")),
        Err(e) => (StatusCode::CONFLICT, format!("{e}\n")),
    }
}

fn query<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}
