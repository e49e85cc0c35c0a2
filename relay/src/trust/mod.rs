//! Who the relay trusts: its private CA and certificates, enrollment with join tokens, revoked
//! certificates, and the state files that keep tokens and revocations across restarts.

pub(crate) mod enroll;
pub mod pki;
pub(crate) mod revocations;
pub(crate) mod state_file;
