//! How homelab clients reach agents' services: one file or folder per kind of exposure, and the
//! caps every listener shares.

pub(crate) mod http;
pub(crate) mod https;
pub(crate) mod limits;
pub(crate) mod tcp;
pub(crate) mod udp;
