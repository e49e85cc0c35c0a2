//! Numeric codes carried in QUIC CONNECTION_CLOSE and RESET_STREAM/STOP_SENDING frames.

/// Connection close codes (application error codes of CONNECTION_CLOSE).
pub mod close {
    /// Orderly close with nothing to report.
    pub const NORMAL: u32 = 0;
    /// The relay is shutting down or draining: reconnect now, without backoff.
    pub const GOING_AWAY: u32 = 1;
    /// The peer broke the protocol (bad frame, wrong first message, timeout on the first message).
    pub const PROTOCOL_ERROR: u32 = 2;
    /// A newer connection of the same agent took over.
    pub const REPLACED: u32 = 3;
    /// The relay refused this agent (no policy for it, or no common protocol version).
    pub const REFUSED: u32 = 4;
    /// A replica of a replicated relay closed a further connection of an agent that holds a tunnel
    /// to it already (or a lane whose session it does not hold): dial again, for another replica.
    pub const HELD: u32 = 5;
}

/// Stream error codes (RESET_STREAM and STOP_SENDING).
pub mod stream {
    /// The side that resets lost its end of the connection: the client reset it (relay) or the
    /// target reset it (agent). The other side turns this into a TCP RST.
    pub const PEER_RESET: u32 = 1;
    /// Our own side failed (IO error, shutdown past the grace period).
    pub const INTERNAL: u32 = 2;
    /// The relay is shutting down and the grace period is over.
    pub const SHUTDOWN: u32 = 3;
}
