//! Lanes: further connections of an agent that carry data streams beside its tunnel, so one
//! agent's traffic is spread over several connections (and so over several threads on both
//! sides). A lane proves who it is as a tunnel does (mutual TLS, the certificate's name, not
//! revoked); its first control message names the session of that agent's tunnel, and it lives
//! only as long as that session.

use std::sync::Arc;

use sallyport_proto::{codes::close, AgentMessage, RelayMessage, MAX_CONTROL_FRAME};
use sallyport_runtime::link::{Connection, RecvStream, SendStream};
use sallyport_runtime::{code, read_frame, write_frame};
use tracing::{debug, info, warn};

use crate::tunnel::state::Tunnels;

/// Why a lane was not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LaneRefusal {
    #[error("no tunnel session {0} of this agent is open")]
    NoSession(u64),
    #[error("the agent has {0} connections open already (relay.lanes)")]
    Full(usize),
}

/// Serves lane `session` of `agent` until its connection or control stream ends, or the tunnel
/// it belongs to ends (which closes it).
pub(crate) async fn serve_lane(
    connection: Connection,
    agent: &str,
    session: u64,
    (mut send, mut recv): (SendStream, RecvStream),
    tunnels: &Arc<Tunnels>,
) {
    let max = tunnels.config.get().relay.lanes;
    let registry = &tunnels.registry;
    let id = registry.next_id();
    let taken = match registry.lanes_of(agent, session) {
        None => Err(LaneRefusal::NoSession(session)),
        Some(lanes) if lanes.add(id, connection.clone(), max) => Ok(lanes),
        Some(_) => Err(LaneRefusal::Full(max)),
    };
    let lanes = match taken {
        Ok(lanes) => lanes,
        // Through a shared address a lane lands on any replica: one that does not hold its
        // session sends it on to dial again.
        Err(LaneRefusal::NoSession(_)) if tunnels.cluster.is_some() => {
            let why = "the lane's session is on another replica";
            return send_held(&connection, send, tunnels, why).await;
        }
        Err(refusal) => {
            let reason = refusal.to_string();
            warn!(%reason, session, "lane refused");
            tunnels.runtime.metrics.handshake_failed("lane_refused");
            let _ =
                write_frame(&mut send, &RelayMessage::Refused { reason: reason.clone() }, MAX_CONTROL_FRAME)
                    .await;
            connection.close(code(close::REFUSED), reason.as_bytes());
            return;
        }
    };
    // The session may have ended between the lookup and the add: then nobody closes this lane.
    if registry.lanes_of(agent, session).is_none() {
        lanes.remove(id);
        connection.close(code(close::GOING_AWAY), b"the agent's tunnel ended");
        return;
    }
    if write_frame(&mut send, &RelayMessage::LaneAccepted, MAX_CONTROL_FRAME).await.is_ok() {
        info!(session, lane = id, remote = %connection.remote_address(), lanes = lanes.count(), "lane up");
        // A lane's control stream carries nothing after LaneAccepted: anything is a violation.
        let mut buf = Vec::new();
        let read = tokio::select! {
            read = read_frame::<AgentMessage>(&mut recv, MAX_CONTROL_FRAME, &mut buf) => read,
            never = connection.sweep_stalls() => match never {},
        };
        match read {
            Ok(None) => info!(session, lane = id, "lane ended by the agent"),
            Ok(Some(_)) => {
                warn!(session, lane = id, "closing lane: a control message on a lane");
                connection.close(code(close::PROTOCOL_ERROR), b"a lane carries no control message");
            }
            Err(e) if e.is_protocol_violation() => {
                warn!(session, lane = id, error = %e, "closing lane: protocol error");
                connection.close(code(close::PROTOCOL_ERROR), e.to_string().as_bytes());
            }
            Err(e) => info!(session, lane = id, reason = %e, "lane ended"),
        }
    }
    lanes.remove(id);
}

/// Tells the agent its connection reached a replica it does not want here (one it holds a tunnel
/// to already, or not the one of a lane's session) and closes the connection; nothing else of
/// the agent's is touched.
pub(crate) async fn send_held(
    connection: &Connection,
    mut send: SendStream,
    tunnels: &Tunnels,
    why: &'static str,
) {
    let replica = tunnels.cluster.as_ref().map(|c| c.me.name.clone()).unwrap_or_default();
    debug!(%replica, why, "sending the agent's connection on to another replica");
    let _ = write_frame(&mut send, &RelayMessage::Held { replica }, MAX_CONTROL_FRAME).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
    connection.close(code(close::HELD), why.as_bytes());
}
