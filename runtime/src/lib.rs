//! What the Sallyport relay and agent share at run time, so that nothing is written twice.
//!
//! # Layout
//!
//! - [`tls`]: rustls configurations (server, client, pinned enrollment client) and certificate
//!   inspection; [`replica_tls`]: mutual TLS between a relay's replicas (one certificate).
//! - [`limits`]: windows, stream counts and timers both transports share.
//! - [`quic`]: quinn's settings for both ends, the UDP socket with its kernel buffers, the
//!   stable stateless-reset key, counted system calls, the agent's client endpoint and connect.
//! - [`tcp`]: the tunnel over TLS on TCP, its streams multiplexed by HTTP/2; the agent's connect.
//! - [`link`]: a tunnel connection over either transport, one API for both.
//! - [`framed`]: length-prefixed frames (see `sallyport_proto::frame`) on QUIC streams.
//! - [`splice`]: a TCP connection joined to a QUIC stream, with half-close and reset semantics;
//!   [`stall`]: how many streams of a connection may sit on a full window while their readers
//!   have stopped.
//! - [`config`]: loading a TOML file into a raw model, human durations, errors naming file and key;
//!   [`keys`]: each key declared once (`config_section!`): default, bounds, reload, documentation.
//! - [`live`]: the configuration in force and the one reload watcher both binaries run.
//! - [`cli`]: process setup both binaries share: signals, logging, small pages, error rendering;
//!   [`logs`]: log budgets.
//! - [`flows`]: the idle-flow table (UDP flows on both sides) and its activity stamps;
//!   [`watched`]: an IO object that stamps activity, for idle timeouts of plain copies.
//! - [`allocator`]: how soon freed memory goes back to the system.
//! - [`durable`]: flushing a rename's directory, writing a private file.
//! - [`addr`], [`clock`], [`hex`], [`sync`]: the unspecified address of a family, Unix seconds,
//!   lowercase hex, and the one way to treat a poisoned lock.
// deny, not forbid: the allocator's settings (allocator.rs) are the one module that calls C.
#![deny(unsafe_code)]

pub mod addr;
pub mod allocator;
pub mod cli;
pub mod clock;
pub mod compare;
pub mod config;
pub mod durable;
pub mod flows;
pub mod framed;
pub mod hex;
pub mod keys;
pub mod limits;
pub mod link;
pub mod live;
pub mod logs;
pub mod pace;
pub mod peer_logs;
pub mod quic;
pub mod replica_tls;
pub mod splice;
pub mod stall;
pub mod sync;
pub mod tcp;
pub mod tls;
pub mod watched;

pub use cli::shutdown_signal;
pub use framed::{read_frame, write_frame, FrameError};
pub use link::code;
pub use splice::{reset_on_close, splice, splice_paced, splice_watched, Side, SpliceError, Spliced};
pub use tls::{Identity, TlsError};

#[doc(hidden)]
pub use tracing;
