//! Admission: whether an agent that proved its name may connect, and which of its services the
//! relay publishes.

use sallyport_proto::{
    negotiate_version, Hello, ServiceVerdict, Welcome, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use crate::config::Config;

/// This build, as the relay describes itself to agents.
pub const SOFTWARE: &str = concat!("sallyport-relay ", env!("CARGO_PKG_VERSION"));

/// Why an agent was refused (the agent is told this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// No service in the relay's config names this agent.
    #[error("agent {0:?} is not allowed on this relay (no service names it)")]
    UnknownAgent(String),
    /// The agent's protocol versions and the relay's do not overlap.
    #[error(
        "no common protocol version: relay speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, agent {min}..={max}"
    )]
    NoCommonVersion { min: u16, max: u16 },
}

/// Decides whether `agent` may connect and which of its services the relay publishes.
pub(crate) fn admit(config: &Config, agent: &str, hello: &Hello) -> Result<Welcome, Refusal> {
    if !config.knows_agent(agent) {
        return Err(Refusal::UnknownAgent(agent.to_owned()));
    }
    let version = negotiate_version(hello.min_version, hello.max_version)
        .ok_or(Refusal::NoCommonVersion { min: hello.min_version, max: hello.max_version })?;
    let services = hello
        .services
        .iter()
        .map(|offer| {
            let refused = match config.group(&offer.name) {
                Some(g) if g.has(agent) => None,
                Some(g) if g.agents.len() == 1 => {
                    Some(format!("service {:?} belongs to agent {:?}", offer.name, g.agents[0]))
                }
                Some(g) => Some(format!(
                    "service {:?} belongs to the agents {}",
                    offer.name,
                    g.agents.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
                )),
                None => Some(format!("service {:?} is not configured on this relay", offer.name)),
            };
            ServiceVerdict { name: offer.name.clone(), refused }
        })
        .collect();
    Ok(Welcome { version, software: SOFTWARE.to_owned(), services })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sallyport_proto::ServiceOffer;
    use std::path::Path;

    fn config() -> Config {
        Config::from_toml(
            r#"
[relay]
ca_cert = "ca.crt"
cert = "relay.crt"
key = "relay.key"
[services.web]
agent = "winbox"
listen = "127.0.0.1:0"
[services.db]
agent = "other"
listen = "127.0.0.1:0"
"#,
            Path::new("relay.toml"),
        )
        .expect("valid config")
    }

    fn hello(min: u16, max: u16, services: &[&str]) -> Hello {
        Hello {
            min_version: min,
            max_version: max,
            software: "test".into(),
            services: services.iter().map(|s| ServiceOffer { name: (*s).into() }).collect(),
        }
    }

    #[test]
    fn admission_checks_agent_version_and_each_service() {
        let c = config();
        let w = admit(&c, "winbox", &hello(1, PROTOCOL_VERSION, &["web", "db", "nope"])).expect("admitted");
        assert_eq!(w.version, PROTOCOL_VERSION);
        assert_eq!(w.services[0].refused, None);
        assert!(w.services[1].refused.as_deref().is_some_and(|r| r.contains("belongs to agent \"other\"")));
        assert!(w.services[2].refused.as_deref().is_some_and(|r| r.contains("not configured")));
        let e = admit(&c, "stranger", &hello(1, 1, &["web"])).expect_err("unknown agent");
        assert_eq!(e, Refusal::UnknownAgent("stranger".into()));
        assert!(e.to_string().contains("not allowed"), "{e}");
        let e = admit(&c, "winbox", &hello(90, 99, &["web"])).expect_err("no common version");
        assert_eq!(e, Refusal::NoCommonVersion { min: 90, max: 99 });
        assert!(e.to_string().contains("no common protocol version"), "{e}");
    }
}
