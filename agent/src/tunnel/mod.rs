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

use quinn::{ConnectionError, Endpoint, VarInt};
use sallyport_proto::{
    codes::close, AgentMessage, Hello, RelayMessage, Replicas, ServiceOffer, Welcome, MAX_CONTROL_FRAME,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use sallyport_runtime::{
    code,
    limits::StreamCredit,
    link::{Connection, RecvStream, SendStream, Transport},
    quic::counted::{counted_endpoint, UdpCounters},
    read_frame,
    sync::{lock, read},
    tcp, tls, write_frame, FrameError,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use self::{lanes::LaneStarter, replicas::Group};
use crate::{
    backoff::Backoff,
    config::{Live, RelayAddr, TransportChoice, QUIC_WAIT},
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
        /// The transport carrying it, and why that one.
        transport: Transport,
        why: String,
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
    /// The same identity for tunnels over TCP.
    pub(crate) tcp_config: RwLock<Arc<rustls::ClientConfig>>,
    /// The transport that last carried a tunnel to each relay (`auto` starts there).
    remembered: Mutex<BTreeMap<String, Transport>>,
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
        (client_config, tcp_config): (quinn::ClientConfig, Arc<rustls::ClientConfig>),
        cert_validity: (i64, i64),
    ) -> Self {
        Self {
            config,
            offers: watch::Sender::new(0),
            targets,
            client_config: RwLock::new(client_config),
            tcp_config: RwLock::new(tcp_config),
            remembered: Mutex::default(),
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
    /// The TCP transport's connect or TLS handshake failed.
    #[error("over TCP: {0}")]
    Tcp(String),
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
    /// The relay is draining or restarting: reconnect at once (over the transport it ran on).
    GoingAway(Transport),
    /// The tunnel was up and is lost, with the path's round-trip time when it was last known and
    /// the transport it ran on.
    Lost(String, Duration, Transport),
    /// The attempt failed before the tunnel was up.
    Failed(TunnelError),
}

impl TunnelError {
    /// Whether the error says QUIC cannot get through (no answer, UDP refused), so `auto` tries TCP.
    fn udp_blocked(&self) -> bool {
        matches!(
            self,
            Self::NoAnswer(_)
                | Self::Timeout(_)
                | Self::Socket(_)
                | Self::Connect(_)
                | Self::Connection(ConnectionError::TimedOut)
        )
    }
}

/// The transport a slot dials next, and why.
#[derive(Debug, Clone)]
struct Choice {
    transport: Transport,
    why: String,
    /// Since when QUIC attempts have gone unanswered.
    silent_since: Option<Instant>,
}

impl Choice {
    fn first(choice: TransportChoice, remembered: Option<Transport>) -> Self {
        let (transport, why) = match (choice, remembered) {
            (TransportChoice::Only(t), _) => (t, format!("agent.transport = \"{t}\"")),
            (TransportChoice::Auto, Some(Transport::Tcp)) => {
                (Transport::Tcp, "auto: TCP carried the last tunnel to this relay".to_owned())
            }
            (TransportChoice::Auto, _) => (Transport::Quic, "auto: QUIC first".to_owned()),
        };
        Self { transport, why, silent_since: None }
    }
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
        let mode = tunnels.config.get().transport;
        let mut choice = Choice::first(mode, lock(&tunnels.remembered).get(&key).copied());
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
            let mut answer_within = redial.answer_within(Instant::now());
            let auto_quic = mode == TransportChoice::Auto && choice.transport == Transport::Quic;
            if auto_quic {
                // In auto, a QUIC handshake waits a few seconds at most before TCP is tried.
                answer_within = Some(answer_within.unwrap_or(QUIC_WAIT).min(QUIC_WAIT));
            }
            let started = Instant::now();
            let attempt = Attempt {
                relay: &relay,
                tunnels: &tunnels,
                stop: &stop,
                group: &group,
                slot,
                key: &key,
                choice: &choice,
                probe: mode == TransportChoice::Auto,
            };
            let outcome = connect_and_serve(attempt, &mut endpoint, answer_within).await;
            match &outcome {
                Outcome::Failed(e) if auto_quic && e.udp_blocked() => {
                    let since = *choice.silent_since.get_or_insert(started);
                    if since.elapsed() + Duration::from_millis(50) >= QUIC_WAIT
                        || !matches!(e, TunnelError::NoAnswer(_))
                    {
                        warn!(error = %e, waited = ?since.elapsed(), "QUIC does not get through: trying TCP");
                        choice = Choice {
                            transport: Transport::Tcp,
                            why: format!("auto: QUIC got no answer within {:?} ({e})", since.elapsed()),
                            silent_since: None,
                        };
                        continue;
                    }
                }
                Outcome::Failed(e) if mode == TransportChoice::Auto && choice.transport == Transport::Tcp => {
                    // TCP failed too (the relay is away?): QUIC first again next time.
                    debug!(error = %e, "tunnel over TCP failed: QUIC first next time");
                    choice = Choice::first(mode, None);
                }
                Outcome::Failed(_) => {}
                _ => choice.silent_since = None,
            }
            if let Outcome::Lost(_, _, transport) | Outcome::GoingAway(transport) = &outcome {
                if mode == TransportChoice::Auto && *transport != choice.transport {
                    choice = Choice::first(mode, Some(*transport));
                }
            }
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
                Outcome::GoingAway(_) => {
                    info!("relay going away: reconnecting now");
                    backoff.reset();
                    redial.lost(Instant::now(), None);
                    // A little spread so many agents do not arrive in the same instant.
                    Duration::from_millis(fastrand::u64(0..100))
                }
                Outcome::Lost(reason, rtt, _) => {
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
    let moved = sallyport_runtime::quic::socket::quic_socket(bind).and_then(|socket| {
        sallyport_runtime::quic::counted::rebind_counted(&quic.endpoint, &quic.udp, socket)
    });
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
    choice: &'a Choice,
    /// While over TCP, try QUIC again now and then (`auto`).
    probe: bool,
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
    let Attempt { relay, tunnels, stop, group, slot, .. } = attempt;
    let transport = attempt.choice.transport;
    let opened = async {
        // Until this connection knows its replica, no other slot of the group dials.
        let _dialing = group.dialing.lock().await;
        let session =
            connect(relay, endpoint, transport, tunnels, answer_within, &group.held_by_others(slot)).await?;
        if let Some(replicas) = &session.4 {
            group.landed(slot, &replicas.this, replicas.serving.clone());
        }
        Ok::<_, TunnelError>(session)
    };
    let attempt_result = tokio::select! {
        a = opened => a,
        () = stop.cancelled() => return Outcome::Stopped,
    };
    let mut session = match attempt_result {
        Ok(session) => session,
        Err(e) => return Outcome::Failed(e),
    };
    let mut why = attempt.choice.why.clone();
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

/// How serving a tunnel ended.
enum Served {
    Over(Outcome),
    /// A probe brought a QUIC tunnel up while this one ran over TCP: serve that one now.
    Moved(Box<Session>),
}

async fn serve(attempt: Attempt<'_>, session: Session, why: &str, endpoint: &mut Option<Quic>) -> Served {
    let Attempt { relay, tunnels, stop, group, slot, key, .. } = attempt;
    let (connection, mut send, mut recv, welcome, replicas) = session;
    let transport = connection.transport();
    lock(&tunnels.remembered).insert(key.to_owned(), transport);
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
    tunnels.set_status(
        key,
        TunnelStatus::Connected {
            remote: connection.remote_address(),
            published,
            replica,
            transport,
            why: why.to_owned(),
        },
    );

    // The lanes of this tunnel end with it.
    let lanes = LaneStarter {
        relay: relay.clone(),
        addr: connection.remote_address(),
        transport,
        stop: stop.child_token(),
    };
    let lanes_end = lanes.stop.clone().drop_guard();
    let open = Arc::new(());
    let probing = attempt.probe && transport == Transport::Tcp;
    let probe = async {
        if !probing {
            return std::future::pending().await;
        }
        probe_quic(relay, endpoint, tunnels, group, slot).await
    };
    let outcome = tokio::select! {
        () = accept_streams(&connection, tunnels, &open) => None,
        () = crate::targets::udp::serve(&connection, &tunnels.targets) => None,
        () = control_loop(&mut send, &mut recv, tunnels, (key, welcome.version), &lanes, group, (transport, why)) => None,
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
    if let Some(outcome) = outcome {
        return Served::Over(outcome);
    }
    Served::Over(match connection.close_reason() {
        Some(ConnectionError::ApplicationClosed(c)) if c.error_code == code(close::GOING_AWAY) => {
            Outcome::GoingAway(transport)
        }
        Some(reason) => Outcome::Lost(reason.to_string(), connection.rtt(), transport),
        None => {
            connection.close(code(close::PROTOCOL_ERROR), b"control stream ended");
            Outcome::Lost("the relay ended the control stream".into(), connection.rtt(), transport)
        }
    })
}

/// While a tunnel runs over TCP: every `agent.quic_probe`, a QUIC tunnel is tried; the first that
/// comes up is returned (the relay then routes new streams to it).
async fn probe_quic(
    relay: &RelayAddr,
    endpoint: &mut Option<Quic>,
    tunnels: &Tunnels,
    group: &Group,
    slot: usize,
) -> Session {
    loop {
        tokio::time::sleep(tunnels.config.get().quic_probe).await;
        let tried = async {
            let _dialing = group.dialing.lock().await;
            let session = connect(
                relay,
                endpoint,
                Transport::Quic,
                tunnels,
                Some(QUIC_WAIT),
                &group.held_by_others(slot),
            )
            .await?;
            if let Some(replicas) = &session.4 {
                group.landed(slot, &replicas.this, replicas.serving.clone());
            }
            Ok::<_, TunnelError>(session)
        };
        match tried.await {
            Ok(session) => {
                info!("QUIC gets through again: moving the tunnel back from TCP");
                return session;
            }
            Err(e) => debug!(error = %e, "QUIC probe: still no way through"),
        }
    }
}

/// The tunnel a probe replaced: the relay sends it no new streams; it serves the streams in
/// flight, then closes (the relay closes it at the end of its drain grace in any case).
fn drain_moved(connection: Connection, tunnels: Arc<Tunnels>, open: Arc<()>) {
    tokio::spawn(async move {
        let drained = async {
            while Arc::strong_count(&open) > 1 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            () = accept_streams(&connection, &tunnels, &open) => {}
            () = drained => {}
        }
        info!(transport = %connection.transport(), "previous tunnel drained: closing it");
        connection.close(code(close::NORMAL), b"tunnel moved to another transport");
    });
}

type Session = (Connection, SendStream, RecvStream, Welcome, Option<Replicas>);

/// Dials the relay and completes the control handshake within the handshake timeout; with
/// `answer_within`, the QUIC handshake must be done within that.
async fn connect(
    relay: &RelayAddr,
    endpoint: &mut Option<Quic>,
    transport: Transport,
    tunnels: &Tunnels,
    answer_within: Option<Duration>,
    held: &[String],
) -> Result<Session, TunnelError> {
    let addr = tokio::net::lookup_host((relay.host.as_str(), relay.port))
        .await
        .map_err(TunnelError::Resolve)?
        .next()
        .ok_or(TunnelError::NoAddress)?;
    let quic;
    let via = match transport {
        Transport::Quic => {
            quic = endpoint_for(addr, endpoint)?;
            Via::Quic(&quic)
        }
        Transport::Tcp => Via::Tcp,
    };
    let (connection, (send, recv, welcome, replicas)) =
        dial(via, addr, &relay.server_name, tunnels, answer_within, |c| async move {
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
    via: Via<'_>,
    addr: SocketAddr,
    server_name: &str,
    tunnels: &Tunnels,
    answer_within: Option<Duration>,
    first: impl FnOnce(Connection) -> Fut,
) -> Result<(Connection, T), TunnelError>
where
    Fut: std::future::Future<Output = Result<T, TunnelError>>,
{
    let timeout = tunnels.config.get().timing.handshake_timeout;
    let handshake = async {
        let connection = match via {
            Via::Quic(endpoint) => {
                let client_config = read(&tunnels.client_config).clone();
                let connecting = endpoint.connect_with(client_config, addr, server_name)?;
                Connection::Quic(match answer_within {
                    None => connecting.await?,
                    Some(wait) => tokio::time::timeout(wait, connecting)
                        .await
                        .map_err(|_| TunnelError::NoAnswer(wait))??,
                })
            }
            Via::Tcp => {
                let connecting = connect_tcp(addr, server_name, tunnels);
                match answer_within {
                    None => connecting.await?,
                    Some(wait) => tokio::time::timeout(wait, connecting)
                        .await
                        .map_err(|_| TunnelError::NoAnswer(wait))??,
                }
            }
        };
        match first(connection.clone()).await {
            Ok(opened) => Ok((connection, opened)),
            Err(e) => Err(refusal(&connection).unwrap_or(e)),
        }
    };
    tokio::time::timeout(timeout, handshake).await.map_err(|_| TunnelError::Timeout(timeout))?
}

/// Whether `relay` can be reached over `transport`: the handshake (mutual TLS) only, closed at
/// once, so a running agent's tunnel is not disturbed. How long it took, or why not.
pub(crate) async fn probe(
    relay: &RelayAddr,
    transport: Transport,
    tunnels: &Tunnels,
) -> Result<Duration, TunnelError> {
    let addr = tokio::net::lookup_host((relay.host.as_str(), relay.port))
        .await
        .map_err(TunnelError::Resolve)?
        .next()
        .ok_or(TunnelError::NoAddress)?;
    let mut slot = None;
    let quic;
    let via = match transport {
        Transport::Quic => {
            quic = endpoint_for(addr, &mut slot)?;
            Via::Quic(&quic)
        }
        Transport::Tcp => Via::Tcp,
    };
    let started = Instant::now();
    let (connection, ()) =
        dial(via, addr, &relay.server_name, tunnels, Some(QUIC_WAIT), |_| async { Ok(()) }).await?;
    let took = started.elapsed();
    connection.close(code(close::NORMAL), b"check");
    if let Some(Quic { endpoint, .. }) = slot {
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }
    Ok(took)
}

/// How a connection is dialed: QUIC from the slot's endpoint, or TLS over TCP.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via<'a> {
    Quic(&'a Endpoint),
    Tcp,
}

/// TCP, then TLS with the agent's certificate, then HTTP/2 (the agent's end serves the relay's
/// streams).
async fn connect_tcp(
    addr: SocketAddr,
    server_name: &str,
    tunnels: &Tunnels,
) -> Result<Connection, TunnelError> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| TunnelError::Tcp(format!("cannot connect to {addr}: {e}")))?;
    sallyport_runtime::tcp::tunnel_socket(&tcp);
    let config = read(&tunnels.tcp_config).clone();
    let name = tls::server_name(server_name).map_err(|e| TunnelError::Tcp(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| TunnelError::Tcp(format!("TLS handshake: {e}")))?;
    let peer = tcp::Peer::of(addr, tls.get_ref().1);
    let timing = tunnels.config.get().timing.clone();
    let settings = sallyport_runtime::tcp::tcp_agent(timing.keep_alive, timing.idle_timeout);
    Ok(Connection::Tcp(tcp::server(tls, peer, settings).await?))
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
    let socket = sallyport_runtime::quic::socket::quic_socket(bind).map_err(TunnelError::Socket)?;
    let (endpoint, udp) = counted_endpoint(sallyport_runtime::quic::socket::endpoint_config(), None, socket)
        .map_err(TunnelError::Socket)?;
    *slot = Some(Quic { endpoint: endpoint.clone(), udp });
    Ok(endpoint)
}

/// Serves the data streams the relay opens until the connection ends, raising the relay's stream
/// limit as concurrency grows.
async fn accept_streams(connection: &Connection, tunnels: &Arc<Tunnels>, open: &Arc<()>) {
    let mut credit = StreamCredit::default();
    // One clone per stream being served: its strong count, less the caller's, is the number open.
    while let Ok((send, recv)) = connection.accept_bi().await {
        if let Some(limit) = credit.raise_for(Arc::strong_count(open) as u64) {
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
