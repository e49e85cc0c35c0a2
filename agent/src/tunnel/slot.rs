//! The tunnels to one relay address, each a slot kept up: dial, serve, reconnect with backoff,
//! seek past replicas held, fall back to TCP and probe QUIC again. What to dial is the transport
//! choice's ([`Choice`]); how long to wait is the redial window's and the backoff's.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sallyport_runtime::quic::connect::ClientEndpoint;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::{
    choice::{Choice, Next, Redial},
    error::TunnelError,
    replicas::{self, Group},
    serve::{connect_and_serve, Attempt, Outcome},
    tunnels::{TunnelStatus, Tunnels},
};
use crate::{backoff::Backoff, config::RelayAddr};

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

/// What a slot waits for before its next attempt.
#[derive(Debug, PartialEq, Eq)]
enum Wait {
    /// The agent stops.
    Stop,
    /// The attempt landed on a replica held already: dial again soon from a new port; a change
    /// of the replicas serving starts the seeking over.
    Seek(Duration),
    /// Dial again after this; a change of the replicas serving cuts it short.
    Redial(Duration),
}

/// The reconnect policy of one slot: backoff between failed attempts, the redial window after a
/// loss, the count of landings on replicas held.
#[derive(Debug)]
struct Retry {
    backoff: Backoff,
    redial: Redial,
    held_tries: u32,
}

impl Retry {
    /// What to wait for after `outcome` (and what the slot's status says meanwhile).
    fn after(&mut self, outcome: Outcome, now: Instant) -> (Wait, Option<TunnelStatus>) {
        if !matches!(outcome, Outcome::Failed(TunnelError::Held(_))) {
            self.held_tries = 0;
        }
        let retrying = |e: &TunnelError| Some(TunnelStatus::Retrying { error: e.to_string() });
        match outcome {
            Outcome::Stopped => (Wait::Stop, None),
            Outcome::Failed(TunnelError::Held(replica)) => {
                debug!(%replica, tries = self.held_tries, "reached a replica held already: dialing again");
                self.held_tries += 1;
                (Wait::Seek(replicas::seek_delay(self.held_tries)), None)
            }
            Outcome::GoingAway(_) => {
                info!("relay going away: reconnecting now");
                self.backoff.reset();
                self.redial.lost(now, None);
                // A little spread so many agents do not arrive in the same instant.
                (Wait::Redial(Duration::from_millis(fastrand::u64(0..100))), None)
            }
            Outcome::Lost(reason, rtt, _) => {
                warn!(event_id = crate::events::id::TUNNEL_DOWN, %reason, "tunnel lost");
                self.backoff.reset();
                self.redial.lost(now, Some(rtt));
                (Wait::Redial(Duration::from_millis(fastrand::u64(0..50))), None)
            }
            // The relay is not answering yet (restarting, or the path is still dark): the next
            // attempt goes out at once, while the tunnel was lost only a short while ago.
            Outcome::Failed(e @ TunnelError::NoAnswer(_)) => {
                if self.redial.unanswered() {
                    warn!(error = %e, "cannot connect: dialing again at once");
                } else {
                    debug!(error = %e, "no answer from the relay: dialing again");
                }
                (Wait::Redial(Duration::ZERO), retrying(&e))
            }
            Outcome::Failed(e) => {
                let delay = self.backoff.next_delay();
                match e {
                    TunnelError::Refused(_) => error!(error = %e, retry_in = ?delay, "cannot connect"),
                    _ => warn!(error = %e, retry_in = ?delay, "cannot connect"),
                }
                (Wait::Redial(delay), retrying(&e))
            }
        }
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
        let timing = tunnels.config.get().agent.clone();
        let mut retry = Retry {
            backoff: Backoff::new(timing.reconnect_min, timing.reconnect_max),
            redial: Redial::default(),
            held_tries: 0,
        };
        let mut endpoint = None;
        let mut changes = group.changes();
        let mut choice = Choice::first(tunnels.config.get().agent.transport, tunnels.remembered(&key));
        loop {
            if !group.keeps(slot) {
                debug!("no replica left for this tunnel");
                tunnels.remove_status(&key);
                break;
            }
            if group.replicated() {
                // Through the relay's shared address, a new flow lands on a replica at random:
                // each attempt goes out from a new port.
                ClientEndpoint::new_port(&mut endpoint);
            }
            tunnels.set_status(&key, TunnelStatus::Connecting);
            let answer_within = choice.answer_within(retry.redial.answer_within(Instant::now()));
            let started = Instant::now();
            let attempt = Attempt {
                relay: &relay,
                tunnels: &tunnels,
                stop: &stop,
                group: &group,
                slot,
                key: &key,
                choice: &choice,
            };
            let outcome = connect_and_serve(attempt, &mut endpoint, answer_within).await;
            match &outcome {
                Outcome::Failed(e) => {
                    if choice.failed(e.failure(), started, Instant::now(), e) == Next::Now {
                        warn!(error = %e, why = choice.why(), "QUIC does not get through: trying TCP");
                        continue;
                    }
                }
                Outcome::Lost(_, _, ran_on) | Outcome::GoingAway(ran_on) => choice.was_up(*ran_on),
                Outcome::Stopped => {}
            }
            let (wait, status) = retry.after(outcome, Instant::now());
            if let Some(status) = status {
                tunnels.set_status(&key, status);
            }
            let (delay, seeking) = match wait {
                Wait::Stop => break,
                Wait::Seek(delay) => (delay, true),
                Wait::Redial(delay) => (delay, false),
            };
            changes.mark_unchanged();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                // A replica joined (or the list changed): dial again now, from the start.
                _ = changes.changed() => if seeking { retry.held_tries = 0 } else { retry.backoff.reset() },
                () = stop.cancelled() => break,
            }
        }
        if let Some(endpoint) = endpoint {
            let udp = endpoint.close().await;
            info!(%udp, "QUIC socket");
        }
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use sallyport_runtime::link::Transport;

    fn retry() -> Retry {
        Retry {
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(10)),
            redial: Redial::default(),
            held_tries: 0,
        }
    }

    #[test]
    fn a_lost_tunnel_is_dialed_again_at_once_and_unanswered_attempts_follow_without_delay() {
        let mut retry = retry();
        let now = Instant::now();
        let (wait, status) =
            retry.after(Outcome::Lost("gone".into(), Duration::from_millis(5), Transport::Quic), now);
        assert!(matches!(wait, Wait::Redial(d) if d < Duration::from_millis(50)) && status.is_none());
        assert!(retry.redial.answer_within(now).is_some(), "the redial window is open");
        let (wait, status) =
            retry.after(Outcome::Failed(TunnelError::NoAnswer(Duration::from_millis(250))), now);
        assert_eq!(wait, Wait::Redial(Duration::ZERO));
        assert!(matches!(status, Some(TunnelStatus::Retrying { .. })));
    }

    #[test]
    fn failures_back_off_landings_on_held_replicas_seek_and_stopping_stops() {
        let mut retry = retry();
        let now = Instant::now();
        let Wait::Redial(first) = retry.after(Outcome::Failed(TunnelError::Refused("no".into())), now).0
        else {
            panic!("a refusal waits")
        };
        assert!(first <= Duration::from_millis(250), "{first:?}");
        let (wait, _) = retry.after(Outcome::Failed(TunnelError::Held("relay-0".into())), now);
        assert!(matches!(wait, Wait::Seek(d) if d < Duration::from_millis(50)));
        assert_eq!(retry.held_tries, 1);
        retry.after(Outcome::Failed(TunnelError::NoAddress), now);
        assert_eq!(retry.held_tries, 0, "a landing elsewhere starts the seeking over");
        assert_eq!(retry.after(Outcome::Stopped, now).0, Wait::Stop);
    }

    #[test]
    fn the_first_slot_keeps_the_relay_address_as_its_key() {
        let relay = RelayAddr { host: "relay.lan".into(), port: 443, server_name: "relay.lan".into() };
        assert_eq!(slot_key(&relay, 0), "relay.lan:443");
        assert_eq!(slot_key(&relay, 2), "relay.lan:443 #3");
    }
}
