//! The control stream's opening: `Seek`, `Hello`, then `Welcome` and `Replicas` (or `Held`,
//! `Refused`).

use quinn::ConnectionError;
use sallyport_proto::{codes::close, AgentMessage, RelayMessage, Replicas, Welcome, MAX_CONTROL_FRAME};
use sallyport_runtime::{
    code,
    link::{Connection, RecvStream, SendStream},
    read_frame, write_frame,
};

use super::*;

pub(super) type Session = (Connection, SendStream, RecvStream, Welcome, Option<Replicas>);

/// The control stream's opening: `Seek` first when the agent holds tunnels to other replicas of
/// this relay, then `Hello`; the answer is `Welcome` (followed, from version 4 on, by `Replicas`),
/// `Held` or `Refused`.
pub(super) async fn hello(
    connection: &Connection,
    tunnels: &Tunnels,
    held: &[String],
) -> Result<(SendStream, RecvStream, Welcome, Option<Replicas>), TunnelError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    if !held.is_empty() {
        write_frame(&mut send, &AgentMessage::Seek { held: held.to_vec() }, MAX_CONTROL_FRAME).await?;
    }
    write_frame(&mut send, &AgentMessage::Hello(tunnels.hello()), MAX_CONTROL_FRAME).await?;
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
            | RelayMessage::Replicas(_),
        ) => return Err(TunnelError::Protocol("a control message before Welcome".into())),
        None => return Err(TunnelError::Protocol("control stream ended before Welcome".into())),
    };
    if welcome.version < 4 {
        return Ok((send, recv, welcome, None));
    }
    match read_frame::<RelayMessage>(&mut recv, MAX_CONTROL_FRAME, &mut buf).await? {
        Some(RelayMessage::Replicas(replicas)) => Ok((send, recv, welcome, Some(replicas))),
        Some(_) => Err(TunnelError::Protocol("Replicas must follow Welcome (version 4)".into())),
        None => Err(TunnelError::Protocol("control stream ended after Welcome".into())),
    }
}

pub(super) fn refusal(connection: &Connection) -> Option<TunnelError> {
    match connection.close_reason()? {
        ConnectionError::ApplicationClosed(c) if c.error_code == code(close::REFUSED) => {
            Some(TunnelError::Refused(String::from_utf8_lossy(&c.reason).into_owned()))
        }
        _ => None,
    }
}
