//! `[relay]`: every key of the table declared once (its default, its rule, whether a reload
//! applies it, its documentation); the checks that need several keys follow.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use sallyport_runtime::{
    config::{ConfigError, HumanDuration, Section},
    quic::Congestion,
    tls::TlsFiles,
};

use super::budget::{default_threads, Budget, DEFAULT_MEMORY_BUDGET};

const MILLISECOND: Duration = Duration::from_millis(1);
pub(super) const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
pub(super) const DAY: Duration = Duration::from_secs(86_400);
const MIB: u64 = 1 << 20;

/// Where agents reach the relay when `relay.listen` is not set.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 4433);
/// The admin server's address when `relay.admin` is not set: loopback only.
pub const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);
/// The request head the relay accepts by default, and the unproven peers it holds by default:
/// with the default memory budget they make the default `max_connections`.
const MAX_HEADER_BYTES: usize = 64 * 1024;
const MAX_UNAUTHENTICATED: usize = 64;

sallyport_runtime::config_section! {
    /// The `[relay]` table: addresses, trust files, timeouts and caps.
    pub struct RelayKeys from RawRelay in "relay" {
        /// UDP address of the QUIC endpoint agents connect to.
        listen: SocketAddr = DEFAULT_LISTEN, from SocketAddr, value("an address host:port"), restart;
        /// TCP address agents reach the tunnel over TCP at, for networks where UDP does not get out
        /// (`none`: the address of `listen`, over TCP). The HTTPS listener's address shares its port.
        tcp_listen: Option<SocketAddr> = None, from SocketAddr, value("an address host:port"), restart;
        /// Whether agents may reach the tunnel over TCP at all (`false`: QUIC only; no TCP listener
        /// for it, and the HTTPS listener hands no connection to it).
        tcp_tunnel: bool = true, from bool, value("true or false"), restart;
        /// TCP address of the admin HTTP server (`/livez`, `/readyz`, `/metrics`, the API).
        admin: SocketAddr = DEFAULT_ADMIN, from SocketAddr, value("an address host:port"), restart;
        /// File holding the bearer token the admin API wants for operator calls; without one they
        /// are refused (reads stay open on loopback).
        admin_token_file: Option<PathBuf> = None, from PathBuf, path, restart;
        /// File holding a second bearer token that only reads: `/agents`, `/metrics` and the status
        /// pages (for Prometheus). It cannot make join tokens, revoke, reload or run container commands.
        read_token_file: Option<PathBuf> = None, from PathBuf, path, restart;
        /// Whether the admin token may start, stop and restart agents' containers and read their
        /// logs (`false`: refused, whoever asks).
        container_commands: bool = true, from bool, value("true or false"), live;
        /// The CA certificate agents' certificates are checked against.
        ca_cert: PathBuf = PathBuf::new(), from PathBuf, required_path, restart;
        /// The relay's certificate.
        cert: PathBuf = PathBuf::new(), from PathBuf, required_path, restart;
        /// The relay's private key.
        key: PathBuf = PathBuf::new(), from PathBuf, required_path, restart;
        /// The intermediate CA's private key (`ca.key` from `init`, never the root's): with it (and an admin token) the relay enrolls agents with join tokens.
        ca_key: Option<PathBuf> = None, from PathBuf, path, restart;
        /// Where join tokens are kept across restarts (`none`: in memory only).
        tokens_file: Option<PathBuf> = None, from PathBuf, path, restart;
        /// Where revoked agent certificates are kept across restarts (`none`: in memory only).
        revocations_file: Option<PathBuf> = None, from PathBuf, path, restart;
        /// Validity of the certificates the relay issues to enrolling agents (they renew over the tunnel).
        agent_cert_validity: Duration = DAY * 30, from HumanDuration, within(SECOND * 10..=DAY * 3650), restart;
        /// TCP address of the HTTP listener that routes requests by `Host` (services with `hosts`).
        http_listen: Option<SocketAddr> = None, from SocketAddr, value("an address host:port"), live;
        /// TCP address of the HTTPS listener that routes TLS connections by SNI (services with
        /// `sni`), passed through or terminated (`tls = "terminate"`).
        https_listen: Option<SocketAddr> = None, from SocketAddr, value("an address host:port"), live;
        /// The port clients reach the HTTPS listener on (behind a LoadBalancer, its port, not
        /// `https_listen`'s): a terminated service's redirect from plain HTTP names it.
        https_public_port: usize = 443, from usize, within(1..=65_535), live;
        /// A tunnel with no traffic (not even keep-alives) for this long is dead.
        idle_timeout: Duration = sallyport_runtime::limits::IDLE_TIMEOUT, from HumanDuration, within(MILLISECOND * 500..=HOUR), restart;
        /// A quiet tunnel sends a keep-alive after this long (at most five sixths of `idle_timeout`).
        keep_alive: Duration = sallyport_runtime::limits::RELAY_KEEP_ALIVE, from HumanDuration, within(MILLISECOND * 100..=SECOND * 600), restart;
        /// Time for a new agent to finish the handshake and send `Hello`.
        handshake_timeout: Duration = SECOND * 10, from HumanDuration, within(MILLISECOND * 100..=SECOND * 300), restart;
        /// How long connections in flight may take to finish on shutdown, or when their service goes.
        drain_grace: Duration = SECOND * 20, from HumanDuration, within(Duration::ZERO..=HOUR), live;
        /// QUIC handshakes in progress at once, at most.
        max_incoming: usize = 256, from usize, within(1..=usize::MAX), restart;
        /// Connections whose peer has not proven who it is (handshake, Hello, enrollment), at most.
        max_unauthenticated: usize = MAX_UNAUTHENTICATED, from usize, within(1..=65_536), restart;
        /// Such connections from one host (an IPv4 address, an IPv6 /64), at most.
        max_unauthenticated_per_ip: usize = 8, from usize, within(1..=65_536), restart;
        /// New handshakes one host (an IPv4 address, an IPv6 /64) may start per second (in bursts of twice that).
        handshakes_per_ip_per_second: usize = 10, from usize, within(1..=100_000), restart;
        /// What the relay may hold in memory (the pod's memory limit): the default of
        /// `max_connections` is derived from it.
        memory_budget: u64 = DEFAULT_MEMORY_BUDGET, shown "512MiB", from String, size, live;
        /// Client connections open at once across all services, at most.
        max_connections: usize = Budget::new(DEFAULT_MEMORY_BUDGET, MAX_HEADER_BYTES, MAX_UNAUTHENTICATED).connections,
            shown "what memory_budget holds", from usize, within(1..=usize::MAX), live;
        /// Congestion controller of the relay-to-agent direction.
        congestion: Congestion = Congestion::default(), from String, parsed("bbr, cubic or newreno"), restart;
        /// Time for an HTTP client to send a whole request head (and a TLS client its
        /// ClientHello); also how long an idle keep-alive connection waits for its next request.
        header_timeout: Duration = SECOND * 10, from HumanDuration, within(MILLISECOND * 100..=SECOND * 300), live;
        /// The largest HTTP request head accepted (bigger: 431 and closed).
        max_header_bytes: usize = MAX_HEADER_BYTES, from usize, within(8192..=1 << 20), live;
        /// Connections open at once from one client host (an IPv4 address, an IPv6 /64), across every listener, at most.
        max_connections_per_ip: usize = 256, from usize, within(1..=usize::MAX), live;
        /// A UDP flow with no datagram either way for this long is forgotten.
        udp_flow_idle: Duration = SECOND * 60, from HumanDuration, within(SECOND..=HOUR), live;
        /// UDP flows kept per service; a new flow beyond it replaces a flow of the fullest client
        /// prefix (not-yet-answered and quiet ones first).
        udp_max_flows: usize = 4096, from usize, within(1..=1 << 20), restart;
        /// Threads that run the relay (its CPU quota counts where a cgroup sets one).
        threads: usize = default_threads(), shown "half the cores, at least 1", from usize, within(1..=256), restart;
        /// Connections per agent (its tunnel and its lanes) that the relay spreads the agent's
        /// data streams over, at most.
        lanes: usize = 8, from usize, within(1..=64), live;
    }
}

impl RelayKeys {
    /// The `[relay]` table as written, each key checked by its rule, then the checks that need
    /// several keys; `max_connections` not written is derived from the memory budget.
    pub(super) fn from_raw(raw: &RawRelay, section: Section<'_>) -> Result<Self, ConfigError> {
        let mut keys = Self::read(raw, section.path())?;
        let budget = keys.budget();
        if raw.max_connections.is_none() {
            keys.max_connections = budget.connections;
        }
        if keys.keep_alive * 6 > keys.idle_timeout * 5 {
            return Err(ConfigError::invalid(
                section.path(),
                section.key("keep_alive"),
                "must be at most five sixths of relay.idle_timeout, or a quiet tunnel is declared dead",
            ));
        }
        if budget.connections == 0 {
            return Err(ConfigError::invalid(
                section.path(),
                section.key("memory_budget"),
                format!(
                    "{} MiB leaves no room for client connections: the runtime and {} tunnels take {} MiB",
                    keys.memory_budget / MIB,
                    Budget::TUNNELS,
                    budget.reserved.div_ceil(MIB)
                ),
            ));
        }
        Ok(keys)
    }

    /// What the budget holds with these limits.
    pub fn budget(&self) -> Budget {
        Budget::new(self.memory_budget, self.max_header_bytes, self.max_unauthenticated)
    }

    /// The relay's certificate, key and CA.
    /// Where the tunnel takes agents over TCP: `tcp_listen`, else `listen`'s address over TCP;
    /// `None` with `tcp_tunnel = false`.
    pub fn tunnel_tcp(&self) -> Option<SocketAddr> {
        self.tcp_tunnel.then(|| self.tcp_listen.unwrap_or(self.listen))
    }

    /// Whether the tunnel over TCP shares the HTTPS listener's address: only then does that
    /// listener hand ClientHellos offering the tunnel's ALPN to the tunnel.
    pub fn tunnel_shares_https(&self) -> bool {
        self.https_listen.is_some() && self.tunnel_tcp() == self.https_listen
    }

    pub fn tls(&self) -> TlsFiles {
        TlsFiles { ca_cert: self.ca_cert.clone(), cert: self.cert.clone(), key: self.key.clone() }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The configuration guide's `[relay]` table is the one the declarations make.
    #[test]
    fn the_guide_lists_every_relay_key_as_declared() {
        let guide = include_str!("../../../docs/configuration.md");
        let listed = sallyport_runtime::keys::guide_lists(
            guide,
            "relay",
            "relay/src/config/relay_keys.rs",
            &RelayKeys::keys(),
        );
        assert_eq!(listed, Ok(()), "docs/configuration.md");
    }

    /// A table that writes only the required keys gets every declared default, each within its
    /// own rule (a default out of its bounds would be refused here), and every key is documented.
    #[test]
    fn an_all_default_relay_table_reads_as_the_declared_defaults() {
        let path = Path::new("/etc/sallyport/relay.toml");
        let raw: RawRelay = sallyport_runtime::config::parse_toml(
            "ca_cert = \"ca.crt\"\ncert = \"relay.crt\"\nkey = \"relay.key\"",
            path,
        )
        .expect("raw");
        let keys = RelayKeys::read(&raw, path).expect("the defaults pass their rules");
        let expected = RelayKeys {
            ca_cert: "/etc/sallyport/ca.crt".into(),
            cert: "/etc/sallyport/relay.crt".into(),
            key: "/etc/sallyport/relay.key".into(),
            ..RelayKeys::default()
        };
        assert_eq!(keys, expected);
        for key in RelayKeys::keys() {
            assert!(!key.doc.is_empty(), "{} has no documentation", key.key);
        }
    }
}
