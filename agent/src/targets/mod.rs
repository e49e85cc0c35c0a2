//! What a service name means on this machine: the target a data stream is dialed to (TCP, a
//! container, a WSL2 port; with the PROXY v2 header when asked), UDP flows toward UDP targets,
//! and the WSL2 VM address `wsl://` targets resolve to.

pub(crate) mod dial;
pub(crate) mod udp;
pub(crate) mod wsl;
