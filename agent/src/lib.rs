//! The Sallyport agent: keeps an outbound QUIC tunnel to each relay it is told about and connects
//! the streams the relay opens to the targets this machine declares.
//!
//! # Layout
//!
//! Dependencies point one way (`agent` → `tunnel` → `targets` → `containers` → `config`), and
//! nothing imports this file.
//!
//! - [`agent`]: [`Agent::new`] loads the identity (failing closed), [`Agent::run`] keeps the
//!   tunnels until shutdown.
//! - `tunnel/`: one reconnecting tunnel per relay, its control loop, relay commands, certificate
//!   renewal.
//! - `targets/`: what a service name means here: dialing a stream's target (with the PROXY v2
//!   header), UDP flows, `wsl://` addresses.
//! - [`containers`]: the declared containers and their lifecycle through the Docker Engine API.
//! - [`config`]: agent.toml into a valid [`Config`].
//! - [`service`]: the Windows service (its plan is data, unit-tested everywhere).
//! - [`enroll`]: `sallyport-agent enroll`: a join token redeemed for a certificate.
//! - [`backoff`]: full-jitter exponential backoff.
//! - [`acl`]: who may change the service's files, decided from Windows' access descriptors.
//! - [`events`]: the Event Log's stable event IDs (log events carry them as `event_id`).
//! - `files`: the agent's own files, written whole, a key private.
// Denied everywhere but in the Windows Event Log writer (service/eventlog.rs), which says why.
#![deny(unsafe_code)]

pub mod acl;
pub mod agent;
pub mod backoff;
pub mod config;
pub mod containers;
pub mod drain;
pub mod enroll;
pub mod events;
mod files;
#[doc(hidden)]
pub mod fuzzing;
mod reload;
pub mod service;
mod targets;
mod tunnel;

pub use agent::{Agent, IdentityInfo, StartError};
pub use config::Config;
pub use containers::{ContainerError, ContainerState, Containers};
pub use tunnel::{TunnelError, TunnelStatus, SOFTWARE};
