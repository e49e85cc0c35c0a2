//! `relay.toml`: the raw file model and the validated [`Config`] it is parsed into.
//!
//! The relay owns exposure: which agent may publish which service, and on which listener. A relay
//! with no service (and so no agent allowed) refuses to start.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use sallyport_runtime::config::{self as conf, ConfigError};

pub mod access;
pub mod acme;
mod auth;
mod bandwidth;
mod budget;
pub mod certificates;
pub mod group;
mod raw;
mod relay_keys;

pub use access::{Access, ServiceAccess};
pub use budget::{default_threads, Budget, DEFAULT_MEMORY_BUDGET};
pub use certificates::{Certificate, CertificateError, Loaded, Terminate};
pub use group::{Group, Health, Strategy};
use raw::{RawCluster, RawConfig};
pub use relay_keys::RelayKeys;
use relay_keys::SECOND;

/// The validated relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages, and to reload).
    pub path: PathBuf,
    /// The first 12 hex digits of the SHA-256 of the file's text: which configuration is live.
    pub hash: String,
    /// The `[relay]` table: addresses, trust files, timeouts and caps.
    pub relay: RelayKeys,
    /// Several replicas behind one address (`[cluster]`); `None`: this relay runs alone.
    pub cluster: Option<Cluster>,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Who may reach which service (`[access]` and each service's `access`), and the access log.
    pub access: Access,
    /// The certificates of the HTTPS services the relay terminates, read when the file loaded.
    pub certificates: BTreeMap<String, (Certificate, Option<Loaded>)>,
    /// Each service's agents, strategy and health check, by service name.
    pub groups: BTreeMap<String, Group>,
}

/// Where a replica takes the others' calls, by default.
pub const DEFAULT_PEER_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9443);

/// `[cluster]`: this relay is one of several replicas behind one address. One of them, the
/// writer, keeps join tokens and revocations; the others forward writes to it and follow its
/// revocations and its list of replicas serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// This replica's name (`cluster.replica`, or `serve --replica`: in Kubernetes the pod's name).
    pub replica: String,
    /// The name of the replica that keeps tokens and revocations.
    pub writer: String,
    /// `host:port` of the writer's replica port (mutual TLS), looked up at each call.
    pub writer_peer: String,
    /// Where this replica takes the other replicas' calls (mutual TLS with the relay's own
    /// certificate); only the writer gets any.
    pub peer_listen: SocketAddr,
    /// How often a replica reports to the writer and takes its revocations and replica list.
    pub sync_interval: Duration,
}

impl Cluster {
    /// How long after its last report a replica stops counting as serving.
    pub fn member_timeout(&self) -> Duration {
        self.sync_interval * 3
    }

    /// Whether this replica is the writer.
    pub fn is_writer(&self) -> bool {
        self.replica == self.writer
    }
}

/// One published service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// Where the relay listens for its clients.
    pub listen: Listen,
    /// In Kubernetes: a MetalLB IP of the service's own instead of the relay's shared one (used by
    /// `sallyport-relay manifests` only).
    pub load_balancer_ip: Option<std::net::IpAddr>,
    /// A client connection (TCP, HTTP once a request named the service, HTTP after an upgrade)
    /// that moves no byte either way for this long is closed; `None` for long-lived protocols that sit quiet (`idle_timeout = "0s"`).
    pub idle_timeout: Option<Duration>,
    /// An HTTPS service whose TLS the relay terminates (`tls = "terminate"`); `None`: passed
    /// through (or not an HTTPS service).
    pub terminate: Option<Terminate>,
}

/// How a service is exposed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP port of its own (`listen`).
    Tcp(SocketAddr),
    /// A UDP port of its own (`udp`).
    Udp(SocketAddr),
    /// Host names on the shared HTTP listener (`hosts`), lower-case.
    Http(Vec<String>),
    /// Server names on the shared HTTPS listener (`sni`), lower-case; TLS passes through.
    Https(Vec<String>),
}

impl Listen {
    /// The port of a service's own listener, with its protocol.
    pub fn own_port(&self) -> Option<(&'static str, SocketAddr)> {
        match *self {
            Self::Tcp(addr) => Some(("TCP", addr)),
            Self::Udp(addr) => Some(("UDP", addr)),
            Self::Http(_) | Self::Https(_) => None,
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "tcp {addr}"),
            Self::Udp(addr) => write!(f, "udp {addr}"),
            Self::Http(hosts) => write!(f, "http {}", hosts.join(", ")),
            Self::Https(names) => write!(f, "https {}", names.join(", ")),
        }
    }
}

impl Config {
    /// Where agents reach the relay when `relay.listen` is not set.
    pub const DEFAULT_LISTEN: SocketAddr = relay_keys::DEFAULT_LISTEN;
    /// The admin server's address when `relay.admin` is not set: loopback only.
    pub const DEFAULT_ADMIN: SocketAddr = relay_keys::DEFAULT_ADMIN;
    /// How long a service's client connection may sit quiet unless the service says otherwise.
    pub const DEFAULT_SERVICE_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text, path)
    }

    /// Validates `text` as if it had been read from `path` (relative paths resolve against it).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::from_raw(conf::parse_toml(text, path)?, path, sallyport_runtime::live::hash(text.as_bytes()))
    }

    /// Why `new` cannot replace this configuration without a restart: the first key it changes
    /// that a reload cannot (the QUIC endpoint, the admin server, the trust files, the tunnels'
    /// transport: the `[relay]` keys declared `restart`, and `[cluster]`), as an error naming the
    /// file and the key.
    pub fn reload_refusal(&self, new: &Config) -> Option<ConfigError> {
        let key = if self.cluster != new.cluster {
            Some("cluster")
        } else if self.access.log != new.access.log {
            Some("access.log")
        } else {
            self.relay.restart_needed(&new.relay)
        };
        key.map(|key| {
            ConfigError::invalid(
                &new.path,
                key,
                "cannot change while the relay runs: restart it to apply this (the running configuration stays)",
            )
        })
    }

    fn from_raw(raw: RawConfig, path: &Path, hash: String) -> Result<Self, ConfigError> {
        let r = RelayKeys::from_raw(&raw.relay, conf::Section::new(path, "relay"))?;
        if raw.services.is_empty() {
            return Err(ConfigError::invalid(
                path,
                "services",
                "no service is defined, so no agent may connect: add a [services.NAME] table with \
                 `agent` and `listen` (the relay has no open mode)",
            ));
        }
        let listeners = (r.http_listen.is_some(), r.https_listen.is_some());
        let loaded_certificates = certificates::from_raw(path, raw.certificates, listeners)?;
        let mut services = BTreeMap::new();
        let mut seen_listen = BTreeMap::new();
        let mut seen_names = BTreeMap::new();
        let mut access = BTreeMap::new();
        let mut groups = BTreeMap::new();
        for (name, s) in raw.services {
            let key = format!("services.{name}");
            let name = conf::name(path, &key, &name)?;
            let listen = match (s.listen, s.udp, s.hosts, s.sni) {
                (Some(addr), None, None, None) => Listen::Tcp(addr),
                (None, Some(addr), None, None) => Listen::Udp(addr),
                (None, None, Some(hosts), None) => {
                    if r.http_listen.is_none() {
                        return Err(ConfigError::invalid(
                            path,
                            format!("{key}.hosts"),
                            "routing by Host needs the HTTP listener: set relay.http_listen",
                        ));
                    }
                    Listen::Http(host_names(path, &format!("{key}.hosts"), &hosts, &name, &mut seen_names)?)
                }
                (None, None, None, Some(names)) => {
                    if r.https_listen.is_none() {
                        return Err(ConfigError::invalid(
                            path,
                            format!("{key}.sni"),
                            "routing by SNI needs the HTTPS listener: set relay.https_listen",
                        ));
                    }
                    Listen::Https(host_names(path, &format!("{key}.sni"), &names, &name, &mut seen_names)?)
                }
                _ => {
                    return Err(ConfigError::invalid(
                        path,
                        key,
                        "set exactly one of `listen` (a TCP port), `udp` (a UDP port), `hosts` (HTTP by \
                         Host) or `sni` (HTTPS by server name)",
                    ))
                }
            };
            let own = match &listen {
                Listen::Tcp(addr) => Some((format!("{key}.listen"), "tcp", *addr)),
                Listen::Udp(addr) => Some((format!("{key}.udp"), "udp", *addr)),
                Listen::Http(_) | Listen::Https(_) => None,
            };
            if let Some((key, proto, addr)) = own.filter(|(_, _, a)| a.port() != 0) {
                if let Some(other) = seen_listen.insert((proto, addr), name.clone()) {
                    return Err(ConfigError::invalid(
                        path,
                        key,
                        format!("{proto} {addr} is already the listener of service {other:?}"),
                    ));
                }
            }
            let idle_timeout = conf::within(
                path,
                &format!("{key}.idle_timeout"),
                s.idle_timeout.map_or(Self::DEFAULT_SERVICE_IDLE_TIMEOUT, Duration::from),
                Duration::ZERO..=Duration::from_secs(7 * 86_400),
            )?;
            let idle_timeout = (!idle_timeout.is_zero()).then_some(idle_timeout);
            let terminate = certificates::terminate(
                path,
                &key,
                (
                    match &listen {
                        Listen::Https(names) => Some(names.as_slice()),
                        _ => None,
                    },
                    r.http_listen.is_some(),
                ),
                (s.tls.as_deref(), s.redirect_http, s.hsts.map(Duration::from)),
                &loaded_certificates,
            )?;
            let load_balancer_ip = s.load_balancer_ip;
            let rates = access::RawRates {
                connections_per_second: s.connections_per_second,
                connection_burst: s.connection_burst,
                requests_per_second: s.requests_per_second,
                request_burst: s.request_burst,
            };
            let raw_access = access::RawServiceAccess {
                access: s.access,
                trusted_proxies: s.trusted_proxies,
                rates,
                auth: s.auth,
                bandwidth: s.bandwidth,
                bandwidth_burst: s.bandwidth_burst,
            };
            let is_http = matches!(listen, Listen::Http(_)) || terminate.is_some();
            access.insert(name.clone(), (raw_access, is_http));
            let raw_group =
                group::RawGroup { agent: s.agent, agents: s.agents, strategy: s.strategy, health: s.health };
            groups.insert(
                name.clone(),
                Group::from_raw(path, &key, raw_group, matches!(listen, Listen::Udp(_)))?,
            );
            services
                .insert(name.clone(), Service { name, listen, load_balancer_ip, idle_timeout, terminate });
        }
        let tcp_tunnel = r.tcp_listen.filter(|a| r.tcp_tunnel && Some(*a) != r.https_listen);
        for (key, addr) in [
            ("relay.http_listen", r.http_listen),
            ("relay.https_listen", r.https_listen),
            ("relay.tcp_listen", tcp_tunnel),
        ] {
            if let Some(other) = addr.filter(|a| a.port() != 0).and_then(|a| seen_listen.get(&("tcp", a))) {
                let addr = addr.unwrap_or(Self::DEFAULT_LISTEN);
                return Err(ConfigError::invalid(
                    path,
                    key,
                    format!("tcp {addr} is already the listener of service {other:?}"),
                ));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            hash,
            relay: r,
            cluster: raw.cluster.map(|c| Cluster::from_raw(c, path)).transpose()?,
            services,
            access: Access::from_raw(path, raw.access, access)?,
            groups,
            certificates: loaded_certificates,
        })
    }

    /// Names this relay as replica `name` of its `[cluster]` (`serve --replica`).
    pub fn set_replica(&mut self, name: &str) -> Result<(), ConfigError> {
        let name = conf::name(&self.path, "cluster.replica", name)?;
        match &mut self.cluster {
            Some(cluster) => {
                cluster.replica = name;
                Ok(())
            }
            None => Err(ConfigError::invalid(
                &self.path,
                "cluster",
                "--replica names this relay's replica, but relay.toml has no [cluster] table",
            )),
        }
    }

    /// Whether any service names `agent`: only such agents are admitted.
    pub fn knows_agent(&self, agent: &str) -> bool {
        self.groups.values().any(|g| g.has(agent))
    }

    /// Whether `agent` may carry `service`.
    pub fn carries(&self, service: &str, agent: &str) -> bool {
        self.groups.get(service).is_some_and(|g| g.has(agent))
    }

    /// The group of `service` (every service has one, of one agent or more).
    pub fn group(&self, service: &str) -> Option<&Group> {
        self.groups.get(service)
    }
}

/// Validates the host names of one service: DNS names, lower-cased, without a trailing dot, each
/// used by one service only (`seen` maps names to the service holding them).
fn host_names(
    path: &Path,
    key: &str,
    names: &[String],
    service: &str,
    seen: &mut BTreeMap<String, String>,
) -> Result<Vec<String>, ConfigError> {
    if names.is_empty() {
        return Err(ConfigError::invalid(path, key, "list at least one host name"));
    }
    let mut out = Vec::new();
    for name in names {
        let lower = name.trim_end_matches('.').to_ascii_lowercase();
        let valid = !lower.is_empty()
            && lower.len() <= 253
            && lower.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid {
            return Err(ConfigError::invalid(path, key, format!("{name:?} is not a host name")));
        }
        if let Some(other) = seen.insert(lower.clone(), service.to_owned()) {
            return Err(ConfigError::invalid(
                path,
                key,
                format!("{name:?} is already a name of service {other:?}"),
            ));
        }
        out.push(lower);
    }
    Ok(out)
}

/// The relay's configuration in force: read for each new connection, replaced whole by a reload.
pub type Live = sallyport_runtime::live::Live<Config>;

impl Cluster {
    /// Replica names pending `--replica` are empty here; [`Config::set_replica`] fills them and
    /// the relay refuses to start without one.
    fn from_raw(raw: RawCluster, path: &Path) -> Result<Self, ConfigError> {
        let section = conf::Section::new(path, "cluster");
        let replica = match raw.replica {
            Some(name) => conf::name(path, "cluster.replica", &name)?,
            None => String::new(),
        };
        let writer = conf::name(path, "cluster.writer", &raw.writer)?;
        if raw.writer_admin.is_some() {
            return Err(ConfigError::invalid(
                path,
                "cluster.writer_admin",
                "replaced by cluster.writer_peer: the writer's replica port (9443 by default), where replicas \
                 talk over mutual TLS instead of sending the admin token to its admin server",
            ));
        }
        let Some(writer_peer) = raw.writer_peer else {
            return Err(ConfigError::invalid(
                path,
                "cluster.writer_peer",
                "required: HOST:PORT of the writer's replica port (cluster.peer_listen)",
            ));
        };
        let port_ok = writer_peer
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
        if !port_ok {
            return Err(ConfigError::invalid(
                path,
                "cluster.writer_peer",
                format!("{writer_peer:?} is not HOST:PORT (the writer's replica port)"),
            ));
        }
        Ok(Self {
            replica,
            writer,
            writer_peer,
            peer_listen: raw.peer_listen.unwrap_or(DEFAULT_PEER_LISTEN),
            sync_interval: section.bounded(
                "sync_interval",
                raw.sync_interval,
                SECOND,
                Duration::from_millis(100)..=SECOND * 60,
            )?,
        })
    }
}

impl sallyport_runtime::live::Sourced for Config {
    fn path(&self) -> &Path {
        &self.path
    }

    fn hash(&self) -> &str {
        &self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[relay]
listen = "0.0.0.0:4433"
ca_cert = "ca.crt"
cert = "relay.crt"
key = "relay.key"
idle_timeout = "30s"

[services.mssql]
agent = "winbox"
listen = "0.0.0.0:1433"
"#;

    fn err(text: &str) -> String {
        match Config::from_toml(text, Path::new("/etc/sallyport/relay.toml")) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn good_config_resolves_paths_and_defaults() {
        let c = Config::from_toml(GOOD, Path::new("/etc/sallyport/relay.toml")).expect("valid");
        assert_eq!(c.relay.ca_cert, Path::new("/etc/sallyport/ca.crt"));
        assert_eq!(c.relay.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.relay.admin, SocketAddr::from(([127, 0, 0, 1], 9090)));
        assert_eq!(c.groups["mssql"].agents, ["winbox"]);
        assert!(c.knows_agent("winbox") && !c.knows_agent("other"));
    }

    #[test]
    fn no_services_fails_closed() {
        let text = GOOD.split("[services.mssql]").next().unwrap_or_default();
        let e = err(text);
        assert!(e.contains("relay.toml: key `services`: no service is defined"), "{e}");
    }

    #[test]
    fn unknown_key_names_it() {
        let e = err(&GOOD.replace("idle_timeout", "idle_timout"));
        assert!(e.contains("relay.toml") && e.contains("idle_timout"), "{e}");
    }

    #[test]
    fn bad_values_name_file_key_and_reason() {
        let e = err(&GOOD.replace("\"30s\"", "\"thirty\""));
        assert!(
            e.contains("relay.toml") && e.contains("idle_timeout") && e.contains("expected a duration"),
            "{e}"
        );
        let e = err(&GOOD.replace("agent = \"winbox\"", "agent = \"Win_Box\""));
        assert!(e.contains("key `services.mssql.agent`") && e.contains("not a valid name"), "{e}");
        let e = err(&GOOD.replace("0.0.0.0:1433", "localhost"));
        assert!(e.contains("relay.toml") && e.contains("listen"), "{e}");
        let e = err(&GOOD.replace("idle_timeout = \"30s\"", "congestion = \"vegas\""));
        assert!(e.contains("key `relay.congestion`: unknown congestion controller \"vegas\""), "{e}");
        let e = err(&GOOD.replace("\"30s\"", "\"0s\""));
        assert!(e.contains("key `relay.idle_timeout`: 0s is out of range"), "{e}");
    }

    #[test]
    fn the_connection_cap_follows_the_memory_budget() {
        let c = Config::from_toml(GOOD, Path::new("r.toml")).expect("valid");
        let budget = c.relay.budget();
        assert_eq!(c.relay.memory_budget, 512 << 20);
        assert_eq!(c.relay.max_connections, budget.connections);
        assert!(
            budget.reserved + budget.per_connection * budget.connections as u64 <= 512 << 20,
            "{budget:?}"
        );
        assert!(budget.connections > 2000, "{budget:?}");
        // A bigger budget holds more; smaller heads hold more in the same budget; a written cap wins.
        let with = |line: &str| {
            Config::from_toml(&GOOD.replace("[relay]", &format!("[relay]\n{line}")), Path::new("r.toml"))
                .expect("valid")
                .relay
        };
        assert!(with("memory_budget = \"2GiB\"").max_connections > 4 * budget.connections);
        assert!(with("max_header_bytes = 16384").max_connections > budget.connections);
        assert_eq!(with("max_connections = 100").max_connections, 100);
        let e = err(&GOOD.replace("[relay]", "[relay]\nmemory_budget = \"128MiB\""));
        assert!(
            e.contains("key `relay.memory_budget`: 128 MiB leaves no room for client connections"),
            "{e}"
        );
        let e = err(&GOOD.replace("[relay]", "[relay]\nmemory_budget = \"lots\""));
        assert!(e.contains("key `relay.memory_budget`: \"lots\": unknown unit"), "{e}");
    }

    #[test]
    fn access_rules_and_log_are_checked_and_kept_apart_from_services() {
        let with = |access: &str, service: &str| {
            let text = format!("{GOOD}{service}\n{access}\n")
                .replace("[relay]", "[relay]\nhttp_listen = \"0.0.0.0:80\"");
            Config::from_toml(&text, Path::new("/etc/sallyport/relay.toml"))
        };
        let c = with(
            "[access]\ndefault = [\"allow 192.168.4.0/24\", \"deny all\"]\nlog = \"access.log\"",
            "access = [\"allow 192.168.4.10\"]\n[services.web]\nagent = \"winbox\"\nhosts = [\"app\"]\ntrusted_proxies = [\"10.42.0.0/16\"]",
        )
        .expect("valid");
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        assert!(
            c.access.admits("mssql", ip("192.168.4.10")) && !c.access.admits("mssql", ip("192.168.4.11"))
        );
        assert!(c.access.admits("web", ip("192.168.4.11")) && !c.access.admits("web", ip("10.0.0.1")));
        assert_eq!(
            (c.access.describe("mssql"), c.access.describe("web")),
            ("own:1".into(), "default:2".into())
        );
        assert!(c.access.trusted_proxies("web").is_some_and(|p| p.admits(ip("10.42.0.9"))));
        assert_eq!(
            c.access.log,
            Some(crate::access::log::Destination::File {
                path: "/etc/sallyport/access.log".into(),
                max_bytes: access::DEFAULT_LOG_MAX_BYTES,
                keep: access::DEFAULT_LOG_KEEP
            })
        );
        let open = with("", "").expect("valid");
        assert!(open.access.admits("mssql", ip("203.0.113.1")) && open.access.describe("mssql") == "open");
        // Rules are not part of the service: changing them retires no connection.
        assert_eq!(c.services["mssql"], open.services["mssql"]);
        let e = |access: &str, service: &str| with(access, service).expect_err("invalid").to_string();
        let bad = e("[access]\ndefault = [\"allow 192.168.4.0/33\"]", "");
        assert!(
            bad.contains("key `access.default`: \"allow 192.168.4.0/33\": \"192.168.4.0/33\" is neither"),
            "{bad}"
        );
        let bad = e("", "access = [\"let 10.0.0.1\"]");
        assert!(bad.contains("key `services.mssql.access`: \"let 10.0.0.1\" is not a rule"), "{bad}");
        let bad = e("", "access = []");
        assert!(bad.contains("key `services.mssql.access`: an empty list"), "{bad}");
        let bad = e("", "trusted_proxies = [\"10.42.0.0/16\"]");
        assert!(bad.contains("key `services.mssql.trusted_proxies`: only HTTP services"), "{bad}");
        let bad = e("[access]\nlog_keep = 3", "");
        assert!(bad.contains("key `access.log_keep`: there is no access log"), "{bad}");
        let bad = e("[access]\nlog = \"a.log\"\nlog_max_bytes = \"1KiB\"", "");
        assert!(bad.contains("key `access.log_max_bytes`: at least 4KiB"), "{bad}");
        let bad = e("[access]\nlogs = \"stdout\"", "");
        assert!(bad.contains("logs"), "{bad}");
        // Rates: per service or by default, a burst of twice the rate unless set, each on its kind.
        let rated = with(
            "[access]\nconnections_per_second = 10",
            "connection_burst = 50\nconnections_per_second = 20\n[services.web]\nagent = \"winbox\"\nhosts = [\"app\"]\nrequests_per_second = 5",
        )
        .expect("valid");
        use crate::access::rates::Counted;
        let rate = |service: &str, counted| {
            rated.access.rate(service, counted).map(|r| (r.per_second.get(), r.burst.get()))
        };
        assert_eq!(rate("mssql", Counted::Connections), Some((20, 50)));
        assert_eq!(rate("web", Counted::Requests), Some((5, 10)));
        assert_eq!(rate("web", Counted::Connections), Some((10, 20)), "the default");
        let bad = e("", "requests_per_second = 5");
        assert!(bad.contains("key `services.mssql.requests_per_second`: only HTTP services"), "{bad}");
        let bad = e("", "connection_burst = 5");
        assert!(bad.contains("key `services.mssql.connection_burst`: a burst needs a rate"), "{bad}");
        let bad = e("[access]\nrequests_per_second = 0", "");
        assert!(bad.contains("key `access.requests_per_second`: 0 is out of range"), "{bad}");
        // A login: only in front of HTTP services, with hashes, tokens and a URL it can use.
        let web = |auth: &str| {
            format!("[services.web]\nagent = \"winbox\"\nhosts = [\"app\"]\n[services.web.auth]\n{auth}")
        };
        let hash = crate::access::auth::hash_password("pw").expect("a hash");
        let good = with("", &web(&format!("users = {{ alice = \"{hash}\" }}\nbypass = [\"/api/\"]")))
            .expect("valid");
        assert!(good.access.auth("web").is_some_and(|a| a.users.contains_key("alice") && a.realm == "web"));
        let bad = e(
            "",
            &web("users = { alice = \"$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW\" }"),
        );
        assert!(
            bad.contains("key `services.web.auth.users.alice`")
                && bad.contains("is not an argon2 password hash"),
            "{bad}"
        );
        let bad = e("", &web("forward = \"ftp://auth.home.lan/verify\""));
        assert!(
            bad.contains("key `services.web.auth.forward`")
                && bad.contains("is not an http:// or https:// URL"),
            "{bad}"
        );
        let bad = e("", &web("forward = \"http://auth:9091/\"\nforward_ca = \"ca.pem\""));
        assert!(
            bad.contains("key `services.web.auth.forward_ca`: the CAs are for checking an https://"),
            "{bad}"
        );
        let bad = e("", &web("forward = \"https://auth.home.lan/\"\nforward_ca = \"no-such-ca.pem\""));
        assert!(
            bad.contains("key `services.web.auth.forward_ca`: cannot read") && bad.contains("no-such-ca.pem"),
            "{bad}"
        );
        let bad = e("", &web("tokens = { ci = \"hunter2\" }"));
        assert!(bad.contains("key `services.web.auth.tokens.ci`: a token is written \"sha256:\""), "{bad}");
        let bad = e("", &web("bypass = [\"/api/\"]"));
        assert!(bad.contains("key `services.web.auth`: set users, tokens or forward"), "{bad}");
        let bad = e("", "[services.mssql.auth]\nforward = \"http://auth:9091/\"");
        assert!(bad.contains("key `services.mssql.auth`: a login goes in front of HTTP services"), "{bad}");
        // Bandwidth: on every kind of service and per agent, in bytes per second.
        let capped = with("[access]\nagent_bandwidth = { winbox = \"50MiB\" }", "bandwidth = \"2MiB\"")
            .expect("valid");
        assert_eq!(
            capped.access.bandwidth("mssql").map(|b| (b.per_second.get(), b.burst.get())),
            Some((2 << 20, 209_715))
        );
        assert_eq!(capped.access.agent_bandwidth("winbox").map(|b| b.per_second.get()), Some(50 << 20));
        let bad = e("", "bandwidth = \"fast\"");
        assert!(bad.contains("key `services.mssql.bandwidth`: \"fast\""), "{bad}");
        let bad = e("", "bandwidth = \"100\"");
        assert!(bad.contains("key `services.mssql.bandwidth`: \"100\" is out of range 1KiB..4GiB"), "{bad}");
        let bad = e("", "bandwidth_burst = \"1MiB\"");
        assert!(bad.contains("key `services.mssql.bandwidth_burst`: a burst needs a cap"), "{bad}");
        let web_capped =
            with("", "[services.web]\nagent = \"winbox\"\nhosts = [\"app\"]\nbandwidth = \"1MiB\"")
                .expect("every kind takes a cap");
        assert_eq!(web_capped.access.bandwidth("web").map(|b| b.per_second.get()), Some(1 << 20));
        // The log's destination needs a restart; the rules do not.
        let stdout = with("[access]\nlog = \"stdout\"", "").expect("valid");
        let refusal = c.reload_refusal(&stdout).expect("refused").to_string();
        assert!(refusal.contains("key `access.log`: cannot change while the relay runs"), "{refusal}");
        let other_rules =
            with("[access]\ndefault = [\"deny all\"]\nlog = \"access.log\"", "").expect("valid");
        assert!(c.reload_refusal(&other_rules).is_none());
    }

    #[test]
    fn two_services_on_one_port_are_refused() {
        let e = err(&format!("{GOOD}\n[services.web]\nagent = \"winbox\"\nlisten = \"0.0.0.0:1433\"\n"));
        assert!(e.contains("key `services.web.listen`") && e.contains("already the listener"), "{e}");
        // The same port number for TCP and UDP is two listeners.
        let both = format!("{GOOD}\n[services.dns]\nagent = \"winbox\"\nudp = \"0.0.0.0:1433\"\n");
        assert!(Config::from_toml(&both, Path::new("r.toml")).is_ok());
    }

    #[test]
    fn routed_services_need_their_listener_and_unique_names() {
        let web = "\n[services.web]\nagent = \"winbox\"\nhosts = [\"App.Home.lan.\", \"app\"]\n";
        let e = err(&format!("{GOOD}{web}"));
        assert!(e.contains("key `services.web.hosts`: routing by Host needs the HTTP listener"), "{e}");
        let with_http = GOOD.replace("[relay]", "[relay]\nhttp_listen = \"0.0.0.0:80\"");
        let c = Config::from_toml(&format!("{with_http}{web}"), Path::new("r.toml")).expect("valid");
        assert_eq!(c.services["web"].listen, Listen::Http(vec!["app.home.lan".into(), "app".into()]));
        assert_eq!(c.services["web"].listen.to_string(), "http app.home.lan, app");
        let twice = format!("{with_http}{web}\n[services.web2]\nagent = \"winbox\"\nhosts = [\"APP\"]\n");
        let e = err(&twice);
        assert!(
            e.contains("key `services.web2.hosts`") && e.contains("already a name of service \"web\""),
            "{e}"
        );
        let e = err(&format!("{with_http}\n[services.bad]\nagent = \"winbox\"\nhosts = [\"a b\"]\n"));
        assert!(e.contains("key `services.bad.hosts`: \"a b\" is not a host name"), "{e}");
        let e = err(&format!("{GOOD}\n[services.nas]\nagent = \"winbox\"\nsni = [\"nas.lan\"]\n"));
        assert!(e.contains("key `services.nas.sni`") && e.contains("relay.https_listen"), "{e}");
        let e = err(
            &GOOD.replace("listen = \"0.0.0.0:1433\"", "listen = \"0.0.0.0:1433\"\nudp = \"0.0.0.0:53\"")
        );
        assert!(e.contains("key `services.mssql`: set exactly one of"), "{e}");
        let e = err(&GOOD.replace("[relay]", "[relay]\nhttp_listen = \"0.0.0.0:1433\""));
        assert!(e.contains("key `relay.http_listen`") && e.contains("already the listener"), "{e}");
    }
}
