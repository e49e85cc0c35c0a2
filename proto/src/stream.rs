//! Data streams: the header the relay writes first, and the one-byte answer of the agent.
//!
//! For each client connection the relay opens a bidirectional stream, writes a [`StreamHeader`]
//! frame and then the client's bytes as they come, without waiting for anything. The agent reads the
//! header, dials the service's target and writes one [`Answer`] byte; on [`Answer::Connected`] the
//! target's bytes follow, on any other answer the agent finishes the stream.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The first frame on a data stream (relay to agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// The service the client connected to; the agent maps it to a target from its own config.
    pub service: String,
    /// The client's address as the relay saw it (address and port; an IPv6 scope id is not carried).
    pub client_addr: SocketAddr,
}

/// The agent's one-byte answer on a data stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Answer {
    /// The target accepted the connection; its bytes follow.
    Connected = 0,
    /// The agent has no target for this service.
    UnknownService = 1,
    /// The target refused the connection (TCP RST).
    Refused = 2,
    /// The target could not be reached (no route, host down, other dial errors).
    Unreachable = 3,
    /// The target did not accept within the agent's connect timeout.
    TimedOut = 4,
}

/// A byte that is not an [`Answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid answer byte {0:#04x}")]
pub struct InvalidAnswer(pub u8);

impl TryFrom<u8> for Answer {
    type Error = InvalidAnswer;

    fn try_from(byte: u8) -> Result<Self, Self::Error> {
        Ok(match byte {
            0 => Self::Connected,
            1 => Self::UnknownService,
            2 => Self::Refused,
            3 => Self::Unreachable,
            4 => Self::TimedOut,
            other => return Err(InvalidAnswer(other)),
        })
    }
}

impl Answer {
    /// A short description for logs and error pages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::UnknownService => "the agent has no target for this service",
            Self::Refused => "the target refused the connection",
            Self::Unreachable => "the target is unreachable",
            Self::TimedOut => "the target did not answer in time",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_bytes_round_trip_and_others_are_refused() {
        for byte in 0..=u8::MAX {
            match Answer::try_from(byte) {
                Ok(answer) => assert_eq!(answer as u8, byte),
                Err(InvalidAnswer(b)) => assert!(b > 4 && b == byte),
            }
        }
    }
}
