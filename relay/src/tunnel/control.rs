//! One agent's tunnel after the handshake: `Hello` within the handshake timeout, admission,
//! `Welcome`, registration, then the control loop (one handler per message), the writer of
//! commands and replies, and the agent's datagrams, until one of them ends.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use sallyport_proto::{codes::close, AgentMessage, ContainerReport, Hello, RelayMessage, MAX_CONTROL_FRAME};
use sallyport_runtime::link::{Connection, RecvStream, SendStream};
use sallyport_runtime::{code, read_frame, sync::lock, write_frame, FrameError};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::tunnel::{
    admission::admit,
    closed::{frame_error, Closed, ProtocolError},
    conflicts::Conflicts,
    datagrams, health,
    identity::AgentCert,
    lanes,
    registry::{AgentSession, Lanes, PendingCommand},
    state::Tunnels,
};

pub(crate) enum FirstMessageError {
    /// The connection went away; nothing to tell anyone.
    Gone,
    /// The agent broke the protocol; the reason goes to the log and into the close frame.
    Protocol(String),
}

pub(crate) async fn serve_agent(connection: Connection, cert: AgentCert, tunnels: Arc<Tunnels>) {
    let name = cert.id.agent.clone();
    let metrics = &tunnels.runtime.metrics;
    let (mut send, mut recv, hello) = match first_message(&connection, &tunnels).await {
        Ok(First::Hello(send, recv, hello)) => (send, recv, hello),
        Ok(First::Seek(send)) => {
            return lanes::send_held(&connection, send, &tunnels, "the agent holds a tunnel to this replica")
                .await
        }
        Ok(First::Lane(send, recv, session)) => {
            return lanes::serve_lane(connection, &name, session, (send, recv), &tunnels).await
        }
        Err(FirstMessageError::Gone) => return,
        Err(FirstMessageError::Protocol(reason)) => {
            warn!(%reason, "closing agent: protocol error");
            metrics.handshake_failed("protocol");
            connection.close(code(close::PROTOCOL_ERROR), reason.as_bytes());
            return;
        }
    };
    let welcome = match admit(&tunnels.config.get(), &name, &hello) {
        Ok(welcome) => welcome,
        Err(refusal) => {
            let reason = refusal.to_string();
            warn!(%reason, "agent refused");
            metrics.handshake_failed("refused");
            let _ =
                write_frame(&mut send, &RelayMessage::Refused { reason: reason.clone() }, MAX_CONTROL_FRAME)
                    .await;
            connection.close(code(close::REFUSED), reason.as_bytes());
            return;
        }
    };
    // A copy of the agent's identity beside the real agent: the live session stays.
    if let Some(live) = Conflicts::check(&tunnels.registry, &name, connection.remote_address()) {
        let remote = connection.remote_address();
        metrics.identity_conflict(&name);
        if tunnels.conflicts.should_log(&name) {
            warn!(%remote, live = %live, "a second session of this agent refused: its identity is in use from another address (a copy of its key?)");
        }
        let reason = format!(
            "agent {name:?} already has a live session from another address ({}): is its identity copied?",
            live.ip()
        );
        let _ = write_frame(&mut send, &RelayMessage::Refused { reason: reason.clone() }, MAX_CONTROL_FRAME)
            .await;
        connection.close(code(close::REFUSED), reason.as_bytes());
        return;
    }
    let services: BTreeSet<String> = welcome.published().map(str::to_owned).collect();
    for (service, reason) in welcome.refused() {
        warn!(%service, %reason, "service not published");
    }
    if let Err(e) = write_frame(&mut send, &RelayMessage::Welcome(welcome.clone()), MAX_CONTROL_FRAME).await {
        info!(error = %e, "agent left during the handshake");
        return;
    }
    // Version 4 on: which replica this is and which serve (a relay alone sends an empty list),
    // right after `Welcome`, and again at every change. Written before the session is registered,
    // so that no command or reply can come first.
    let mut serving = tunnels.cluster.as_ref().map(|c| c.serving());
    if welcome.version >= 4 {
        let replicas = match (&tunnels.cluster, &mut serving) {
            (Some(cluster), Some(serving)) => sallyport_proto::Replicas {
                this: cluster.me.name.clone(),
                serving: serving.borrow_and_update().clone(),
            },
            _ => sallyport_proto::Replicas { this: String::new(), serving: Vec::new() },
        };
        if let Err(e) = write_frame(&mut send, &RelayMessage::Replicas(replicas), MAX_CONTROL_FRAME).await {
            info!(error = %e, "agent left during the handshake");
            return;
        }
    }
    let registry = &tunnels.registry;
    let id = registry.next_id();
    let lanes = Arc::new(Lanes::new(connection.clone()));
    let (commands, mut command_rx) = mpsc::channel(16);
    let containers = Arc::new(Mutex::new(Vec::new()));
    let start_failures = Arc::new(Mutex::new(BTreeMap::new()));
    let transport_why = Arc::new(Mutex::new(String::new()));
    let health = Arc::new(Mutex::new(BTreeMap::new()));
    let drain_asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let session = AgentSession {
        id,
        name: name.clone(),
        remote: connection.remote_address(),
        software: hello.software,
        version: welcome.version,
        services: services.clone(),
        offered: hello.services.iter().map(|s| s.name.clone()).collect(),
        connected_at: std::time::SystemTime::now(),
        containers: containers.clone(),
        start_failures: start_failures.clone(),
        transport_why: transport_why.clone(),
        health: health.clone(),
        drain_asked: drain_asked.clone(),
        serial: cert.id.serial.clone(),
        cert_issued_unix: cert.id.issued_unix,
        cert_not_after_unix: cert.not_after_unix,
        connection: connection.clone(),
        commands,
        lanes: lanes.clone(),
    };
    if let Some(old) = registry.insert(session) {
        let moved = old.connection.transport() != connection.transport();
        if moved {
            // The agent moves its tunnel to the other transport (back to QUIC once UDP gets
            // through again): new streams take the new tunnel, and the streams in flight finish
            // on the old one, which the agent closes once they have (or the drain grace ends it).
            let grace = tunnels.config.get().relay.drain_grace;
            info!(old_remote = %old.remote, from = %old.connection.transport(), to = %connection.transport(), ?grace, "the agent moved its tunnel: draining the previous one");
            tunnels.runtime.background.spawn(async move {
                tokio::select! {
                    _ = old.connection.closed() => {}
                    () = tokio::time::sleep(grace) => {}
                }
                old.connection.close(code(close::REPLACED), b"replaced by a newer connection");
                old.lanes.close_all(code(close::REPLACED), b"replaced by a newer connection");
            });
        } else {
            info!(old_remote = %old.remote, "replacing the agent's previous connection");
            old.connection.close(code(close::REPLACED), b"replaced by a newer connection");
            old.lanes.close_all(code(close::REPLACED), b"replaced by a newer connection");
        }
    }
    info!(remote = %connection.remote_address(), ?services, version = welcome.version, "agent connected");

    let pending = Mutex::new(HashMap::new());
    let (replies, mut reply_rx) = mpsc::channel(4);
    let max_lanes = tunnels.config.get().relay.lanes;
    if welcome.version >= 3 && max_lanes > 1 {
        let max = u16::try_from(max_lanes).unwrap_or(u16::MAX);
        let _ = replies.try_send(RelayMessage::Lanes { session: id, max });
    }
    let push = match (welcome.version >= 4, &tunnels.cluster, serving) {
        (true, Some(cluster), Some(serving)) => Some((cluster, serving, replies.clone())),
        _ => None,
    };
    let reader = Reader {
        cert: &cert,
        id,
        tunnels: &tunnels,
        pending: &pending,
        containers: &containers,
        start_failures: &start_failures,
        transport_why: &transport_why,
        health: &health,
        drain_asked: &drain_asked,
        replies: replies.clone(),
    };
    // The agent's UDP flows come as datagrams on its tunnel (over TCP, kept only from now on).
    connection.accept_datagrams();
    let ended = tokio::select! {
        r = push_replicas(push) => r,
        never = health::push_checks(&tunnels, (&name, id, welcome.version), replies) => match never {},
        r = control_reader(&mut recv, reader) => r,
        r = control_writer(&mut send, &mut command_rx, &mut reply_rx, &pending) => r,
        r = datagrams::from_agent(&connection, &name, &tunnels.flows, metrics) => r,
        never = connection.sweep_stalls() => match never {},
        () = until_unix(cert.not_after_unix) => Ok(Closed::Expired),
    };
    registry.remove(&name, id);
    lanes.close_all(code(close::GOING_AWAY), b"the agent's tunnel ended");
    match ended {
        Ok(Closed::Expired) => {
            info!("the agent's certificate ended: closing its tunnel");
            connection.close(code(close::REFUSED), b"its certificate expired");
        }
        Ok(reason) => info!(%reason, "agent disconnected"),
        Err(violation) => {
            warn!(reason = %violation, "closing agent: protocol error");
            connection.close(code(close::PROTOCOL_ERROR), violation.to_string().as_bytes());
        }
    }
}

/// Returns at `unix` (seconds), wall-clock time: when a certificate ends.
async fn until_unix(unix: i64) {
    let left = unix.saturating_sub(sallyport_runtime::clock::unix_now() as i64).max(0) as u64;
    tokio::time::sleep(std::time::Duration::from_secs(left)).await;
}

/// What pushes the replicas serving to one agent: the cluster, its list, the tunnel's writer queue.
type ReplicaPush<'a> = (
    &'a Arc<crate::cluster::Cluster>,
    tokio::sync::watch::Receiver<Vec<sallyport_proto::Replica>>,
    mpsc::Sender<RelayMessage>,
);

/// Tells the agent which replicas serve at every change (a relay of a cluster, to an agent of
/// version 4 on); never ends on its own.
async fn push_replicas(push: Option<ReplicaPush<'_>>) -> Result<Closed, ProtocolError> {
    let Some((cluster, mut serving, replies)) = push else { return std::future::pending().await };
    while serving.changed().await.is_ok() {
        let replicas = sallyport_proto::Replicas {
            this: cluster.me.name.clone(),
            serving: serving.borrow_and_update().clone(),
        };
        if replies.send(RelayMessage::Replicas(replicas)).await.is_err() {
            break;
        }
    }
    std::future::pending().await
}

/// What a connection's first control message makes of it.
enum First {
    /// A tunnel.
    Hello(SendStream, RecvStream, Hello),
    /// A lane of the tunnel with this session number.
    Lane(SendStream, RecvStream, u64),
    /// A further tunnel to a replicated relay that reached a replica the agent holds already.
    Seek(SendStream),
}

/// Accepts the control stream and reads `Hello` (or `Lane`), both within the handshake timeout.
async fn first_message(connection: &Connection, tunnels: &Tunnels) -> Result<First, FirstMessageError> {
    let timeout = tunnels.config.get().relay.handshake_timeout;
    let read = async {
        let (send, mut recv) = connection.accept_bi().await.map_err(|_| FirstMessageError::Gone)?;
        let mut buf = Vec::new();
        let mut first = read_frame::<AgentMessage>(&mut recv, MAX_CONTROL_FRAME, &mut buf).await;
        if let Ok(Some(AgentMessage::Seek { held })) = &first {
            // A replica the agent holds says so; any other (or a relay alone) reads the Hello next.
            if tunnels.cluster.as_ref().is_some_and(|c| c.is_held(held)) {
                return Ok(First::Seek(send));
            }
            first = read_frame::<AgentMessage>(&mut recv, MAX_CONTROL_FRAME, &mut buf).await;
            if let Ok(Some(other @ (AgentMessage::Seek { .. } | AgentMessage::Lane { .. }))) = &first {
                return Err(FirstMessageError::Protocol(format!(
                    "Seek must be followed by Hello, got {}",
                    message_kind(other)
                )));
            }
        }
        match first {
            Ok(Some(AgentMessage::Hello(hello))) => Ok(First::Hello(send, recv, hello)),
            Ok(Some(AgentMessage::Lane { session })) => Ok(First::Lane(send, recv, session)),
            Ok(Some(other)) => Err(FirstMessageError::Protocol(format!(
                "first control message must be Hello, Seek or Lane, got {}",
                message_kind(&other)
            ))),
            Ok(None) => Err(FirstMessageError::Protocol("control stream ended before Hello".into())),
            Err(e) if e.is_protocol_violation() => Err(FirstMessageError::Protocol(e.to_string())),
            Err(_) => Err(FirstMessageError::Gone),
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(FirstMessageError::Protocol(format!("no Hello within {timeout:?}"))),
    }
}

fn message_kind(msg: &AgentMessage) -> &'static str {
    match msg {
        AgentMessage::Hello(_) => "Hello",
        AgentMessage::Pong { .. } => "Pong",
        AgentMessage::CommandResult { .. } => "CommandResult",
        AgentMessage::Containers(_) => "Containers",
        AgentMessage::Renew { .. } => "Renew",
        AgentMessage::Offer(_) => "Offer",
        AgentMessage::Lane { .. } => "Lane",
        AgentMessage::Seek { .. } => "Seek",
        AgentMessage::StartFailures(_) => "StartFailures",
        AgentMessage::Transport { .. } => "Transport",
        AgentMessage::Health(_) => "Health",
        AgentMessage::Drain { .. } => "Drain",
    }
}

/// Commands sent to the agent and waiting for its result, by id.
type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<String, String>>>>;

/// What the control reader works with.
struct Reader<'a> {
    /// The certificate the tunnel runs on.
    cert: &'a AgentCert,
    /// The session this tunnel is in the registry.
    id: u64,
    tunnels: &'a Tunnels,
    pending: &'a Pending,
    containers: &'a Mutex<Vec<ContainerReport>>,
    start_failures: &'a Mutex<BTreeMap<String, u64>>,
    /// Why the agent chose the tunnel's transport, as it said.
    transport_why: &'a Mutex<String>,
    /// How its checked services fare, as it said.
    health: &'a Arc<Mutex<BTreeMap<String, sallyport_proto::ServiceHealth>>>,
    /// It asked to be drained.
    drain_asked: &'a std::sync::atomic::AtomicBool,
    /// Answers to the agent's requests, sent by the writer.
    replies: mpsc::Sender<RelayMessage>,
}

/// Reads control messages until the stream ends (`Ok`) or the agent breaks the protocol (`Err`).
async fn control_reader(recv: &mut RecvStream, reader: Reader<'_>) -> Result<Closed, ProtocolError> {
    let mut buf = Vec::new();
    loop {
        let message = match read_frame::<AgentMessage>(recv, MAX_CONTROL_FRAME, &mut buf).await {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(Closed::Finished),
            Err(e) => return frame_error(e),
        };
        match message {
            AgentMessage::Pong { nonce } => debug!(nonce, "pong"),
            AgentMessage::CommandResult { id, result } => reader.command_result(id, result),
            AgentMessage::Renew { csr_pem } => reader.renew(&csr_pem).await?,
            AgentMessage::Containers(reports) => reader.containers(reports),
            AgentMessage::StartFailures(counts) => reader.start_failures(counts),
            AgentMessage::Transport { why, .. } => {
                // What the relay shows is the transport it sees; the agent's word is the reason.
                let why = sallyport_runtime::logs::printable(&why, 200);
                sallyport_runtime::limited_per!(reader.cert.id.agent, info, %why, "the agent's choice of transport");
                *lock(reader.transport_why) = why;
            }
            AgentMessage::Offer(offers) => reader.offer(offers).await?,
            AgentMessage::Health(report) => {
                health::report(reader.tunnels, &reader.cert.id.agent, reader.health, report);
                reader.tunnels.registry.touch();
            }
            AgentMessage::Drain { draining } => {
                health::drain_asked(reader.drain_asked, draining);
                reader.tunnels.registry.touch();
            }

            AgentMessage::Hello(_) => return Err(ProtocolError::HelloTwice),
            AgentMessage::Lane { .. } => return Err(ProtocolError::LaneOnTunnel),
            AgentMessage::Seek { .. } => return Err(ProtocolError::SeekOnTunnel),
        }
    }
}

impl Reader<'_> {
    /// Hands a command's result to whoever waits for it.
    fn command_result(&self, id: u64, result: Result<String, String>) {
        match lock(self.pending).remove(&id) {
            Some(waiter) => {
                let _ = waiter.send(result);
            }
            None => debug!(id, "result of a command nobody waits for"),
        }
    }

    /// Signs the agent's renewal request if it may have one and queues the answer.
    async fn renew(&self, csr_pem: &str) -> Result<(), ProtocolError> {
        let tunnels = self.tunnels;
        let local: Vec<String> = tunnels.registry.subscribe().borrow().keys().cloned().collect();
        let agent = &self.cert.id.agent;
        let named = tunnels.config.get().knows_agent(agent);
        let renewed = tunnels
            .renewals
            .renew(
                (&tunnels.trust, tunnels.cluster.as_deref(), named),
                self.cert,
                csr_pem,
                (&tunnels.runtime.metrics, local),
            )
            .await
            .map_err(|refused| {
                sallyport_runtime::limited_per!(agent, warn, reason = %refused, serial = %self.cert.id.serial, "agent certificate not renewed");
                refused.to_string()
            });
        // The writer has stopped: the select in serve_agent ends the tunnel with its reason.
        let _ = self.replies.send(RelayMessage::Renewed(renewed)).await;
        Ok(())
    }

    /// Keeps the agent's latest container report for the admin API and metrics.
    /// The agent reloaded its configuration and offers these services now: publish those this
    /// relay gives it (no reconnect), and tell it which.
    async fn offer(&self, offers: Vec<sallyport_proto::ServiceOffer>) -> Result<(), ProtocolError> {
        let name = &self.cert.id.agent;
        let hello = sallyport_proto::Hello {
            min_version: sallyport_proto::PROTOCOL_VERSION,
            max_version: sallyport_proto::PROTOCOL_VERSION,
            software: String::new(),
            services: offers,
        };
        let Ok(verdicts) = admit(&self.tunnels.config.get(), name, &hello) else {
            // The agent is no longer configured at all: it publishes nothing.
            self.tunnels.registry.reoffer(name, self.id, BTreeSet::new(), BTreeSet::new());
            return Ok(());
        };
        let offered = hello.services.iter().map(|s| s.name.clone()).collect();
        let published: BTreeSet<String> = verdicts.published().map(str::to_owned).collect();
        sallyport_runtime::limited_per!(name, info, ?published, "the agent offers new services");
        self.tunnels.registry.reoffer(name, self.id, offered, published);
        let _ = self.replies.send(RelayMessage::Published(verdicts.services)).await;
        Ok(())
    }

    /// Keeps the agent's latest count of failed container starts, for the metrics.
    fn start_failures(&self, counts: Vec<(String, u64)>) {
        let mut kept = lock(self.start_failures);
        kept.clear();
        // As many as the agent declares containers; a report is bounded by the frame cap.
        kept.extend(counts);
    }

    fn containers(&self, reports: Vec<ContainerReport>) {
        for report in &reports {
            debug!(container = %report.name, state = %report.state, "container state");
        }
        *lock(self.containers) = reports;
    }
}

/// Sends the commands operators queue and the replies the reader hands over; ends only when the
/// stream fails. (Liveness is QUIC's keep-alive: no periodic `Ping` adds packets to an idle
/// tunnel.)
async fn control_writer(
    send: &mut SendStream,
    commands: &mut mpsc::Receiver<PendingCommand>,
    replies: &mut mpsc::Receiver<RelayMessage>,
    pending: &Pending,
) -> Result<Closed, ProtocolError> {
    loop {
        let message = tokio::select! {
            Some(reply) = replies.recv() => reply,
            Some(PendingCommand { command, reply }) = commands.recv() => {
                lock(pending).insert(command.id, reply);
                RelayMessage::Command(command)
            }
            // Both queues closed: the tunnel is ending, and the reader says why.
            else => return std::future::pending().await,
        };
        match write_frame(send, &message, MAX_CONTROL_FRAME).await {
            Ok(()) => {}
            // One message that does not fit (a command naming a huge container) fails alone: its
            // waiter hears why, and the tunnel goes on.
            Err(FrameError::Encode(e)) => {
                warn!(error = %e, "control message not sent");
                if let RelayMessage::Command(command) = message {
                    if let Some(waiter) = lock(pending).remove(&command.id) {
                        let _ = waiter.send(Err(format!("the command could not be sent: {e}")));
                    }
                }
            }
            Err(e) => return frame_error(e),
        }
    }
}
