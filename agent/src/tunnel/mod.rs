//! One tunnel per relay (and per replica of a relay that runs as several): connect with mutual
//! TLS over QUIC or TLS on TCP, say `Hello`, get `Welcome`, then serve data streams and answer
//! the control stream until the connection ends; reconnect forever with full-jitter backoff.
//!
//! # Layout
//!
//! Dependencies point one way, down this list; nothing here imports this file.
//!
//! - [`slot`]: the tunnels to one relay address, each slot kept up (`maintain`): the reconnect
//!   policy (backoff, redial window, seeking past replicas held).
//! - [`serve`]: one attempt: open a session, serve it, probe QUIC while on TCP and move back.
//! - [`control`]: the control loop after `Welcome`, one handler per message.
//! - [`lanes`]: further connections beside a tunnel, each on its own thread.
//! - [`streams`]: the data streams of one connection, each served toward its target.
//! - [`session`]: dial + `Seek`/`Hello` → `Welcome`/`Replicas`; the handshake-only probe.
//! - [`tunnels`]: what every tunnel shares (`Tunnels`) and each tunnel's status.
//! - [`commands`]: relay commands (expiry, replay, declaration); [`renew`]: certificate renewal.
//! - [`connect`]: the one `dial` over either transport, the credentials of the moment.
//! - [`choice`]: which transport next and how long to wait for an answer (pure).
//! - [`replicas`]: the group of slots of one relay address (pure); [`error`]: `TunnelError`.

mod choice;
pub(crate) mod commands;
mod connect;
mod control;
mod error;
mod health;
mod lanes;
pub(crate) mod renew;
mod replicas;
mod serve;
mod session;
mod slot;
mod streams;
mod tunnels;

pub(crate) use choice::Failure;
pub(crate) use connect::{dial, Credentials, Dialer, Timers, Via};
pub use error::TunnelError;
pub(crate) use session::probe;
pub(crate) use slot::maintain;
pub(crate) use tunnels::Tunnels;
pub use tunnels::{TunnelStatus, SOFTWARE};
