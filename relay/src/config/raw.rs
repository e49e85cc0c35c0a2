//! relay.toml as written: the raw serde model, every field optional where a default exists,
//! unknown keys refused. `Config::from_raw` and `Limits::from_raw` turn it into valid types.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use sallyport_runtime::config::HumanDuration;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) relay: RawRelay,
    pub(crate) cluster: Option<RawCluster>,
    #[serde(default)]
    pub(crate) services: BTreeMap<String, RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub(crate) replica: Option<String>,
    pub(crate) writer: String,
    pub(crate) writer_admin: String,
    pub(crate) sync_interval: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRelay {
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) admin: Option<SocketAddr>,
    pub(crate) admin_token_file: Option<PathBuf>,
    pub(crate) ca_key: Option<PathBuf>,
    pub(crate) tokens_file: Option<PathBuf>,
    pub(crate) revocations_file: Option<PathBuf>,
    pub(crate) agent_cert_validity: Option<HumanDuration>,
    pub(crate) ca_cert: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) idle_timeout: Option<HumanDuration>,
    pub(crate) keep_alive: Option<HumanDuration>,
    pub(crate) handshake_timeout: Option<HumanDuration>,
    pub(crate) drain_grace: Option<HumanDuration>,
    pub(crate) max_incoming: Option<usize>,
    pub(crate) max_unauthenticated: Option<usize>,
    pub(crate) max_unauthenticated_per_ip: Option<usize>,
    pub(crate) handshakes_per_ip_per_second: Option<usize>,
    pub(crate) memory_budget: Option<String>,
    pub(crate) max_connections: Option<usize>,
    pub(crate) congestion: Option<String>,
    pub(crate) http_listen: Option<SocketAddr>,
    pub(crate) https_listen: Option<SocketAddr>,
    pub(crate) tcp_listen: Option<SocketAddr>,
    pub(crate) header_timeout: Option<HumanDuration>,
    pub(crate) max_header_bytes: Option<usize>,
    pub(crate) max_connections_per_ip: Option<usize>,
    pub(crate) udp_flow_idle: Option<HumanDuration>,
    pub(crate) udp_max_flows: Option<usize>,
    pub(crate) threads: Option<usize>,
    pub(crate) lanes: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    pub(crate) agent: String,
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) udp: Option<SocketAddr>,
    pub(crate) hosts: Option<Vec<String>>,
    pub(crate) sni: Option<Vec<String>>,
    pub(crate) load_balancer_ip: Option<std::net::IpAddr>,
    pub(crate) idle_timeout: Option<HumanDuration>,
}
