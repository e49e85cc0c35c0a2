//! Attacks on the relay's trust boundaries, each while legitimate traffic keeps flowing: the
//! attack fails, is counted, and nobody else notices.

use std::{net::SocketAddr, time::Duration};

use sallyport_proto::{datagram::Datagram, RelayMessage};
use sallyport_tests::{
    raw::{key_and_csr, RawAgent},
    RunningRelay, TestPki,
};

/// token, a revocations file, `extra` in `[relay]` and service `svc` of agent `winbox`.
fn relay_toml_with_admin_token(pki: &TestPki, file: &str, extra: &str) -> std::path::PathBuf {
    let path = pki.dir().join(file);
    std::fs::write(
        &path,
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\n\
             key = \"relay.key\"\nadmin_token_file = \"admin.token\"\nrevocations_file = \"revoked.toml\"\n{extra}\
             [services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .expect("relay.toml");
    path
}

use sallyport_tests::metric;

fn encode(datagram: &Datagram<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(datagram.encoded_len());
    datagram.encode(&mut out);
    out
}

/// A compromised agent that learned the id of another agent's UDP flow sends datagrams for it:
/// they never reach that flow's client, they are counted, and the real answers still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_answer_another_agents_udp_flows() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        "",
        "[services.dns]\nagent = \"winbox\"\nudp = \"127.0.0.1:0\"\n\
         [services.other]\nagent = \"intruder\"\nudp = \"127.0.0.1:0\"\n",
    ))
    .await;
    let owner = RawAgent::connect(&pki, "winbox", &pki, relay.quic, &["dns"]).await.expect("owner admitted");
    assert!(matches!(owner.answer, RelayMessage::Welcome(_)), "{:?}", owner.answer);
    let intruder =
        RawAgent::connect(&pki, "intruder", &pki, relay.quic, &["other"]).await.expect("intruder admitted");
    relay.wait_agent("winbox").await;
    relay.wait_agent("intruder").await;

    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("client socket");
    let dns: SocketAddr = relay.service("dns");
    let mut flow_ids = Vec::new();
    for round in 0..20u32 {
        client.send_to(format!("query {round}").as_bytes(), dns).await.expect("query");
        // The owner learns the flow from the relay's datagram, as any agent does.
        let opened = tokio::time::timeout(Duration::from_secs(5), owner.connection.read_datagram())
            .await
            .expect("datagram to the owner in time")
            .expect("owner's tunnel up");
        let flow = match Datagram::decode(&opened).expect("valid datagram") {
            Datagram::Open { flow, service, .. } => {
                assert_eq!(service, "dns");
                flow
            }
            Datagram::Data { flow, .. } => flow,
            Datagram::Unknown { .. } => panic!("the relay does not send Unknown"),
        };
        flow_ids.push(flow);
        // The intruder, told the id, races the owner with answers of its own.
        for _ in 0..5 {
            let evil = encode(&Datagram::Data { flow, payload: b"evil" });
            intruder.connection.send_datagram(evil.into()).expect("intruder sends");
        }
        let good = encode(&Datagram::Data { flow, payload: format!("answer {round}").as_bytes() });
        owner.connection.send_datagram(good.into()).expect("owner answers");
        let mut buf = [0u8; 256];
        let (len, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("answer in time")
            .expect("receive");
        assert_eq!(from, dns);
        assert_eq!(
            &buf[..len],
            format!("answer {round}").as_bytes(),
            "only the owner's answer reaches the client"
        );
    }
    // Nothing of the intruder's arrives late either.
    let mut buf = [0u8; 256];
    let late = tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await;
    assert!(late.is_err(), "an intruder's datagram reached the client: {late:?}");

    let m = relay.metrics().await;
    let foreign = metric(&m, "sallyport_refusals_total{listener=\"dns\",reason=\"foreign_flow\"}");
    println!("20 flows, 100 forged datagrams: {foreign} counted as foreign, 0 delivered; ids {flow_ids:?}");
    assert!(foreign >= 90.0, "forged datagrams are counted: {foreign}\n{m}");
    // Flow ids are not a counter an agent could walk.
    let sequential = flow_ids.windows(2).filter(|w| w[1] == w[0].wrapping_add(1)).count();
    assert!(sequential < 3, "flow ids look sequential: {flow_ids:?}");
    assert_eq!(relay.connected(), vec!["intruder".to_owned(), "winbox".to_owned()]);
    relay.stop().await;
}

const ADMIN_TOKEN: &str = "attacks-test-admin-token";

async fn admin_post(relay: &RunningRelay, path: &str) -> (u16, String) {
    sallyport_relay::cli::admin_client::request(relay.admin, "POST", path, Some(ADMIN_TOKEN))
        .await
        .expect("admin API")
}

/// Someone holding a copy of an agent's key asks for renewals in a burst, then the operator revokes
/// the agent: the relay renewed only when due and only once, and after `agent revoke` neither the
/// copied certificate nor the renewed one gets in, also after the relay restarts. Another agent's
/// traffic is untouched throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_are_rationed_and_revoking_an_agent_refuses_all_its_certificates() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let config = pki.relay_config(
        &[("svc", "fresh"), ("web", "other")],
        "admin_token_file = \"admin.token\"\nca_key = \"ca.key\"\ntokens_file = \"tokens.toml\"\n\
         revocations_file = \"revoked.toml\"\nagent_cert_validity = \"15s\"",
    );
    let mut relay = RunningRelay::start(config.clone()).await;
    let target = sallyport_tests::targets::transfer_server().await;
    let other = sallyport_tests::RunningAgent::start(pki.agent_config(
        "other",
        &[relay.quic],
        &[("web", target.addr)],
        "",
    ));
    relay.wait_agent("other").await;

    let (status, body) = admin_post(&relay, "/tokens?agent=fresh&ttl_secs=600").await;
    assert_eq!(status, 200, "{body}");
    let token = sallyport_relay::cli::join_token::join_token(&config, &[relay.quic.to_string()], &body)
        .expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    let enrolled = sallyport_agent::enroll::enroll(&token, dir.path()).await.expect("enrolls");
    assert_eq!(enrolled.agent, "fresh");
    let (cert, key) = (dir.path().join("agent.crt"), dir.path().join("agent.key"));

    // The copied identity connects like the agent would.
    let mut copy = RawAgent::connect_with(&cert, &key, &pki, relay.quic, &["svc"]).await.expect("admitted");
    assert!(matches!(copy.answer, RelayMessage::Welcome(_)), "{:?}", copy.answer);
    let (_, csr) = key_and_csr();
    let early = copy.renew(&csr).await.expect_err("not due yet");
    println!("renewal before it is due: {early}");
    assert!(early.contains("not due"), "{early}");

    // Due with a third (5 s) of its 15 s left.
    let info = sallyport_runtime::tls::inspect(
        &sallyport_runtime::tls::certs_from_pem(&std::fs::read(&cert).expect("cert"), "cert").expect("pem")
            [0],
    )
    .expect("inspect");
    let due = info.not_after_unix - (info.not_after_unix - info.not_before_unix) / 3;
    let wait = (due - sallyport_runtime::clock::unix_now() as i64 + 1).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(wait)).await;
    sallyport_tests::transfer::run(relay.service("web"), 100_000, 100_000, 1)
        .await
        .expect("other agent works");

    let (renewed_key, csr) = key_and_csr();
    let mut issued = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..5 {
        match copy.renew(&csr).await {
            Ok(pem) => issued.push(pem),
            Err(reason) => refused.push(reason),
        }
    }
    println!("burst of 5 renewals: {} issued, refused: {refused:?}", issued.len());
    assert_eq!(issued.len(), 1, "one renewal per certificate and minute");
    assert!(refused.iter().all(|r| r.contains("renewed less than")), "{refused:?}");
    let renewed_cert = dir.path().join("renewed.crt");
    let renewed_key_file = dir.path().join("renewed.key");
    std::fs::write(&renewed_cert, &issued[0]).expect("write");
    std::fs::write(&renewed_key_file, &renewed_key).expect("write");
    let renewed = RawAgent::connect_with(&renewed_cert, &renewed_key_file, &pki, relay.quic, &["svc"])
        .await
        .expect("the renewed certificate works before the revocation");
    drop(renewed);

    let (status, body) = admin_post(&relay, "/agents/fresh/revoke").await;
    assert_eq!(status, 200, "{body}");
    println!("{}", body.trim());
    let closed =
        tokio::time::timeout(Duration::from_secs(5), copy.connection.closed()).await.expect("closed");
    println!("the copy's live tunnel: {closed}");

    for restarted in [false, true] {
        if restarted {
            relay.stop().await;
            relay = RunningRelay::start(config.clone()).await;
        }
        for (what, cert, key) in [("copied", &cert, &key), ("renewed", &renewed_cert, &renewed_key_file)] {
            let refused = RawAgent::connect_with(cert, key, &pki, relay.quic, &["svc"])
                .await
                .expect_err("revoked certificate refused");
            println!("{what} certificate{}: {refused}", if restarted { " after a restart" } else { "" });
            assert!(refused.contains("certificate revoked"), "{what}: {refused}");
        }
        if !restarted {
            sallyport_tests::transfer::run(relay.service("web"), 100_000, 100_000, 2)
                .await
                .expect("other agent unaffected");
        }
    }
    let m = relay.metrics().await;
    assert!(m.contains("sallyport_handshake_failures_total{reason=\"revoked\"} 2"), "{m}");
    other.stop().await;
    relay.stop().await;
}

/// `kill -9` of the relay at random points while it saves revocations, ten times: the
/// revocations file always loads, and it holds every revocation the relay confirmed before it died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_relay_mid_save_never_leaves_a_broken_state_file() {
    use sallyport_tests::process::{addr_field, Spawned};
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let relay_toml = relay_toml_with_admin_token(&pki, "crash-relay.toml", "");
    let state = pki.dir().join("revoked.toml");
    let mut confirmed: Vec<String> = Vec::new();
    for round in 0..10u32 {
        let mut relay = Spawned::relay(&relay_toml);
        let admin = addr_field(&relay.wait_line("relay ready", Duration::from_secs(10)), "admin");
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn(async move {
            for i in 0u64.. {
                let agent = format!("a{round}-{i}");
                let path = format!(
                    "/agents/{agent}/revoke?serial={:032x}",
                    (u128::from(round) << 64) | u128::from(i)
                );
                match sallyport_relay::cli::admin_client::request(admin, "POST", &path, Some(ADMIN_TOKEN))
                    .await
                {
                    Ok((200, _)) => {
                        let _ = done_tx.send(agent);
                    }
                    _ => return,
                }
            }
        });
        // Fault injection, not a wait for readiness: the kill lands somewhere inside a save.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(30..300))).await;
        relay.kill();
        let _ = writer.await;
        while let Ok(agent) = done_rx.try_recv() {
            confirmed.push(agent);
        }
        let text = std::fs::read_to_string(&state).expect("the state file exists once anything was revoked");
        let file: toml::Table = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("round {round}: the state file does not load: {e}\n{text}"));
        let kept: std::collections::BTreeSet<&str> = file["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .filter_map(|a| a.get("agent")?.as_str())
            .collect();
        let lost: Vec<&String> = confirmed.iter().filter(|a| !kept.contains(a.as_str())).collect();
        assert!(lost.is_empty(), "round {round}: confirmed revocations lost: {lost:?}");
        println!(
            "round {round}: killed after {} confirmed revocations in all; the file loads and keeps them",
            confirmed.len()
        );
    }
    assert!(confirmed.len() >= 10, "revocations were saved: {}", confirmed.len());
}

/// 200 connections without a certificate, from 25 addresses, each pushing garbage on a stream and
/// in datagrams: the relay holds little for them, refuses or pushes out what is over its caps, and
/// a real agent still connects within 2 s and carries traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_certificateless_connections_holds_little_and_keeps_no_agent_out() {
    use sallyport_proto::enroll::ALPN_ENROLL;
    use sallyport_runtime::tls;
    use sallyport_tests::{
        lab::rss_kib,
        process::{addr_field, Spawned},
    };
    const ATTACKERS: u32 = 200;
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let relay_toml = relay_toml_with_admin_token(
        &pki,
        "flood-relay.toml",
        "ca_key = \"ca.key\"\ntokens_file = \"tokens.toml\"\n",
    );
    let mut relay = Spawned::relay(&relay_toml);
    let service = addr_field(&relay.wait_line("service listening", Duration::from_secs(10)), "addr");
    let ready = relay.wait_line("relay ready", Duration::from_secs(10));
    let (quic, admin) = (addr_field(&ready, "quic"), addr_field(&ready, "admin"));
    let pid = relay.child.id();
    let idle_kib = rss_kib(pid);

    let ca =
        tls::certs_from_pem(&std::fs::read(pki.dir().join("ca.crt")).expect("ca"), "ca").expect("ca pem");
    let pin = tls::cert_sha256(&ca[0]);
    let mut attackers = tokio::task::JoinSet::new();
    for i in 0..ATTACKERS {
        let source: SocketAddr = format!("127.0.3.{}:0", 1 + i / 8).parse().expect("addr");
        attackers.spawn(async move {
            let (crypto, _) = tls::pinned_client_crypto(pin, &[ALPN_ENROLL]).expect("crypto");
            let endpoint = quinn::Endpoint::client(source).expect("endpoint");
            let Ok(connecting) = endpoint.connect_with(quinn::ClientConfig::new(crypto), quic, "127.0.0.1")
            else {
                return (false, endpoint);
            };
            let Ok(Ok(connection)) = tokio::time::timeout(Duration::from_secs(5), connecting).await else {
                return (false, endpoint);
            };
            for _ in 0..200 {
                let _ = connection.send_datagram(vec![0xee; 1100].into());
            }
            if let Ok((mut send, _recv)) = connection.open_bi().await {
                let garbage = vec![0xab; 64 * 1024];
                for _ in 0..32 {
                    if tokio::time::timeout(Duration::from_secs(1), send.write_all(&garbage)).await.is_err() {
                        break;
                    }
                }
            }
            (true, endpoint)
        });
    }
    // The flood is on: peak memory while it lasts, and an agent's way in.
    let started = std::time::Instant::now();
    let pki_agent = pki.agent_config("winbox", &[quic], &[("svc", "127.0.0.1:9".parse().expect("addr"))], "");
    let target = sallyport_tests::targets::transfer_server().await;
    let mut config = pki_agent;
    if let Some(svc) = config.services.get_mut("svc") {
        svc.target =
            sallyport_agent::config::Target::Tcp { host: "127.0.0.1".into(), port: target.addr.port() };
    }
    let agent = sallyport_tests::RunningAgent::start(config);
    let mut status = agent.status.clone();
    let connected = tokio::time::timeout(
        Duration::from_secs(2),
        status.wait_for(|s| s.values().any(|t| matches!(t, sallyport_agent::TunnelStatus::Connected { .. }))),
    )
    .await;
    let agent_in = started.elapsed();
    assert!(connected.is_ok(), "the agent did not get in within 2 s of the flood's start");
    let mut peak_kib = rss_kib(pid);
    let report =
        sallyport_tests::transfer::run(service, 1 << 20, 1 << 20, 3).await.expect("traffic during the flood");
    assert_eq!(report.down, 1 << 20);
    let mut completed = 0;
    while let Some(done) = attackers.join_next().await {
        peak_kib = peak_kib.max(rss_kib(pid));
        completed += usize::from(done.map(|(ok, _)| ok).unwrap_or(false));
    }
    let (_, m) =
        sallyport_relay::cli::admin_client::request(admin, "GET", "/metrics", None).await.expect("metrics");
    let refused =
        |reason: &str| metric(&m, &format!("sallyport_handshake_failures_total{{reason=\"{reason}\"}}"));
    println!(
        "{ATTACKERS} certificate-less connections from 25 addresses: {completed} got a connection, {} pushed out, \
         {} over an address's cap, {} over its handshake rate; relay RSS {} KiB idle, {} KiB at most during the \
         flood (+{} KiB); the agent was in after {agent_in:?}",
        refused("unauthenticated_pushed_out"),
        refused("unauthenticated_per_ip_cap"),
        refused("handshake_rate"),
        idle_kib,
        peak_kib,
        peak_kib.saturating_sub(idle_kib),
    );
    // 64 held at once, each at most 64 KiB of stream data and 256 KiB of datagrams, plus the
    // connections' own state: far below what the flood sent (200 x 2 MiB + 220 KB).
    assert!(peak_kib.saturating_sub(idle_kib) < 64 * 1024, "relay grew by {} KiB", peak_kib - idle_kib);
    assert!(refused("unauthenticated_pushed_out") > 0.0, "the cap on unauthenticated connections held\n{m}");
    agent.stop().await;
}

/// Another agent, or anybody who learned a session number, asks to join `winbox`'s tunnel as a
/// lane: refused (the lane's certificate must name the session's agent), counted, and `winbox`'s
/// transfers running meanwhile arrive intact. A lane that then sends a control message is closed,
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_joins_only_its_own_agents_tunnel() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let target = sallyport_tests::targets::transfer_server().await;
    let mut relay = RunningRelay::start(pki.relay_config(&[("svc", "winbox"), ("web", "other")], "")).await;
    let agent = sallyport_tests::RunningAgent::start(pki.agent_config(
        "winbox",
        &[relay.quic],
        &[("svc", target.addr)],
        "lanes = 2",
    ));
    relay.wait_agent("winbox").await;
    relay.wait_connections("winbox", 2).await;
    let session = relay.session_id("winbox").expect("session");
    let service = relay.service("svc");
    let traffic = tokio::spawn(async move {
        for seed in 0..20 {
            sallyport_tests::transfer::run(service, 1 << 20, 1 << 20, seed)
                .await
                .expect("traffic during the attack");
        }
    });

    for (who, session, expected) in [
        ("other", session, "no tunnel session"),
        ("intruder", session, "no tunnel session"),
        ("winbox", session + 1_000, "no tunnel session"),
    ] {
        let refused = match RawAgent::lane(&pki, who, &pki, relay.quic, session).await {
            Ok(raw) => match raw.answer {
                RelayMessage::Refused { reason } => reason,
                other => panic!("{who} joined session {session}: {other:?}"),
            },
            Err(closed) => closed,
        };
        println!("{who} asking for lane of session {session}: {refused}");
        assert!(refused.contains(expected), "{refused}");
    }
    assert_eq!(relay.connections("winbox"), Some(2));

    // The agent's own identity may add a lane (up to relay.lanes); a control message on it closes
    // that lane alone.
    let mut own = RawAgent::lane(&pki, "winbox", &pki, relay.quic, session).await.expect("lane");
    assert_eq!(own.answer, RelayMessage::LaneAccepted);
    assert_eq!(relay.connections("winbox"), Some(3));
    own.send(&sallyport_proto::AgentMessage::Pong { nonce: 1 }).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), own.connection.closed()).await.expect("closed");
    println!("lane after a control message: {closed}");
    assert!(closed.to_string().contains("a lane carries no control message"), "{closed}");

    traffic.await.expect("traffic intact");
    let text = relay.metrics().await;
    assert_eq!(
        sallyport_tests::metric(&text, "sallyport_handshake_failures_total{reason=\"lane_refused\"}"),
        3.0
    );
    assert_eq!(sallyport_tests::metric(&text, "sallyport_agent_connections{agent=\"winbox\"}"), 2.0);
    agent.stop().await;
    relay.stop().await;
}

/// A compromised agent reports 5,000 containers, with names that are not names and states no
/// agent has: `/metrics` shows at most the cap of valid names, states only from the known set, and
/// a real agent's series beside them are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_flood_the_metrics_with_series() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(
        pki.relay_config_toml("", "[services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n"),
    )
    .await;
    let mut raw =
        RawAgent::connect_current(&pki, "winbox", &pki, relay.quic, &["svc"]).await.expect("admitted");
    relay.wait_agent("winbox").await;
    let reports: Vec<sallyport_proto::ContainerReport> = (0..5_000)
        .map(|i| sallyport_proto::ContainerReport {
            // Every third name is not a name (upper case); every state is made up.
            name: if i % 3 == 0 { format!("C{i}") } else { format!("c{i}") },
            state: format!("x{i}"),
            cold_start_ms: None,
        })
        .collect();
    raw.send(&sallyport_proto::AgentMessage::Containers(reports)).await;
    let started = std::time::Instant::now();
    let text = loop {
        let text = relay.metrics().await;
        if text.contains("sallyport_container_state{") || started.elapsed() > Duration::from_secs(5) {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let series: Vec<&str> = text.lines().filter(|l| l.starts_with("sallyport_container_state{")).collect();
    println!("{} container series from a report of 5,000", series.len());
    assert!(!series.is_empty(), "the report arrived: {text}");
    assert!(series.len() <= 64, "{} series", series.len());
    assert!(
        series.iter().all(|l| l.contains("state=\"other\"") && !l.contains("container=\"C")),
        "{series:?}"
    );
    assert_eq!(metric(&text, "sallyport_agents_connected"), 1.0, "the agent's tunnel is untouched");
}
