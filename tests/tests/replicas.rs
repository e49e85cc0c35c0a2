//! Relay replicas behind one address, in the network lab: relay pods in their own namespaces, a
//! Service address whose flows kube-proxy (emulated with iptables DNAT and random choice, as it
//! works) spreads over the ready pods, clients in the homelab, the agent behind NAT. Needs root;
//! skips with a message elsewhere, fails in CI.

use std::time::{Duration, Instant};

use sallyport_tests::{
    lab::{addr, rss_kib, Lab, LabCluster, Policy, Role, CLUSTER_PORT, PEER, VIP},
    lab_or_skip,
};

/// How long a replica has to show what a test waits for.
const WAIT: Duration = Duration::from_secs(10);

/// The transfer service on the Service address, as clients dial it.
fn service() -> String {
    addr(VIP, CLUSTER_PORT).to_string()
}

/// Runs `labtool rate` from the client namespace against the Service for `duration`.
fn spawn_rate(lab: &mut Lab, duration: &str) -> usize {
    let index = lab.spawn_binary(
        Role::Client,
        "sallyport-labtool",
        &["rate", "--to", &service(), "--rate", "50", "--duration", duration],
    );
    lab.process(index).wait_line("rate started", Duration::from_secs(10));
    index
}

/// Starts `count` transfers of up to `max` bytes each way through the Service.
fn spawn_transfers(lab: &mut Lab, count: &str, max: &str) -> usize {
    lab.spawn_binary(
        Role::Client,
        "sallyport-labtool",
        &["transfers", "--to", &service(), "--count", count, "--max", max],
    )
}

/// Starts `count` transfers of `min..max` bytes each way through the Service, and waits until
/// they flow.
fn spawn_long_transfers(lab: &mut Lab, count: &str, (min, max): (&str, &str)) -> usize {
    let args = ["transfers", "--to", &service(), "--count", count, "--min", min, "--max", max];
    let index = lab.spawn_binary(Role::Client, "sallyport-labtool", &args);
    lab.process(index).wait_line("flowing", Duration::from_secs(30));
    index
}

/// Each connection of a finished `labtool rate`: (ms after its start, result word).
fn rate_results(lab: &mut Lab, index: usize, timeout: Duration) -> (Vec<(u64, String)>, String) {
    let process = lab.process(index);
    let summary = process.wait_line("rate:", timeout);
    let lines = process
        .log
        .iter()
        .filter(|l| l.starts_with("conn "))
        .map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                    .unwrap_or_default()
                    .to_owned()
            };
            (field("at_ms").parse().unwrap_or(0), field("result"))
        })
        .collect();
    (lines, summary)
}

/// Client connections of the transfer service a relay saw end, by result.
fn connection_results(
    cluster: &LabCluster,
    lab: &Lab,
    pod: usize,
) -> std::collections::BTreeMap<String, u64> {
    let (_, metrics) = cluster.admin(lab, pod, "GET", "/metrics");
    let mut out = std::collections::BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("sallyport_connections_total{") && l.contains("service=\"transfer\""))
    {
        let result =
            line.split("result=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?").to_owned();
        let value: u64 = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).map_or(0, |v| v as u64);
        *out.entry(result).or_insert(0) += value;
    }
    out
}

#[test]
fn the_agent_holds_a_tunnel_to_every_replica_and_clients_reach_it_through_any() {
    let mut lab = lab_or_skip!();
    lab.add_cluster(3, &Policy::Cluster);
    lab.assert_homelab_cannot_reach_windows();
    let mut cluster = LabCluster::start(&mut lab, 2);
    for pod in 0..2 {
        assert!(cluster.agent_connected_at(&lab, pod), "the agent is connected at relay-{pod}");
    }
    // Each replica holds the agent's tunnel and its lane (lanes that reached the other replica
    // were sent back to dial again).
    for pod in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cluster.admin(&lab, pod, "GET", "/agents").1.contains("connections=2") {
            assert!(
                Instant::now() < deadline,
                "relay-{pod}: {}",
                cluster.admin(&lab, pod, "GET", "/agents").1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let agent_pid = lab.process(cluster.agent).child.id();
    let two = rss_kib(agent_pid);

    // A third replica joins: the agent holds a tunnel to it within 2 s of it being ready.
    let joined = Instant::now();
    cluster.start_relay(&mut lab, 2);
    let ready = Instant::now();
    let found = cluster.wait_agent_at(&mut lab, 2, Duration::from_secs(10));
    let took = found.duration_since(ready);
    println!(
        "relay-2 ready {:?} after its start; the agent's tunnel to it {took:?} after that",
        ready - joined
    );
    if took >= Duration::from_millis(500) {
        println!("agent log:\n{}", lab.process(cluster.agent).drain().join("\n"));
    }
    assert!(took < Duration::from_secs(2), "the agent found the new replica in {took:?}");
    cluster.proxy.wait_endpoints(&[0, 1, 2], Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let three = rss_kib(agent_pid);
    println!(
        "agent memory: {two} KiB with 2 tunnels, {three} KiB with 3: {} KiB for the third",
        three as i64 - two as i64
    );

    // Clients through the one address reach the agent through every replica.
    let batch = spawn_transfers(&mut lab, "60", "2000000");
    let report = lab.finish_transfers(batch, Duration::from_secs(120));
    assert_eq!(report.count("ok"), 60, "{:#?}", report.lines);
    for pod in 0..3 {
        let results = connection_results(&cluster, &lab, pod);
        println!("relay-{pod}: {results:?}");
        assert!(results.get("completed").copied().unwrap_or(0) > 0, "relay-{pod} carried none: {results:?}");
    }
    let after = rss_kib(agent_pid);
    println!("agent memory after 60 transfers over 3 tunnels: {after} KiB");
}

#[test]
fn kill_9_of_a_replica_under_fifty_new_connections_a_second() {
    let mut lab = lab_or_skip!();
    lab.add_cluster(3, &Policy::Cluster);
    let cluster = LabCluster::start(&mut lab, 3);
    // Long transfers in flight on every replica, and new connections at 50 a second.
    let long = spawn_long_transfers(&mut lab, "12", ("40000000", "60000000"));
    let rate = spawn_rate(&mut lab, "8s");
    let rate_start = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let killed_at = Instant::now();
    lab.process(cluster.relays[1].expect("relay-1")).kill();
    let kill_ms = killed_at.duration_since(rate_start).as_millis() as u64;
    cluster.proxy.wait_endpoints(&[0, 2], Duration::from_secs(5));
    let removed = cluster.proxy.removed_at(1, killed_at);

    let (conns, summary) = rate_results(&mut lab, rate, Duration::from_secs(60));
    println!("{summary}");
    let failed: Vec<&(u64, String)> = conns.iter().filter(|(_, r)| r != "ok").collect();
    let late: Vec<&&(u64, String)> = failed.iter().filter(|(at, _)| *at > kill_ms + 1000).collect();
    println!(
        "kill -9 at {kill_ms} ms: endpoint removed after {:?}; {} of {} new connections failed, all within {:?} of the kill",
        removed.map(|r| r.duration_since(killed_at)),
        failed.len(),
        conns.len(),
        failed.iter().map(|(at, _)| Duration::from_millis(at.saturating_sub(kill_ms))).max()
    );
    assert!(conns.len() >= 350, "50 a second for 8 s: {summary}");
    assert!(late.is_empty(), "new connections failed more than 1 s after the kill: {late:?}");

    // Connections on the surviving replicas are untouched: every one they carried completed.
    let report = lab.finish_transfers(long, Duration::from_secs(300));
    println!("long transfers: {}", report.summary);
    assert!(report.violations().is_empty(), "{:#?}", report.violations());
    for pod in [0, 2] {
        let results = connection_results(&cluster, &lab, pod);
        println!("relay-{pod}: {results:?}");
        assert_eq!(
            results.keys().collect::<Vec<_>>(),
            ["completed"],
            "relay-{pod} cut a connection: {results:?}"
        );
    }
    // The ones cut were those on relay-1 (reset, never a short transfer).
    assert_eq!(report.count("ok") + report.count("reset"), 12, "{:#?}", report.lines);
}

#[test]
fn a_rolling_restart_loses_no_connection() {
    let mut lab = lab_or_skip!();
    lab.add_cluster(3, &Policy::Cluster);
    let mut cluster = LabCluster::start(&mut lab, 3);
    let long = spawn_long_transfers(&mut lab, "9", ("30000000", "50000000"));
    let rate = spawn_rate(&mut lab, "40s");
    let started = Instant::now();
    let mut rejoin = Vec::new();
    for pod in 0..3 {
        // As kubectl rollout restart does it: the pod leaves the endpoints, preStop, SIGTERM,
        // the drain, then the new pod under the same name, ready before the next one goes.
        cluster.proxy.terminating(pod, true);
        std::thread::sleep(Duration::from_secs(1));
        cluster.sigterm(&mut lab, pod);
        let old = cluster.relays[pod].expect("relay");
        lab.process(old).wait_line("relay stopped", Duration::from_secs(60));
        assert!(lab.process(old).child.wait().expect("exit").success());
        cluster.proxy.terminating(pod, false);
        cluster.start_relay(&mut lab, pod);
        let ready = Instant::now();
        let back = cluster.wait_agent_at(&mut lab, pod, Duration::from_secs(10));
        rejoin.push(back.duration_since(ready));
        let all: Vec<usize> = (0..3).collect();
        cluster.proxy.wait_endpoints(&all, Duration::from_secs(10));
    }
    println!(
        "rolling restart of 3 replicas took {:?}; the agent was back at each within {rejoin:?}",
        started.elapsed()
    );
    let (conns, summary) = rate_results(&mut lab, rate, Duration::from_secs(120));
    println!("{summary}");
    let failed: Vec<&(u64, String)> = conns.iter().filter(|(_, r)| r != "ok").collect();
    assert!(failed.is_empty(), "new connections failed during the rolling restart: {failed:?}");
    let report = lab.finish_transfers(long, Duration::from_secs(300));
    println!("in-flight transfers: {}", report.summary);
    assert_eq!(report.count("ok"), 9, "an in-flight connection was cut: {:#?}", report.lines);
    for took in rejoin {
        assert!(took < Duration::from_secs(2), "the agent took {took:?} to hold a restarted replica");
    }
}

#[test]
fn tokens_and_revocations_have_one_writer() {
    let mut lab = lab_or_skip!();
    lab.add_cluster(2, &Policy::Cluster);
    let mut cluster = LabCluster::start(&mut lab, 2);
    // A token made through the follower is kept by the writer.
    let (status, created) = cluster.admin(&lab, 1, "POST", "/tokens?agent=newbox&ttl_secs=600");
    assert_eq!(status, 200, "{created}");
    let (_, listed) = cluster.admin(&lab, 0, "GET", "/tokens");
    assert!(listed.contains("agent=newbox"), "{listed}");

    // Redeemed at the same moment through both replicas: exactly one wins.
    let config = sallyport_relay::Config::load(std::path::Path::new(&cluster.tomls[0])).expect("relay.toml");
    let mut enrolls = Vec::new();
    for pod in 0..2 {
        let relay = addr(sallyport_tests::lab::pod_ip(pod), 4433).to_string();
        let token =
            sallyport_relay::cli::join_token::join_token(&config, &[relay], created.trim()).expect("token");
        let dir = lab.dir().join(format!("enroll{pod}"));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        std::fs::write(&file, token).expect("token file");
        let (dir, file) = (dir.display().to_string(), file.display().to_string());
        enrolls.push(
            lab.home
                .command(sallyport_tests::process::binary("sallyport-agent"))
                .args(["enroll", "--token-file", &file, "--dir", &dir])
                .spawn()
                .expect("enroll"),
        );
    }
    let outcomes: Vec<bool> = enrolls.into_iter().map(|mut c| c.wait().expect("enroll").success()).collect();
    println!("concurrent redemption through relay-0 and relay-1: {outcomes:?}");
    assert_eq!(outcomes.iter().filter(|ok| **ok).count(), 1, "exactly one redemption wins: {outcomes:?}");

    // A revocation through the follower holds on both replicas within seconds.
    let revoked = Instant::now();
    let (status, body) = cluster.admin(&lab, 1, "POST", "/agents/winbox/revoke");
    assert_eq!(status, 200, "{body}");
    for pod in 0..2 {
        let relay = cluster.relays[pod].expect("relay");
        lab.process(relay).wait_line("revoked certificate refused", Duration::from_secs(5));
        println!("relay-{pod} refuses the revoked agent {:?} after the revocation", revoked.elapsed());
    }
    assert!(!cluster.agent_connected_at(&lab, 0) && !cluster.agent_connected_at(&lab, 1));

    // The writer down: traffic-free here (the agent is revoked), but reads work, writes fail
    // clearly, and the follower keeps the revocation across its own restart.
    lab.process(cluster.relays[0].expect("writer")).kill();
    let (status, body) = cluster.admin(&lab, 1, "POST", "/tokens?agent=other");
    println!("a write with the writer down: {status} {}", body.trim());
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"relay-0\"") && body.contains("tunnels and traffic keep working"), "{body}");
    lab.process(cluster.relays[1].expect("relay-1")).kill();
    let restarted = cluster.start_relay(&mut lab, 1);
    lab.process(restarted).wait_line("revoked certificate refused", Duration::from_secs(10));

    // The writer comes back with an empty revocations file (its volume lost): it un-revokes
    // nobody. The follower keeps the revocation and reports it back; the writer, which holds
    // agents back until it has heard every replica, holds it again within a report, on disk too.
    let file = config.relay.revocations_file.clone().expect("the writer's revocations file");
    std::fs::write(&file, "").expect("empty the writer's revocations");
    let lost = Instant::now();
    let writer = cluster.start_relay(&mut lab, 0);
    lab.process(writer).wait_line("revocations restored from another replica's report", WAIT);
    lab.process(writer).wait_line("revoked certificate refused", WAIT);
    println!("the writer, restarted without its revocations, had them back {:?} later", lost.elapsed());
    let kept = std::fs::read_to_string(&file).expect("the writer's revocations");
    assert!(kept.contains("agent = \"winbox\""), "{kept}");
    assert!(!cluster.agent_connected_at(&lab, 0) && !cluster.agent_connected_at(&lab, 1));
}

#[test]
fn with_the_writer_down_tunnels_and_traffic_go_on() {
    let mut lab = lab_or_skip!();
    lab.add_cluster(2, &Policy::Cluster);
    let cluster = LabCluster::start(&mut lab, 2);
    lab.process(cluster.relays[0].expect("writer")).kill();
    cluster.proxy.wait_endpoints(&[1], Duration::from_secs(5));
    let batch = spawn_transfers(&mut lab, "20", "1000000");
    let report = lab.finish_transfers(batch, Duration::from_secs(60));
    assert_eq!(report.count("ok"), 20, "{:#?}", report.lines);
    // Within its next report or two, the follower says the writer is away.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cluster.admin(&lab, 1, "GET", "/metrics").1.contains("sallyport_writer_reachable 0") {
        assert!(Instant::now() < deadline, "the follower does not say the writer is away");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn local_traffic_policy_follows_the_announcing_node() {
    let mut lab = lab_or_skip!();
    lab.add_cluster(2, &Policy::Local);
    // MetalLB announces from the node of relay-0: only it gets the Service's flows.
    let mut cluster = LabCluster::start(&mut lab, 1);
    cluster.proxy.announce(&[0]);
    cluster.start_relay(&mut lab, 1);
    // relay-1 never sees the agent (its node does not get the address): it takes clients once its
    // warm-up is over, and the agent, still looking for it, has backed off to its longest wait.
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.admin(&lab, 1, "GET", "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "relay-1 never turned ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(cluster.agent_connected_at(&lab, 0) && !cluster.agent_connected_at(&lab, 1));
    let batch = spawn_transfers(&mut lab, "4", "100000");
    assert_eq!(lab.finish_transfers(batch, Duration::from_secs(60)).count("ok"), 4);
    // That node goes away: MetalLB announces from the other one.
    let moved = Instant::now();
    lab.process(cluster.relays[0].expect("relay-0")).kill();
    cluster.proxy.announce(&[1]);
    let found = cluster.wait_agent_at(&mut lab, 1, Duration::from_secs(15));
    println!(
        "Local policy: the agent holds the newly announced node's replica {:?} after the move",
        found - moved
    );
    // The agent's longest wait between looks for a replica it cannot reach is 5 s.
    assert!(found - moved < Duration::from_secs(6), "{:?}", found - moved);
    let batch = spawn_transfers(&mut lab, "4", "100000");
    assert_eq!(lab.finish_transfers(batch, Duration::from_secs(60)).count("ok"), 4);
}

/// The replicas' own API (reports to the writer, token checks, forwarded writes) attacked from the
/// homelab while clients' traffic flows through the Service: the admin port no longer serves it,
/// the replica port answers nobody without the relay's certificate, and a follower forwards no
/// write its operator's token did not authorize; traffic is untouched.
#[test]
fn the_replicas_api_refuses_strangers_while_traffic_flows() {
    let mut lab = lab_or_skip!();
    lab.add_cluster(2, &Policy::Cluster);
    let cluster = LabCluster::start(&mut lab, 2);
    let batch = spawn_transfers(&mut lab, "40", "4000000");
    let (_, before) = cluster.admin(&lab, 0, "GET", "/tokens");
    let fake = "replica = \"relay-9\"\nboot = 1\nserving = true\nagents = [\"winbox\"]\n";
    let redeem = "id = 1\nsecret = \"00\"\n";
    for token in [None, Some("not-the-admin-token-0000"), Some(cluster.token.as_str())] {
        let sync = cluster.admin_as(&lab, 0, ("POST", "/cluster/v1/sync"), token, fake);
        assert_eq!(sync.0, 404, "the admin port takes no report: {sync:?}");
        let check = cluster.admin_as(&lab, 0, ("POST", "/cluster/v1/redeem"), token, redeem);
        assert_eq!(check.0, 404, "the admin port checks no token: {check:?}");
    }
    // The replica port: plain HTTP, TLS without a certificate, TLS with the agent's (another of the
    // CA's certificates): no answer at all.
    let url = format!("https://{}/cluster/v1/sync", addr(sallyport_tests::lab::pod_ip(0), PEER));
    let plain = format!("http://{}/cluster/v1/sync", addr(sallyport_tests::lab::pod_ip(0), PEER));
    let bundle = cluster.pki.agent_bundle("winbox").display().to_string();
    let (crt, key) = (format!("{bundle}/agent.crt"), format!("{bundle}/agent.key"));
    let attempts: [&[&str]; 3] = [&[&plain], &["-k", &url], &["-k", "--cert", &crt, "--key", &key, &url]];
    for attempt in attempts {
        let mut args = vec!["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "-X", "POST"];
        args.extend_from_slice(&["--data-binary", fake]);
        args.extend_from_slice(attempt);
        let out = lab.home.output("curl", &args);
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(code == "000" || code.is_empty(), "{attempt:?} got HTTP {code} from the replica port");
    }
    for token in [None, Some("not-the-admin-token-0000")] {
        // The follower forwards nothing it did not authorize itself.
        let write = cluster.admin_as(&lab, 1, ("POST", "/tokens?agent=intruder"), token, "");
        assert_eq!(write.0, 401, "an unauthenticated write through the follower: {write:?}");
        let revoke = cluster.admin_as(&lab, 1, ("POST", "/agents/winbox/revoke"), token, "");
        assert_eq!(revoke.0, 401, "an unauthenticated revocation through the follower: {revoke:?}");
    }
    // Nothing changed: no replica relay-9, no token, the agent still up everywhere.
    let (_, after) = cluster.admin(&lab, 0, "GET", "/tokens");
    assert_eq!(before, after, "no token was made");
    let (_, metrics) = cluster.admin(&lab, 0, "GET", "/metrics");
    assert!(metrics.contains("sallyport_replicas_serving 2"), "no stranger joined the replicas");
    assert!(cluster.agent_connected_at(&lab, 0) && cluster.agent_connected_at(&lab, 1));
    let report = lab.finish_transfers(batch, Duration::from_secs(120));
    assert_eq!(report.count("ok"), 40, "{:#?}", report.lines);
}
