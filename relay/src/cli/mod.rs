//! Bodies of the subcommands that do not run the relay: `check`, `manifests`, join tokens, and
//! the admin API client the others use.

pub mod admin_client;
pub mod check;
pub mod join_token;
pub mod manifests;
