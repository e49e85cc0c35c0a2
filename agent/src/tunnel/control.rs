//! The control stream after `Welcome`: pings, commands, renewals, lanes, replicas, offers.

use std::{sync::Arc, time::Duration};

use sallyport_proto::{AgentMessage, RelayMessage, MAX_CONTROL_FRAME};
use sallyport_runtime::{
    link::{RecvStream, SendStream, Transport},
    read_frame, write_frame, FrameError,
};
use tracing::{debug, info, warn};

use super::*;
use super::{lanes::LaneStarter, replicas::Group};

/// The control stream after `Welcome`: answers pings, runs container commands, and reports
/// container states, until the stream ends or breaks. Reading and writing run side by side, joined
/// by a queue, so a slow command never holds up a ping.
pub(super) async fn control_loop(
    send: &mut SendStream,
    recv: &mut RecvStream,
    tunnels: &Arc<Tunnels>,
    (relay, version): (&str, u16),
    lanes: &LaneStarter,
    group: &Group,
    (transport, why): (Transport, &str),
) {
    let mut reloads = tunnels.offers.subscribe();
    reloads.mark_unchanged();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<AgentMessage>(64);
    if version >= 5 {
        let said = AgentMessage::Transport { transport: transport.to_string(), why: why.to_owned() };
        let _ = tx.try_send(said);
    }
    let writer = async {
        while let Some(message) = rx.recv().await {
            match write_frame(send, &message, MAX_CONTROL_FRAME).await {
                Ok(()) => {}
                // One message that does not fit is dropped; the tunnel goes on.
                Err(FrameError::Encode(e)) => warn!(error = %e, "control message not sent"),
                Err(_) => return,
            }
        }
    };
    let reader = async {
        let mut buf = Vec::new();
        loop {
            match read_frame::<RelayMessage>(recv, MAX_CONTROL_FRAME, &mut buf).await {
                Ok(Some(RelayMessage::Ping { nonce })) => {
                    if tx.send(AgentMessage::Pong { nonce }).await.is_err() {
                        return;
                    }
                }
                Ok(Some(RelayMessage::Renewed(result))) => renew::apply(result, tunnels),
                Ok(Some(RelayMessage::Lanes { session, max })) => lanes.start(session, max, tunnels),
                Ok(Some(RelayMessage::Replicas(replicas))) => group.observe(replicas.serving),
                Ok(Some(RelayMessage::Published(verdicts))) => {
                    let published: Vec<String> =
                        verdicts.iter().filter(|v| v.refused.is_none()).map(|v| v.name.clone()).collect();
                    for verdict in &verdicts {
                        if let Some(reason) = &verdict.refused {
                            warn!(service = %verdict.name, %reason, "relay does not publish this service");
                        }
                    }
                    info!(?published, "the relay publishes the services after the reload");
                    let now = tunnels.status().borrow().get(relay).cloned();
                    if let Some(TunnelStatus::Connected { remote, replica, transport, why, .. }) = now {
                        tunnels.set_status(
                            relay,
                            TunnelStatus::Connected { remote, published, replica, transport, why },
                        );
                    }
                }
                Ok(Some(RelayMessage::Command(command))) => {
                    let (tx, tunnels) = (tx.clone(), tunnels.clone());
                    tokio::spawn(async move {
                        let id = command.id;
                        let result = commands::answer(command, &tunnels).await;
                        let _ = tx.send(AgentMessage::CommandResult { id, result }).await;
                    });
                }
                Ok(Some(other)) => {
                    warn!(message = ?other, "unexpected control message from the relay");
                    return;
                }
                Ok(None) => return,
                Err(e) => {
                    debug!(error = %e, "control stream ended");
                    return;
                }
            }
        }
    };
    let reporter = async {
        if tunnels.targets.containers.is_empty() {
            return std::future::pending().await;
        }
        let (mut last, mut last_failures) = (None, None);
        loop {
            let states = tunnels.targets.containers.reports();
            if last.as_ref() != Some(&states) {
                if tx.send(AgentMessage::Containers(states.clone())).await.is_err() {
                    return;
                }
                last = Some(states);
            }
            let failures = tunnels.targets.containers.start_failures();
            if version >= 4 && last_failures.as_ref() != Some(&failures) {
                if tx.send(AgentMessage::StartFailures(failures.clone())).await.is_err() {
                    return;
                }
                last_failures = Some(failures);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    // After a reload, the services are offered again on this tunnel: no reconnect.
    let offerer = async {
        while reloads.changed().await.is_ok() {
            if version < 2 {
                warn!(
                    version,
                    "the relay speaks an older protocol: changed services are offered at the next reconnect"
                );
                continue;
            }
            if tx.send(AgentMessage::Offer(tunnels.offers())).await.is_err() {
                return;
            }
        }
        std::future::pending().await
    };
    tokio::select! {
        () = writer => {}
        () = reader => {}
        () = reporter => {}
        () = offerer => {}
        () = renew::when_due(&tx, tunnels) => {}
    }
}
