//! `sallyport-relay check`: validate a configuration and its TLS files without binding anything.

use std::fmt;

use sallyport_runtime::tls::{self, IdentityError, TlsFileError};

use crate::{config::Config, ops::auth::load_admin_token, relay::StartError};

/// What a valid configuration amounts to.
#[derive(Debug)]
pub struct CheckReport {
    pub relay_names: Vec<String>,
    pub relay_cert_days_left: i64,
    pub services: Vec<(String, String, String)>,
    /// Whether container commands are on (an admin token is configured and readable).
    pub commands_enabled: bool,
    /// `relay.container_commands`.
    pub container_commands: bool,
    /// `max_connections`, and how many the memory budget holds at worst.
    pub max_connections: usize,
    pub budget: crate::config::Budget,
    pub memory_budget: u64,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "relay certificate: valid for {} more days, names {}",
            self.relay_cert_days_left,
            self.relay_names.join(", ")
        )?;
        for (name, agent, listen) in &self.services {
            writeln!(f, "service {name}: agent {agent}, listens on {listen}")?;
        }
        writeln!(
            f,
            "memory budget: {} MiB holds {} client connections at worst ({} KiB each, {} MiB for the runtime \
             and tunnels); max_connections = {}{}",
            self.memory_budget >> 20,
            self.budget.connections,
            self.budget.per_connection >> 10,
            self.budget.reserved >> 20,
            self.max_connections,
            if self.max_connections > self.budget.connections { " (more than the budget holds)" } else { "" }
        )?;
        match (self.commands_enabled, self.container_commands) {
            (true, true) => writeln!(f, "container commands: on (admin token loaded)")?,
            (true, false) => writeln!(f, "container commands: off (relay.container_commands = false)")?,
            (false, _) => writeln!(f, "container commands: off (no relay.admin_token_file)")?,
        }
        Ok(())
    }
}

/// Reads the CA and the relay's certificate and key, and checks that they belong together.
pub fn check(config: &Config) -> Result<CheckReport, StartError> {
    let tls = config.relay.tls().load()?;
    let days_left = tls.leaf.days_left();
    if days_left < 0 {
        return Err(TlsFileError {
            path: config.relay.cert.clone(),
            reason: "certificate has expired".into(),
        }
        .into());
    }
    let names = tls.leaf.sans.clone();
    // Building the server configuration checks that the key matches the certificate.
    tls::server_crypto(tls.roots, tls.identity, &[sallyport_proto::ALPN_TUNNEL])
        .map_err(IdentityError::from)?;
    let commands_enabled = load_admin_token(config)?.is_some();
    crate::trust::check_durable(config, commands_enabled)?;
    Ok(CheckReport {
        commands_enabled,
        container_commands: config.relay.container_commands,
        max_connections: config.relay.max_connections,
        budget: config.relay.budget(),
        memory_budget: config.relay.memory_budget,
        relay_names: names,
        relay_cert_days_left: days_left,
        services: config
            .services
            .values()
            .map(|s| {
                (
                    s.name.clone(),
                    config.group(&s.name).map(|g| g.agents.join(",")).unwrap_or_default(),
                    s.listen.to_string(),
                )
            })
            .collect(),
    })
}
