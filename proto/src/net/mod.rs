//! Tokio/quinn helpers shared by relay and agent: TLS and transport configuration, the framed
//! control stream, and the splice that joins a TCP connection to a QUIC stream.

pub mod cli;
pub mod framed;
pub mod splice;
pub mod tls;
pub mod transport;

pub use cli::shutdown_signal;
pub use framed::{read_frame, write_frame, FrameError};
pub use splice::{reset_on_close, splice, Side, SpliceError, Spliced};
pub use tls::{Identity, TlsError};

/// Turns one of the protocol's `u32` codes into a QUIC variable-length integer.
pub fn code(value: u32) -> quinn::VarInt {
    quinn::VarInt::from_u32(value)
}
