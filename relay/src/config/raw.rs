//! relay.toml as written: the raw serde model, every field optional where a default exists,
//! unknown keys refused. `Config::from_raw` turns it into valid types; the `[relay]` table is declared
//! with its keys (`relay_keys.rs`).

use std::{collections::BTreeMap, net::SocketAddr};

use sallyport_runtime::config::HumanDuration;
use serde::Deserialize;

use super::relay_keys::RawRelay;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) relay: RawRelay,
    pub(crate) cluster: Option<RawCluster>,
    pub(crate) access: Option<super::access::RawAccess>,
    #[serde(default)]
    pub(crate) services: BTreeMap<String, RawService>,
    #[serde(default)]
    pub(crate) certificates: BTreeMap<String, super::certificates::RawCertificate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub(crate) replica: Option<String>,
    pub(crate) writer: String,
    pub(crate) writer_peer: Option<String>,
    pub(crate) peer_listen: Option<SocketAddr>,
    /// Replaced by `writer_peer`: refused with a message saying so.
    pub(crate) writer_admin: Option<String>,
    pub(crate) sync_interval: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    pub(crate) agent: Option<String>,
    pub(crate) agents: Option<Vec<String>>,
    pub(crate) strategy: Option<String>,
    pub(crate) health: Option<super::group::RawHealth>,
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) udp: Option<SocketAddr>,
    pub(crate) hosts: Option<Vec<String>>,
    pub(crate) sni: Option<Vec<String>>,
    pub(crate) tls: Option<String>,
    pub(crate) redirect_http: Option<bool>,
    pub(crate) hsts: Option<HumanDuration>,
    pub(crate) load_balancer_ip: Option<std::net::IpAddr>,
    pub(crate) idle_timeout: Option<HumanDuration>,
    pub(crate) access: Option<Vec<String>>,
    pub(crate) trusted_proxies: Option<Vec<String>>,
    pub(crate) connections_per_second: Option<u32>,
    pub(crate) connection_burst: Option<u32>,
    pub(crate) requests_per_second: Option<u32>,
    pub(crate) request_burst: Option<u32>,
    pub(crate) auth: Option<super::auth::RawAuth>,
    pub(crate) bandwidth: Option<String>,
    pub(crate) bandwidth_burst: Option<String>,
}
