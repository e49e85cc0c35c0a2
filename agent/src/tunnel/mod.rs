//! One tunnel per relay: connect (mutual TLS), say `Hello`, get `Welcome`, then serve data streams
//! and answer pings until the connection ends; reconnect forever with full-jitter backoff.

pub(crate) mod commands;
mod lanes;
pub(crate) mod renew;
mod replicas;

use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use sallyport_proto::{
    codes::close, AgentMessage, Hello, RelayMessage, Replicas, ServiceOffer, Welcome, MAX_CONTROL_FRAME,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use sallyport_runtime::{
    code, read_frame,
    sync::read,
    transport::{self, StreamCredit},
    udp_count::{counted_endpoint, UdpCounters},
    write_frame, FrameError,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use self::{lanes::LaneStarter, replicas::Group};
use crate::{
    backoff::Backoff,
    config::{Live, RelayAddr},
    targets::{dial, Targets},
};
/// This build, as the agent describes itself to relays.
pub const SOFTWARE: &str = concat!("sallyport-agent ", env!("CARGO_PKG_VERSION"));

/// The state of the tunnel to one relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelStatus {
    Connecting,
    /// Up; `replica` names the replica it reached, for a relay that runs as several.
    Connected {
        remote: SocketAddr,
        published: Vec<String>,
        replica: Option<String>,
    },
    Retrying {
        error: String,
    },
}

/// What the tunnels to every relay share.
#[derive(Debug)]
pub(crate) struct Tunnels {
    /// The configuration in force (a reload of agent.toml replaces it).
    pub(crate) config: Arc<Live>,
    /// Bumped by each applied reload: every live tunnel then offers the relay its services again.
    pub(crate) offers: watch::Sender<u64>,
    /// What the relay's streams and datagrams are dialed to.
    pub(crate) targets: Arc<Targets>,
    /// Rebuilt when the certificate is renewed; each new connection takes the current one.
    pub(crate) client_config: RwLock<quinn::ClientConfig>,
    /// Validity of the current certificate (seconds since the epoch): renewal is due when a third
    /// of it is left.
    pub(crate) cert_validity: Mutex<(i64, i64)>,
    /// The key of a renewal request in flight and when it was sent, until its certificate arrives.
    pub(crate) renewal_key: Mutex<Option<(String, Instant)>>,
    /// Data streams in flight.
    pub(crate) streams: TaskTracker,
    /// Ids of container commands already run, with their expiry: a replay is refused.
    pub(crate) seen_commands: Mutex<BTreeMap<u64, u64>>,
    status: watch::Sender<BTreeMap<String, TunnelStatus>>,
}

impl Tunnels {
    pub(crate) fn new(
        config: Arc<Live>,
        targets: Arc<Targets>,
        client_config: quinn::ClientConfig,
        cert_validity: (i64, i64),
    ) -> Self {
        Self {
            config,
            offers: watch::Sender::new(0),
            targets,
            client_config: RwLock::new(client_config),
            cert_validity: Mutex::new(cert_validity),
            renewal_key: Mutex::new(None),
            streams: TaskTracker::new(),
            seen_commands: Mutex::default(),
            status: watch::Sender::new(BTreeMap::new()),
        }
    }

    /// The state of each tunnel, by relay address.
    pub(crate) fn status(&self) -> watch::Receiver<BTreeMap<String, TunnelStatus>> {
        self.status.subscribe()
    }

    pub(crate) fn set_status(&self, relay: &str, status: TunnelStatus) {
        self.status.send_modify(|all| {
            all.insert(relay.to_owned(), status);
        });
    }

    fn remove_status(&self, relay: &str) {
        self.status.send_modify(|all| {
            all.remove(relay);
        });
    }

    /// The services this agent offers now.
    pub(crate) fn offers(&self) -> Vec<ServiceOffer> {
        self.config.get().services.keys().map(|name| ServiceOffer { name: name.clone() }).collect()
    }

    pub(crate) fn hello(&self) -> Hello {
        Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            software: SOFTWARE.to_owned(),
            services: self.offers(),
        }
    }
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot resolve the relay address: {0}")]
    Resolve(io::Error),
    #[error("the relay address resolves to nothing")]
    NoAddress,
    #[error("cannot open a UDP socket: {0}")]
    Socket(io::Error),
    #[error("cannot start the connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("{0}")]
    Connection(#[from] ConnectionError),
    #[error("control stream: {0}")]
    Frame(#[from] FrameError),
    #[error("the relay refused this agent: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no Welcome from the relay within {0:?}")]
    Timeout(Duration),
    #[error("no answer from the relay within {0:?}")]
    NoAnswer(Duration),
    /// The connection reached a replica the agent holds a tunnel to already.
    #[error("reached replica {0}, which this agent holds a tunnel to already")]
    Held(String),
}

/// How a tunnel ended.
enum Outcome {
    /// The agent is shutting down.
    Stopped,
    /// The relay is draining or restarting: reconnect at once.
    GoingAway,
    /// The tunnel was up and is lost, with the path's round-trip time when it was last known.
    Lost(String, Duration),
    /// The attempt failed before the tunnel was up.
    Failed(TunnelError),
}

/// Keeps a tunnel to `relay` up until `stop` is cancelled; to each of its replicas, when the
/// relay runs as several behind one address.
pub(crate) async fn maintain(relay: RelayAddr, tunnels: Arc<Tunnels>, stop: CancellationToken) {
    let group = Arc::new(Group::default());
    let slots = TaskTracker::new();
    let mut changes = group.changes();
    loop {
        for slot in group.to_start() {
            slots.spawn(keep_slot(relay.clone(), tunnels.clone(), stop.clone(), group.clone(), slot));
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
    slots.close();
    slots.wait().await;
}

/// The status key of a slot: the relay address, with the slot's number after the first.
fn slot_key(relay: &RelayAddr, slot: usize) -> String {
    match slot {
        0 => relay.to_string(),
        n => format!("{relay} #{}", n + 1),
    }
}

/// Keeps one tunnel (slot) of a relay address up until `stop` is cancelled, or until the relay's
/// replicas need it no more.
async fn keep_slot(
    relay: RelayAddr,
    tunnels: Arc<Tunnels>,
    stop: CancellationToken,
    group: Arc<Group>,
    slot: usize,
) {
    let key = slot_key(&relay, slot);
    let span = info_span!("tunnel", relay = %key);
    async {
        let timing = tunnels.config.get().timing.clone();
        let mut backoff = Backoff::new(timing.reconnect_min, timing.reconnect_max);
        let mut endpoint = None;
        let mut redial = Redial::default();
        let mut held_tries = 0;
        let mut changes = group.changes();
        loop {
            if !group.keeps(slot) {
                debug!("no replica left for this tunnel");
                tunnels.remove_status(&key);
                break;
            }
            if group.replicated() {
                // Through the relay's shared address, a new flow lands on a replica at random:
                // each attempt goes out from a new port.
                new_port(&mut endpoint);
            }
            tunnels.set_status(&key, TunnelStatus::Connecting);
            let answer_within = redial.answer_within(Instant::now());
            let attempt =
                Attempt { relay: &relay, tunnels: &tunnels, stop: &stop, group: &group, slot, key: &key };
            let outcome = connect_and_serve(attempt, &mut endpoint, answer_within).await;
            if !matches!(outcome, Outcome::Failed(TunnelError::Held(_))) {
                held_tries = 0;
            }
            let delay = match outcome {
                Outcome::Stopped => break,
                Outcome::Failed(TunnelError::Held(replica)) => {
                    debug!(%replica, tries = held_tries, "reached a replica held already: dialing again");
                    held_tries += 1;
                    changes.mark_unchanged();
                    let delay = replicas::seek_delay(held_tries);
                    // A change of the replicas serving (one joined) cuts the wait short.
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = changes.changed() => held_tries = 0,
                        () = stop.cancelled() => break,
                    }
                    continue;
                }
                Outcome::GoingAway => {
                    info!("relay going away: reconnecting now");
                    backoff.reset();
                    redial.lost(Instant::now(), None);
                    // A little spread so many agents do not arrive in the same instant.
                    Duration::from_millis(fastrand::u64(0..100))
                }
                Outcome::Lost(reason, rtt) => {
                    warn!(event_id = crate::events::id::TUNNEL_DOWN, %reason, "tunnel lost");
                    backoff.reset();
                    redial.lost(Instant::now(), Some(rtt));
                    Duration::from_millis(fastrand::u64(0..50))
                }
                // The relay is not answering yet (restarting, or the path is still dark): the next
                // attempt goes out at once, while the tunnel was lost only a short while ago.
                Outcome::Failed(TunnelError::NoAnswer(wait)) => {
                    // Said once, then every 40 attempts (about every 10 s): the rest is debug.
                    if redial.unanswered % 40 == 0 {
                        warn!(error = %TunnelError::NoAnswer(wait), "cannot connect: dialing again at once");
                    } else {
                        debug!(?wait, "no answer from the relay: dialing again");
                    }
                    redial.unanswered += 1;
                    tunnels.set_status(
                        &key,
                        TunnelStatus::Retrying { error: TunnelError::NoAnswer(wait).to_string() },
                    );
                    Duration::ZERO
                }
                Outcome::Failed(e) => {
                    let delay = backoff.next_delay();
                    match e {
                        TunnelError::Refused(_) => {
                            error!(error = %e, retry_in = ?delay, "cannot connect")
                        }
                        _ => warn!(error = %e, retry_in = ?delay, "cannot connect"),
                    }
                    tunnels.set_status(&key, TunnelStatus::Retrying { error: e.to_string() });
                    delay
                }
            };
            changes.mark_unchanged();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                // A replica joined (or the list changed): dial again now, from the start.
                _ = changes.changed() => backoff.reset(),
                () = stop.cancelled() => break,
            }
        }
        if let Some(Quic { endpoint, udp }) = endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
            info!(udp = %udp.figures(), "QUIC socket");
        }
    }
    .instrument(span)
    .await
}

/// Moves the slot's endpoint to a new local port (or drops it, so the next attempt opens one).
fn new_port(slot: &mut Option<Quic>) {
    let Some(quic) = slot else { return };
    let bind: SocketAddr = match quic.endpoint.local_addr() {
        Ok(local) if local.is_ipv6() => (Ipv6Addr::UNSPECIFIED, 0).into(),
        _ => (Ipv4Addr::UNSPECIFIED, 0).into(),
    };
    let moved = transport::quic_socket(bind)
        .and_then(|socket| sallyport_runtime::udp_count::rebind_counted(&quic.endpoint, &quic.udp, socket));
    if let Err(e) = moved {
        debug!(error = %e, "cannot move the QUIC endpoint to a new port: opening a new one");
        *slot = None;
    }
}

/// One attempt of one slot: where it goes and what it shares.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    relay: &'a RelayAddr,
    tunnels: &'a Arc<Tunnels>,
    stop: &'a CancellationToken,
    group: &'a Arc<Group>,
    slot: usize,
    /// The slot's status key.
    key: &'a str,
}

/// How soon to give up on an attempt that hears nothing: after a tunnel was lost, the relay is
/// most likely restarting, so for [`Redial::WINDOW`] each attempt waits only a few round trips for
/// the relay's first answer and the next goes out at once (one Initial packet every few hundred
/// milliseconds while the relay is away); the agent is then back within that of the relay being
/// ready. Outside the window an attempt waits the whole handshake timeout, with backoff between.
#[derive(Debug, Default)]
struct Redial {
    until: Option<Instant>,
    rtt: Option<Duration>,
    /// Attempts without an answer since the tunnel was lost.
    unanswered: u32,
}

impl Redial {
    const WINDOW: Duration = Duration::from_secs(60);
    const MIN_WAIT: Duration = Duration::from_millis(250);
    const MAX_WAIT: Duration = Duration::from_secs(2);

    fn lost(&mut self, now: Instant, rtt: Option<Duration>) {
        self.until = Some(now + Self::WINDOW);
        self.unanswered = 0;
        self.rtt = rtt.or(self.rtt);
    }

    /// How long the next attempt waits for the relay's first answer, if not the whole handshake.
    fn answer_within(&self, now: Instant) -> Option<Duration> {
        let until = self.until?;
        (now < until).then(|| {
            (self.rtt.unwrap_or_default() * 4 + Duration::from_millis(100))
                .clamp(Self::MIN_WAIT, Self::MAX_WAIT)
        })
    }
}

async fn connect_and_serve(
    attempt: Attempt<'_>,
    endpoint: &mut Option<Quic>,
    answer_within: Option<Duration>,
) -> Outcome {
    let Attempt { relay, tunnels, stop, group, slot, key } = attempt;
    let opened = async {
        // Until this connection knows its replica, no other slot of the group dials.
        let _dialing = group.dialing.lock().await;
        let session = connect(relay, endpoint, tunnels, answer_within, &group.held_by_others(slot)).await?;
        if let Some(replicas) = &session.4 {
            group.landed(slot, &replicas.this, replicas.serving.clone());
        }
        Ok::<_, TunnelError>(session)
    };
    let attempt = tokio::select! {
        a = opened => a,
        () = stop.cancelled() => return Outcome::Stopped,
    };
    let (connection, mut send, mut recv, welcome, replicas) = match attempt {
        Ok(session) => session,
        Err(e) => return Outcome::Failed(e),
    };
    let replica = replicas.map(|r| r.this).filter(|name| !name.is_empty());
    let published: Vec<String> = welcome.published().map(str::to_owned).collect();
    for (service, reason) in welcome.refused() {
        warn!(%service, %reason, "relay does not publish this service");
    }
    info!(
        event_id = crate::events::id::TUNNEL_UP,
        remote = %connection.remote_address(),
        relay_software = %welcome.software,
        ?published,
        replica = replica.as_deref().unwrap_or("-"),
        held = ?group.held(),
        "tunnel up"
    );
    tunnels
        .set_status(key, TunnelStatus::Connected { remote: connection.remote_address(), published, replica });

    // The lanes of this tunnel end with it.
    let lanes =
        LaneStarter { relay: relay.clone(), addr: connection.remote_address(), stop: stop.child_token() };
    let _lanes_end = lanes.stop.clone().drop_guard();
    let outcome = tokio::select! {
        () = accept_streams(&connection, tunnels) => None,
        () = crate::targets::udp::serve(&connection, &tunnels.targets) => None,
        () = control_loop(&mut send, &mut recv, tunnels, (key, welcome.version), &lanes, group) => None,
        () = stop.cancelled() => {
            connection.close(code(close::NORMAL), b"agent stopping");
            Some(Outcome::Stopped)
        }
    };
    group.lost(slot);
    if let Some(outcome) = outcome {
        return outcome;
    }
    match connection.close_reason() {
        Some(ConnectionError::ApplicationClosed(c)) if c.error_code == code(close::GOING_AWAY) => {
            Outcome::GoingAway
        }
        Some(reason) => Outcome::Lost(reason.to_string(), connection.rtt()),
        None => {
            connection.close(code(close::PROTOCOL_ERROR), b"control stream ended");
            Outcome::Lost("the relay ended the control stream".into(), connection.rtt())
        }
    }
}

type Session = (Connection, SendStream, RecvStream, Welcome, Option<Replicas>);

/// Dials the relay and completes the control handshake within the handshake timeout; with
/// `answer_within`, the QUIC handshake must be done within that.
async fn connect(
    relay: &RelayAddr,
    endpoint: &mut Option<Quic>,
    tunnels: &Tunnels,
    answer_within: Option<Duration>,
    held: &[String],
) -> Result<Session, TunnelError> {
    let addr = tokio::net::lookup_host((relay.host.as_str(), relay.port))
        .await
        .map_err(TunnelError::Resolve)?
        .next()
        .ok_or(TunnelError::NoAddress)?;
    let endpoint = endpoint_for(addr, endpoint)?;
    let (connection, (send, recv, welcome, replicas)) =
        dial(&endpoint, addr, &relay.server_name, tunnels, answer_within, |c| async move {
            hello(&c, tunnels, held).await
        })
        .await?;
    Ok((connection, send, recv, welcome, replicas))
}

/// Dials `addr` with the current client certificate and runs `first` (the control stream's
/// opening exchange) on the new connection, all within the handshake timeout; with
/// `answer_within`, the QUIC handshake must be done within that. A reason the relay closed with
/// beats "connection lost".
pub(crate) async fn dial<T, Fut>(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
    tunnels: &Tunnels,
    answer_within: Option<Duration>,
    first: impl FnOnce(Connection) -> Fut,
) -> Result<(Connection, T), TunnelError>
where
    Fut: std::future::Future<Output = Result<T, TunnelError>>,
{
    let client_config = read(&tunnels.client_config).clone();
    let connecting = endpoint.connect_with(client_config, addr, server_name)?;
    let timeout = tunnels.config.get().timing.handshake_timeout;
    let handshake = async {
        let connection = match answer_within {
            None => connecting.await?,
            Some(wait) => {
                tokio::time::timeout(wait, connecting).await.map_err(|_| TunnelError::NoAnswer(wait))??
            }
        };
        match first(connection.clone()).await {
            Ok(opened) => Ok((connection, opened)),
            Err(e) => Err(refusal(&connection).unwrap_or(e)),
        }
    };
    tokio::time::timeout(timeout, handshake).await.map_err(|_| TunnelError::Timeout(timeout))?
}

/// The control stream's opening: `Seek` first when the agent holds tunnels to other replicas of
/// this relay, then `Hello`; the answer is `Welcome` (followed, from version 4 on, by `Replicas`),
/// `Held` or `Refused`.
async fn hello(
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

fn refusal(connection: &Connection) -> Option<TunnelError> {
    match connection.close_reason()? {
        ConnectionError::ApplicationClosed(c) if c.error_code == code(close::REFUSED) => {
            Some(TunnelError::Refused(String::from_utf8_lossy(&c.reason).into_owned()))
        }
        _ => None,
    }
}

/// The tunnel's UDP endpoint and what its socket has done.
#[derive(Debug)]
struct Quic {
    endpoint: Endpoint,
    udp: Arc<UdpCounters>,
}

/// The tunnel's UDP endpoint, opened for the relay address's family and kept across attempts.
fn endpoint_for(addr: SocketAddr, slot: &mut Option<Quic>) -> Result<Endpoint, TunnelError> {
    if let Some(quic) = slot {
        if quic.endpoint.local_addr().is_ok_and(|local| local.is_ipv4() == addr.is_ipv4()) {
            return Ok(quic.endpoint.clone());
        }
        info!(udp = %quic.udp.figures(), "QUIC socket replaced (the relay address changed family)");
    }
    let bind: SocketAddr =
        if addr.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = transport::quic_socket(bind).map_err(TunnelError::Socket)?;
    let (endpoint, udp) =
        counted_endpoint(transport::endpoint_config(), None, socket).map_err(TunnelError::Socket)?;
    *slot = Some(Quic { endpoint: endpoint.clone(), udp });
    Ok(endpoint)
}

/// Serves the data streams the relay opens until the connection ends, raising the relay's stream
/// limit as concurrency grows.
async fn accept_streams(connection: &Connection, tunnels: &Arc<Tunnels>) {
    let mut credit = StreamCredit::default();
    // One clone per stream being served: its strong count, less this one, is the number open.
    let open = Arc::new(());
    while let Ok((send, recv)) = connection.accept_bi().await {
        if let Some(limit) = credit.raise_for(Arc::strong_count(&open) as u64) {
            debug!(limit, "raising the data stream limit");
            connection.set_max_concurrent_bi_streams(VarInt::from_u32(limit));
        }
        let served = open.clone();
        let targets = tunnels.targets.clone();
        tunnels.streams.spawn(async move {
            dial::handle_stream(send, recv, targets).await;
            drop(served);
        });
    }
}

/// The control stream after `Welcome`: answers pings, runs container commands, and reports
/// container states, until the stream ends or breaks. Reading and writing run side by side, joined
/// by a queue, so a slow command never holds up a ping.
async fn control_loop(
    send: &mut SendStream,
    recv: &mut RecvStream,
    tunnels: &Arc<Tunnels>,
    (relay, version): (&str, u16),
    lanes: &LaneStarter,
    group: &Group,
) {
    let mut reloads = tunnels.offers.subscribe();
    reloads.mark_unchanged();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<AgentMessage>(64);
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
                    if let Some(TunnelStatus::Connected { remote, replica, .. }) = now {
                        tunnels.set_status(relay, TunnelStatus::Connected { remote, published, replica });
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
