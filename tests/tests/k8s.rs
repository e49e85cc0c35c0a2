//! The Kubernetes manifests in `deploy/k8s/`: base and homelab overlay render with kustomize,
//! validate against the Kubernetes 1.32 schemas offline, and agree with the overlay's relay.toml
//! (ports, probes, MetalLB annotations, drain timing). Needs kubectl and kubernetes-validate;
//! skips with a message elsewhere, fails in CI.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use sallyport_relay::{
    cli::manifests::{self, ManifestOptions},
    Config,
};
use serde_norway::Value;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

fn tools_or_skip() -> bool {
    for (tool, arg) in [("kubectl", "version"), ("kubernetes-validate", "--version")] {
        let found = Command::new(tool)
            .arg(arg)
            .arg("--client")
            .output()
            .or_else(|_| Command::new(tool).arg(arg).output());
        if found.is_err() {
            assert!(std::env::var("CI").map_or(true, |v| v != "true"), "{tool} missing in CI");
            eprintln!("SKIPPED: {tool} is not installed");
            return false;
        }
    }
    true
}

fn kustomize(dir: &Path) -> String {
    let out = Command::new("kubectl").arg("kustomize").arg(dir).output().expect("kubectl runs");
    assert!(out.status.success(), "kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn validate(yaml: &str, what: &str) {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), yaml).expect("write");
    let out = Command::new("kubernetes-validate")
        .args(["--kubernetes-version", "1.32.0", "--strict"])
        .arg(file.path())
        .output()
        .expect("kubernetes-validate runs");
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{what}: {} resources passed", report.matches(" passed ").count());
    assert!(
        out.status.success(),
        "{what} does not validate:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("YAML document"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn ports(service: &Value) -> Vec<(String, u64, u64)> {
    service["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["protocol"].as_str().expect("protocol").to_owned(),
                p["port"].as_u64().expect("port"),
                p["targetPort"].as_u64().expect("targetPort"),
            )
        })
        .collect()
}

#[test]
fn base_and_overlay_render_and_validate_against_kubernetes_1_32() {
    if !tools_or_skip() {
        return;
    }
    validate(&kustomize(&k8s_dir().join("base")), "base");
    validate(&kustomize(&k8s_dir().join("overlays/homelab")), "overlay homelab");
}

#[test]
fn the_overlay_agrees_with_its_relay_toml() {
    if !tools_or_skip() {
        return;
    }
    let overlay = k8s_dir().join("overlays/homelab");
    let config = Config::load(&overlay.join("relay.toml")).expect("overlay relay.toml loads");
    let docs = documents(&kustomize(&overlay));

    // The committed Services are exactly what `sallyport-relay manifests` renders from relay.toml.
    let relay_lb = find(&docs, "Service", "sallyport-relay");
    let agents_lb = find(&docs, "Service", "sallyport-relay-agents");
    let ip_of = |lb: &Value| -> IpAddr {
        lb["metadata"]["annotations"]["metallb.io/loadBalancerIPs"]
            .as_str()
            .expect("MetalLB annotation")
            .parse()
            .expect("an IP")
    };
    let (ip, clients_ip) = (ip_of(agents_lb), ip_of(relay_lb));
    assert_eq!((ip.to_string().as_str(), clients_ip.to_string().as_str()), ("192.168.4.60", "192.168.4.61"));
    let options = ManifestOptions {
        load_balancer_ip: Some(ip),
        clients_ip: Some(clients_ip),
        ..ManifestOptions::default()
    };
    let committed = std::fs::read_to_string(overlay.join("services.yaml")).expect("services.yaml");
    assert_eq!(
        committed,
        manifests::render(&config, &options),
        "services.yaml is stale: sallyport-relay manifests --config relay.toml --load-balancer-ip {ip} --clients-ip {clients_ip} > services.yaml"
    );

    // Agents: QUIC over UDP to relay.listen, and the tunnel over TCP on the HTTPS listener's port,
    // in the agents' Service, which sends to every running replica (a starting one turns ready
    // only once it holds the agents) on any node (Cluster). Clients: every service without its
    // own IP in the clients' Service on an address of its own, to ready replicas only, with
    // Local: no SNAT, so the relay sees each client's address.
    let https_port =
        u64::from(config.relay.https_listen.expect("the overlay shows the HTTPS listener").port());
    assert_eq!(
        ports(agents_lb),
        vec![("UDP".into(), 443, u64::from(config.relay.listen.port())), ("TCP".into(), 443, https_port)]
    );
    assert_eq!(agents_lb["spec"]["publishNotReadyAddresses"].as_bool(), Some(true));
    assert!(relay_lb["spec"].get("publishNotReadyAddresses").is_none());
    for (lb, policy) in [(relay_lb, "Local"), (agents_lb, "Cluster")] {
        assert_eq!(lb["spec"]["type"].as_str(), Some("LoadBalancer"));
        assert_eq!(lb["spec"]["externalTrafficPolicy"].as_str(), Some(policy));
    }
    // MetalLB shares an address only between Services of one policy: the two do not share.
    assert!(relay_lb["metadata"]["annotations"].get("metallb.io/allow-shared-ip").is_none());
    let lb_ports = ports(relay_lb);
    for (listener, public, addr) in
        [("http", 80, config.relay.http_listen), ("https", 443, config.relay.https_listen)]
    {
        let port =
            u64::from(addr.unwrap_or_else(|| panic!("the overlay shows the {listener} listener")).port());
        assert!(
            lb_ports.contains(&("TCP".into(), public, port)),
            "{listener} on the shared IP: {lb_ports:?}"
        );
    }
    let mut kinds = std::collections::BTreeSet::new();
    for service in config.services.values() {
        kinds.insert(service.listen.to_string().split(' ').next().unwrap_or_default().to_owned());
        let Some((protocol, addr)) = service.listen.own_port() else {
            assert!(
                !docs.iter().any(|d| d["metadata"]["name"].as_str() == Some(service.name.as_str())),
                "{} is routed by name on a shared listener: no Service of its own",
                service.name
            );
            continue;
        };
        let protocol = protocol.to_owned();
        let port = u64::from(addr.port());
        let in_cluster = find(&docs, "Service", &service.name);
        assert_eq!(
            ports(in_cluster),
            vec![(protocol.clone(), port, port)],
            "ClusterIP Service {}",
            service.name
        );
        match service.load_balancer_ip {
            None => {
                assert!(lb_ports.contains(&(protocol, port, port)), "{} on the shared IP", service.name)
            }
            Some(own) => {
                let lb = find(&docs, "Service", &format!("{}-lb", service.name));
                assert_eq!(
                    lb["metadata"]["annotations"]["metallb.io/loadBalancerIPs"].as_str(),
                    Some(own.to_string().as_str())
                );
                assert_eq!(ports(lb), vec![(protocol, port, port)]);
            }
        }
    }
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        ["http", "https", "tcp", "udp"],
        "the overlay shows every kind"
    );

    // Replicas: two, one per node, a budget that keeps one, one at a time in a rollout, each
    // named by its pod; the first is the writer, reached by the others at its stable name.
    let deployment = find(&docs, "StatefulSet", "sallyport-relay");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(2));
    assert_eq!(spec["updateStrategy"]["type"].as_str(), Some("RollingUpdate"));
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"].as_u64(), Some(1));
    let spread = &spec["template"]["spec"]["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"].as_str(), Some("kubernetes.io/hostname"));
    assert_eq!(spread["maxSkew"].as_u64(), Some(1));
    let budget = find(&docs, "PodDisruptionBudget", "sallyport-relay");
    assert_eq!(budget["spec"]["minAvailable"].as_u64(), Some(1));
    let cluster = config.cluster.as_ref().expect("the overlay runs replicas ([cluster])");
    let peers = spec["serviceName"].as_str().expect("serviceName");
    let peers_service = find(&docs, "Service", peers);
    assert_eq!(peers_service["spec"]["clusterIP"].as_str(), Some("None"));
    assert_eq!(peers_service["spec"]["publishNotReadyAddresses"].as_bool(), Some(true));
    assert_eq!(cluster.writer, "sallyport-relay-0", "the writer is ordinal 0");
    assert_eq!(
        cluster.writer_peer,
        format!("{}.{peers}.sallyport.svc.cluster.local:{}", cluster.writer, cluster.peer_listen.port())
    );
    let peer_port = peers_service["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"].as_str() == Some("peer"))
        .expect("the peers Service publishes the replica port");
    assert_eq!(peer_port["port"].as_u64(), Some(u64::from(cluster.peer_listen.port())));

    // The pod: probes on the admin port, ports as configured, the config mounted, drain fits.
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let container_port = |name: &str| {
        container["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("container port {name}"))
    };
    assert_eq!(container_port("admin"), u64::from(config.relay.admin.port()));
    assert_eq!(container_port("quic"), u64::from(config.relay.listen.port()));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"].as_str(), Some("/livez"));
    assert_eq!(container["readinessProbe"]["httpGet"]["port"].as_str(), Some("admin"));
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().expect("preStop sleep");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("grace period");
    assert!(
        grace > pre_stop + config.relay.drain_grace.as_secs(),
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} + drain_grace {:?}",
        config.relay.drain_grace
    );
    // The relay's caps are derived from its memory budget: the budget is the pod's limit, and the
    // caps it holds at worst fit in it.
    let limit = container["resources"]["limits"]["memory"].as_str().expect("a memory limit");
    // Kubernetes writes 512Mi for 512 MiB.
    let limit =
        sallyport_runtime::config::parse_size(&format!("{limit}B")).expect("memory limit in Mi or Gi");
    assert_eq!(config.relay.memory_budget, limit, "relay.memory_budget is the pod's memory limit");
    let budget = config.relay.budget();
    assert!(
        config.relay.max_connections <= budget.connections,
        "max_connections {} is more than the budget holds ({budget:?})",
        config.relay.max_connections
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(container["securityContext"]["capabilities"]["drop"][0].as_str(), Some("ALL"));

    let args: Vec<&str> =
        container["args"].as_sequence().expect("args").iter().filter_map(|a| a.as_str()).collect();
    assert_eq!(args, ["serve", "--config", "/etc/sallyport/config/relay.toml", "--replica", "$(POD_NAME)"]);
    assert_eq!(container["env"][0]["name"].as_str(), Some("POD_NAME"));
    assert_eq!(container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("metadata.name"));
    // The config folder is mounted whole (a subPath mount never sees a ConfigMap update), and the
    // ConfigMap keeps its name (an update reloads the relay instead of rolling the pods).
    let config_mount = container["volumeMounts"]
        .as_sequence()
        .expect("volume mounts")
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/etc/sallyport/config"))
        .expect("the config folder is mounted");
    assert!(config_mount.get("subPath").is_none(), "no subPath: {config_mount:?}");
    let map_name = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .expect("config volume");
    assert_eq!(map_name, "sallyport-relay-config", "the ConfigMap keeps its name (no hash suffix)");
    let map = find(&docs, "ConfigMap", map_name);
    let shipped = std::fs::read_to_string(overlay.join("relay.toml")).expect("relay.toml");
    assert_eq!(map["data"]["relay.toml"].as_str(), Some(shipped.as_str()));
    for file in [&config.relay.ca_cert, &config.relay.cert, &config.relay.key] {
        assert!(file.starts_with("/etc/sallyport/tls"), "{} is not in the Secret's mount", file.display());
    }

    // State that must survive a restart sits on a writable volume backed by a claim that the
    // manifests create; the relay itself refuses to start otherwise.
    sallyport_relay::trust::check_durable(&config, config.relay.admin_token_file.is_some())
        .expect("the overlay keeps its revocations");
    let mounts = container["volumeMounts"].as_sequence().expect("volume mounts");
    for file in
        [config.relay.revocations_file.as_ref(), config.relay.tokens_file.as_ref()].into_iter().flatten()
    {
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"].as_str().is_some_and(|p| file.starts_with(p)))
            .unwrap_or_else(|| panic!("{} is on no mounted volume", file.display()));
        assert_ne!(mount["readOnly"].as_bool(), Some(true), "{} is on a read-only mount", file.display());
        // One claim per replica, from the StatefulSet's templates.
        let templates = spec["volumeClaimTemplates"].as_sequence().expect("volume claim templates");
        assert!(
            templates.iter().any(|t| t["metadata"]["name"] == mount["name"]),
            "{} is not on a persistent volume",
            file.display()
        );
    }

    // Only the monitoring namespace and the relay's own pods reach the admin port; every other
    // port is open.
    let policy = find(&docs, "NetworkPolicy", "sallyport-relay");
    let admin_port = u64::from(config.relay.admin.port());
    for rule in policy["spec"]["ingress"].as_sequence().expect("ingress rules") {
        let covers_admin = rule["ports"].as_sequence().expect("ports").iter().any(|p| {
            let start = p["port"].as_u64().unwrap_or(0);
            let end = p["endPort"].as_u64().unwrap_or(start);
            p["protocol"].as_str() == Some("TCP") && (start..=end).contains(&admin_port)
        });
        if covers_admin {
            let from = rule["from"].as_sequence().expect("the admin port's rule names who may come");
            let relay_pods = |f: &Value| {
                f["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str() == Some("sallyport-relay")
            };
            assert!(
                !from.is_empty()
                    && from.iter().all(|f| f.get("namespaceSelector").is_some() || relay_pods(f)),
                "the admin port is open to more than a namespace and the relay's pods: {rule:?}"
            );
            assert!(from.iter().any(relay_pods), "the replicas reach the writer's admin port");
        } else {
            assert!(rule.get("from").is_none(), "service ports are open to the homelab: {rule:?}");
        }
    }

    // The admin port is for the kubelet's probes and in-cluster scrapes, never a Service's port.
    // (The replicas' headless Service only names the pods in DNS: nothing is forwarded through it.)
    let headless = |d: &Value| d["spec"]["clusterIP"].as_str() == Some("None");
    for service in docs.iter().filter(|d| d["kind"].as_str() == Some("Service") && !headless(d)) {
        for (_, port, target) in ports(service) {
            assert!(
                port != u64::from(config.relay.admin.port())
                    && target != u64::from(config.relay.admin.port()),
                "Service {} exposes the admin port",
                service["metadata"]["name"].as_str().unwrap_or_default()
            );
        }
    }
}

/// The operator's kit as an overlay adds it (`overlays/homelab-monitoring`): it renders, the core
/// resources validate against Kubernetes 1.32 (ServiceMonitor and PrometheusRule are the
/// Prometheus Operator's types, which have no schema offline: their shape is checked here), and
/// the pieces agree with each other and with the relay's deployment.
#[test]
fn the_monitoring_component_renders_and_its_pieces_agree() {
    if !tools_or_skip() {
        return;
    }
    let yaml = kustomize(&k8s_dir().join("overlays/homelab-monitoring"));
    validate(&yaml, "overlay homelab-monitoring");
    let docs = documents(&yaml);
    let deployment = find(&docs, "StatefulSet", "sallyport-relay");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let admin_port = container["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"].as_str() == Some("admin"))
        .expect("the relay's admin port");
    assert_eq!(admin_port["containerPort"].as_u64(), Some(9090));

    // The metrics Service reaches the relay's pods on the admin port.
    let service = find(&docs, "Service", "sallyport-relay-metrics");
    assert_eq!(service["metadata"]["namespace"].as_str(), Some("sallyport"));
    assert_eq!(service["spec"]["type"].as_str(), Some("ClusterIP"), "metrics stay inside the cluster");
    for (key, value) in service["spec"]["selector"].as_mapping().expect("selector") {
        assert_eq!(&pod_labels[key.as_str().expect("key")], value, "the selector matches the relay's pods");
    }
    let port = &service["spec"]["ports"][0];
    assert_eq!((port["name"].as_str(), port["targetPort"].as_str()), (Some("admin"), Some("admin")));

    // The ServiceMonitor selects exactly that Service, scrapes /metrics on its port with the
    // read-only token from the relay's Secret.
    let monitor = find(&docs, "ServiceMonitor", "sallyport-relay");
    assert_eq!(monitor["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    for (key, value) in monitor["spec"]["selector"]["matchLabels"].as_mapping().expect("matchLabels") {
        assert_eq!(&service["metadata"]["labels"][key.as_str().expect("key")], value);
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!((endpoint["port"].as_str(), endpoint["path"].as_str()), (Some("admin"), Some("/metrics")));
    let credentials = &endpoint["authorization"]["credentials"];
    assert_eq!(endpoint["authorization"]["type"].as_str(), Some("Bearer"));
    let secret = credentials["name"].as_str().expect("secret name");
    let volumes = deployment["spec"]["template"]["spec"]["volumes"].as_sequence().expect("volumes");
    assert!(
        volumes.iter().any(|v| v["secret"]["secretName"].as_str() == Some(secret)),
        "the token comes from the Secret the relay mounts ({secret})"
    );
    assert_eq!(credentials["key"].as_str(), Some("read.token"), "Prometheus holds the read-only token");

    // Prometheus (namespace monitoring) may reach that port through the relay's NetworkPolicy.
    let policy = find(&docs, "NetworkPolicy", "sallyport-relay");
    let admitted = policy["spec"]["ingress"].as_sequence().expect("ingress").iter().any(|rule| {
        rule["from"].as_sequence().is_some_and(|from| {
            from.iter().any(|f| {
                f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as_str()
                    == Some("monitoring")
            })
        }) && rule["ports"]
            .as_sequence()
            .is_some_and(|ports| ports.iter().any(|p| p["port"].as_u64() == Some(9090)))
    });
    assert!(admitted, "Prometheus cannot reach the admin port");

    // Every alert has an expression, a duration, a severity and a summary.
    let rule = find(&docs, "PrometheusRule", "sallyport-relay");
    let alerts: Vec<&Value> = rule["spec"]["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules"))
        .collect();
    let names: Vec<&str> = alerts.iter().filter_map(|a| a["alert"].as_str()).collect();
    assert_eq!(
        names,
        [
            "SallyportAgentDown",
            "SallyportRelayNotReady",
            "SallyportHandshakeFailuresRising",
            "SallyportCertificateExpiringSoon",
            "SallyportContainerStartsFailing",
            "SallyportIdentityConflict",
            "SallyportWriterUnreachable",
            "SallyportGroupNoHealthyMember",
            "SallyportGroupOnLastMember"
        ]
    );
    for alert in &alerts {
        assert!(alert["expr"].as_str().is_some_and(|e| e.contains("sallyport_")), "{alert:?}");
        assert!(
            alert["for"].as_str().is_some() && alert["labels"]["severity"].as_str().is_some(),
            "{alert:?}"
        );
        assert!(alert["annotations"]["summary"].as_str().is_some(), "{alert:?}");
    }

    // The dashboard as the ConfigMap Grafana's sidecar loads.
    let dashboard = find(&docs, "ConfigMap", "sallyport-grafana-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"].as_str(), Some("1"));
    let json = dashboard["data"]["sallyport-relay.json"].as_str().expect("the dashboard in the ConfigMap");
    let parsed: serde_json::Value = serde_json::from_str(json).expect("the dashboard is JSON");
    assert_eq!(parsed["uid"].as_str(), Some("sallyport-relay"));
    println!(
        "monitoring component: {} alerts, {} dashboard panels",
        alerts.len(),
        parsed["panels"].as_array().map_or(0, Vec::len)
    );
}

/// The cert-manager component (`components/https-certificate`): the relay mounts the Secret the
/// Certificate is issued into, as a whole folder (a renewal reaches the pod), its files readable by
/// the relay's group only (the relay refuses a key every user may read), where the documented
/// `[certificates]` table reads it.
#[test]
fn the_https_certificate_component_mounts_the_certificates_secret() {
    if !tools_or_skip() {
        return;
    }
    let yaml = kustomize(&k8s_dir().join("overlays/homelab-https"));
    validate(&yaml, "overlay homelab-https");
    let docs = documents(&yaml);
    let certificate = find(&docs, "Certificate", "sallyport-web");
    assert_eq!(certificate["metadata"]["namespace"].as_str(), Some("sallyport"));
    let secret = certificate["spec"]["secretName"].as_str().expect("secretName");
    let pod = &find(&docs, "StatefulSet", "sallyport-relay")["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["secret"]["secretName"].as_str() == Some(secret))
        .expect("a volume of the Certificate's Secret");
    assert_eq!(volume["secret"]["defaultMode"].as_u64(), Some(0o440), "{volume:?}");
    assert_eq!(pod["securityContext"]["fsGroup"].as_u64(), Some(65532), "the relay's group reads it");
    let name = volume["name"].as_str().expect("volume name");
    let mounts = pod["containers"][0]["volumeMounts"].as_sequence().expect("mounts");
    let mount = mounts.iter().find(|m| m["name"].as_str() == Some(name)).expect("mounted");
    assert!(mount["subPath"].is_null(), "a subPath mount never sees a renewal");
    let path = mount["mountPath"].as_str().expect("mountPath");
    assert_eq!(mounts.len(), 4, "the base's mounts are kept: {mounts:?}");
    let docs_page = std::fs::read_to_string(k8s_dir().join("../../docs/https.md")).expect("docs/https.md");
    for file in ["tls.crt", "tls.key"] {
        assert!(docs_page.contains(&format!("{path}/{file}")), "docs/https.md reads {path}/{file}");
    }
    println!("cert-manager Secret {secret} mounted at {path} (mode 0440)");
}
