//! Lanes: further connections to a relay beside the tunnel, which the relay spreads data streams
//! over. Each lane runs on its own thread, with its own runtime and its own UDP socket, so the
//! agent's share of the work (QUIC, TLS, system calls, copying to targets) uses more than one
//! core. A lane names the tunnel's session in its first control message and ends with the tunnel.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use sallyport_proto::{codes::close, AgentMessage, RelayMessage, MAX_CONTROL_FRAME};
use sallyport_runtime::{
    code,
    link::{Connection, RecvStream, SendStream, Transport},
    quic::connect::ClientEndpoint,
    read_frame, write_frame,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, info_span, warn, Instrument};

use super::{
    connect::{dial, Via},
    error::TunnelError,
    replicas,
    streams::accept_streams,
    tunnels::Tunnels,
};
use crate::{backoff::Backoff, config::RelayAddr};

/// Where lanes of one tunnel go, and when they stop (the tunnel ended, or the agent stops).
#[derive(Debug, Clone)]
pub(crate) struct LaneStarter {
    pub(crate) relay: RelayAddr,
    /// The address the tunnel reached: lanes go to the same relay.
    pub(crate) addr: SocketAddr,
    /// Lanes run over the tunnel's transport.
    pub(crate) transport: Transport,
    pub(crate) stop: CancellationToken,
}

impl LaneStarter {
    /// Opens the lanes the relay allows for session `session`: up to `max` connections in all,
    /// the tunnel's included.
    pub(crate) fn start(&self, session: u64, max: u16, tunnels: &Arc<Tunnels>) {
        let wanted = tunnels.config.get().agent.lanes.min(usize::from(max));
        for index in 1..wanted {
            let (lane, tunnels) = (self.clone(), tunnels.clone());
            let span = info_span!("lane", index);
            let spawned =
                std::thread::Builder::new().name(format!("sallyport-lane-{index}")).spawn(move || {
                    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime.block_on(lane.keep(session, tunnels).instrument(span)),
                        Err(e) => warn!(error = %e, "cannot start a lane's runtime"),
                    }
                });
            if let Err(e) = spawned {
                warn!(error = %e, "cannot start a lane's thread: the tunnel carries its streams alone");
                return;
            }
        }
    }

    /// Keeps one lane up until the tunnel ends; a lane that drops is opened again, with the
    /// tunnel's reconnect backoff between failed attempts.
    async fn keep(self, session: u64, tunnels: Arc<Tunnels>) {
        let mut endpoint = None;
        let timing = tunnels.config.get().agent.clone();
        let mut backoff = Backoff::new(timing.reconnect_min, timing.reconnect_max);
        let mut held_tries = 0;
        loop {
            let delay = match self.run(session, &mut endpoint, &tunnels).await {
                // It was up: dial again at once.
                Ok(()) => {
                    backoff.reset();
                    held_tries = 0;
                    Duration::ZERO
                }
                // Through a replicated relay's shared address the lane reached another replica:
                // again, from a new socket (so a new flow, which may land elsewhere).
                Err(TunnelError::Held(replica)) => {
                    debug!(%replica, "the lane reached another replica: dialing again");
                    held_tries += 1;
                    ClientEndpoint::new_port(&mut endpoint);
                    replicas::seek_delay(held_tries)
                }
                Err(TunnelError::Refused(reason)) => {
                    info!(%reason, "the relay refused the lane");
                    break;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    debug!(error = %e, retry_in = ?delay, "lane lost");
                    delay
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.stop.cancelled() => break,
            }
        }
        if let Some(endpoint) = endpoint {
            let udp = endpoint.close().await;
            debug!(%udp, "lane's QUIC socket");
        }
    }

    /// One lane connection: dial, `Lane`, `LaneAccepted`, then serve its data streams until it or
    /// the tunnel ends.
    async fn run(
        &self,
        session: u64,
        endpoint: &mut Option<ClientEndpoint>,
        tunnels: &Arc<Tunnels>,
    ) -> Result<(), TunnelError> {
        let via = Via::to(self.transport, self.addr, endpoint)?;
        let dialer = tunnels.credentials.current();
        let opened = dial(&dialer, via, (self.addr, &self.relay.server_name), None, |c| async move {
            join(&c, session).await
        });
        let (connection, _control) = tokio::select! {
            opened = opened => opened?,
            () = self.stop.cancelled() => return Ok(()),
        };
        info!(remote = %connection.remote_address(), "lane up");
        let open = TaskTracker::new();
        tokio::select! {
            () = accept_streams(&connection, tunnels, &open) => {}
            () = self.stop.cancelled() => connection.close(code(close::NORMAL), b"tunnel ended"),
        }
        Ok(())
    }
}

/// Opens the lane's control stream and joins session `session`.
async fn join(connection: &Connection, session: u64) -> Result<(SendStream, RecvStream), TunnelError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    write_frame(&mut send, &AgentMessage::Lane { session }, MAX_CONTROL_FRAME).await?;
    let mut buf = Vec::new();
    match read_frame::<RelayMessage>(&mut recv, MAX_CONTROL_FRAME, &mut buf).await? {
        Some(RelayMessage::LaneAccepted) => Ok((send, recv)),
        Some(RelayMessage::Refused { reason }) => Err(TunnelError::Refused(reason)),
        Some(RelayMessage::Held { replica }) => Err(TunnelError::Held(replica)),
        Some(_) => Err(TunnelError::Protocol("a control message other than LaneAccepted on a lane")),
        None => Err(TunnelError::Protocol("lane control stream ended before LaneAccepted")),
    }
}
