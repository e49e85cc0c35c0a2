//! The tunnel across a real NAT (network namespaces, iptables MASQUERADE), through loss and delay,
//! through faults, with real clients. Needs root; skips with a message elsewhere, fails in CI.

use std::time::{Duration, Instant};

use sallyport_tests::{
    lab::{output_text, transfer_spec, Role, TunnelSpec, RELAY_IP, TRANSFER_PORT},
    lab_or_skip,
};

#[test]
fn nat_keeps_the_homelab_out_and_the_tunnel_crosses_it() {
    let mut lab = lab_or_skip!();
    lab.assert_homelab_cannot_reach_windows();
    lab.start_transfer_server(TRANSFER_PORT);
    let tunnel = lab.start_tunnel(&transfer_spec());
    let report = lab.transfers(TRANSFER_PORT, &["--count", "4", "--min", "1000", "--max", "4000000"]);
    println!("{}", report.summary);
    assert_eq!(report.count("ok"), 4, "{:#?}", report.lines);
    // The relay saw the agent arrive from the router's address, not the windows host's.
    let line = lab.process(tunnel.relay()).wait_line("agent connected", Duration::from_secs(5));
    assert!(line.contains("remote=10.4.0.1:"), "agent should arrive through the NAT: {line}");
}

#[test]
fn hundred_parallel_transfers_through_twenty_ms_and_two_percent_loss() {
    let mut lab = lab_or_skip!();
    lab.start_transfer_server(TRANSFER_PORT);
    lab.start_tunnel(&transfer_spec().impaired(&["--delay", "10ms", "--loss", "0.02", "--seed", "7"]));
    let started = Instant::now();
    let report = lab.transfers(
        TRANSFER_PORT,
        &["--count", "100", "--max", "33554432", "--seed", "11", "--timeout", "600s"],
    );
    println!("{}", report.summary);
    println!(
        "100 transfers through 20 ms RTT and 2% loss: {:?}, {:.1} MB/s",
        started.elapsed(),
        report.field("bytes") / report.field("seconds") / 1e6
    );
    assert!(report.violations().is_empty(), "{:#?}", report.violations());
    assert_eq!(report.count("ok"), 100, "{:#?}", report.lines);
}

#[test]
fn real_clients_through_the_tunnel() {
    let mut lab = lab_or_skip!();
    let www = lab.dir().join("www");
    std::fs::create_dir_all(&www).expect("www");
    let mut blob = vec![0u8; 3 * 1024 * 1024 + 17];
    fastrand::Rng::with_seed(5).fill(&mut blob);
    std::fs::write(www.join("blob.bin"), &blob).expect("blob");
    lab.start_http(8000, &www);
    lab.start_postgres(5432);
    lab.start_redis(6379);
    lab.start_iperf3(5201);
    lab.start_tunnel(&TunnelSpec::new(&[
        ("http", 8080, 8000),
        ("postgres", 5432, 5432),
        ("redis", 6379, 6379),
        ("iperf", 5201, 5201),
    ]));
    let relay = RELAY_IP.to_string();

    // curl: a 3 MiB file arrives byte for byte.
    let started = Instant::now();
    let out = lab.home.output("curl", &["-sS", "--max-time", "60", &format!("http://{relay}:8080/blob.bin")]);
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.len(), blob.len());
    assert!(out.stdout == blob, "curl body differs from the served file");
    println!("curl: {} bytes intact in {:?}", blob.len(), started.elapsed());

    // psql: a query and its answer.
    let psql = ["-h", relay.as_str(), "-p", "5432", "-U", "postgres", "-d", "postgres", "-Atc"];
    let out =
        lab.home.output("psql", &[&psql[..], &["select 6 * 7, current_setting('server_version')"]].concat());
    assert!(out.status.success(), "psql: {}", output_text(&out));
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(answer.starts_with("42|"), "psql answered {answer:?}");
    println!("psql: select 6 * 7 -> {answer}");

    // pgbench: every transaction of 8 clients x 200 is processed.
    let pg = ["-h", relay.as_str(), "-p", "5432", "-U", "postgres"];
    let out = lab.home.output("pgbench", &[&pg[..], &["-i", "-q", "postgres"]].concat());
    assert!(out.status.success(), "pgbench -i: {}", output_text(&out));
    let out =
        lab.home.output("pgbench", &[&pg[..], &["-c", "8", "-j", "2", "-t", "200", "postgres"]].concat());
    let report = output_text(&out);
    assert!(out.status.success(), "pgbench: {report}");
    assert!(report.contains("number of transactions actually processed: 1600/1600"), "{report}");
    let tps = report.lines().find(|l| l.starts_with("tps")).unwrap_or_default();
    println!("pgbench -c 8 -t 200: 1600/1600 transactions; {tps}");

    // redis-benchmark: every test reports a rate, no errors.
    let out = lab.home.output("redis-benchmark", &["-h", &relay, "-p", "6379", "-q", "-n", "20000"]);
    let report = output_text(&out).replace('\r', "\n");
    assert!(out.status.success(), "redis-benchmark: {report}");
    let results: Vec<&str> = report.lines().filter(|l| l.contains("requests per second")).collect();
    assert!(results.len() >= 10, "redis-benchmark ran too few tests: {report}");
    assert!(!report.contains("ERR") && !report.to_lowercase().contains("error"), "{report}");
    println!(
        "redis-benchmark -q -n 20000: {} tests, e.g. {}",
        results.len(),
        results.iter().find(|l| l.starts_with("GET")).unwrap_or(&"")
    );

    // iperf3: five seconds of bulk TCP, received bytes reported.
    let out = lab.home.output("iperf3", &["-c", &relay, "-p", "5201", "-t", "5", "-J"]);
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "iperf3: {}", output_text(&out));
    let value: serde_json::Value = serde_json::from_str(&json).expect("iperf3 JSON");
    assert!(value.get("error").is_none(), "iperf3 error: {}", value["error"]);
    let bps = value["end"]["sum_received"]["bits_per_second"].as_f64().expect("bits_per_second");
    let bytes = value["end"]["sum_received"]["bytes"].as_f64().expect("bytes");
    assert!(bytes > 0.0, "iperf3 received nothing");
    println!("iperf3 -t 5: {:.0} Mbit/s received ({bytes} bytes; debug build)", bps / 1e6);
}

#[test]
fn relay_killed_during_transfers_then_back() {
    let mut lab = lab_or_skip!();
    let (mut tunnel, batch) = lab.transfers_in_flight(transfer_spec(), "20", "8000000", "32000000");
    lab.process(tunnel.relay()).kill();
    let report = lab.finish_transfers(batch, Duration::from_secs(90));
    println!("kill -9 relay during 20 transfers: {}", report.summary);
    assert!(
        report.violations().is_empty(),
        "never a clean short EOF, a mismatch or a hang: {:#?}",
        report.violations()
    );
    assert_eq!(report.count("ok") + report.count("reset"), 20, "{:#?}", report.lines);
    assert!(report.count("reset") > 0, "the kill should have cut some transfers: {:#?}", report.lines);

    let back = Instant::now();
    tunnel.relays[0] = lab.start_relay(&tunnel, 0);
    lab.process(tunnel.agent).wait_line("tunnel up", Duration::from_secs(30));
    let report = lab.transfers(TRANSFER_PORT, &["--count", "2", "--max", "100000"]);
    let took = back.elapsed();
    println!("relay back -> agent reconnected and new connections worked in {took:?}");
    assert_eq!(report.count("ok"), 2, "{:#?}", report.lines);
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn agent_killed_then_back() {
    let mut lab = lab_or_skip!();
    let (mut tunnel, batch) = lab.transfers_in_flight(transfer_spec(), "10", "16000000", "32000000");
    let killed = Instant::now();
    lab.process(tunnel.agent).kill();
    let report = lab.finish_transfers(batch, Duration::from_secs(60));
    let reset_after = killed.elapsed();
    println!("kill -9 agent: {} (all ended {reset_after:?} after the kill)", report.summary);
    assert!(report.violations().is_empty(), "{:#?}", report.violations());
    assert!(report.count("reset") > 0, "{:#?}", report.lines);
    assert!(
        reset_after < Duration::from_secs(3),
        "clients in flight must be reset within the idle timeout (1.5 s), took {reset_after:?}"
    );

    // The relay notices, keeps its listener bound and refuses clients at once.
    lab.process(tunnel.relay()).wait_line("agent disconnected", Duration::from_secs(15));
    let refused = Instant::now();
    let report = lab.transfers(TRANSFER_PORT, &["--count", "3", "--max", "1000"]);
    println!("while the agent is away: {} in {:?}", report.summary, refused.elapsed());
    assert_eq!(report.count("reset"), 3, "{:#?}", report.lines);
    assert!(refused.elapsed() < Duration::from_secs(2));

    tunnel.agent = lab.start_agent(&tunnel);
    let report = lab.transfers(TRANSFER_PORT, &["--count", "3", "--max", "100000"]);
    assert_eq!(report.count("ok"), 3, "{:#?}", report.lines);
}

#[test]
fn nat_mapping_changes_mid_transfer() {
    let mut lab = lab_or_skip!();
    let (tunnel, batch) = lab.transfers_in_flight(transfer_spec(), "10", "16000000", "32000000");
    let conntrack_before = output_text(&lab.router.output("conntrack", &["-L", "-p", "udp"]));
    lab.remap_nat();
    let report = lab.finish_transfers(batch, Duration::from_secs(90));
    let conntrack_after = output_text(&lab.router.output("conntrack", &["-L", "-p", "udp"]));
    assert!(report.violations().is_empty(), "{:#?}", report.violations());
    assert!(
        conntrack_after.contains("sport=40") || conntrack_after.contains("dport=40"),
        "the NAT did not remap: {conntrack_after}"
    );
    let relay_log = lab.process(tunnel.relay()).log.join("\n");
    let reconnected = relay_log.matches("agent connected").count() > 1;
    let how =
        if reconnected { "the agent reconnected" } else { "the connection migrated to the new address" };
    println!("NAT remapped mid-transfer: {how}; {}", report.summary);
    println!("conntrack before: {}", conntrack_before.lines().next().unwrap_or_default());
    println!("conntrack after:  {}", conntrack_after.lines().next().unwrap_or_default());
    if !reconnected {
        assert_eq!(report.count("ok"), 10, "migration keeps every transfer: {:#?}", report.lines);
    }
    let report = lab.transfers(TRANSFER_PORT, &["--count", "2", "--max", "100000"]);
    assert_eq!(report.count("ok"), 2, "{:#?}", report.lines);
}

#[test]
fn sigterm_drains_one_relay_while_the_other_carries_on() {
    use sallyport_tests::lab::RELAY2_IP;
    let mut lab = lab_or_skip!();
    let (tunnel, batch) = lab.transfers_in_flight(transfer_spec().two_relays(), "10", "4000000", "16000000");
    let pid = lab.process(tunnel.relay()).child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    lab.process(tunnel.relay()).wait_line("draining", Duration::from_secs(10));

    // New connections to the draining relay are refused; the other relay carries them.
    let refused = lab.transfers_to(RELAY_IP, TRANSFER_PORT, &["--count", "2", "--max", "1000"]);
    assert_eq!(refused.count("reset"), 2, "draining relay must refuse: {:#?}", refused.lines);
    let other = lab.transfers_to(RELAY2_IP, TRANSFER_PORT, &["--count", "4", "--max", "1000000"]);
    assert_eq!(other.count("ok"), 4, "second relay must carry on: {:#?}", other.lines);

    // Transfers in flight finish within the grace period; then the relay exits 0.
    let report = lab.finish_transfers(batch, Duration::from_secs(30));
    println!("SIGTERM during transfers: {}", report.summary);
    assert_eq!(
        report.count("ok"),
        10,
        "in-flight transfers finish within the grace period: {:#?}",
        report.lines
    );
    lab.process(tunnel.relay()).wait_line("relay stopped", Duration::from_secs(30));
    assert!(lab.process(tunnel.relay()).child.wait().expect("exit").success());
    lab.process(tunnel.agent).wait_line("relay going away", Duration::from_secs(5));
}

#[test]
fn dead_peer_detection_when_the_path_drops_everything() {
    let mut lab = lab_or_skip!();
    lab.start_transfer_server(TRANSFER_PORT);
    let tunnel = lab.start_tunnel(&transfer_spec());
    lab.cut();
    let cut = Instant::now();
    let agent_line = lab.process(tunnel.agent).wait_line("tunnel lost", Duration::from_secs(20));
    let agent_noticed = cut.elapsed();
    lab.process(tunnel.relay()).wait_line("agent disconnected", Duration::from_secs(20));
    let relay_noticed = cut.elapsed();
    println!("path cut: agent noticed after {agent_noticed:?} ({agent_line}), relay after {relay_noticed:?}; default keep-alive 1 s, idle 1.5 s");
    // The last packet came at most a keep-alive before the cut; the keep-alive sent into the dark
    // restarts the idle timer once.
    let bound = Duration::from_millis(1000 + 1500 + 500);
    assert!(
        agent_noticed <= bound && relay_noticed <= bound,
        "agent {agent_noticed:?}, relay {relay_noticed:?}"
    );
    lab.heal();
    lab.process(tunnel.agent).wait_line("tunnel up", Duration::from_secs(20));
    let report = lab.transfers(TRANSFER_PORT, &["--count", "2", "--max", "100000"]);
    assert_eq!(report.count("ok"), 2, "{:#?}", report.lines);
}

#[test]
fn soak_mixed_traffic_through_impairment() {
    let seconds: u64 = std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    let mut lab = lab_or_skip!();
    lab.start_transfer_server(TRANSFER_PORT);
    let tunnel = lab.start_tunnel(&transfer_spec().impaired(&[
        "--delay",
        "5ms",
        "--jitter",
        "2ms",
        "--loss",
        "0.01",
        "--reorder",
        "0.01",
        "--duplicate",
        "0.005",
        "--seed",
        "3",
    ]));
    let started = Instant::now();
    let (mut round, mut total_ok, mut bytes) = (0u64, 0usize, 0f64);
    let mut first_minute = None;
    while started.elapsed() < Duration::from_secs(seconds) {
        round += 1;
        let seed = round.to_string();
        let count = ["5", "20", "50"][(round % 3) as usize];
        let max = ["8000000", "1000000", "64000"][(round % 3) as usize];
        let report = lab.transfers(
            TRANSFER_PORT,
            &["--count", count, "--max", max, "--seed", &seed, "--timeout", "120s"],
        );
        assert!(report.violations().is_empty(), "round {round}: {:#?}", report.violations());
        assert_eq!(report.count("ok"), report.lines.len(), "round {round}: {:#?}", report.lines);
        total_ok += report.lines.len();
        bytes += report.field("bytes");
        if first_minute.is_none() && started.elapsed() >= Duration::from_secs(60) {
            first_minute = Some((lab.rss_kib(tunnel.relay()), lab.rss_kib(tunnel.agent)));
        }
    }
    let last = (lab.rss_kib(tunnel.relay()), lab.rss_kib(tunnel.agent));
    let first = first_minute.unwrap_or(last);
    println!(
        "soak {seconds} s: {round} rounds, {total_ok} transfers, {:.0} MB, 0 mismatches; RSS relay {} -> {} KiB, agent {} -> {} KiB (after 1st minute -> end)",
        bytes / 1e6, first.0, last.0, first.1, last.1
    );
    for (name, a, b) in [("relay", first.0, last.0), ("agent", first.1, last.1)] {
        assert!(b <= a + a / 4 + 8 * 1024, "{name} memory grew from {a} KiB to {b} KiB");
    }
}

/// A copy of the agent's bundle started on a second host (the homelab side of the NAT) while the
/// agent is live: the relay keeps the agent's session, refuses the copy's with a reason, counts the
/// conflict (the kit's `SallyportIdentityConflict` fires on any increase), and transfers through
/// the real agent go on.
#[test]
fn a_copied_bundle_on_a_second_host_is_refused_beside_the_live_agent() {
    let mut lab = lab_or_skip!();
    let token = "lab-admin-token-copied-bundle-0123";
    let token_file = lab.dir().join("admin.token");
    std::fs::write(&token_file, token).expect("token");
    lab.start_transfer_server(TRANSFER_PORT);
    let spec = transfer_spec().relay_extra(&format!(
        "admin_token_file = \"{}\"\nrevocations_file = \"{}\"",
        token_file.display(),
        lab.dir().join("revoked.toml").display()
    ));
    let tunnel = lab.start_tunnel(&spec);
    let transfers =
        lab.spawn_transfers(RELAY_IP, TRANSFER_PORT, &["--count", "20", "--max", "4000000", "--seed", "3"]);
    let agent_toml = tunnel.agent_toml().to_owned();
    let copy = lab.spawn_binary(Role::Home, "sallyport-agent", &["run", "--config", &agent_toml]);
    let refused = lab.process(copy).wait_line("another address", Duration::from_secs(15));
    println!("the copy on the homelab host: {refused}");
    let report = lab.finish_transfers(transfers, Duration::from_secs(120));
    println!("{}", report.summary);
    assert_eq!(report.count("ok"), 20, "{:#?}", report.lines);
    let auth = format!("Authorization: Bearer {token}");
    let metrics = lab.home.run("curl", &["-s", "-H", &auth, &format!("http://{RELAY_IP}:9090/metrics")]);
    let conflicts = sallyport_tests::metric(&metrics, "sallyport_identity_conflicts_total{agent=\"winbox\"}");
    println!("sallyport_identity_conflicts_total{{agent=\"winbox\"}} = {conflicts}");
    assert!(conflicts >= 1.0, "{metrics}");
    let log = lab.process(tunnel.relay()).drain().join("\n");
    assert!(!log.contains("agent disconnected"), "the live agent's session was kept:\n{log}");
    let connected = log.lines().filter(|l| l.contains("agent connected")).count();
    assert_eq!(connected, 1, "one session, the live agent's:\n{log}");
}
