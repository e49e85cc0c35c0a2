//! One tunnel of a relay address (a slot), kept up: dial, serve, reconnect with backoff, seek
//! past replicas held, fall back to TCP and probe QUIC again.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use quinn::ConnectionError;
use sallyport_proto::codes::close;
use sallyport_runtime::{
    code,
    link::{Connection, Transport},
    sync::lock,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::*;
use super::{
    choice::{Choice, Redial},
    connect::{connect, new_port, Quic},
    control::control_loop,
    handshake::Session,
    streams::accept_streams,
};
use super::{lanes::LaneStarter, replicas::Group};
use crate::{
    backoff::Backoff,
    config::{RelayAddr, TransportChoice, QUIC_WAIT},
};

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

/// The status key of a slot: the relay address, with the slot's number after the first.
fn slot_key(relay: &RelayAddr, slot: usize) -> String {
    match slot {
        0 => relay.to_string(),
        n => format!("{relay} #{}", n + 1),
    }
}

/// Keeps one tunnel (slot) of a relay address up until `stop` is cancelled, or until the relay's
/// replicas need it no more.
pub(super) async fn keep_slot(
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
