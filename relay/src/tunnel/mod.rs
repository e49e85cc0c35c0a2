//! Agents over QUIC: accepting them, their identity from the certificate, admission, the control
//! loop that lasts as long as the connection, the registry of connected agents, opening data
//! streams to them, and the datagrams they send.

mod accept;
mod admission;
mod closed;
mod conflicts;
mod control;
pub(crate) mod datagrams;
mod gate;
mod health;
mod identity;
mod lanes;
pub(crate) mod registry;
mod renewal;
pub(crate) mod revoked;
pub(crate) mod state;
pub(crate) mod streams;

use std::sync::Arc;

pub(crate) use accept::{accept_loop, tcp_accept_loop, Handoff};

/// The gate in front of the handshake, for `limits`.
pub(crate) fn gate(limits: &crate::config::RelayKeys) -> Arc<gate::Gate> {
    gate::Gate::new(limits)
}
pub use admission::SOFTWARE;
pub(crate) use state::Tunnels;
