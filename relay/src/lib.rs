//! The Sallyport relay: accepts agents over QUIC (mutual TLS) and exposes their services to the
//! homelab.
//!
//! # Layout
//!
//! Folders are planes, and dependencies point one way: `relay` → `ops` → `expose` → `tunnel` →
//! `cluster` → `trust` → `config`; `runtime` and `metrics` sit below them all. Nothing imports
//! this file.
//!
//! - [`relay`]: [`Relay::bind`] binds every socket (failing closed), [`Relay::run`] serves until
//!   shutdown, then drains.
//! - `tunnel/`: agents over QUIC: accept, identity from the certificate, admission, the control
//!   loop (one handler per message), the registry of connected agents, opening data streams, the
//!   datagrams agents send back.
//! - `expose/`: how homelab clients reach services: `tcp`, `udp`, `http/` (routing by Host, the
//!   upstream pool), `https/` (routing by SNI, passed through or terminated; the ClientHello
//!   parser is in `sallyport_proto`), per-address caps.
//! - `certs/`: the certificates of terminated HTTPS services as served now, read again when their
//!   files change, picked by server name.
//! - `cluster/`: several replicas behind one address: the writer of tokens and revocations, the
//!   others' reports to it, and the list of replicas serving that agents follow.
//! - [`trust`]: the PKI, enrollment with join tokens, revocations, state files.
//! - [`ops`]: the admin API and its auth, container commands, the status page.
//! - [`cli`]: bodies of the subcommands that do not run the relay.
//! - [`config`]: relay.toml into a valid [`Config`].
//! - [`access`]: allow and deny lists by client address, the client behind a trusted proxy, the
//!   access log (a leaf: the configuration parses rules with it, the listeners ask it).
//! - `runtime`: what every plane shares while the relay runs (metrics, task trackers,
//!   readiness); `metrics`: the Prometheus registry.
#![forbid(unsafe_code)]

pub mod access;
mod certs;
pub mod cli;
mod cluster;
pub mod config;
mod expose;
#[doc(hidden)]
pub mod fuzzing;
mod groups;
mod metrics;
pub mod ops;
pub mod relay;
mod runtime;
pub mod trust;
mod tunnel;

pub use config::Config;
pub use relay::{run, Relay, StartError};
pub use tunnel::{
    registry::{AgentSession, Registry},
    SOFTWARE,
};
