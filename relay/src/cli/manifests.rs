//! `sallyport-relay manifests`: the Kubernetes Services that expose the relay's listeners, rendered
//! from `relay.toml`, so the ports in the cluster and in the relay cannot drift apart.
//!
//! On the relay's MetalLB IP, two LoadBalancer Services share the address: `sallyport-relay-agents`
//! carries the QUIC port (UDP) agents dial and publishes every relay pod that runs, ready or not
//! (a starting replica is reached by the agents before it turns ready: it turns ready once it holds
//! them); `sallyport-relay` carries the HTTP and HTTPS listeners and every service port (TCP or
//! UDP) to ready pods only. A service with a `load_balancer_ip` of its own gets its own
//! LoadBalancer Service. Every service with a port of its own also gets a
//! ClusterIP Service of its name, for in-cluster clients (`mssql.sallyport.svc.cluster.local:1433`).

use std::{fmt::Write, net::IpAddr};

use crate::config::Config;

/// What the rendering needs beyond `relay.toml`.
#[derive(Debug, Clone)]
pub struct ManifestOptions {
    pub namespace: String,
    /// The relay's MetalLB IP; the cluster picks one when unset.
    pub load_balancer_ip: Option<IpAddr>,
    /// The UDP port agents dial (mapped to `relay.listen`'s port).
    pub quic_port: u16,
    /// How the LoadBalancer Services deliver to the relay replicas.
    pub traffic_policy: TrafficPolicy,
}

/// `externalTrafficPolicy` of the LoadBalancer Services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    /// kube-proxy spreads each new flow over every ready replica, on any node: agents find every
    /// replica, clients use all of them, a node loss costs the endpoint update. Client addresses
    /// are replaced by the node's (SNAT).
    #[default]
    Cluster,
    /// Only the replicas on the node MetalLB announces from: client addresses are kept, but the
    /// other replicas idle, and a node loss costs MetalLB's move of the address.
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
    // The tunnel over TCP: on the HTTPS listener's port when it shares it (the clients' Service
    // carries it), else a port of its own beside QUIC: TCP 443 unless the HTTPS listener has it.
    if let Some(tunnel_tcp) = config.relay.tunnel_tcp().filter(|_| !config.relay.tunnel_shares_https()) {
        let port = if config.relay.https_listen.is_none() { options.quic_port } else { tunnel_tcp.port() };
        agents.push(Port { name: "tunnel-tcp".into(), protocol: "TCP", port, target: tunnel_tcp.port() });
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
    load_balancer(&mut out, ("sallyport-relay-agents", options), (ip, Publish::Running), &agents);
    load_balancer(&mut out, ("sallyport-relay", options), (ip, Publish::Ready), &shared);
    for (name, ip, port) in own {
        load_balancer(&mut out, (&format!("{name}-lb"), options), (Some(ip), Publish::Ready), &[port]);
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

fn load_balancer(
    out: &mut String,
    (name, options): (&str, &ManifestOptions),
    (ip, publish): (Option<IpAddr>, Publish),
    list: &[Port],
) {
    header(out, name, &options.namespace);
    if let Some(ip) = ip {
        // The agents' and the clients' Services share the relay's IP (MetalLB allows it for
        // Services with the same sharing key, policy and selector).
        let _ = write!(
            out,
            "  annotations:\n    metallb.io/loadBalancerIPs: \"{ip}\"\n    metallb.io/allow-shared-ip: \"sallyport-relay\"\n"
        );
    }
    let _ = write!(
        out,
        "spec:\n  type: LoadBalancer\n  externalTrafficPolicy: {}\n",
        options.traffic_policy.word()
    );
    if publish == Publish::Running {
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

    #[test]
    fn the_traffic_policy_is_cluster_unless_asked() {
        assert_eq!("local".parse::<TrafficPolicy>(), Ok(TrafficPolicy::Local));
        assert_eq!("Cluster".parse::<TrafficPolicy>(), Ok(TrafficPolicy::Cluster));
        assert_eq!(
            "nodes".parse::<TrafficPolicy>().map_err(|e| e.to_string()),
            Err("\"nodes\": cluster or local".into())
        );
        let mut out = String::new();
        let local = ManifestOptions { traffic_policy: TrafficPolicy::Local, ..ManifestOptions::default() };
        load_balancer(&mut out, ("x", &local), (None, Publish::Ready), &[]);
        assert!(out.contains("externalTrafficPolicy: Local"), "{out}");
        out.clear();
        load_balancer(&mut out, ("x", &ManifestOptions::default()), (None, Publish::Running), &[]);
        assert!(out.contains("externalTrafficPolicy: Cluster"), "{out}");
        assert!(out.contains("publishNotReadyAddresses: true"), "{out}");
    }

    #[test]
    fn the_tunnel_over_tcp_shares_the_https_port_or_has_its_own() {
        let text = |relay: &str| {
            format!(
                "[relay]\nlisten = \"0.0.0.0:4433\"\nca_cert = \"c\"\ncert = \"c\"\nkey = \"k\"\n{relay}\n\
                 [services.web]\nagent = \"winbox\"\nlisten = \"0.0.0.0:1433\"\n"
            )
        };
        let render_of = |relay: &str| {
            let config = Config::from_toml(&text(relay), std::path::Path::new("relay.toml")).expect("config");
            render(&config, &ManifestOptions::default())
        };
        // Shared with the HTTPS listener: TCP 443 is the HTTPS port, nothing more for agents.
        let shared = render_of("https_listen = \"0.0.0.0:8443\"\ntcp_listen = \"0.0.0.0:8443\"");
        assert!(!shared.contains("tunnel-tcp"), "{shared}");
        assert!(
            shared.contains("name: https\n      protocol: TCP\n      port: 443\n      targetPort: 8443"),
            "{shared}"
        );
        // No HTTPS listener: the tunnel takes TCP 443 beside QUIC's UDP 443, in the agents' Service.
        let own = render_of("");
        assert!(
            own.contains("name: tunnel-tcp\n      protocol: TCP\n      port: 443\n      targetPort: 4433"),
            "{own}"
        );
        let agents = own.split("---").find(|s| s.contains("name: sallyport-relay-agents")).expect("agents");
        assert!(agents.contains("tunnel-tcp") && agents.contains("protocol: UDP"), "{agents}");
        // Both, apart: the HTTPS listener keeps 443; the tunnel is on its own port number.
        let apart = render_of("https_listen = \"0.0.0.0:8443\"\ntcp_listen = \"0.0.0.0:9443\"");
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
