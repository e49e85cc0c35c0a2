//! `[agent]`: every key of the table declared once (its default, its rule, whether a reload
//! applies it, its documentation); the checks that need several keys follow.

use std::{path::PathBuf, time::Duration};

use sallyport_runtime::{
    config::{ConfigError, HumanDuration, Section},
    keys::Shown,
    link::Transport,
    quic::Congestion,
    tls::TlsFiles,
};

const MILLISECOND: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);

/// How long a QUIC handshake may take in `auto` before the tunnel falls back to TCP.
pub const QUIC_WAIT: Duration = Duration::from_secs(3);

/// `agent.transport`: which transport carries the tunnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    /// QUIC first; TCP when QUIC's handshake does not complete within [`QUIC_WAIT`] or UDP fails
    /// outright; back to QUIC once a probe gets through. The default.
    Auto,
    /// One transport only.
    Only(Transport),
}

impl Shown for TransportChoice {
    fn shown(&self) -> String {
        match self {
            Self::Auto => "auto".to_owned(),
            Self::Only(t) => t.to_string(),
        }
    }
}

/// The default number of connections to each relay: one per two cores the agent may use (the
/// kernel's share of moving the traffic runs on the other), between 1 and 4.
pub fn default_lanes() -> usize {
    (std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) / 2).clamp(1, 4)
}

fn transport(
    section: &Section<'_>,
    key: &str,
    raw: Option<String>,
    default: TransportChoice,
) -> Result<TransportChoice, ConfigError> {
    match raw.as_deref() {
        None => Ok(default),
        Some("auto") => Ok(TransportChoice::Auto),
        Some(other) => other.parse().map(TransportChoice::Only).map_err(|_| {
            ConfigError::invalid(
                section.path(),
                section.key(key),
                format!("{other:?}: must be auto, quic or tcp"),
            )
        }),
    }
}

fn relays(
    section: &Section<'_>,
    key: &str,
    raw: Option<Vec<String>>,
    _: Vec<String>,
) -> Result<Vec<String>, ConfigError> {
    match raw {
        Some(list) if !list.is_empty() => Ok(list),
        _ => Err(ConfigError::invalid(
            section.path(),
            section.key(key),
            "list at least one relay as \"HOST:PORT\"",
        )),
    }
}

sallyport_runtime::config_section! {
    /// The `[agent]` table: the relays, the identity, the timers, the transport.
    pub struct AgentKeys from RawAgent in "agent" {
        /// Every relay the agent keeps a tunnel to, as `"HOST:PORT"`.
        relays: Vec<String> = Vec::new(), shown "required", from Vec<String>, custom(relays, "a list of \"HOST:PORT\""), restart;
        /// The name the relays' certificate carries (`none`: each relay's host).
        server_name: Option<String> = None, from String, value("a DNS name"), restart;
        /// The CA certificate the relays' certificates are checked against.
        ca_cert: PathBuf = PathBuf::new(), from PathBuf, required_path, restart;
        /// The agent's certificate.
        cert: PathBuf = PathBuf::new(), from PathBuf, required_path, restart;
        /// The agent's private key.
        key: PathBuf = PathBuf::new(), from PathBuf, required_path, restart;
        /// QUIC keep-alive interval: well under NAT and conntrack UDP timeouts (at most two thirds
        /// of `idle_timeout`).
        keep_alive: Duration = sallyport_runtime::limits::KEEP_ALIVE, from HumanDuration, within(MILLISECOND * 100..=SECOND * 600), restart;
        /// A tunnel silent for this long is dead (QUIC takes the smaller of this and the relay's).
        idle_timeout: Duration = sallyport_runtime::limits::IDLE_TIMEOUT, from HumanDuration, within(MILLISECOND * 500..=HOUR), restart;
        /// Time for the handshake plus the relay's `Welcome`.
        handshake_timeout: Duration = SECOND * 10, from HumanDuration, within(MILLISECOND * 100..=SECOND * 300), restart;
        /// Time for a target to accept a TCP connection.
        connect_timeout: Duration = SECOND * 5, from HumanDuration, within(MILLISECOND * 10..=SECOND * 300), restart;
        /// First reconnect delay bound; doubles per failed attempt up to `reconnect_max`.
        reconnect_min: Duration = MILLISECOND * 250, from HumanDuration, within(MILLISECOND * 10..=SECOND * 600), restart;
        /// The longest reconnect delay.
        reconnect_max: Duration = SECOND * 10, from HumanDuration, within(MILLISECOND * 10..=HOUR), restart;
        /// Congestion controller of the agent-to-relay direction.
        congestion: Congestion = Congestion::default(), from String, parsed("bbr, cubic or newreno"), restart;
        /// A UDP flow with no datagram either way for this long is closed.
        udp_flow_idle: Duration = SECOND * 60, from HumanDuration, within(SECOND..=HOUR), restart;
        /// UDP flows open at once, at most; a new one beyond it closes a flow of the fullest client
        /// prefix (not-yet-answered and quiet ones first).
        udp_max_flows: usize = 4096, from usize, within(1..=1_000_000), restart;
        /// Connections to each relay that the relay spreads data streams over: the tunnel and
        /// `lanes - 1` lanes beside it, each on its own thread.
        lanes: usize = default_lanes(), shown "one per two cores, 1 to 4", from usize, within(1..=64), restart;
        /// Which transport carries the tunnels: `auto` (QUIC first, TCP when QUIC gets no answer
        /// within 3 s, back to QUIC when a probe gets through), `quic` or `tcp`.
        transport: TransportChoice = TransportChoice::Auto, from String, custom(transport, "auto, quic or tcp"), restart;
        /// While a tunnel runs over TCP in `auto`, how often QUIC is tried again.
        quic_probe: Duration = SECOND * 15, from HumanDuration, within(SECOND..=HOUR), live;
    }
}

impl AgentKeys {
    /// The `[agent]` table as written, each key checked by its rule, then the checks that need
    /// several keys.
    pub(super) fn from_raw(raw: &RawAgent, section: Section<'_>) -> Result<Self, ConfigError> {
        let keys = Self::read(raw, section.path())?;
        if keys.keep_alive * 3 > keys.idle_timeout * 2 {
            return Err(ConfigError::invalid(
                section.path(),
                section.key("keep_alive"),
                "must be at most two thirds of agent.idle_timeout, or a quiet tunnel is declared dead",
            ));
        }
        if keys.reconnect_min > keys.reconnect_max {
            return Err(ConfigError::invalid(
                section.path(),
                section.key("reconnect_min"),
                "must not exceed agent.reconnect_max",
            ));
        }
        Ok(keys)
    }

    /// The agent's certificate, key and CA.
    pub fn tls(&self) -> TlsFiles {
        TlsFiles { ca_cert: self.ca_cert.clone(), cert: self.cert.clone(), key: self.key.clone() }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The configuration guide's `[agent]` table is the one the declarations make.
    #[test]
    fn the_guide_lists_every_agent_key_as_declared() {
        let guide = include_str!("../../../docs/configuration.md");
        let listed = sallyport_runtime::keys::guide_lists(
            guide,
            "agent",
            "agent/src/config/agent_keys.rs",
            &AgentKeys::keys(),
        );
        assert_eq!(listed, Ok(()), "docs/configuration.md");
    }

    /// A table that writes only the required keys gets every declared default, each within its
    /// own rule (a default out of its bounds would be refused here), and every key is documented.
    #[test]
    fn an_all_default_agent_table_reads_as_the_declared_defaults() {
        let path = Path::new("/etc/sallyport/agent.toml");
        let raw: RawAgent = sallyport_runtime::config::parse_toml(
            "relays = [\"relay.lan:443\"]\nca_cert = \"ca.crt\"\ncert = \"agent.crt\"\nkey = \"agent.key\"",
            path,
        )
        .expect("raw");
        let keys = AgentKeys::read(&raw, path).expect("the defaults pass their rules");
        let expected = AgentKeys {
            relays: vec!["relay.lan:443".into()],
            ca_cert: "/etc/sallyport/ca.crt".into(),
            cert: "/etc/sallyport/agent.crt".into(),
            key: "/etc/sallyport/agent.key".into(),
            ..AgentKeys::default()
        };
        assert_eq!(keys, expected);
        for key in AgentKeys::keys() {
            assert!(!key.doc.is_empty(), "{} has no documentation", key.key);
        }
    }
}
