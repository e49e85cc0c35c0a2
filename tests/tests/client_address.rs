//! The client's own address under the manifests `sallyport-relay manifests` renders by default,
//! in the lab with kube-proxy emulated: the agents' Service on one address with
//! `externalTrafficPolicy: Cluster` (kube-proxy spreads and masquerades: the agent reaches every
//! replica, from the node's address), the clients' Service on another with `Local` (no SNAT). A
//! homelab client's connections reach both replicas, and the relay's access rules, its access log
//! and the PROXY v2 header the target reads all carry the client's own address.

use std::time::Duration;

use sallyport_tests::{
    lab::{LabCluster, Policy, Role, CLIENT_NET_IP, WIN_IP},
    lab_or_skip, servers,
};

const SOURCE_PORT: u16 = 7100;
const SOURCE_TARGET: u16 = 7101;

#[test]
fn clients_keep_their_address_while_agents_reach_every_replica() {
    let mut lab = lab_or_skip!();
    let policy = Policy::Split;
    lab.add_cluster(2, &policy);
    // Only the homelab client may use the service: under SNAT it would be refused.
    let relay_more = format!(
        "[services.source]\nagent = \"winbox\"\nlisten = \"0.0.0.0:{SOURCE_PORT}\"\n\
         [access]\ndefault = [\"allow {CLIENT_NET_IP}\", \"deny all\"]\nlog = \"access.log\"\n"
    );
    let agent_more =
        format!("[services.source]\ntarget = \"tcp://{WIN_IP}:{SOURCE_TARGET}\"\nproxy_protocol = \"v2\"\n");
    let listen = format!("{WIN_IP}:{SOURCE_TARGET}");
    let target = lab.spawn_binary(Role::Win, "sallyport-labtool", &["proxy-source", "--listen", &listen]);
    lab.process(target).wait_line("proxy source listening", Duration::from_secs(10));
    // Waits until the agent holds a tunnel to each replica through the agents' address.
    let cluster = LabCluster::start_with(&mut lab, 2, &relay_more, &agent_more);

    // 20 connections from the client to the clients' address: the target names the client.
    let client = lab.client.as_ref().expect("the client network");
    let clients = policy.clients_vip();
    let script = format!(
        "for i in $(seq 20); do exec 3<>/dev/tcp/{clients}/{SOURCE_PORT} && head -n1 <&3; exec 3<&-; done"
    );
    let out = client.output("bash", &["-c", &script]);
    let answers = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = answers.lines().collect();
    println!("PROXY v2 at the target: {:?} (of {})", lines.first(), lines.len());
    assert_eq!(lines.len(), 20, "{answers}{}", String::from_utf8_lossy(&out.stderr));
    let prefix = format!("source {CLIENT_NET_IP}:");
    assert!(lines.iter().all(|l| l.starts_with(&prefix)), "the target sees the client: {answers}");

    // Each replica's access log has the client's own address; kube-proxy spread the connections.
    // Lines are written as connections end: wait for all 20.
    let logs = [cluster.pod_dir(0).join("access.log"), cluster.pod_dir(1).join("access.log")];
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
    servers::wait_for_log(&logs[0], |first| first.lines().count() + read(&logs[1]).lines().count() >= 20);
    let mut per_replica = Vec::new();
    for (i, path) in logs.iter().enumerate() {
        let text = read(path);
        let lines: Vec<&str> = text.lines().collect();
        let own = format!("\"client_ip\":\"{CLIENT_NET_IP}\"");
        assert!(
            lines.iter().all(|l| l.contains(&own) && l.contains("\"result\":\"completed\"")),
            "replica {i}'s access log: {text}"
        );
        per_replica.push(lines.len());
    }
    let total: usize = per_replica.iter().sum();
    println!("access log lines per replica: {per_replica:?}, {total} in all");
    assert_eq!(total, 20);
    assert!(per_replica.iter().all(|n| *n > 0), "both replicas took clients: {per_replica:?}");

    // The agents' address is masqueraded (Cluster): each relay saw the agent from its node's
    // gateway, not from the agent's NAT router, and still holds it.
    for i in 0..2 {
        let index = cluster.relays[i].expect("relay running");
        let log = lab.process(index).drain().join("\n");
        let connected = log.lines().find(|l| l.contains("agent connected")).unwrap_or_default().to_owned();
        let node = std::net::Ipv4Addr::new(10, 42, u8::try_from(i).expect("two pods"), 1);
        assert!(connected.contains(&format!("remote={node}:")), "replica {i}: {connected}");
    }
}
