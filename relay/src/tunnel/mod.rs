//! The QUIC side of the relay: accepting agents, checking who they are, the control-stream
//! handshake, and the control loop that lasts as long as the connection.

pub mod registry;

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream};
use sallyport_proto::{
    codes::close, negotiate_version, AgentMessage, ContainerReport, Hello, RelayMessage, ServiceVerdict,
    Welcome, MAX_CONTROL_FRAME, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use sallyport_runtime::{code, read_frame, tls, write_frame, FrameError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    config::Config,
    relay::Shared,
    tunnel::registry::{AgentSession, PendingCommand},
};

/// How often the relay probes the control stream.
const PING_INTERVAL: Duration = Duration::from_secs(15);

/// Accepts agent connections until `stop` is cancelled. Each connection gets its own task.
pub(crate) async fn accept_loop(endpoint: Endpoint, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = stop.cancelled() => None,
        };
        let Some(incoming) = incoming else { break };
        // Under a handshake flood, make unvalidated peers prove their address first.
        if !incoming.remote_address_validated()
            && endpoint.open_connections() > shared.config.limits.max_incoming
        {
            if let Err(e) = incoming.retry() {
                debug!(error = %e, "retry refused");
            }
            continue;
        }
        let remote = incoming.remote_address();
        let shared = shared.clone();
        shared
            .tasks
            .spawn(handle_incoming(incoming, shared.clone()).instrument(info_span!("tunnel", %remote)));
    }
}

async fn handle_incoming(incoming: Incoming, shared: Arc<Shared>) {
    let limits = &shared.config.limits;
    let connection = match tokio::time::timeout(limits.handshake_timeout, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            warn!(error = %e, "handshake failed");
            shared.metrics.handshake_failed("tls");
            return;
        }
        Err(_) => {
            warn!(timeout = ?limits.handshake_timeout, "handshake timed out");
            shared.metrics.handshake_failed("timeout");
            return;
        }
    };
    let alpn = connection
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() == Some(sallyport_proto::enroll::ALPN_ENROLL) {
        match &shared.enrollment {
            Some(enrollment) => crate::trust::enroll::serve(connection, enrollment).await,
            None => connection.close(code(close::REFUSED), b"enrollment is off"),
        }
        return;
    }
    let (name, serial) = match agent_identity(&connection) {
        Ok(identity) => identity,
        Err(reason) => {
            warn!(%reason, "agent certificate refused");
            shared.metrics.handshake_failed("certificate");
            connection.close(code(close::REFUSED), reason.as_bytes());
            return;
        }
    };
    if shared.revocations.contains(&serial) {
        warn!(agent = %name, %serial, "revoked certificate refused");
        shared.metrics.handshake_failed("revoked");
        connection.close(code(close::REFUSED), b"certificate revoked");
        return;
    }
    serve_agent(connection, name.clone(), serial, shared)
        .instrument(info_span!("agent", agent = %name))
        .await;
}

/// The agent's name: the first DNS name in its client certificate, which the handshake verified.
fn agent_identity(connection: &Connection) -> Result<(String, String), String> {
    let certs = connection
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .ok_or("no client certificate")?;
    let leaf = certs.first().ok_or("empty client certificate chain")?;
    let info = tls::inspect(leaf).map_err(|e| e.to_string())?;
    let name = info.dns_name.ok_or("client certificate has no DNS name")?;
    if !sallyport_proto::is_valid_name(&name) {
        return Err(format!("client certificate name {name:?} is not a valid agent name"));
    }
    Ok((name, info.serial))
}

async fn serve_agent(connection: Connection, name: String, serial: String, shared: Arc<Shared>) {
    let (mut send, mut recv, hello) = match first_message(&connection, &shared).await {
        Ok(v) => v,
        Err(FirstMessageError::Gone) => return,
        Err(FirstMessageError::Protocol(reason)) => {
            warn!(%reason, "closing agent: protocol error");
            shared.metrics.handshake_failed("protocol");
            connection.close(code(close::PROTOCOL_ERROR), reason.as_bytes());
            return;
        }
    };
    let welcome = match admit(&shared.config, &name, &hello) {
        Ok(welcome) => welcome,
        Err(reason) => {
            warn!(%reason, "agent refused");
            shared.metrics.handshake_failed("refused");
            let _ =
                write_frame(&mut send, &RelayMessage::Refused { reason: reason.clone() }, MAX_CONTROL_FRAME)
                    .await;
            connection.close(code(close::REFUSED), reason.as_bytes());
            return;
        }
    };
    let services: BTreeSet<String> = welcome.published().map(str::to_owned).collect();
    for (service, reason) in welcome.refused() {
        warn!(%service, %reason, "service not published");
    }
    if let Err(e) = write_frame(&mut send, &RelayMessage::Welcome(welcome.clone()), MAX_CONTROL_FRAME).await {
        info!(error = %e, "agent left during the handshake");
        return;
    }
    let id = shared.registry.next_id();
    let (commands, mut command_rx) = mpsc::channel(16);
    let containers = Arc::new(Mutex::new(Vec::new()));
    let session = AgentSession {
        id,
        name: name.clone(),
        remote: connection.remote_address(),
        software: hello.software,
        version: welcome.version,
        services: services.clone(),
        connected_at: std::time::SystemTime::now(),
        containers: containers.clone(),
        serial,
        connection: connection.clone(),
        commands,
    };
    if let Some(old) = shared.registry.insert(session) {
        info!(old_remote = %old.remote, "replacing the agent's previous connection");
        old.connection.close(code(close::REPLACED), b"replaced by a newer connection");
    }
    info!(remote = %connection.remote_address(), ?services, version = welcome.version, "agent connected");

    let pending = Mutex::new(HashMap::new());
    let (replies, mut reply_rx) = mpsc::channel(4);
    let reader = Reader { name: &name, shared: &shared, pending: &pending, containers: &containers, replies };
    let ended = tokio::select! {
        r = control_reader(&mut recv, reader) => r,
        r = control_writer(&mut send, &mut command_rx, &mut reply_rx, &pending) => r,
        r = crate::expose::udp::from_agent(&connection, &shared) => r,
    };
    shared.registry.remove(&name, id);
    match ended {
        Ok(reason) => info!(%reason, "agent disconnected"),
        Err(reason) => {
            warn!(%reason, "closing agent: protocol error");
            connection.close(code(close::PROTOCOL_ERROR), reason.as_bytes());
        }
    }
}

enum FirstMessageError {
    /// The connection went away; nothing to tell anyone.
    Gone,
    /// The agent broke the protocol; the reason goes to the log and into the close frame.
    Protocol(String),
}

/// Accepts the control stream and reads `Hello`, both within the handshake timeout.
async fn first_message(
    connection: &Connection,
    shared: &Shared,
) -> Result<(SendStream, RecvStream, Hello), FirstMessageError> {
    let timeout = shared.config.limits.handshake_timeout;
    let read = async {
        let (send, mut recv) = connection.accept_bi().await.map_err(|_| FirstMessageError::Gone)?;
        let mut buf = Vec::new();
        match read_frame::<AgentMessage>(&mut recv, MAX_CONTROL_FRAME, &mut buf).await {
            Ok(Some(AgentMessage::Hello(hello))) => Ok((send, recv, hello)),
            Ok(Some(other)) => Err(FirstMessageError::Protocol(format!(
                "first control message must be Hello, got {}",
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
    }
}

/// Decides whether `agent` may connect and which of its services the relay publishes.
pub(crate) fn admit(config: &Config, agent: &str, hello: &Hello) -> Result<Welcome, String> {
    if !config.knows_agent(agent) {
        return Err(format!("agent {agent:?} is not allowed on this relay (no service names it)"));
    }
    let version = negotiate_version(hello.min_version, hello.max_version).ok_or_else(|| {
        format!(
            "no common protocol version: relay speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, agent {}..={}",
            hello.min_version, hello.max_version
        )
    })?;
    let services = hello
        .services
        .iter()
        .map(|offer| {
            let refused = match config.services.get(&offer.name) {
                Some(s) if s.agent == agent => None,
                Some(s) => Some(format!("service {:?} belongs to agent {:?}", offer.name, s.agent)),
                None => Some(format!("service {:?} is not configured on this relay", offer.name)),
            };
            ServiceVerdict { name: offer.name.clone(), refused }
        })
        .collect();
    Ok(Welcome { version, software: crate::relay::SOFTWARE.to_owned(), services })
}

/// Commands sent to the agent and waiting for its result, by id.
type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<String, String>>>>;

/// What the control reader works with.
struct Reader<'a> {
    name: &'a str,
    shared: &'a Shared,
    pending: &'a Pending,
    containers: &'a Mutex<Vec<ContainerReport>>,
    /// Answers to the agent's requests, sent by the writer.
    replies: mpsc::Sender<RelayMessage>,
}

/// Reads control messages until the stream ends (`Ok`) or the agent breaks the protocol (`Err`).
async fn control_reader(recv: &mut RecvStream, reader: Reader<'_>) -> Result<String, String> {
    let Reader { name, shared, pending, containers, replies } = reader;
    let mut buf = Vec::new();
    loop {
        match read_frame::<AgentMessage>(recv, MAX_CONTROL_FRAME, &mut buf).await {
            Ok(Some(AgentMessage::Pong { nonce })) => debug!(nonce, "pong"),
            Ok(Some(AgentMessage::CommandResult { id, result })) => {
                let waiter = pending.lock().ok().and_then(|mut p| p.remove(&id));
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(result);
                    }
                    None => debug!(id, "result of a command nobody waits for"),
                }
            }
            Ok(Some(AgentMessage::Renew { csr_pem })) => {
                let renewed = match &shared.enrollment {
                    None => Err("certificate renewal is off on this relay (no relay.ca_key)".to_owned()),
                    Some(enrollment) => enrollment
                        .ca
                        .issue_agent_for_csr(name, &csr_pem, enrollment.validity)
                        .map_err(|e| format!("bad certificate request: {e}")),
                };
                match &renewed {
                    Ok(_) => info!("agent certificate renewed"),
                    Err(reason) => warn!(%reason, "agent certificate not renewed"),
                }
                if replies.send(RelayMessage::Renewed(renewed)).await.is_err() {
                    return Ok("control stream closing".into());
                }
            }
            Ok(Some(AgentMessage::Containers(reports))) => {
                for report in &reports {
                    debug!(container = %report.name, state = %report.state, "container state");
                }
                if let Ok(mut current) = containers.lock() {
                    *current = reports;
                }
            }
            Ok(Some(AgentMessage::Hello(_))) => return Err("Hello sent twice".into()),
            Ok(None) => return Ok("control stream finished".into()),
            Err(e) if e.is_protocol_violation() => return Err(e.to_string()),
            Err(e) => return Ok(e.to_string()),
        }
    }
}

/// Sends a `Ping` every [`PING_INTERVAL`] and the commands operators queue; ends only when the
/// stream fails.
async fn control_writer(
    send: &mut SendStream,
    commands: &mut mpsc::Receiver<PendingCommand>,
    replies: &mut mpsc::Receiver<RelayMessage>,
    pending: &Pending,
) -> Result<String, String> {
    let mut nonce = 0u64;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        let message = tokio::select! {
            _ = ping.tick() => {
                nonce += 1;
                RelayMessage::Ping { nonce }
            }
            Some(reply) = replies.recv() => reply,
            Some(PendingCommand { command, reply }) = commands.recv() => {
                if let Ok(mut p) = pending.lock() {
                    p.insert(command.id, reply);
                }
                RelayMessage::Command(command)
            }
        };
        if let Err(e) = write_frame(send, &message, MAX_CONTROL_FRAME).await {
            return match e {
                FrameError::Encode(e) => Err(e.to_string()),
                other => Ok(other.to_string()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sallyport_proto::ServiceOffer;
    use std::path::Path;

    fn config() -> Config {
        Config::from_toml(
            r#"
[relay]
ca_cert = "ca.crt"
cert = "relay.crt"
key = "relay.key"
[services.web]
agent = "winbox"
listen = "127.0.0.1:0"
[services.db]
agent = "other"
listen = "127.0.0.1:0"
"#,
            Path::new("relay.toml"),
        )
        .expect("valid config")
    }

    fn hello(min: u16, max: u16, services: &[&str]) -> Hello {
        Hello {
            min_version: min,
            max_version: max,
            software: "test".into(),
            services: services.iter().map(|s| ServiceOffer { name: (*s).into() }).collect(),
        }
    }

    #[test]
    fn admission_checks_agent_version_and_each_service() {
        let c = config();
        let w = admit(&c, "winbox", &hello(1, 5, &["web", "db", "nope"])).expect("admitted");
        assert_eq!(w.version, PROTOCOL_VERSION);
        assert_eq!(w.services[0].refused, None);
        assert!(w.services[1].refused.as_deref().is_some_and(|r| r.contains("belongs to agent \"other\"")));
        assert!(w.services[2].refused.as_deref().is_some_and(|r| r.contains("not configured")));
        let e = admit(&c, "stranger", &hello(1, 1, &["web"])).expect_err("unknown agent");
        assert!(e.contains("not allowed"), "{e}");
        let e = admit(&c, "winbox", &hello(90, 99, &["web"])).expect_err("no common version");
        assert!(e.contains("no common protocol version"), "{e}");
    }
}
