//! Which transport a slot dials next (`auto`: QUIC first, TCP when QUIC gets no answer, back to
//! QUIC after a probe), and how soon an attempt that hears nothing gives up (`Redial`).

use std::time::{Duration, Instant};

use sallyport_runtime::link::Transport;

use crate::config::TransportChoice;

/// The transport a slot dials next, and why.
#[derive(Debug, Clone)]
pub(super) struct Choice {
    pub(super) transport: Transport,
    pub(super) why: String,
    /// Since when QUIC attempts have gone unanswered.
    pub(super) silent_since: Option<Instant>,
}

impl Choice {
    pub(super) fn first(choice: TransportChoice, remembered: Option<Transport>) -> Self {
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

/// How soon to give up on an attempt that hears nothing: after a tunnel was lost, the relay is
/// most likely restarting, so for [`Redial::WINDOW`] each attempt waits only a few round trips for
/// the relay's first answer and the next goes out at once (one Initial packet every few hundred
/// milliseconds while the relay is away); the agent is then back within that of the relay being
/// ready. Outside the window an attempt waits the whole handshake timeout, with backoff between.
#[derive(Debug, Default)]
pub(super) struct Redial {
    until: Option<Instant>,
    rtt: Option<Duration>,
    /// Attempts without an answer since the tunnel was lost.
    pub(super) unanswered: u32,
}

impl Redial {
    const WINDOW: Duration = Duration::from_secs(60);
    const MIN_WAIT: Duration = Duration::from_millis(250);
    const MAX_WAIT: Duration = Duration::from_secs(2);

    pub(super) fn lost(&mut self, now: Instant, rtt: Option<Duration>) {
        self.until = Some(now + Self::WINDOW);
        self.unanswered = 0;
        self.rtt = rtt.or(self.rtt);
    }

    /// How long the next attempt waits for the relay's first answer, if not the whole handshake.
    pub(super) fn answer_within(&self, now: Instant) -> Option<Duration> {
        let until = self.until?;
        (now < until).then(|| {
            (self.rtt.unwrap_or_default() * 4 + Duration::from_millis(100))
                .clamp(Self::MIN_WAIT, Self::MAX_WAIT)
        })
    }
}
