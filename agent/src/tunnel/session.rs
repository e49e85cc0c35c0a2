//! Opening a tunnel's session: dial, then on the control stream `Seek` (when the agent holds
//! tunnels to other replicas of this relay) and `Hello`, answered by `Welcome` and `Replicas`,
//! `Held` or `Refused`. And the handshake alone, for `check --connect`.

use std::time::{Duration, Instant};

use sallyport_proto::{
    codes::close, AgentMessage, Hello, RelayMessage, Replicas, Welcome, MAX_CONTROL_FRAME,
};
use sallyport_runtime::{
    code,
    link::{Connection, RecvStream, SendStream, Transport},
    quic::connect::ClientEndpoint,
    read_frame, write_frame,
};

use super::{
    connect::{dial, resolve, Via},
    error::TunnelError,
    tunnels::Tunnels,
};
use crate::config::{RelayAddr, QUIC_WAIT};

/// A tunnel with its control stream open and the relay's welcome read.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) connection: Connection,
    pub(crate) send: SendStream,
    pub(crate) recv: RecvStream,
    pub(crate) welcome: Welcome,
    /// Which replica the connection reached and which serve (protocol 4 on).
    pub(crate) replicas: Option<Replicas>,
}

/// Dials `relay` over `transport` and opens the session; with `answer_within`, the transport's
/// handshake must be done within that.
pub(crate) async fn open(
    relay: &RelayAddr,
    endpoint: &mut Option<ClientEndpoint>,
    transport: Transport,
    tunnels: &Tunnels,
    answer_within: Option<Duration>,
    held: &[String],
) -> Result<Session, TunnelError> {
    let addr = resolve(relay).await?;
    let via = Via::to(transport, addr, endpoint)?;
    let dialer = tunnels.credentials.current();
    let (connection, (send, recv, welcome, replicas)) =
        dial(&dialer, via, (addr, &relay.server_name), answer_within, |c| async move {
            hello(&c, tunnels.hello(), held).await
        })
        .await?;
    Ok(Session { connection, send, recv, welcome, replicas })
}

/// The control stream's opening, on `connection`.
async fn hello(
    connection: &Connection,
    hello: Hello,
    held: &[String],
) -> Result<(SendStream, RecvStream, Welcome, Option<Replicas>), TunnelError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    if !held.is_empty() {
        write_frame(&mut send, &AgentMessage::Seek { held: held.to_vec() }, MAX_CONTROL_FRAME).await?;
    }
    write_frame(&mut send, &AgentMessage::Hello(hello), MAX_CONTROL_FRAME).await?;
    let mut buf = Vec::new();
    let welcome = match read_frame::<RelayMessage>(&mut recv, MAX_CONTROL_FRAME, &mut buf).await? {
        Some(RelayMessage::Welcome(welcome)) => welcome,
        Some(RelayMessage::Refused { reason }) => return Err(TunnelError::Refused(reason)),
        Some(RelayMessage::Held { replica }) => return Err(TunnelError::Held(replica)),
        Some(
            RelayMessage::Ping { .. }
            | RelayMessage::Command(_)
            | RelayMessage::Renewed(_)
            | RelayMessage::Published(_)
            | RelayMessage::Lanes { .. }
            | RelayMessage::LaneAccepted
            | RelayMessage::Replicas(_)
            | RelayMessage::Checks(_),
        ) => return Err(TunnelError::Protocol("a control message before Welcome")),
        None => return Err(TunnelError::Protocol("control stream ended before Welcome")),
    };
    if welcome.version < 4 {
        return Ok((send, recv, welcome, None));
    }
    match read_frame::<RelayMessage>(&mut recv, MAX_CONTROL_FRAME, &mut buf).await? {
        Some(RelayMessage::Replicas(replicas)) => Ok((send, recv, welcome, Some(replicas))),
        Some(_) => Err(TunnelError::Protocol("Replicas must follow Welcome (version 4)")),
        None => Err(TunnelError::Protocol("control stream ended after Welcome")),
    }
}

/// Whether `relay` can be reached over `transport`: the handshake (mutual TLS) only, closed at
/// once, so a running agent's tunnel is not disturbed. How long it took, or why not.
pub(crate) async fn probe(
    relay: &RelayAddr,
    transport: Transport,
    tunnels: &Tunnels,
) -> Result<Duration, TunnelError> {
    let addr = resolve(relay).await?;
    let mut endpoint = None;
    let via = Via::to(transport, addr, &mut endpoint)?;
    let started = Instant::now();
    let dialer = tunnels.credentials.current();
    let (connection, ()) =
        dial(&dialer, via, (addr, &relay.server_name), Some(QUIC_WAIT), |_| async { Ok(()) }).await?;
    let took = started.elapsed();
    connection.close(code(close::NORMAL), b"check");
    if let Some(endpoint) = endpoint {
        endpoint.close().await;
    }
    Ok(took)
}
