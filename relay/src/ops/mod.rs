//! The operator's surface: the admin API and its auth, container commands, the status page.

pub(crate) mod admin;
pub(crate) mod status;
