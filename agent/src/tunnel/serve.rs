//! One attempt of a slot: open a session, then serve it (data streams, UDP flows, the control
//! loop, lanes) until it ends; over TCP in `auto`, probe QUIC and move the tunnel back to it.

use std::{sync::Arc, time::Duration};

use quinn::ConnectionError;
use sallyport_proto::codes::close;
use sallyport_runtime::{
    code,
    link::{Connection, Transport},
    quic::connect::ClientEndpoint,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use super::{
    choice::Choice,
    control::{control_loop, Control},
    error::TunnelError,
    lanes::LaneStarter,
    replicas::Group,
    session::{self, Session},
    streams::accept_streams,
    tunnels::{TunnelStatus, Tunnels},
};
use crate::config::{RelayAddr, QUIC_WAIT};

/// How a tunnel ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The agent is shutting down.
    Stopped,
    /// The relay is draining or restarting: reconnect at once (over the transport it ran on).
    GoingAway(Transport),
    /// The tunnel was up and is lost, with the path's round-trip time when it was last known and
    /// the transport it ran on.
    Lost(String, Duration, Transport),
    /// The attempt failed before the tunnel was up.
    Failed(TunnelError),
}

/// One attempt of one slot: where it goes and what it shares.
#[derive(Clone, Copy)]
pub(crate) struct Attempt<'a> {
    pub(crate) relay: &'a RelayAddr,
    pub(crate) tunnels: &'a Arc<Tunnels>,
    pub(crate) stop: &'a CancellationToken,
    pub(crate) group: &'a Arc<Group>,
    pub(crate) slot: usize,
    /// The slot's status key.
    pub(crate) key: &'a str,
    pub(crate) choice: &'a Choice,
}

/// Opens a session over the chosen transport and serves it (and the ones probes move it to) until
/// the tunnel ends.
pub(crate) async fn connect_and_serve(
    attempt: Attempt<'_>,
    endpoint: &mut Option<ClientEndpoint>,
    answer_within: Option<Duration>,
) -> Outcome {
    let opened = open(attempt, endpoint, attempt.choice.transport(), answer_within);
    let mut session = tokio::select! {
        opened = opened => match opened {
            Ok(session) => session,
            Err(e) => return Outcome::Failed(e),
        },
        () = attempt.stop.cancelled() => return Outcome::Stopped,
    };
    let mut why = attempt.choice.why().to_owned();
    loop {
        match serve(attempt, session, &why, endpoint).await {
            Served::Over(outcome) => return outcome,
            Served::Moved(next) => {
                session = *next;
                why = "auto: a probe found QUIC getting through again".to_owned();
            }
        }
    }
}

/// Opens a session for the slot; until it knows its replica, no other slot of the group dials.
async fn open(
    attempt: Attempt<'_>,
    endpoint: &mut Option<ClientEndpoint>,
    transport: Transport,
    answer_within: Option<Duration>,
) -> Result<Session, TunnelError> {
    let Attempt { relay, tunnels, group, slot, .. } = attempt;
    let _dialing = group.dialing.lock().await;
    let held = group.held_by_others(slot);
    let session = session::open(relay, endpoint, transport, tunnels, answer_within, &held).await?;
    if let Some(replicas) = &session.replicas {
        group.landed(slot, &replicas.this, replicas.serving.clone());
    }
    Ok(session)
}

/// How serving a tunnel ended.
enum Served {
    Over(Outcome),
    /// A probe brought a QUIC tunnel up while this one ran over TCP: serve that one now.
    Moved(Box<Session>),
}

async fn serve(
    attempt: Attempt<'_>,
    session: Session,
    why: &str,
    endpoint: &mut Option<ClientEndpoint>,
) -> Served {
    let Attempt { relay, tunnels, stop, group, slot, key, .. } = attempt;
    let Session { connection, mut send, mut recv, welcome, replicas } = session;
    let transport = connection.transport();
    tunnels.remember(key, transport);
    let replica = replicas.map(|r| r.this).filter(|name| !name.is_empty());
    let published: Vec<String> = welcome.published().map(str::to_owned).collect();
    for (service, reason) in welcome.refused() {
        warn!(%service, %reason, "relay does not publish this service");
    }
    info!(
        event_id = crate::events::id::TUNNEL_UP,
        remote = %connection.remote_address(),
        %transport,
        why,
        relay_software = %welcome.software,
        ?published,
        replica = replica.as_deref().unwrap_or("-"),
        held = ?group.held(),
        "tunnel up"
    );
    let remote = connection.remote_address();
    let status = TunnelStatus::Connected { remote, published, replica, transport, why: why.to_owned() };
    tunnels.set_status(key, status);

    // The lanes of this tunnel end with it.
    let lanes = LaneStarter { relay: relay.clone(), addr: remote, transport, stop: stop.child_token() };
    let lanes_end = lanes.stop.clone().drop_guard();
    let open = TaskTracker::new();
    let probe = async {
        if !attempt.choice.probes(transport) {
            return std::future::pending().await;
        }
        probe_quic(attempt, endpoint).await
    };
    let control = Control { key, version: welcome.version, lanes: &lanes, group, transport, why };
    let outcome = tokio::select! {
        () = accept_streams(&connection, tunnels, &open) => None,
        () = crate::targets::udp::serve(&connection, &tunnels.targets) => None,
        () = control_loop(&mut send, &mut recv, tunnels, control) => None,
        next = probe => {
            drop(lanes_end);
            drain_moved(connection.clone(), tunnels.clone(), open);
            return Served::Moved(Box::new(next));
        }
        () = stop.cancelled() => {
            connection.close(code(close::NORMAL), b"agent stopping");
            Some(Outcome::Stopped)
        }
    };
    group.lost(slot);
    Served::Over(outcome.unwrap_or_else(|| ended(&connection, transport)))
}

/// How a served tunnel ended, from its connection's close reason.
fn ended(connection: &Connection, transport: Transport) -> Outcome {
    match connection.close_reason() {
        Some(ConnectionError::ApplicationClosed(c)) if c.error_code == code(close::GOING_AWAY) => {
            Outcome::GoingAway(transport)
        }
        Some(reason) => Outcome::Lost(reason.to_string(), connection.rtt(), transport),
        None => {
            connection.close(code(close::PROTOCOL_ERROR), b"control stream ended");
            Outcome::Lost("the relay ended the control stream".into(), connection.rtt(), transport)
        }
    }
}

/// While a tunnel runs over TCP: every `agent.quic_probe`, a QUIC tunnel is tried; the first that
/// comes up is returned (the relay then routes new streams to it).
async fn probe_quic(attempt: Attempt<'_>, endpoint: &mut Option<ClientEndpoint>) -> Session {
    loop {
        tokio::time::sleep(attempt.tunnels.config.get().agent.quic_probe).await;
        match open(attempt, endpoint, Transport::Quic, Some(QUIC_WAIT)).await {
            Ok(session) => {
                info!("QUIC gets through again: moving the tunnel back from TCP");
                return session;
            }
            Err(e) => debug!(error = %e, "QUIC probe: still no way through"),
        }
    }
}

/// The tunnel a probe replaced: the relay sends it no new streams; it serves the streams in
/// flight (`open`), then closes (the relay closes it at the end of its drain grace in any case).
fn drain_moved(connection: Connection, tunnels: Arc<Tunnels>, open: TaskTracker) {
    let drained = tunnels.clone();
    tunnels.tasks.spawn(async move {
        open.close();
        tokio::select! {
            () = accept_streams(&connection, &drained, &open) => {}
            () = open.wait() => {}
        }
        info!(transport = %connection.transport(), "previous tunnel drained: closing it");
        connection.close(code(close::NORMAL), b"tunnel moved to another transport");
    });
}
