//! Windows, stream counts and timers of a tunnel, shared by both transports: what one peer may
//! make the other hold, and how soon a silent peer is gone.

use std::time::Duration;

/// Receive window of one stream, both ends and both transports: 1 MiB keeps a gigabit per stream
/// at up to 8 ms RTT, and a sixteenth of the connection's window, so the streams whose readers
/// stopped may hold at most half of it (see the `stall` module). It also bounds what quinn keeps per
/// stream slot (its recycled reassembly buffer grows with the window).
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Receive window of one stream on the agent, for data from clients toward targets.
pub const AGENT_STREAM_RECEIVE_WINDOW: u32 = STREAM_RECEIVE_WINDOW;

/// Bytes a splice reads from TCP in one go, at most: also what one direction of a splice holds
/// while the other end's flow control holds it back, and what an HTTP/2 stream may buffer for
/// sending.
pub const MAX_READ: usize = 64 * 1024;

/// Receive window of a whole connection (quinn's default is unlimited).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;

/// Bytes a connection may have in flight unacknowledged.
pub const SEND_WINDOW: u64 = 8 * 1024 * 1024;

/// How many data streams the relay may have open toward one agent at once, at most.
pub const MAX_DATA_STREAMS: u32 = 16 * 1024;

/// How many data streams the relay may have open toward one agent at first; [`StreamCredit`]
/// raises it with demand. Quinn keeps one receive state per stream the peer is allowed to open,
/// recycled with the capacity its reassembly buffer reached (up to ~100 KiB after a bulk upload),
/// so the agent's memory follows this limit rather than the connections actually open.
pub const INITIAL_DATA_STREAMS: u32 = 64;

/// How many bidirectional streams an agent may open toward the relay (the control stream).
pub const MAX_AGENT_STREAMS: u32 = 4;

/// How often an idle tunnel says it is alive, by default: the agent sends a PING after a second
/// without a packet from the relay, and the relay's ACK comes back: one packet a second each way.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// The relay's keep-alive, by default: a little longer than the agent's, so on an idle tunnel the
/// agent's fires first every time (each side's timer restarts on every packet it receives) and the
/// relay only answers; it keeps alive a tunnel to an agent configured with a longer keep-alive.
pub const RELAY_KEEP_ALIVE: Duration = Duration::from_millis(1250);

/// How long a tunnel may hear nothing before it is dead, by default: a second and a half, so a
/// peer that died or went dark is noticed within that (and a client that arrives in the meantime
/// waits at most that long), while a live peer's keep-alive and its retransmissions (each a
/// retransmission timeout apart) all have to be lost for a false alarm. QUIC uses the smaller of
/// the two sides' values, and never less than three retransmission timeouts of the path.
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(1500);

/// The connection receive window of a relay connection whose peer has not proven who it is yet:
/// all the stream data such a peer can make the relay hold.
pub const UNAUTHENTICATED_RECEIVE_WINDOW: u32 = 64 * 1024;

/// Datagrams the relay keeps per connection until it reads them (the tunnel reads an agent's
/// datagrams as they come; a peer that is not an agent is never read).
pub const DATAGRAM_RECEIVE_BUFFER: usize = 256 * 1024;

/// The agent's limit on concurrently open data streams, doubled (up to [`MAX_DATA_STREAMS`]) when
/// three quarters of it are in use and never lowered: memory then follows the peak concurrency a
/// tunnel has actually seen, and a burst waits at most a round trip per doubling.
#[derive(Debug)]
pub struct StreamCredit {
    limit: u32,
}

impl Default for StreamCredit {
    fn default() -> Self {
        Self { limit: INITIAL_DATA_STREAMS }
    }
}

impl StreamCredit {
    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Called with the number of streams open; returns the new limit when it should be raised.
    pub fn raise_for(&mut self, open: u64) -> Option<u32> {
        if self.limit >= MAX_DATA_STREAMS || open * 4 < u64::from(self.limit) * 3 {
            return None;
        }
        self.limit = (self.limit * 2).min(MAX_DATA_STREAMS);
        Some(self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_credit_doubles_at_three_quarters_up_to_the_cap_and_never_shrinks() {
        let mut credit = StreamCredit::default();
        assert_eq!(credit.raise_for(0), None);
        assert_eq!(credit.raise_for(47), None);
        assert_eq!(credit.raise_for(48), Some(128));
        assert_eq!(credit.raise_for(10), None);
        assert_eq!(credit.limit(), 128);
        let mut open = 0;
        while credit.limit() < MAX_DATA_STREAMS {
            open += 1;
            credit.raise_for(open);
        }
        assert_eq!(credit.limit(), MAX_DATA_STREAMS);
        assert_eq!(credit.raise_for(u64::from(MAX_DATA_STREAMS)), None);
    }
}
