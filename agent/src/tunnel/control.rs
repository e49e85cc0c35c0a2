//! The control stream after `Welcome`: pings, commands, renewals, lanes, replicas and offers.
//! Reading and writing run side by side, joined by a queue, so a slow command never holds up a
//! ping; the reader hands each message to its one handler.

use std::{sync::Arc, time::Duration};

use sallyport_proto::{AgentMessage, Command, RelayMessage, ServiceVerdict, MAX_CONTROL_FRAME};
use sallyport_runtime::{
    link::{RecvStream, SendStream, Transport},
    read_frame, write_frame, FrameError,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    commands, health,
    lanes::LaneStarter,
    renew,
    replicas::Group,
    tunnels::{TunnelStatus, Tunnels},
};

/// What the control loop of one tunnel needs to know of it.
pub(crate) struct Control<'a> {
    /// The slot's status key.
    pub(crate) key: &'a str,
    /// The protocol version the relay chose.
    pub(crate) version: u16,
    pub(crate) lanes: &'a LaneStarter,
    pub(crate) group: &'a Group,
    pub(crate) transport: Transport,
    /// Why this transport.
    pub(crate) why: &'a str,
}

/// Runs the control stream until it ends or breaks.
pub(crate) async fn control_loop(
    send: &mut SendStream,
    recv: &mut RecvStream,
    tunnels: &Arc<Tunnels>,
    control: Control<'_>,
) {
    let (tx, mut rx) = mpsc::channel::<AgentMessage>(64);
    if control.version >= 5 {
        let said =
            AgentMessage::Transport { transport: control.transport.to_string(), why: control.why.to_owned() };
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
    let (checks, checks_rx) = tokio::sync::watch::channel(Vec::new());
    let handlers = Handlers { tx: &tx, tunnels, control: &control, checks };
    tokio::select! {
        () = writer => {}
        () = read(recv, &handlers) => {}
        () = report_containers(&tx, tunnels, control.version) => {}
        () = offer_after_reloads(&tx, tunnels, control.version) => {}
        () = renew::when_due(&tx, &tunnels.renewal) => {}
        () = report_drain(&tx, tunnels, control.version) => {}
        never = health::run(&tx, &tunnels.targets, checks_rx) => match never {},
    }
}

/// Reads the relay's messages and hands each to its handler, until the stream ends, breaks, or
/// a handler says the tunnel cannot go on.
async fn read(recv: &mut RecvStream, handlers: &Handlers<'_>) {
    let mut buf = Vec::new();
    loop {
        match read_frame::<RelayMessage>(recv, MAX_CONTROL_FRAME, &mut buf).await {
            Ok(Some(message)) => {
                if handlers.handle(message).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "control stream ended");
                return;
            }
        }
    }
}

/// The tunnel cannot go on (the writer is gone, or the relay sent what it must not).
struct Ended;

/// One handler per message from the relay.
struct Handlers<'a> {
    tx: &'a mpsc::Sender<AgentMessage>,
    tunnels: &'a Arc<Tunnels>,
    control: &'a Control<'a>,
    /// The health checks the relay asked for.
    checks: tokio::sync::watch::Sender<Vec<sallyport_proto::HealthCheck>>,
}

impl Handlers<'_> {
    async fn handle(&self, message: RelayMessage) -> Result<(), Ended> {
        match message {
            RelayMessage::Ping { nonce } => {
                self.tx.send(AgentMessage::Pong { nonce }).await.map_err(|_| Ended)
            }
            RelayMessage::Renewed(result) => {
                let tunnels = self.tunnels;
                renew::apply(result, &tunnels.renewal, &tunnels.credentials, &tunnels.config.get());
                Ok(())
            }
            RelayMessage::Lanes { session, max } => {
                self.control.lanes.start(session, max, self.tunnels);
                Ok(())
            }
            RelayMessage::Replicas(replicas) => {
                self.control.group.observe(replicas.serving);
                Ok(())
            }
            RelayMessage::Published(verdicts) => {
                self.published(&verdicts);
                Ok(())
            }
            RelayMessage::Command(command) => {
                self.command(command);
                Ok(())
            }
            RelayMessage::Checks(checks) => {
                info!(checks = checks.len(), "the relay asks for health checks");
                self.checks.send_replace(checks);
                Ok(())
            }
            other => {
                warn!(message = ?other, "unexpected control message from the relay");
                Err(Ended)
            }
        }
    }

    /// The relay's verdicts on the services offered again after a reload.
    fn published(&self, verdicts: &[ServiceVerdict]) {
        let published: Vec<String> =
            verdicts.iter().filter(|v| v.refused.is_none()).map(|v| v.name.clone()).collect();
        for verdict in verdicts {
            if let Some(reason) = &verdict.refused {
                warn!(service = %verdict.name, %reason, "relay does not publish this service");
            }
        }
        info!(?published, "the relay publishes the services after the reload");
        let key = self.control.key;
        let now = self.tunnels.status().borrow().get(key).cloned();
        if let Some(TunnelStatus::Connected { remote, replica, transport, why, .. }) = now {
            self.tunnels
                .set_status(key, TunnelStatus::Connected { remote, published, replica, transport, why });
        }
    }

    /// A container command runs on its own (a start may take a while); its result goes back on
    /// the control stream.
    fn command(&self, command: Command) {
        let (tx, tunnels) = (self.tx.clone(), self.tunnels.clone());
        self.tunnels.tasks.spawn(async move {
            let id = command.id;
            let result = commands::answer(command, &tunnels).await;
            let _ = tx.send(AgentMessage::CommandResult { id, result }).await;
        });
    }
}

/// Reports the containers' states and failed starts as they change.
async fn report_containers(tx: &mpsc::Sender<AgentMessage>, tunnels: &Tunnels, version: u16) {
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
}

/// Tells the relay whether this agent asks to be drained: at once when it does, then at every change.
async fn report_drain(tx: &mpsc::Sender<AgentMessage>, tunnels: &Tunnels, version: u16) {
    if version < 6 {
        return std::future::pending().await;
    }
    let mut draining = tunnels.draining.subscribe();
    let mut said = false;
    loop {
        let now = *draining.borrow_and_update();
        if now != said {
            if tx.send(AgentMessage::Drain { draining: now }).await.is_err() {
                return;
            }
            said = now;
        }
        if draining.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// After a reload, the services are offered again on this tunnel: no reconnect.
async fn offer_after_reloads(tx: &mpsc::Sender<AgentMessage>, tunnels: &Tunnels, version: u16) {
    let mut reloads = tunnels.offers.subscribe();
    reloads.mark_unchanged();
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
}
