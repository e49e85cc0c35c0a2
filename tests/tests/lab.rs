//! The tunnel across a real NAT (network namespaces, iptables MASQUERADE), through loss and delay,
//! through faults, with real clients. Needs root; skips with a message elsewhere, fails in CI.

use std::time::{Duration, Instant};

use sallyport_tests::{
    lab::{Lab, LabTunnel, Netns, TunnelSpec, RELAY_IP},
    lab_or_skip,
};

const TRANSFER_PORT: u16 = 9000;

fn transfer_spec() -> TunnelSpec {
    TunnelSpec::new(&[("transfer", TRANSFER_PORT, TRANSFER_PORT)])
}

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

/// Starts the transfer server and a tunnel from `spec` (default timers), then a background batch of
/// `count` transfers of `min..=max` bytes; returns once bytes are flowing.
fn transfers_in_flight(
    lab: &mut Lab,
    spec: TunnelSpec,
    count: &str,
    min: &str,
    max: &str,
) -> (LabTunnel, usize) {
    lab.start_transfer_server(TRANSFER_PORT);
    let tunnel = lab.start_tunnel(&spec);
    let args = ["--count", count, "--min", min, "--max", max, "--timeout", "60s"];
    let batch = lab.spawn_transfers(RELAY_IP, TRANSFER_PORT, &args);
    lab.process(batch).wait_line("flowing", Duration::from_secs(30));
    (tunnel, batch)
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
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
    assert!(out.status.success(), "psql: {}", text(&out));
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(answer.starts_with("42|"), "psql answered {answer:?}");
    println!("psql: select 6 * 7 -> {answer}");

    // pgbench: every transaction of 8 clients x 200 is processed.
    let pg = ["-h", relay.as_str(), "-p", "5432", "-U", "postgres"];
    let out = lab.home.output("pgbench", &[&pg[..], &["-i", "-q", "postgres"]].concat());
    assert!(out.status.success(), "pgbench -i: {}", text(&out));
    let out =
        lab.home.output("pgbench", &[&pg[..], &["-c", "8", "-j", "2", "-t", "200", "postgres"]].concat());
    let report = text(&out);
    assert!(out.status.success(), "pgbench: {report}");
    assert!(report.contains("number of transactions actually processed: 1600/1600"), "{report}");
    let tps = report.lines().find(|l| l.starts_with("tps")).unwrap_or_default();
    println!("pgbench -c 8 -t 200: 1600/1600 transactions; {tps}");

    // redis-benchmark: every test reports a rate, no errors.
    let out = lab.home.output("redis-benchmark", &["-h", &relay, "-p", "6379", "-q", "-n", "20000"]);
    let report = text(&out).replace('\r', "\n");
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
    assert!(out.status.success(), "iperf3: {}", text(&out));
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
    let (mut tunnel, batch) = transfers_in_flight(&mut lab, transfer_spec(), "20", "8000000", "32000000");
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
    let (mut tunnel, batch) = transfers_in_flight(&mut lab, transfer_spec(), "10", "16000000", "32000000");
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
    let (tunnel, batch) = transfers_in_flight(&mut lab, transfer_spec(), "10", "16000000", "32000000");
    let conntrack_before = text(&lab.router.output("conntrack", &["-L", "-p", "udp"]));
    lab.remap_nat();
    let report = lab.finish_transfers(batch, Duration::from_secs(90));
    let conntrack_after = text(&lab.router.output("conntrack", &["-L", "-p", "udp"]));
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
    let (tunnel, batch) =
        transfers_in_flight(&mut lab, transfer_spec().two_relays(), "10", "4000000", "16000000");
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

const REDIS_PORT: u16 = 6380;
const WEB_PORT: u16 = 8000;
const HTTP_LISTEN_PORT: u16 = 8080;

/// Redis as a TCP service and a web server routed by Host on the relay's HTTP listener, with the
/// timers `init` and `agent add` write (none: the defaults).
fn redis_and_web(lab: &mut Lab) -> LabTunnel {
    use sallyport_tests::lab::WIN_IP;
    lab.start_redis(REDIS_PORT);
    let site = lab.dir().join("site");
    std::fs::create_dir_all(&site).expect("site dir");
    std::fs::write(site.join("index.html"), "hello from the windows side\n").expect("index.html");
    lab.start_http(WEB_PORT, &site);
    lab.start_tunnel(
        &TunnelSpec::new(&[("redis", REDIS_PORT, REDIS_PORT)])
            .relay_extra(&format!(
                "http_listen = \"{RELAY_IP}:{HTTP_LISTEN_PORT}\"\n\
                 [services.web]\nagent = \"winbox\"\nhosts = [\"web.lab\"]"
            ))
            .agent_extra(&format!("[services.web]\ntarget = \"tcp://{WIN_IP}:{WEB_PORT}\"")),
    )
}

/// `redis-cli PING` from the homelab: whether it answered, and how long it took.
fn redis_ping(home: &Netns) -> (bool, Duration) {
    let started = Instant::now();
    let out = home.output(
        "timeout",
        &["10", "redis-cli", "-h", &RELAY_IP.to_string(), "-p", &REDIS_PORT.to_string(), "PING"],
    );
    (out.status.success() && String::from_utf8_lossy(&out.stdout).contains("PONG"), started.elapsed())
}

/// `curl` of the web service by its host name: the status, the body, and how long it took.
fn curl_web(home: &Netns) -> (String, String, Duration) {
    let started = Instant::now();
    let out = home.output(
        "curl",
        &[
            "-s",
            "--max-time",
            "10",
            "-H",
            "Host: web.lab",
            "-w",
            "\n%{http_code}",
            &format!("http://{RELAY_IP}:{HTTP_LISTEN_PORT}/"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_owned(), body.to_owned(), started.elapsed())
}

/// The agent's host dies (`kill -9`: a blue screen, a power cut). Clients that arrive at any
/// moment afterwards, redis-cli and curl, are refused within 2 s: redis-cli sees its connection
/// reset, curl gets a 503 naming the reason. Default timers throughout.
#[test]
fn clients_of_a_dead_agent_are_refused_within_two_seconds() {
    let mut lab = lab_or_skip!();
    let tunnel = redis_and_web(&mut lab);
    assert!(redis_ping(&lab.home).0, "redis through the tunnel");
    let (status, body, _) = curl_web(&lab.home);
    assert_eq!((status.as_str(), body.trim()), ("200", "hello from the windows side"));

    lab.process(tunnel.agent).kill();
    let killed = Instant::now();
    let home = &lab.home;
    // Clients arriving every 100 ms over the next two seconds, each timed on its own.
    let (mut redis, mut web) = (Vec::new(), Vec::new());
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for i in 0..20u64 {
            handles.push(scope.spawn(move || {
                std::thread::sleep(
                    (killed + Duration::from_millis(100 * i)).saturating_duration_since(Instant::now()),
                );
                if i % 2 == 0 {
                    let (answered, took) = redis_ping(home);
                    (true, answered.to_string(), String::new(), took)
                } else {
                    let (status, body, took) = curl_web(home);
                    (false, status, body, took)
                }
            }));
        }
        for handle in handles {
            let (is_redis, outcome, body, took) = handle.join().expect("client thread");
            if is_redis {
                redis.push((outcome, took));
            } else {
                web.push((outcome, body, took));
            }
        }
    });
    let slowest = |times: &mut Vec<Duration>| {
        times.sort();
        times.last().copied().unwrap_or_default()
    };
    let mut redis_times: Vec<Duration> = redis.iter().map(|r| r.1).collect();
    let mut web_times: Vec<Duration> = web.iter().map(|w| w.2).collect();
    println!(
        "agent killed: 10 redis-cli PINGs refused, slowest after {:?}, median {:?}; 10 curls answered {:?}, slowest \
         after {:?}, median {:?}; e.g. {:?}",
        slowest(&mut redis_times),
        redis_times[redis_times.len() / 2],
        web.iter().map(|w| w.0.as_str()).collect::<Vec<_>>(),
        slowest(&mut web_times),
        web_times[web_times.len() / 2],
        web.first().map(|w| w.1.trim()),
    );
    for (answered, took) in &redis {
        assert_eq!(answered, "false", "redis-cli must not get an answer from a dead agent");
        assert!(*took < Duration::from_secs(2), "a redis client waited {took:?}");
    }
    for (status, body, took) in &web {
        assert_eq!(status, "503", "{body}");
        assert!(body.contains("winbox"), "the page names the agent: {body}");
        assert!(*took < Duration::from_secs(2), "a web client waited {took:?}");
    }
}

/// The relay is killed and restarted with the same key, after 4 s (a pod rescheduled) and at once
/// (a crash the supervisor restarts within milliseconds). Default timers. After 4 s the agent has
/// noticed and redials every 250 ms: it is back within 1 s of the relay being ready. After an
/// instant restart it learns of it from the stateless reset that answers its next keep-alive: up
/// to one keep-alive interval (1 s) and a handshake later.
#[test]
fn the_agent_is_back_within_a_second_of_a_restarted_relay() {
    let mut lab = lab_or_skip!();
    let mut tunnel = redis_and_web(&mut lab);
    let mut backs = Vec::new();
    for (round, down) in [4u64, 4, 0, 0, 0].into_iter().enumerate() {
        // Restarts come at any point of the keep-alive cycle.
        std::thread::sleep(Duration::from_millis(300 * round as u64));
        lab.process(tunnel.relay()).kill();
        let killed = Instant::now();
        std::thread::sleep(Duration::from_secs(down));
        tunnel.relays[0] = lab.start_relay(&tunnel, 0);
        let ready = Instant::now();
        let restart = ready - killed;
        lab.process(tunnel.agent).wait_line("tunnel up", Duration::from_secs(30));
        let back = ready.elapsed();
        let (answered, _) = redis_ping(&lab.home);
        assert!(answered, "redis answers once the agent is back");
        println!("relay down {down} s (ready {restart:?} after the kill): the agent was back {back:?} after the relay was ready");
        backs.push((down, back));
    }
    for (down, back) in backs {
        let bound = if down > 0 { Duration::from_secs(1) } else { Duration::from_millis(1250) };
        assert!(back < bound, "relay down {down} s: the agent was back after {back:?}");
    }
}

/// What an idle tunnel costs: packets and bytes each way across the router over 30 s.
#[test]
fn an_idle_tunnel_sends_one_packet_a_second_each_way() {
    let mut lab = lab_or_skip!();
    let _tunnel = lab.start_tunnel(&transfer_spec());
    std::thread::sleep(Duration::from_secs(2));
    let port = sallyport_tests::lab::QUIC_PORT.to_string();
    for direction in ["--dport", "--sport"] {
        lab.router.run("iptables", &["-I", "FORWARD", "1", "-p", "udp", direction, &port]);
    }
    let counters = |lab: &Lab| -> Vec<(u64, u64)> {
        let listing = lab.router.run("iptables", &["-L", "FORWARD", "-v", "-x", "-n"]);
        listing
            .lines()
            .filter(|l| l.contains(&format!("dpt:{port}")) || l.contains(&format!("spt:{port}")))
            .filter(|l| !l.contains("ACCEPT") && !l.contains("DROP"))
            .map(|l| {
                let mut fields = l.split_whitespace();
                let packets = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
                let bytes = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
                (packets, bytes)
            })
            .collect()
    };
    let before = counters(&lab);
    const SECONDS: u64 = 30;
    std::thread::sleep(Duration::from_secs(SECONDS));
    let after = counters(&lab);
    assert_eq!(before.len(), 2, "two counting rules: {before:?}");
    // The first rule inserted last: agent -> relay is the second.
    let (to_agent, to_relay) = (
        (after[0].0 - before[0].0, after[0].1 - before[0].1),
        (after[1].0 - before[1].0, after[1].1 - before[1].1),
    );
    let per_second = |n: u64| n as f64 / SECONDS as f64;
    let day_mb = (to_agent.1 + to_relay.1) as f64 / SECONDS as f64 * 86_400.0 / 1e6;
    println!(
        "idle tunnel over {SECONDS} s: agent -> relay {:.2} packets/s ({} bytes), relay -> agent {:.2} packets/s ({} \
         bytes): {day_mb:.1} MB a day both ways (IP and UDP headers included)",
        per_second(to_relay.0),
        to_relay.1,
        per_second(to_agent.0),
        to_agent.1,
    );
    assert!(per_second(to_relay.0) <= 1.05 && per_second(to_agent.0) <= 1.05, "{to_relay:?} {to_agent:?}");
    assert!(per_second(to_relay.0) >= 0.5 && per_second(to_agent.0) >= 0.5, "keep-alives flow both ways");
}

/// No false alarm: an idle tunnel through 20 ms of RTT and 2% loss each way (the impairment proxy)
/// is never declared dead by either side. `FALSE_ALARM_SECONDS` sets the length (60 s here;
/// `scripts/soak.sh` runs 10 minutes).
#[test]
fn no_false_alarm_through_twenty_ms_and_two_percent_loss() {
    let seconds: u64 = std::env::var("FALSE_ALARM_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let mut lab = lab_or_skip!();
    lab.start_transfer_server(TRANSFER_PORT);
    let tunnel =
        lab.start_tunnel(&transfer_spec().impaired(&["--delay", "10ms", "--loss", "0.02", "--seed", "5"]));
    let started = Instant::now();
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        // Mostly idle (keep-alives only), with a small request now and then.
        std::thread::sleep(
            Duration::from_secs(10).min(Duration::from_secs(seconds).saturating_sub(started.elapsed())),
        );
        round += 1;
        let report =
            lab.transfers(TRANSFER_PORT, &["--count", "1", "--max", "10000", "--seed", &round.to_string()]);
        assert_eq!(report.count("ok"), 1, "{:#?}", report.lines);
    }
    let agent_log = lab.process(tunnel.agent).drain().join("\n");
    let relay_log = lab.process(tunnel.relay()).drain().join("\n");
    let lost = agent_log.matches("tunnel lost").count();
    let gone = relay_log.matches("agent disconnected").count();
    println!("{seconds} s through 20 ms RTT and 2% loss: {lost} tunnels lost (agent), {gone} agents disconnected (relay)");
    assert_eq!((lost, gone), (0, 0), "agent log:\n{agent_log}\nrelay log:\n{relay_log}");
}

/// A reload while 20 transfers run: a service added and a cap changed in relay.toml, then SIGHUP.
/// Every transfer completes SHA-256-equal, none is reset, the tunnel stays up.
#[test]
fn a_reload_during_twenty_transfers_drops_nothing() {
    let mut lab = lab_or_skip!();
    let (tunnel, batch) = transfers_in_flight(&mut lab, transfer_spec(), "20", "4000000", "16000000");
    let path = tunnel.relay_toml(0).to_owned();
    let text = std::fs::read_to_string(&path).expect("relay.toml");
    let changed = text.replacen("[relay]\n", "[relay]\nmax_connections_per_ip = 1000\n", 1)
        + &format!("[services.extra]\nagent = \"winbox\"\nlisten = \"{RELAY_IP}:9100\"\n");
    std::fs::write(&path, changed).expect("relay.toml");
    let pid = lab.process(tunnel.relay()).child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    let applied = lab.process(tunnel.relay()).wait_line("is live (was", Duration::from_secs(10));
    let report = lab.finish_transfers(batch, Duration::from_secs(120));
    println!("reload during 20 transfers: {}\n{applied}", report.summary);
    assert!(applied.contains("added [\"extra\"]"), "{applied}");
    assert!(report.violations().is_empty(), "{:#?}", report.violations());
    assert_eq!(report.count("ok"), 20, "{:#?}", report.lines);
    let log = lab.process(tunnel.relay()).drain().join("\n");
    assert!(!log.contains("agent disconnected"), "the tunnel stayed up:\n{log}");
}

/// Segmentation offload across the NAT at Ethernet MTU, from the relay's own counters: during bulk
/// transfers both ways, one send call of the relay's QUIC socket carries several 1,452-byte
/// packets (GSO), and the counters say how many datagrams each receive call returned (GRO).
#[test]
fn bulk_across_the_nat_is_sent_several_packets_a_system_call() {
    let mut lab = lab_or_skip!();
    let token = "lab-admin-token-0123456789abcdef";
    let token_file = lab.dir().join("admin.token");
    std::fs::write(&token_file, token).expect("token");
    lab.start_transfer_server(TRANSFER_PORT);
    let spec = transfer_spec().relay_extra(&format!(
        "admin_token_file = \"{}\"\nrevocations_file = \"{}\"",
        token_file.display(),
        lab.dir().join("revoked.toml").display()
    ));
    let _tunnel = lab.start_tunnel(&spec);
    let scrape = |lab: &Lab| {
        let auth = format!("Authorization: Bearer {token}");
        let out = lab.home.run("curl", &["-s", "-H", &auth, &format!("http://{RELAY_IP}:9090/metrics")]);
        let get = |name: &str, direction: &str| {
            sallyport_tests::metric(
                &out,
                &format!("sallyport_quic_udp_{name}_total{{direction=\"{direction}\"}}"),
            )
        };
        let gso = sallyport_tests::metric(&out, "sallyport_quic_udp_offload_segments{kind=\"gso\"}");
        let gro = sallyport_tests::metric(&out, "sallyport_quic_udp_offload_segments{kind=\"gro\"}");
        (
            get("datagrams", "sent"),
            get("calls", "sent"),
            get("datagrams", "received"),
            get("calls", "received"),
            gso,
            gro,
        )
    };
    let before = scrape(&lab);
    let report = lab.transfers(TRANSFER_PORT, &["--count", "4", "--min", "16000000", "--max", "16000000"]);
    assert_eq!(report.count("ok"), 4, "{:#?}", report.lines);
    let after = scrape(&lab);
    let (sent, send_calls) = (after.0 - before.0, after.1 - before.1);
    let (received, receive_calls) = (after.2 - before.2, after.3 - before.3);
    println!(
        "relay during 4 x 16 MB each way: sent {sent} datagrams in {send_calls} calls ({:.2} a call, GSO up to {}), \
         received {received} in {receive_calls} calls ({:.2} a call, GRO up to {})",
        sent / send_calls,
        after.4,
        received / receive_calls,
        after.5
    );
    // 64 MB down cannot take fewer than 44,000 packets of 1,452 bytes.
    assert!(sent >= 44_000.0 && received >= 44_000.0, "{sent} {received}");
    assert!(after.4 > 1.0, "the relay's socket has no GSO on this kernel");
    assert!(sent / send_calls >= 2.0, "GSO is not batching: {sent} datagrams in {send_calls} calls");
    assert!(received >= receive_calls, "{received} datagrams in {receive_calls} receive calls");
}
