//! `sallyport-relay manifests`: the Kubernetes Services that expose the relay's listeners, rendered
//! from `relay.toml`, so the ports in the cluster and in the relay cannot drift apart.
//!
//! One LoadBalancer Service carries the QUIC port (UDP), the HTTP and HTTPS listeners and every
//! service port (TCP or UDP) on the relay's MetalLB IP; a service with a `load_balancer_ip` of its
//! own gets its own LoadBalancer Service. Every service with a port of its own also gets a
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
}

impl Default for ManifestOptions {
    fn default() -> Self {
        Self { namespace: "sallyport".into(), load_balancer_ip: None, quic_port: 443 }
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
    let mut shared = vec![Port {
        name: "quic".into(),
        protocol: "UDP",
        port: options.quic_port,
        target: config.listen.port(),
    }];
    // The web listeners answer on the standard ports of the LoadBalancer IP (the pod, not root,
    // listens on high ports); TCP 443 sits beside QUIC's UDP 443.
    for (name, port, addr) in [("http", 80, config.http_listen), ("https", 443, config.https_listen)] {
        if let Some(addr) = addr {
            shared.push(Port { name: name.into(), protocol: "TCP", port, target: addr.port() });
        }
    }
    let mut own = Vec::new();
    let mut names: std::collections::BTreeSet<String> = shared.iter().map(|p| p.name.clone()).collect();
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
    load_balancer(&mut out, "sallyport-relay", &options.namespace, options.load_balancer_ip, &shared);
    for (name, ip, port) in own {
        load_balancer(&mut out, &format!("{name}-lb"), &options.namespace, Some(ip), &[port]);
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

fn load_balancer(out: &mut String, name: &str, namespace: &str, ip: Option<IpAddr>, list: &[Port]) {
    header(out, name, namespace);
    if let Some(ip) = ip {
        let _ = write!(out, "  annotations:\n    metallb.io/loadBalancerIPs: \"{ip}\"\n");
    }
    // Local: clients' source addresses reach the relay unchanged, and no second hop.
    let _ = write!(
        out,
        "spec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector:\n    {SELECTOR}\n"
    );
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
    fn port_names_fit_kubernetes() {
        assert_eq!(port_name("mssql"), "mssql");
        assert_eq!(port_name("a-very-long-service-name"), "a-very-long-ser");
        assert_eq!(port_name("fourteen-chars-x"), "fourteen-chars");
    }
}
