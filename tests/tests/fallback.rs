//! The tunnel where UDP does not get out: across the lab's NAT with UDP dropped at the router,
//! `auto` (the default) brings the tunnel up over TCP on the relay's HTTPS port, real clients
//! (curl, psql, redis-cli, a UDP service) work through it, and once UDP gets through again the
//! tunnel moves back to QUIC with no client connection lost. Also: a tunnel over TCP through
//! delay (the TCP delay proxy) and packet loss (dropped at the router). Needs root.

use std::time::{Duration, Instant};

use sallyport_tests::{
    lab::{Netns, Role, TunnelSpec, QUIC_PORT, RELAY_IP, WIN_IP},
    lab_or_skip,
};

const TRANSFER_PORT: u16 = 9000;
const UDP_PORT: u16 = 5353;

const UDP_ECHO: &str = "
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print('udp echo listening', flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
";

const UDP_CLIENT: &str = "
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
s.connect((sys.argv[1], int(sys.argv[2])))
ok = 0
for n in range(50):
    data = (b'%04d' % n) * (1 + n * 7)
    for attempt in range(10):
        s.send(data)
        try:
            if s.recv(65535) == data:
                ok += 1
                break
        except socket.timeout:
            pass
print(ok)
";

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sallyport_runtime::hex::encode(&sha2::Sha256::digest(bytes))
}

/// curl (SHA-256 of a 3 MiB file), psql, redis-cli and the UDP echo, from the homelab.
fn real_clients(home: &Netns, blob: &[u8]) {
    let relay = RELAY_IP.to_string();
    let out = home.output("curl", &["-sS", "--max-time", "60", &format!("http://{relay}:8080/blob.bin")]);
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha256(&out.stdout), sha256(blob), "curl: the body's SHA-256 differs from the file's");
    let psql =
        ["-h", relay.as_str(), "-p", "5432", "-U", "postgres", "-d", "postgres", "-Atc", "select 6 * 7"];
    let out = home.output("psql", &psql);
    assert!(out.status.success(), "psql: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "psql");
    let out = home.output("redis-cli", &["-h", &relay, "-p", "6379", "set", "sallyport", "tcp"]);
    assert!(text(&out).contains("OK"), "redis-cli set: {}", text(&out));
    let out = home.output("redis-cli", &["-h", &relay, "-p", "6379", "get", "sallyport"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "tcp", "redis-cli get: {}", text(&out));
    let out = home.output("python3", &["-c", UDP_CLIENT, &relay, &UDP_PORT.to_string()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "50", "UDP echo: {}", text(&out));
}

#[test]
fn udp_dropped_at_the_nat_the_tunnel_runs_over_tcp_then_moves_back_to_quic() {
    let mut lab = lab_or_skip!();
    // The NAT router lets no UDP out: QUIC cannot reach the relay.
    lab.router.run("iptables", &["-I", "FORWARD", "1", "-p", "udp", "-j", "DROP"]);
    let www = lab.dir().join("www");
    std::fs::create_dir_all(&www).expect("www");
    let mut blob = vec![0u8; 3 * 1024 * 1024 + 17];
    fastrand::Rng::with_seed(20).fill(&mut blob);
    std::fs::write(www.join("blob.bin"), &blob).expect("blob");
    lab.start_http(8000, &www);
    lab.start_postgres(5432);
    lab.start_redis(6379);
    lab.start_transfer_server(TRANSFER_PORT);
    let echo = lab.spawn_program(
        Role::Win,
        "python3",
        &["-u", "-c", UDP_ECHO, &WIN_IP.to_string(), &UDP_PORT.to_string()],
    );
    lab.process(echo).wait_line("udp echo listening", Duration::from_secs(10));
    // The relay's HTTPS listener sits on the tunnel's port (TCP 4433 here, 443 on the
    // LoadBalancer): the agent's TCP tunnel comes in through it.
    let spec = TunnelSpec::new(&[
        ("http", 8080, 8000),
        ("postgres", 5432, 5432),
        ("redis", 6379, 6379),
        ("transfer", TRANSFER_PORT, TRANSFER_PORT),
    ])
    .relay_extra(&format!(
        "https_listen = \"{RELAY_IP}:{QUIC_PORT}\"\n[services.echo]\nagent = \"winbox\"\nudp = \"{RELAY_IP}:{UDP_PORT}\"\n"
    ))
    .agent_extra(&format!("[services.echo]\ntarget = \"udp://{WIN_IP}:{UDP_PORT}\"\n"));
    let tunnel = lab.start_tunnel(&spec);

    // A fresh agent (nothing remembered): up over TCP within 5 s of its start.
    lab.process(tunnel.agent).kill();
    let started = Instant::now();
    let agent = lab.spawn_binary(Role::Win, "sallyport-agent", &["run", "--config", tunnel.agent_toml()]);
    let up = lab.process(agent).wait_line("tunnel up", Duration::from_secs(10));
    let took = started.elapsed();
    println!("UDP dropped at the NAT: tunnel up after {took:?}: {up}");
    assert!(up.contains("transport=tcp"), "{up}");
    assert!(up.contains("QUIC got no answer"), "{up}");
    assert!(took < Duration::from_secs(5), "up over TCP within 5 s of the agent's start: {took:?}");

    real_clients(&lab.home, &blob);
    println!("over TCP: curl (SHA-256 of 3 MiB), psql, redis-cli and 50 UDP datagrams ok");

    // What a user runs to see why: QUIC fails, TCP works, and what auto does about it.
    let agent_bin = sallyport_tests::process::binary("sallyport-agent").display().to_string();
    let out = lab.win.output(&agent_bin, &["check", "--config", tunnel.agent_toml(), "--connect"]);
    let said = text(&out);
    println!("sallyport-agent check --connect:\n{said}");
    assert!(out.status.success(), "{said}");
    assert!(said.contains("quic fails") && said.contains("tcp ok"), "{said}");
    assert!(said.contains("auto falls back to TCP"), "{said}");

    // Connections in flight while UDP comes back.
    let args = ["--count", "6", "--min", "30000000", "--max", "60000000", "--seed", "4", "--timeout", "180s"];
    let batch = lab.spawn_transfers(RELAY_IP, TRANSFER_PORT, &args);
    lab.process(batch).wait_line("flowing", Duration::from_secs(30));
    lab.router.run("iptables", &["-D", "FORWARD", "-p", "udp", "-j", "DROP"]);
    let healed = Instant::now();
    let moved = lab.process(agent).wait_line("tunnel up", Duration::from_secs(40));
    let back_after = healed.elapsed();
    println!("UDP restored: back on QUIC after {back_after:?}: {moved}");
    assert!(moved.contains("transport=quic"), "{moved}");
    // The default probe period is 15 s; the probe's handshake takes a round trip.
    assert!(back_after < Duration::from_secs(20), "back on QUIC within the probe period: {back_after:?}");
    lab.process(tunnel.relay()).wait_line("the agent moved its tunnel", Duration::from_secs(5));
    let report = lab.finish_transfers(batch, Duration::from_secs(180));
    println!("{}", report.summary);
    assert!(report.violations().is_empty(), "{:#?}", report.violations());
    assert_eq!(report.count("ok"), 6, "no client connection lost in the move: {:#?}", report.lines);
    lab.process(agent).wait_line("previous tunnel drained", Duration::from_secs(30));

    real_clients(&lab.home, &blob);
    println!("back over QUIC: the same clients ok");
}

#[test]
fn a_tunnel_over_tcp_through_delay_and_loss() {
    let mut lab = lab_or_skip!();
    // 1% of the tunnel's TCP packets dropped at the router, both ways, and 10 ms each way from
    // the TCP delay proxy.
    lab.router.run(
        "iptables",
        &[
            "-I",
            "FORWARD",
            "1",
            "-p",
            "tcp",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.01",
            "-j",
            "DROP",
        ],
    );
    lab.start_transfer_server(TRANSFER_PORT);
    let spec = TunnelSpec::new(&[("transfer", TRANSFER_PORT, TRANSFER_PORT)])
        .tcp_delayed(Duration::from_millis(10))
        .agent_extra("transport = \"tcp\"");
    let tunnel = lab.start_tunnel(&spec);
    let started = Instant::now();
    let report = lab.transfers(
        TRANSFER_PORT,
        &["--count", "30", "--max", "8000000", "--seed", "12", "--timeout", "300s"],
    );
    println!("{}", report.summary);
    println!(
        "30 transfers over TCP through 20 ms RTT and 1% loss: {:?}, {:.1} MB/s",
        started.elapsed(),
        report.field("bytes") / report.field("seconds") / 1e6
    );
    assert!(report.violations().is_empty(), "{:#?}", report.violations());
    assert_eq!(report.count("ok"), 30, "{:#?}", report.lines);
    // One tunnel all along: loss and delay did not end it.
    let lines = lab.process(tunnel.agent).drain().to_vec();
    assert!(!lines.iter().any(|l| l.contains("tunnel lost")), "{lines:#?}");
}
