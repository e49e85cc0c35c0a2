//! Health checks of a service group's members (version 6 on): the relay says which checks an
//! agent runs next to its targets, the agent says how each service fares as that changes.

use serde::{Deserialize, Serialize};

/// One check the agent runs for one of its services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// The service whose target is checked.
    pub service: String,
    pub kind: CheckKind,
    /// Between the starts of two checks, milliseconds.
    pub interval_ms: u32,
    /// How long one check may take, milliseconds; slower is a failure.
    pub timeout_ms: u32,
    /// Failures in a row that take a healthy target out.
    pub fall: u8,
    /// Successes in a row that bring an unhealthy target back.
    pub rise: u8,
}

/// What a check does with the service's target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckKind {
    /// A TCP connection is accepted.
    Tcp,
    /// `GET path` over HTTP (or HTTPS, certificate not checked: the target is the agent's own
    /// declaration) answers `status`.
    Http { path: String, status: u16, tls: bool },
    /// The service's container runs, or can be started on demand (its last start did not fail).
    Container,
}

/// How one service fares on the agent now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHealth {
    pub service: String,
    pub healthy: bool,
    /// Why, in a few words (the last failure's reason, or empty).
    pub detail: String,
}
