//! End-to-end tests of one TCP service through relay and agent running in this process.

use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use sallyport_proto::{codes, RelayMessage};
use sallyport_tests::{raw::RawAgent, servers, targets, transfer, RunningAgent, RunningRelay, TestPki};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const MIB: u64 = 1024 * 1024;

/// A relay with service `svc` for agent `winbox`, and that agent pointing `svc` at `target`.
async fn tunnel_to(pki: &TestPki, target: SocketAddr) -> (RunningRelay, RunningAgent) {
    sallyport_tests::init_logging();
    let mut relay = RunningRelay::start(pki.relay_config(&[("svc", "winbox")], "")).await;
    let agent = RunningAgent::start(pki.agent_config("winbox", &[relay.quic], &[("svc", target)], ""));
    relay.wait_agent("winbox").await;
    (relay, agent)
}

/// Reads until EOF or error; returns the bytes and how the read ended.
async fn read_all(stream: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return (out, Ok(())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Err(e)),
        }
    }
}

/// Connects, writes `request`, and reads to the end. The relay may reset so fast that the RST is
/// already there when connect() returns: that counts as a reset with no data.
async fn exchange(addr: SocketAddr, request: &[u8]) -> (Vec<u8>, io::Result<()>) {
    let mut client = match TcpStream::connect(addr).await {
        Ok(client) => client,
        Err(e) => return (Vec::new(), Err(e)),
    };
    if let Err(e) = client.write_all(request).await {
        return (Vec::new(), Err(e));
    }
    tokio::time::timeout(Duration::from_secs(5), read_all(&mut client)).await.expect("no hang")
}

fn is_reset(result: &io::Result<()>) -> bool {
    matches!(result, Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_and_sixty_four_mib_each_way_arrive_intact() {
    let pki = TestPki::new();
    let target = targets::transfer_server().await;
    let (relay, agent) = tunnel_to(&pki, target.addr).await;
    let svc = relay.service("svc");
    for (up, down) in [(MIB, MIB), (64 * MIB, 0), (0, 64 * MIB), (64 * MIB, 64 * MIB)] {
        let started = Instant::now();
        let report = transfer::run(svc, up, down, up ^ down).await.expect("transfer intact");
        assert_eq!((report.up, report.down), (up, down));
        println!("transfer up {} MiB, down {} MiB: {:?}", up / MIB, down / MIB, started.elapsed());
    }
    agent.stop().await;
    relay.stop().await;
}

/// On loopback (MTU 65,536) the tunnel's packets grow past Ethernet size: the relay's path MTU
/// discovery can only get there if the agent's endpoint accepts the larger packets. And the QUIC
/// sockets get their 4 MiB kernel buffers wherever the system allows that much.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_grow_past_ethernet_size_where_the_path_allows() {
    use sallyport_runtime::quic::{
        socket::{quic_socket, receive_buffer},
        MAX_UDP_PAYLOAD, UDP_SOCKET_BUFFER,
    };
    let pki = TestPki::new();
    let target = targets::transfer_server().await;
    let (relay, agent) = tunnel_to(&pki, target.addr).await;
    transfer::run(relay.service("svc"), MIB, MIB, 7).await.expect("transfer intact");
    // Discovery runs on its own timers after the handshake; no event announces its end.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut mtu = 0;
    while Instant::now() < deadline {
        mtu = relay.path_mtu("winbox").expect("agent connected");
        if mtu > 1500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("path MTU toward the agent on loopback: {mtu} bytes (bound {MAX_UDP_PAYLOAD})");
    assert!(mtu > 1500 && mtu <= MAX_UDP_PAYLOAD, "path MTU {mtu}");

    let granted = receive_buffer(&quic_socket("127.0.0.1:0".parse().expect("addr")).expect("socket"));
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if rmem_max >= UDP_SOCKET_BUFFER {
        assert!(granted >= UDP_SOCKET_BUFFER, "receive buffer {granted} with rmem_max {rmem_max}");
    } else {
        println!("net.core.rmem_max is {rmem_max}: the socket buffer part is not checked here");
    }
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections() {
    let pki = TestPki::new();
    let target = targets::transfer_server().await;
    let (relay, agent) = tunnel_to(&pki, target.addr).await;
    let svc = relay.service("svc");
    let started = Instant::now();
    let transfers: Vec<_> = (0..200u64)
        .map(|i| tokio::spawn(transfer::run(svc, 16 * 1024 + i * 331, 32 * 1024 + i * 97, i)))
        .collect();
    let mut ok = 0;
    for t in transfers {
        t.await.expect("task").expect("transfer intact");
        ok += 1;
    }
    assert_eq!(ok, 200);
    println!("200 concurrent transfers in {:?}", started.elapsed());
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_client_still_receives_the_reply() {
    let pki = TestPki::new();
    let target = targets::counts_then_replies().await;
    let (relay, agent) = tunnel_to(&pki, target.addr).await;
    let mut client = TcpStream::connect(relay.service("svc")).await.expect("connect");
    client.write_all(&[1u8; 5000]).await.expect("write");
    client.shutdown().await.expect("half-close");
    let (reply, end) = read_all(&mut client).await;
    end.expect("clean EOF after the reply");
    assert_eq!(reply, b"read 5000 bytes");
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_that_speaks_first_greets_the_client() {
    let pki = TestPki::new();
    let target = targets::greeter(b"220 sallyport-test ESMTP ready\r\n").await;
    let (relay, agent) = tunnel_to(&pki, target.addr).await;
    let mut client = TcpStream::connect(relay.service("svc")).await.expect("connect");
    let mut greeting = [0u8; 32];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut greeting))
        .await
        .expect("greeting arrives without the client sending anything")
        .expect("read");
    assert_eq!(&greeting, b"220 sallyport-test ESMTP ready\r\n");
    client.write_all(b"EHLO x\r\n").await.expect("write");
    let mut echo = [0u8; 8];
    client.read_exact(&mut echo).await.expect("echo");
    assert_eq!(&echo, b"EHLO x\r\n");
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_that_refuses_gives_the_client_a_reset() {
    let pki = TestPki::new();
    let (relay, agent) = tunnel_to(&pki, targets::closed_port().await).await;
    let (data, end) = exchange(relay.service("svc"), b"").await;
    assert!(data.is_empty());
    assert!(is_reset(&end), "expected a reset, got {end:?}");
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_killed_mid_transfer_gives_a_reset_not_eof() {
    let pki = TestPki::new();
    let target = targets::dies_mid_transfer(256 * 1024).await;
    let (relay, agent) = tunnel_to(&pki, target.addr).await;
    for _ in 0..5 {
        let (data, end) = exchange(relay.service("svc"), b"a request the target never reads").await;
        assert!(is_reset(&end), "after {} bytes: expected a reset, got {end:?}", data.len());
    }
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_of_an_absent_agent_is_refused_within_a_second() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let relay = RunningRelay::start(pki.relay_config(&[("svc", "winbox")], "")).await;
    let started = Instant::now();
    let (data, end) = exchange(relay.service("svc"), b"").await;
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    assert!(data.is_empty());
    assert!(is_reset(&end), "expected a reset, got {end:?}");
    println!("absent agent: client reset after {:?}", started.elapsed());
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_after_a_relay_restart() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let target = targets::transfer_server().await;
    // Fixed addresses, as a pod restarted behind the same LoadBalancer IP has. They come from
    // below the ephemeral range: a port of that range may be taken by another test's outgoing
    // connection while the relay is down.
    let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let mut config = pki.relay_config(&[("svc", "winbox")], "");
    config.relay.listen = at(servers::free_port());
    if let Some(service) = config.services.get_mut("svc") {
        service.listen = sallyport_relay::config::Listen::Tcp(at(servers::free_port()));
    }
    let mut relay = RunningRelay::start(config.clone()).await;
    let agent = RunningAgent::start(pki.agent_config("winbox", &[relay.quic], &[("svc", target.addr)], ""));
    relay.wait_agent("winbox").await;
    let svc = relay.service("svc");
    transfer::run(svc, 1000, 1000, 1).await.expect("before restart");
    relay.stop().await;

    let mut relay = RunningRelay::start(config).await;
    let back = Instant::now();
    relay.wait_agent("winbox").await;
    transfer::run(svc, 1000, 1000, 2).await.expect("after restart");
    let took = back.elapsed();
    println!("relay back -> agent reconnected and a connection worked in {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    agent.stop().await;
    relay.stop().await;
}

/// An operator's command sent the moment an agent is registered never comes between `Welcome` and
/// `Replicas`, which the agent reads as its handshake: the relay writes both before the agent's
/// session (and so its command queue) exists. Each round connects a raw agent and fires a command
/// as soon as the relay lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_at_registration_never_cuts_into_the_handshake() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), "order-token-0123456789").expect("token file");
    let mut relay = RunningRelay::start(pki.relay_config(
        &[("svc", "raw")],
        "admin_token_file = \"admin.token\"\nrevocations_file = \"revoked.toml\"",
    ))
    .await;
    let admin = relay.admin;
    for round in 0..20 {
        let previous = relay.session_id("raw");
        let mut agents = relay.agents();
        // Fires the command from another task the moment a new session of "raw" is listed.
        let command = tokio::spawn(async move {
            let _ = agents.wait_for(|a| matches!(a.get("raw"), Some(s) if Some(s.id) != previous)).await;
            let _ = sallyport_relay::cli::admin_client::request(
                admin,
                "POST",
                "/agents/raw/containers/web/status",
                Some("order-token-0123456789"),
            )
            .await;
        });
        let mut raw =
            RawAgent::connect_current(&pki, "raw", &pki, relay.quic, &["svc"]).await.expect("connects");
        assert!(matches!(raw.answer, RelayMessage::Welcome(_)), "round {round}: {:?}", raw.answer);
        let second = raw.next().await;
        assert!(
            matches!(second, Some(RelayMessage::Replicas(_))),
            "round {round}: after Welcome came {second:?}"
        );
        let mut command_seen = false;
        while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(5), raw.next()).await {
            if matches!(message, RelayMessage::Command(_)) {
                command_seen = true;
                break;
            }
        }
        assert!(command_seen, "round {round}: the command reached the agent after the handshake");
        command.abort();
        raw.connection.close(quinn::VarInt::from_u32(0), b"next round");
        relay.wait_agent_gone("raw").await;
    }
    relay.stop().await;
}

/// A raw agent of `name` from `identity_pki` offering no service: the relay's answer, or why none.
async fn raw_agent(
    identity_pki: &TestPki,
    name: &str,
    trust: &TestPki,
    relay: SocketAddr,
) -> Result<(quinn::Connection, quinn::SendStream, RelayMessage), String> {
    let raw = RawAgent::connect(identity_pki, name, trust, relay, &[]).await?;
    Ok((raw.connection, raw.control, raw.answer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let target = targets::transfer_server().await;
    let (mut relay, agent) = tunnel_to(&pki, target.addr).await;

    // An agent whose certificate comes from another CA, claiming a name the relay knows.
    let err = raw_agent(&other, "winbox", &pki, relay.quic).await.expect_err("foreign certificate refused");
    println!("foreign client certificate: {err}");
    assert!(err.contains("handshake") || err.contains("certificate"), "{err}");

    // A relay whose certificate the agent's CA did not sign is refused by the agent.
    let err = raw_agent(&pki, "winbox", &other, relay.quic).await.expect_err("untrusted relay refused");
    println!("untrusted relay certificate: {err}");
    assert!(err.contains("certificate") || err.contains("handshake"), "{err}");

    // The genuine agent is still the one connected and working.
    relay.wait_agent("winbox").await;
    transfer::run(relay.service("svc"), 4096, 4096, 3).await.expect("genuine agent still works");
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_control_frame_closes_only_that_agent() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let target = targets::transfer_server().await;
    let mut relay =
        RunningRelay::start(pki.relay_config(&[("svc", "winbox"), ("other", "intruder")], "")).await;
    let agent = RunningAgent::start(pki.agent_config("winbox", &[relay.quic], &[("svc", target.addr)], ""));
    relay.wait_agent("winbox").await;

    for garbage in [vec![0, 0, 0, 3, 0xff, 0xff, 0xff], u32::MAX.to_be_bytes().to_vec()] {
        let (connection, mut control, answer) =
            raw_agent(&pki, "intruder", &pki, relay.quic).await.expect("intruder admitted");
        assert!(matches!(answer, RelayMessage::Welcome(_)), "{answer:?}");
        relay.wait_agent("intruder").await;
        control.write_all(&garbage).await.expect("write garbage");
        let reason =
            tokio::time::timeout(Duration::from_secs(5), connection.closed()).await.expect("closed by relay");
        println!("garbage {:02x?}: relay closed that connection: {reason}", &garbage[..4]);
        match &reason {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, quinn::VarInt::from_u32(codes::close::PROTOCOL_ERROR));
            }
            other => panic!("expected a protocol-error close, got {other:?}"),
        }
        relay.wait_agent_gone("intruder").await;
        assert_eq!(relay.connected(), vec!["winbox".to_owned()]);
        transfer::run(relay.service("svc"), 10_000, 10_000, 4).await.expect("other agent unaffected");
    }
    agent.stop().await;
    relay.stop().await;
}

/// `GET path` on the admin server; returns the status code.
async fn admin_status(admin: SocketAddr, path: &str) -> u16 {
    let mut stream = TcpStream::connect(admin).await.expect("admin connect");
    let request = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("admin write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("admin read");
    answer.split_whitespace().nth(1).and_then(|code| code.parse().ok()).expect("status code")
}

async fn echo_round_trip(client: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    client.write_all(data).await?;
    let mut back = vec![0u8; data.len()];
    client.read_exact(&mut back).await?;
    assert_eq!(back, data);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_connections_and_refuses_new_ones() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let target = targets::greeter(b"hi\n").await;
    let mut relay =
        RunningRelay::start(pki.relay_config(&[("svc", "winbox")], "drain_grace = \"30s\"")).await;
    let agent = RunningAgent::start(pki.agent_config("winbox", &[relay.quic], &[("svc", target.addr)], ""));
    relay.wait_agent("winbox").await;
    let (svc, admin) = (relay.service("svc"), relay.admin);
    assert_eq!(admin_status(admin, "/livez").await, 200);
    assert_eq!(admin_status(admin, "/readyz").await, 200);

    let mut in_flight = TcpStream::connect(svc).await.expect("connect");
    let mut hi = [0u8; 3];
    in_flight.read_exact(&mut hi).await.expect("greeting");
    echo_round_trip(&mut in_flight, b"before the drain").await.expect("echo");

    relay.begin_shutdown();
    let deadline = Instant::now() + Duration::from_secs(5);
    while admin_status(admin, "/readyz").await != 503 {
        assert!(Instant::now() < deadline, "/readyz still 200 while draining");
        tokio::task::yield_now().await;
    }
    // New connections are refused once the listener is closed (or reset if one raced into it).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, end) = exchange(svc, b"").await;
        match end {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
            other => assert!(
                is_reset(&other) || Instant::now() < deadline,
                "new connection during drain: {other:?}"
            ),
        }
    }
    // The connection that was in flight keeps working and ends cleanly.
    echo_round_trip(&mut in_flight, b"during the drain").await.expect("in-flight connection still works");
    in_flight.shutdown().await.expect("half-close");
    let (rest, end) = read_all(&mut in_flight).await;
    assert!(rest.is_empty());
    end.expect("clean close of the in-flight connection");
    let stopping = Instant::now();
    relay.stop().await;
    println!("drain: relay stopped {:?} after its last connection ended", stopping.elapsed());
    assert!(stopping.elapsed() < Duration::from_secs(10), "drain waited for nothing");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_resets_what_is_left_when_the_grace_period_ends() {
    let pki = TestPki::new();
    let target = targets::greeter(b"hi\n").await;
    let mut relay =
        RunningRelay::start(pki.relay_config(&[("svc", "winbox")], "drain_grace = \"500ms\"")).await;
    let agent = RunningAgent::start(pki.agent_config("winbox", &[relay.quic], &[("svc", target.addr)], ""));
    relay.wait_agent("winbox").await;
    let mut idle = TcpStream::connect(relay.service("svc")).await.expect("connect");
    let mut hi = [0u8; 3];
    idle.read_exact(&mut hi).await.expect("greeting");
    let started = Instant::now();
    relay.begin_shutdown();
    let (_, end) = tokio::time::timeout(Duration::from_secs(10), read_all(&mut idle)).await.expect("no hang");
    println!("grace over: idle client reset after {:?}", started.elapsed());
    assert!(is_reset(&end), "a connection cut by the end of the grace period must be reset, got {end:?}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    relay.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_unknown_to_the_relay_is_refused_with_a_reason() {
    let pki = TestPki::new();
    let relay = RunningRelay::start(pki.relay_config(&[("svc", "winbox")], "")).await;
    let target = targets::closed_port().await;
    let mut agent = RunningAgent::start(pki.agent_config("stranger", &[relay.quic], &[("svc", target)], ""));
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        agent
            .status
            .wait_for(|s| s.values().any(|t| matches!(t, sallyport_agent::TunnelStatus::Retrying { .. }))),
    )
    .await
    .expect("agent reports the refusal")
    .expect("agent running")
    .clone();
    let text = format!("{status:?}");
    println!("{text}");
    assert!(
        text.contains("refused this agent") && text.contains("\\\"stranger\\\" is not allowed"),
        "{text}"
    );
    assert!(relay.connected().is_empty());
    agent.stop().await;
    relay.stop().await;
}

/// An agent holds as many connections to the relay as `agent.lanes` says (its tunnel and lanes
/// beside it), within 2 s of the tunnel coming up, and the relay spreads data streams over all of
/// them in turn; every transfer arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_carry_data_streams_beside_the_tunnel() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let target = targets::transfer_server().await;
    let mut relay = RunningRelay::start(pki.relay_config(&[("svc", "winbox")], "")).await;
    let agent =
        RunningAgent::start(pki.agent_config("winbox", &[relay.quic], &[("svc", target.addr)], "lanes = 3"));
    relay.wait_agent("winbox").await;
    let took = relay.wait_connections("winbox", 3).await;
    println!("3 connections {took:?} after the tunnel was up");
    assert!(took < Duration::from_secs(2), "lanes took {took:?}");

    let svc = relay.service("svc");
    let mut transfers = tokio::task::JoinSet::new();
    for seed in 0..30 {
        transfers.spawn(async move { transfer::run(svc, MIB, MIB, seed).await });
    }
    while let Some(done) = transfers.join_next().await {
        let report = done.expect("task").expect("transfer intact");
        assert_eq!((report.up, report.down), (MIB, MIB));
    }
    let spread = relay.streams_per_connection("winbox");
    println!("data streams per connection: {spread:?}");
    assert_eq!(spread, vec![10, 10, 10]);
    agent.stop().await;
    relay.stop().await;
}

/// The relay caps an agent's connections at `relay.lanes`: an agent that wants more gets that
/// many, and with `lanes = 1` on either side the tunnel carries everything alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_caps_the_lanes_an_agent_opens() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let target = targets::transfer_server().await;
    for (relay_lanes, agent_lanes, expected) in [(2, 4, 2), (1, 4, 1), (8, 1, 1)] {
        let mut relay =
            RunningRelay::start(pki.relay_config(&[("svc", "winbox")], &format!("lanes = {relay_lanes}")))
                .await;
        let agent = RunningAgent::start(pki.agent_config(
            "winbox",
            &[relay.quic],
            &[("svc", target.addr)],
            &format!("lanes = {agent_lanes}"),
        ));
        relay.wait_agent("winbox").await;
        relay.wait_connections("winbox", expected).await;
        // Whatever would come comes within a few round trips on loopback.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(relay.connections("winbox"), Some(expected), "relay {relay_lanes}, agent {agent_lanes}");
        transfer::run(relay.service("svc"), MIB, MIB, 5).await.expect("transfer intact");
        agent.stop().await;
        relay.stop().await;
    }
}
