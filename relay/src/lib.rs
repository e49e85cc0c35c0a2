//! The Sallyport relay: accepts agents over QUIC (mutual TLS) and exposes their services to the
//! homelab.
//!
//! # Layout
//!
//! Folders are planes; dependencies point one way (`relay` → `ops` → `expose` → `tunnel` →
//! `trust` → `config`), and nothing imports this file.
//!
//! - [`relay`]: [`Relay::bind`] binds every socket (failing closed), [`Relay::run`] serves until
//!   shutdown and drains.
//! - `tunnel/`: agents over QUIC: accept, identity from the certificate, admission, the control
//!   loop, the registry of connected agents, opening data streams, datagrams from agents.
//! - `expose/`: how homelab clients reach services: `tcp`, `udp`, `http/`, `https/` (with its
//!   ClientHello parser), and the per-address caps.
//! - [`trust`]: the PKI, enrollment with join tokens, revocations, state files.
//! - `ops/`: the admin API and its auth, container commands, the status page.
//! - `metrics`: the Prometheus registry every plane counts into.
//! - [`cli`]: bodies of the subcommands that do not run the relay (`check`, `manifests`, the admin
//!   API client, join tokens).
//! - [`config`]: relay.toml into a valid [`Config`].
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
mod expose;
mod metrics;
mod ops;
pub mod relay;
pub mod trust;
mod tunnel;

pub use config::Config;
pub use relay::{join_token, load_admin_token, run, Relay, StartError, SOFTWARE};
pub use tunnel::registry::{AgentSession, Registry};
