//! Which transport a slot dials next, and how long an attempt waits for an answer. Pure: the
//! caller says what happened and when, these say what to do; unit-tested without a network.
//!
//! In `auto`, QUIC goes first; when its handshakes get no answer for [`QUIC_WAIT`] (or UDP fails
//! outright), the slot moves to TCP at once. A TCP attempt that fails sends the next one back to
//! QUIC first (the relay may be away altogether). What carried the last tunnel to a relay is where
//! the next reconnect starts. While on TCP, the tunnel probes QUIC and moves back when it gets
//! through.

use std::time::{Duration, Instant};

use sallyport_runtime::link::Transport;

use crate::config::{TransportChoice, QUIC_WAIT};

/// What a failed attempt says about the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Nothing came back within the wait.
    NoAnswer,
    /// UDP refused or dropped outright (no socket, no route, the handshake timed out).
    UdpBlocked,
    /// Anything else: the relay answered (and refused, or broke the protocol).
    Other,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// The transport changed: dial again at once on the new one.
    Now,
    /// Dial again after the usual delay.
    AfterDelay,
}

/// The transport a slot dials next, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Choice {
    mode: TransportChoice,
    transport: Transport,
    why: String,
    /// Since when QUIC attempts have gone unanswered.
    silent_since: Option<Instant>,
}

impl Choice {
    /// Where a slot starts: the configured transport, or in `auto` the one that carried the last
    /// tunnel to this relay, else QUIC.
    pub(crate) fn first(mode: TransportChoice, remembered: Option<Transport>) -> Self {
        let (transport, why) = match (mode, remembered) {
            (TransportChoice::Only(t), _) => (t, format!("agent.transport = \"{t}\"")),
            (TransportChoice::Auto, Some(Transport::Tcp)) => {
                (Transport::Tcp, "auto: TCP carried the last tunnel to this relay".to_owned())
            }
            (TransportChoice::Auto, _) => (Transport::Quic, "auto: QUIC first".to_owned()),
        };
        Self { mode, transport, why, silent_since: None }
    }

    pub(crate) fn transport(&self) -> Transport {
        self.transport
    }

    /// Why this transport, as the log, the status and the relay show it.
    pub(crate) fn why(&self) -> &str {
        &self.why
    }

    /// How long the next attempt waits for the relay's first answer, given the redial window's
    /// wait (`None`: the whole handshake timeout). In `auto`, a QUIC attempt waits [`QUIC_WAIT`]
    /// at most before TCP is tried.
    pub(crate) fn answer_within(&self, redial: Option<Duration>) -> Option<Duration> {
        if self.mode == TransportChoice::Auto && self.transport == Transport::Quic {
            return Some(redial.unwrap_or(QUIC_WAIT).min(QUIC_WAIT));
        }
        redial
    }

    /// Whether a tunnel up over `on` probes QUIC now and then to move back to it.
    pub(crate) fn probes(&self, on: Transport) -> bool {
        self.mode == TransportChoice::Auto && on == Transport::Tcp
    }

    /// An attempt that began at `started` failed at `now` (`error` for the reason shown).
    pub(crate) fn failed(
        &mut self,
        failure: Failure,
        started: Instant,
        now: Instant,
        error: &dyn std::fmt::Display,
    ) -> Next {
        if self.mode != TransportChoice::Auto {
            return Next::AfterDelay;
        }
        match (self.transport, failure) {
            (Transport::Quic, Failure::NoAnswer | Failure::UdpBlocked) => {
                let since = *self.silent_since.get_or_insert(started);
                let waited = now.saturating_duration_since(since);
                // A little slack: the attempts' own waits add up to QUIC_WAIT, give or take a tick.
                if waited + Duration::from_millis(50) < QUIC_WAIT && failure == Failure::NoAnswer {
                    return Next::AfterDelay;
                }
                *self = Self {
                    mode: self.mode,
                    transport: Transport::Tcp,
                    why: format!("auto: QUIC got no answer within {waited:?} ({error})"),
                    silent_since: None,
                };
                Next::Now
            }
            (Transport::Quic, Failure::Other) => Next::AfterDelay,
            // TCP failed too (the relay is away?): QUIC first again next time.
            (Transport::Tcp, _) => {
                *self = Self::first(self.mode, None);
                Next::AfterDelay
            }
        }
    }

    /// A tunnel was up over `ran_on` (and has ended): QUIC's silence is forgotten, and a tunnel a
    /// probe moved to another transport is where the next attempt starts.
    pub(crate) fn was_up(&mut self, ran_on: Transport) {
        self.silent_since = None;
        if self.mode == TransportChoice::Auto && ran_on != self.transport {
            *self = Self::first(self.mode, Some(ran_on));
        }
    }
}

/// How soon to give up on an attempt that hears nothing: after a tunnel was lost, the relay is
/// most likely restarting, so for [`Redial::WINDOW`] each attempt waits only a few round trips for
/// the relay's first answer and the next goes out at once (one Initial packet every few hundred
/// milliseconds while the relay is away); the agent is then back within that of the relay being
/// ready. Outside the window an attempt waits the whole handshake timeout, with backoff between.
#[derive(Debug, Default)]
pub(crate) struct Redial {
    until: Option<Instant>,
    rtt: Option<Duration>,
    /// Attempts without an answer since the tunnel was lost.
    unanswered: u32,
}

impl Redial {
    const WINDOW: Duration = Duration::from_secs(60);
    const MIN_WAIT: Duration = Duration::from_millis(250);
    const MAX_WAIT: Duration = Duration::from_secs(2);

    /// The tunnel was lost at `now` (with the path's last round-trip time, if known).
    pub(crate) fn lost(&mut self, now: Instant, rtt: Option<Duration>) {
        self.until = Some(now + Self::WINDOW);
        self.unanswered = 0;
        self.rtt = rtt.or(self.rtt);
    }

    /// How long the next attempt waits for the relay's first answer, if not the whole handshake.
    pub(crate) fn answer_within(&self, now: Instant) -> Option<Duration> {
        let until = self.until?;
        (now < until).then(|| {
            (self.rtt.unwrap_or_default() * 4 + Duration::from_millis(100))
                .clamp(Self::MIN_WAIT, Self::MAX_WAIT)
        })
    }

    /// One more attempt went unanswered; whether to say so in the log (the first, then every 40th:
    /// about every 10 s).
    pub(crate) fn unanswered(&mut self) -> bool {
        let say = self.unanswered % 40 == 0;
        self.unanswered += 1;
        say
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTO: TransportChoice = TransportChoice::Auto;
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_slot_starts_on_quic_on_what_carried_the_last_tunnel_or_on_the_one_configured() {
        assert_eq!(Choice::first(AUTO, None).transport(), Transport::Quic);
        assert_eq!(Choice::first(AUTO, Some(Transport::Quic)).transport(), Transport::Quic);
        let remembered = Choice::first(AUTO, Some(Transport::Tcp));
        assert_eq!(remembered.transport(), Transport::Tcp);
        assert!(remembered.why().contains("TCP carried the last tunnel"), "{}", remembered.why());
        let only = Choice::first(TransportChoice::Only(Transport::Tcp), Some(Transport::Quic));
        assert_eq!((only.transport(), only.why()), (Transport::Tcp, "agent.transport = \"tcp\""));
    }

    #[test]
    fn quic_unanswered_for_the_whole_wait_moves_to_tcp_at_once() {
        let t0 = Instant::now();
        let mut choice = Choice::first(AUTO, None);
        // Short waits after a lost tunnel: the silence adds up across attempts.
        assert_eq!(choice.failed(Failure::NoAnswer, t0, t0 + 1000 * MS, &"timed out"), Next::AfterDelay);
        assert_eq!(choice.failed(Failure::NoAnswer, t0 + 1000 * MS, t0 + 2000 * MS, &"t"), Next::AfterDelay);
        assert_eq!(choice.transport(), Transport::Quic);
        assert_eq!(choice.failed(Failure::NoAnswer, t0 + 2000 * MS, t0 + 2960 * MS, &"timed out"), Next::Now);
        assert_eq!(choice.transport(), Transport::Tcp);
        assert!(
            choice.why().starts_with("auto: QUIC got no answer within 2.96s (timed out)"),
            "{}",
            choice.why()
        );
    }

    #[test]
    fn udp_failing_outright_moves_to_tcp_without_waiting() {
        let t0 = Instant::now();
        let mut choice = Choice::first(AUTO, None);
        assert_eq!(choice.failed(Failure::UdpBlocked, t0, t0 + MS, &"no socket"), Next::Now);
        assert_eq!(choice.transport(), Transport::Tcp);
    }

    #[test]
    fn a_relay_that_answers_and_refuses_keeps_the_slot_on_quic() {
        let t0 = Instant::now();
        let mut choice = Choice::first(AUTO, None);
        assert_eq!(choice.failed(Failure::Other, t0, t0 + 10 * QUIC_WAIT, &"refused"), Next::AfterDelay);
        assert_eq!(choice.transport(), Transport::Quic);
    }

    #[test]
    fn tcp_failing_too_sends_the_next_attempt_back_to_quic_first() {
        let t0 = Instant::now();
        let mut choice = Choice::first(AUTO, Some(Transport::Tcp));
        assert_eq!(choice.failed(Failure::Other, t0, t0 + MS, &"connection refused"), Next::AfterDelay);
        assert_eq!((choice.transport(), choice.why()), (Transport::Quic, "auto: QUIC first"));
    }

    #[test]
    fn a_configured_transport_never_changes() {
        let t0 = Instant::now();
        for t in [Transport::Quic, Transport::Tcp] {
            let mut choice = Choice::first(TransportChoice::Only(t), None);
            for failure in [Failure::NoAnswer, Failure::UdpBlocked, Failure::Other] {
                assert_eq!(choice.failed(failure, t0, t0 + 60 * QUIC_WAIT, &"x"), Next::AfterDelay);
            }
            choice.was_up(Transport::Tcp);
            assert_eq!(choice.transport(), t);
            assert!(!choice.probes(Transport::Tcp));
            assert_eq!(choice.answer_within(None), None);
        }
    }

    #[test]
    fn a_probe_that_moved_the_tunnel_back_to_quic_is_where_the_next_attempt_starts() {
        let t0 = Instant::now();
        let mut choice = Choice::first(AUTO, None);
        choice.failed(Failure::UdpBlocked, t0, t0, &"x");
        assert!(choice.probes(Transport::Tcp) && !choice.probes(Transport::Quic));
        // The tunnel ran over TCP, a probe moved it to QUIC, then it was lost.
        choice.was_up(Transport::Quic);
        assert_eq!(choice.transport(), Transport::Quic);
        // And the silence counted before a tunnel was up is forgotten.
        assert_eq!(
            choice.failed(Failure::NoAnswer, t0 + QUIC_WAIT * 2, t0 + QUIC_WAIT * 2 + MS, &"x"),
            Next::AfterDelay
        );
    }

    #[test]
    fn auto_waits_for_quic_at_most_its_wait_and_tcp_as_the_redial_says() {
        let quic = Choice::first(AUTO, None);
        assert_eq!(quic.answer_within(None), Some(QUIC_WAIT));
        assert_eq!(quic.answer_within(Some(300 * MS)), Some(300 * MS));
        assert_eq!(quic.answer_within(Some(QUIC_WAIT * 2)), Some(QUIC_WAIT));
        let tcp = Choice::first(AUTO, Some(Transport::Tcp));
        assert_eq!(tcp.answer_within(None), None);
        assert_eq!(tcp.answer_within(Some(300 * MS)), Some(300 * MS));
    }

    #[test]
    fn after_a_loss_attempts_wait_a_few_round_trips_for_a_minute() {
        let t0 = Instant::now();
        let mut redial = Redial::default();
        assert_eq!(redial.answer_within(t0), None);
        redial.lost(t0, Some(10 * MS));
        assert_eq!(redial.answer_within(t0 + MS), Some(Redial::MIN_WAIT));
        redial.lost(t0, Some(500 * MS));
        assert_eq!(redial.answer_within(t0 + MS), Some(Redial::MAX_WAIT));
        assert_eq!(redial.answer_within(t0 + Redial::WINDOW), None);
        assert!(redial.unanswered() && !redial.unanswered());
        for _ in 2..40 {
            redial.unanswered();
        }
        assert!(redial.unanswered(), "the 41st is said again");
    }
}
