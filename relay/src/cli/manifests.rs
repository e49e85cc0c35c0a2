//! `sallyport-relay manifests`: the Kubernetes Services that expose the relay's listeners, rendered
//! from `relay.toml`, so the ports in the cluster and in the relay cannot drift apart.
//!
//! Agents and clients reach the relay on two MetalLB addresses, because they need two policies
//! and MetalLB shares an address only between Services of one `externalTrafficPolicy`:
//!
//! - `sallyport-relay-agents` (the relay's address, `--load-balancer-ip`) carries the QUIC port
//!   (UDP) agents dial, and the tunnel over TCP, with `Cluster`: kube-proxy spreads the agents'
//!   connections over every replica on any node, so an agent finds and holds each of them. It
//!   publishes every relay pod that runs, ready or not (a starting replica is reached by the agents
//!   before it turns ready: it turns ready once it holds them).
//! - `sallyport-relay` (the clients' address, `--clients-ip`) carries the HTTP and HTTPS listeners
//!   and every service port (TCP or UDP) to ready pods only, with `Local`: no SNAT, so the relay
//!   sees each client's own address (its access rules, the access log, PROXY v2), and only the
//!   replicas on the node MetalLB announces the address from take clients.
//!
//! `--external-traffic-policy cluster` puts the clients' Service back on the relay's address with
//! `Cluster` (every replica takes clients; the relay sees a node's address instead of the
//! client's). A service with a `load_balancer_ip` of its own gets its own LoadBalancer Service,
//! with the clients' policy. Every service with a port of its own also gets a ClusterIP Service of
//! its name, for in-cluster clients (`mssql.sallyport.svc.cluster.local:1433`).

use std::{fmt::Write, net::IpAddr};

use crate::config::Config;

/// What the rendering needs beyond `relay.toml`.
#[derive(Debug, Clone)]
pub struct ManifestOptions {
    pub namespace: String,
    /// The relay's MetalLB IP, where agents dial; the cluster picks one when unset.
    pub load_balancer_ip: Option<IpAddr>,
    /// The clients' MetalLB IP (with the `Local` policy); the cluster picks one when unset.
    pub clients_ip: Option<IpAddr>,
    /// The UDP port agents dial (mapped to `relay.listen`'s port).
    pub quic_port: u16,
    /// How the clients' LoadBalancer Services deliver to the relay replicas (the agents' is
    /// always `Cluster`).
    pub traffic_policy: TrafficPolicy,
}

/// `externalTrafficPolicy` of the clients' LoadBalancer Services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    /// kube-proxy spreads each new flow over every ready replica, on any node; client addresses
    /// are replaced by the node's (SNAT). The clients' Service shares the agents' address.
    Cluster,
    /// Only the replicas on the node MetalLB announces from take clients; client addresses are
    /// kept. The clients' Service has an address of its own.
    #[default]
    Local,
}

impl TrafficPolicy {
    fn word(self) -> &'static str {
        match self {
            Self::Cluster => "Cluster",
            Self::Local => "Local",
        }
    }
}

/// A traffic policy that is neither `cluster` nor `local`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: cluster or local")]
pub struct UnknownTrafficPolicy(String);

impl std::str::FromStr for TrafficPolicy {
    type Err = UnknownTrafficPolicy;
    fn from_str(s: &str) -> Result<Self, UnknownTrafficPolicy> {
        match s.to_ascii_lowercase().as_str() {
            "cluster" => Ok(Self::Cluster),
            "local" => Ok(Self::Local),
            other => Err(UnknownTrafficPolicy(other.to_owned())),
        }
    }
}

impl Default for ManifestOptions {
    fn default() -> Self {
        Self {
            namespace: "sallyport".into(),
            load_balancer_ip: None,
            clients_ip: None,
            quic_port: 443,
            traffic_policy: TrafficPolicy::default(),
        }
    }
}

/// The label that selects the relay's pod.
const SELECTOR: &str = "app.kubernetes.io/name: sallyport-relay";

struct Port {
    name: String,
    protocol: &'static str,
    port: u16,
    target: u16,
}

/// Renders the Services as one YAML stream.
pub fn render(config: &Config, options: &ManifestOptions) -> String {
    let mut out = String::from(
        "# Rendered by `sallyport-relay manifests` from relay.toml; regenerate after changing its ports.\n",
    );
    let quic = Port {
        name: "quic".into(),
        protocol: "UDP",
        port: options.quic_port,
        target: config.relay.listen.port(),
    };
    let mut agents = vec![quic];
    // The tunnel over TCP: on the HTTPS listener's port when it shares it, else a port of its own
    // beside QUIC: TCP 443 unless the HTTPS listener has it. On the shared address the clients'
    // Service carries the HTTPS port (and with it the tunnel); apart, the agents' Service carries
    // it too.
    let apart = options.traffic_policy == TrafficPolicy::Local;
    if let Some(tunnel_tcp) = config.relay.tunnel_tcp() {
        let port = if config.relay.tunnel_shares_https() {
            apart.then_some(443)
        } else if config.relay.https_listen.is_none() {
            Some(options.quic_port)
        } else {
            Some(tunnel_tcp.port())
        };
        if let Some(port) = port {
            agents.push(Port { name: "tunnel-tcp".into(), protocol: "TCP", port, target: tunnel_tcp.port() });
        }
    }
    let mut shared = Vec::new();
    // The web listeners answer on the standard ports of the LoadBalancer IP (the pod, not root,
    // listens on high ports); TCP 443 sits beside QUIC's UDP 443.
    for (name, port, addr) in
        [("http", 80, config.relay.http_listen), ("https", 443, config.relay.https_listen)]
    {
        if let Some(addr) = addr {
            shared.push(Port { name: name.into(), protocol: "TCP", port, target: addr.port() });
        }
    }
    let mut own = Vec::new();
    let mut names: std::collections::BTreeSet<String> =
        agents.iter().chain(&shared).map(|p| p.name.clone()).collect();
    for service in config.services.values() {
        let Some((protocol, addr)) = service.listen.own_port() else { continue };
        let mut name = port_name(&service.name);
        if !names.insert(name.clone()) {
            // Two long names sharing their first 15 characters: the port number tells them apart.
            name = format!("{}-{}", protocol.to_ascii_lowercase(), addr.port());
        }
        let port = Port { name, protocol, port: addr.port(), target: addr.port() };
        match service.load_balancer_ip {
            Some(ip) => own.push((service.name.clone(), ip, port)),
            None => shared.push(port),
        }
    }
    let ip = options.load_balancer_ip;
    let agents_lb =
        Lb { ip, policy: TrafficPolicy::Cluster, sharing: Some(SHARING_KEY), publish: Publish::Running };
    load_balancer(&mut out, ("sallyport-relay-agents", options), &agents_lb, &agents);
    let clients_lb = match options.traffic_policy {
        TrafficPolicy::Cluster => Lb { publish: Publish::Ready, ..agents_lb },
        TrafficPolicy::Local => Lb {
            ip: options.clients_ip,
            policy: TrafficPolicy::Local,
            sharing: None,
            publish: Publish::Ready,
        },
    };
    load_balancer(&mut out, ("sallyport-relay", options), &clients_lb, &shared);
    for (name, ip, port) in own {
        let lb = Lb { ip: Some(ip), policy: options.traffic_policy, sharing: None, publish: Publish::Ready };
        load_balancer(&mut out, (&format!("{name}-lb"), options), &lb, &[port]);
    }
    for service in config.services.values() {
        let Some((protocol, addr)) = service.listen.own_port() else { continue };
        let name = protocol.to_ascii_lowercase();
        let port = Port { name, protocol, port: addr.port(), target: addr.port() };
        cluster_ip(&mut out, &service.name, &options.namespace, &port);
    }
    out
}

/// A port name: at most 15 characters of the service name (Kubernetes' limit).
fn port_name(service: &str) -> String {
    let mut name: String = service.chars().take(15).collect();
    while name.ends_with('-') {
        name.pop();
    }
    name
}

fn header(out: &mut String, name: &str, namespace: &str) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    {SELECTOR}\n"
    );
}

fn ports(out: &mut String, ports: &[Port]) {
    out.push_str("  ports:\n");
    for p in ports {
        let _ = write!(
            out,
            "    - name: {}\n      protocol: {}\n      port: {}\n      targetPort: {}\n",
            p.name, p.protocol, p.port, p.target
        );
    }
}

/// Which relay pods a Service sends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Publish {
    /// Ready pods only (clients).
    Ready,
    /// Every pod that runs, ready or not (agents).
    Running,
}

/// The key under which MetalLB lets the agents' Service share its address (with the clients' one
/// when both are `Cluster`).
const SHARING_KEY: &str = "sallyport-relay";

/// How one LoadBalancer Service is exposed.
#[derive(Debug, Clone, Copy)]
struct Lb {
    ip: Option<IpAddr>,
    policy: TrafficPolicy,
    /// MetalLB's sharing key, for Services that share an address.
    sharing: Option<&'static str>,
    publish: Publish,
}

fn load_balancer(out: &mut String, (name, options): (&str, &ManifestOptions), lb: &Lb, list: &[Port]) {
    header(out, name, &options.namespace);
    if let Some(ip) = lb.ip {
        let _ = write!(out, "  annotations:\n    metallb.io/loadBalancerIPs: \"{ip}\"\n");
        if let Some(key) = lb.sharing {
            let _ = writeln!(out, "    metallb.io/allow-shared-ip: \"{key}\"");
        }
    }
    let _ = write!(out, "spec:\n  type: LoadBalancer\n  externalTrafficPolicy: {}\n", lb.policy.word());
    if lb.publish == Publish::Running {
        let _ = writeln!(out, "  publishNotReadyAddresses: true");
    }
    let _ = write!(out, "  selector:\n    {SELECTOR}\n");
    ports(out, list);
}

fn cluster_ip(out: &mut String, name: &str, namespace: &str, port: &Port) {
    header(out, name, namespace);
    let _ = write!(out, "spec:\n  type: ClusterIP\n  selector:\n    {SELECTOR}\n");
    ports(out, std::slice::from_ref(port));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_of(relay: &str, options: &ManifestOptions) -> String {
        let text = format!(
            "[relay]\nlisten = \"0.0.0.0:4433\"\nca_cert = \"c\"\ncert = \"c\"\nkey = \"k\"\n{relay}\n\
             [services.web]\nagent = \"winbox\"\nlisten = \"0.0.0.0:1433\"\n"
        );
        let config = Config::from_toml(&text, std::path::Path::new("relay.toml")).expect("config");
        render(&config, options)
    }

    fn service<'a>(yaml: &'a str, name: &str) -> &'a str {
        yaml.split("---").find(|s| s.contains(&format!("  name: {name}\n"))).expect("the Service")
    }

    #[test]
    fn clients_keep_their_address_on_an_address_of_their_own_unless_asked() {
        assert_eq!("local".parse::<TrafficPolicy>(), Ok(TrafficPolicy::Local));
        assert_eq!("Cluster".parse::<TrafficPolicy>(), Ok(TrafficPolicy::Cluster));
        assert_eq!(
            "nodes".parse::<TrafficPolicy>().map_err(|e| e.to_string()),
            Err("\"nodes\": cluster or local".into())
        );
        let ip = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));
        let options = ManifestOptions {
            load_balancer_ip: ip("192.168.4.60"),
            clients_ip: ip("192.168.4.61"),
            ..ManifestOptions::default()
        };
        let split = render_of("https_listen = \"0.0.0.0:8443\"\ntcp_listen = \"0.0.0.0:8443\"", &options);
        let agents = service(&split, "sallyport-relay-agents");
        assert!(
            agents.contains("externalTrafficPolicy: Cluster")
                && agents.contains("publishNotReadyAddresses: true"),
            "{agents}"
        );
        assert!(agents.contains("metallb.io/loadBalancerIPs: \"192.168.4.60\""), "{agents}");
        // The tunnel over TCP shares the HTTPS listener's port; on the agents' address it is TCP 443.
        assert!(
            agents.contains("name: tunnel-tcp\n      protocol: TCP\n      port: 443\n      targetPort: 8443"),
            "{agents}"
        );
        let clients = service(&split, "sallyport-relay");
        assert!(
            clients.contains("externalTrafficPolicy: Local") && !clients.contains("publishNotReady"),
            "{clients}"
        );
        assert!(
            clients.contains("metallb.io/loadBalancerIPs: \"192.168.4.61\"")
                && !clients.contains("allow-shared-ip"),
            "{clients}"
        );
        // Asked for Cluster: one address, shared, as before.
        let shared = ManifestOptions { traffic_policy: TrafficPolicy::Cluster, ..options };
        let shared = render_of("https_listen = \"0.0.0.0:8443\"\ntcp_listen = \"0.0.0.0:8443\"", &shared);
        for name in ["sallyport-relay-agents", "sallyport-relay"] {
            let lb = service(&shared, name);
            assert!(lb.contains("externalTrafficPolicy: Cluster") && lb.contains("\"192.168.4.60\""), "{lb}");
            assert!(lb.contains("metallb.io/allow-shared-ip: \"sallyport-relay\""), "{lb}");
        }
        assert!(!service(&shared, "sallyport-relay-agents").contains("tunnel-tcp"), "{shared}");
    }

    #[test]
    fn the_tunnel_over_tcp_has_a_port_of_its_own_without_the_https_listener() {
        let options = ManifestOptions::default();
        // No HTTPS listener: the tunnel takes TCP 443 beside QUIC's UDP 443, in the agents' Service.
        let own = render_of("", &options);
        let agents = service(&own, "sallyport-relay-agents");
        assert!(
            agents.contains("name: tunnel-tcp\n      protocol: TCP\n      port: 443\n      targetPort: 4433"),
            "{own}"
        );
        assert!(agents.contains("protocol: UDP"), "{agents}");
        // Both, apart: the HTTPS listener keeps 443; the tunnel is on its own port number.
        let apart = render_of("https_listen = \"0.0.0.0:8443\"\ntcp_listen = \"0.0.0.0:9443\"", &options);
        assert!(
            apart.contains("name: tunnel-tcp\n      protocol: TCP\n      port: 9443\n      targetPort: 9443"),
            "{apart}"
        );
    }

    #[test]
    fn port_names_fit_kubernetes() {
        assert_eq!(port_name("mssql"), "mssql");
        assert_eq!(port_name("a-very-long-service-name"), "a-very-long-ser");
        assert_eq!(port_name("fourteen-chars-x"), "fourteen-chars");
    }
}
