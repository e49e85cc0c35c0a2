//! Attacks on the relay's trust boundaries, each while legitimate traffic keeps flowing: the
//! attack fails, is counted, and nobody else notices.

use std::{net::SocketAddr, time::Duration};

use sallyport_proto::{datagram::Datagram, RelayMessage};
use sallyport_tests::{raw::RawAgent, RunningRelay, TestPki};

/// A relay with `extra` in its `[relay]` table and `services`, and agent `winbox` with `targets`,
/// connected.
async fn relay_and_winbox(
    pki: &TestPki,
    extra: &str,
    services: &str,
    targets: &str,
) -> (RunningRelay, sallyport_tests::RunningAgent) {
    let mut relay = RunningRelay::start(pki.relay_config_toml(extra, services)).await;
    let agent =
        sallyport_tests::RunningAgent::start(pki.agent_config_toml("winbox", &[relay.quic], "", targets));
    relay.wait_agent("winbox").await;
    (relay, agent)
}

/// Writes `file` in the PKI's folder: a relay.toml for the relay binary on port 0 with the admin
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

/// `GET /metrics` on the relay's admin server.
async fn metrics(relay: &RunningRelay) -> String {
    let (status, body) = sallyport_relay::cli::admin_client::request(relay.admin, "GET", "/metrics", None)
        .await
        .expect("metrics");
    assert_eq!(status, 200, "{body}");
    body
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

    let m = metrics(&relay).await;
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

/// A fresh key and a CSR for it.
fn key_and_csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|c| c.pem())
        .expect("csr");
    (key.serialize_pem(), csr)
}

/// Sends `Renew` and waits for the relay's answer (skipping pings).
async fn renew(raw: &mut RawAgent, csr_pem: &str) -> Result<String, String> {
    raw.send(&sallyport_proto::AgentMessage::Renew { csr_pem: csr_pem.to_owned() }).await;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), raw.next()).await.expect("answer in time") {
            Some(RelayMessage::Renewed(result)) => return result,
            Some(_) => continue,
            None => panic!("control stream ended"),
        }
    }
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
    let early = renew(&mut copy, &csr).await.expect_err("not due yet");
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
        match renew(&mut copy, &csr).await {
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
    let m = metrics(&relay).await;
    assert!(m.contains("sallyport_handshake_failures_total{reason=\"revoked\"} 2"), "{m}");
    other.stop().await;
    relay.stop().await;
}

/// `kill -9` of the relay at random points while it saves revocations, ten times: the
/// revocations file always loads, and it holds every revocation the relay confirmed before it died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_relay_mid_save_never_leaves_a_broken_state_file() {
    use sallyport_tests::process::{addr_field, binary, Spawned};
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let relay_toml = relay_toml_with_admin_token(&pki, "crash-relay.toml", "");
    let state = pki.dir().join("revoked.toml");
    let mut confirmed: Vec<String> = Vec::new();
    for round in 0..10u32 {
        let mut relay = Spawned::start({
            let mut c = std::process::Command::new(binary("sallyport-relay"));
            c.arg("serve").arg("--config").arg(&relay_toml);
            c
        });
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
        process::{addr_field, binary, Spawned},
    };
    const ATTACKERS: u32 = 200;
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let relay_toml = relay_toml_with_admin_token(
        &pki,
        "flood-relay.toml",
        "ca_key = \"ca.key\"\ntokens_file = \"tokens.toml\"\n",
    );
    let mut relay = Spawned::start({
        let mut c = std::process::Command::new(binary("sallyport-relay"));
        c.arg("serve").arg("--config").arg(&relay_toml);
        c
    });
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

/// A raw WebSocket upgrade from `source` to the HTTP listener; the connection after `101`.
async fn upgraded(source: &str, http: SocketAddr, host: &str) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("source"))?;
    let mut stream = socket.connect(http).await?;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before 101"));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    if head.starts_with("HTTP/1.1 101") {
        Ok(stream)
    } else {
        Err(std::io::Error::other(head.lines().next().unwrap_or_default().to_owned()))
    }
}

/// Whether a TCP connection from `source` to `addr` gets the target's greeting (a connection over
/// a cap is reset instead).
async fn greeted(source: &str, addr: SocketAddr) -> bool {
    use tokio::io::AsyncReadExt;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{source}:0").parse().expect("source")).expect("bind");
    let Ok(mut stream) = socket.connect(addr).await else { return false };
    let mut greeting = [0u8; 5];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut greeting)).await,
        Ok(Ok(_)) if &greeting == b"hello"
    )
}

/// One address fills its cap with WebSocket connections: upgraded connections keep counting, so
/// its next connection (to a plain TCP service) is reset, while another address still gets through
/// both listeners; once the upgraded connections end, the address gets in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_and_plain_connections_count_against_the_per_address_cap() {
    if !sallyport_tests::servers::have("websockets") {
        assert!(std::env::var("CI").is_err(), "python3 websockets missing in CI");
        eprintln!("SKIPPED: python3 websockets is not installed");
        return;
    }
    sallyport_tests::init_logging();
    let echo = sallyport_tests::servers::websocket_echo();
    let greeter = sallyport_tests::targets::greeter(b"hello").await;
    let pki = TestPki::new();
    let (relay, agent) = relay_and_winbox(
        &pki,
        "http_listen = \"127.0.0.1:0\"\nmax_connections_per_ip = 6",
        "[services.ws]\nagent = \"winbox\"\nhosts = [\"ws.home.lan\"]\n\
         [services.db]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n",
        &format!(
            "[services.ws]\ntarget = \"tcp://{}\"\n[services.db]\ntarget = \"tcp://{}\"\n",
            echo.addr, greeter.addr
        ),
    )
    .await;
    let (http, db) = (relay.http.expect("http listener"), relay.service("db"));

    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(upgraded("127.0.0.1", http, "ws.home.lan").await.expect("upgrade within the cap"));
    }
    assert!(!greeted("127.0.0.1", db).await, "a 7th connection from the address is reset");
    assert!(upgraded("127.0.0.1", http, "ws.home.lan").await.is_err(), "and a 7th upgrade too");
    assert!(greeted("127.0.0.2", db).await, "another address still reaches the TCP service");
    let other = upgraded("127.0.0.2", http, "ws.home.lan").await.expect("and the HTTP listener");
    drop(other);
    drop(held);
    let mut back = false;
    for _ in 0..50 {
        // The relay frees the places as it sees the upgraded connections end.
        if greeted("127.0.0.1", db).await {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the address gets in again once its upgraded connections ended");
    let m = metrics(&relay).await;
    assert!(metric(&m, "sallyport_refusals_total{listener=\"db\",reason=\"per_ip_cap\"}") >= 1.0, "{m}");
    assert!(metric(&m, "sallyport_refusals_total{listener=\"http\",reason=\"per_ip_cap\"}") >= 1.0, "{m}");
    agent.stop().await;
    relay.stop().await;
}

/// A connection that moves nothing for its service's `idle_timeout` is reset and frees its places;
/// a service with `idle_timeout = "0s"` (a protocol that sits quiet) keeps its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_reset_unless_their_service_says_otherwise() {
    use tokio::io::AsyncReadExt;
    sallyport_tests::init_logging();
    let greeter = sallyport_tests::targets::greeter(b"hello").await;
    let pki = TestPki::new();
    let (relay, agent) = relay_and_winbox(
        &pki,
        "",
        "[services.short]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"1s\"\n\
         [services.quiet]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"0s\"\n",
        &format!(
            "[services.short]\ntarget = \"tcp://{0}\"\n[services.quiet]\ntarget = \"tcp://{0}\"\n",
            greeter.addr
        ),
    )
    .await;
    let mut short = tokio::net::TcpStream::connect(relay.service("short")).await.expect("short");
    let mut quiet = tokio::net::TcpStream::connect(relay.service("quiet")).await.expect("quiet");
    let mut greeting = [0u8; 5];
    short.read_exact(&mut greeting).await.expect("greeting");
    quiet.read_exact(&mut greeting).await.expect("greeting");
    let started = std::time::Instant::now();
    let ended =
        tokio::time::timeout(Duration::from_secs(5), short.read(&mut greeting)).await.expect("ended in time");
    let after = started.elapsed();
    println!("idle connection with idle_timeout = 1s ended after {after:?}: {ended:?}");
    assert!(ended.is_err(), "reset, not closed cleanly: {ended:?}");
    assert!(after >= Duration::from_millis(900) && after < Duration::from_secs(3), "{after:?}");
    let still = tokio::time::timeout(Duration::from_secs(2), quiet.read(&mut greeting)).await;
    assert!(still.is_err(), "a service without an idle timeout keeps its quiet connection: {still:?}");
    let m = metrics(&relay).await;
    assert_eq!(metric(&m, "sallyport_connections_total{service=\"short\",result=\"idle\"}"), 1.0, "{m}");
    agent.stop().await;
    relay.stop().await;
}

/// An admin server bound beyond loopback tells nothing about agents without the admin token; the
/// kubelet's probes stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_server_beyond_loopback_needs_the_token_for_reads() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let mut config = pki.relay_config(
        &[("svc", "winbox")],
        "admin_token_file = \"admin.token\"\nrevocations_file = \"revoked.toml\"",
    );
    config.relay.admin = "0.0.0.0:0".parse().expect("addr");
    let relay = RunningRelay::start(config).await;
    // Reached over loopback here; what counts is the address the server is bound to.
    let admin: SocketAddr = SocketAddr::from(([127, 0, 0, 1], relay.admin.port()));
    let get = |path: &'static str, token: Option<&'static str>| async move {
        sallyport_relay::cli::admin_client::request(admin, "GET", path, token).await.expect("admin answers")
    };
    for path in ["/agents", "/metrics", "/", "/status.txt"] {
        let (status, body) = get(path, None).await;
        assert_eq!(status, 401, "{path} without the token: {body}");
        let (status, _) = get(path, Some("wrong-token-0000000000")).await;
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, _) = get(path, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, 200, "{path} with the token");
    }
    for path in ["/livez", "/readyz"] {
        assert_eq!(get(path, None).await.0, 200, "{path} stays open for the kubelet");
    }
    relay.stop().await;
}

/// The relay with the defaults `init` writes, every connection its memory budget allows open at
/// once in the state that costs it most: half are HTTP clients stuck just short of the longest
/// request head, half push into a TCP service whose upstream never reads (so the tunnel's flow
/// control holds their data back). The relay keeps them all and stays within its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_relay_stays_within_its_memory_budget() {
    use sallyport_tests::{
        lab::rss_kib,
        process::{addr_field, binary, Spawned},
    };
    use tokio::io::AsyncWriteExt;
    let pki = TestPki::new();
    let http = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr");
    let relay_toml = pki.dir().join("budget-relay.toml");
    std::fs::write(
        &relay_toml,
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\n\
             key = \"relay.key\"\nhttp_listen = \"{http}\"\n\
             [services.web]\nagent = \"winbox\"\nhosts = [\"web.home.lan\"]\n\
             [services.sink]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .expect("relay.toml");
    let limits = sallyport_relay::Config::load(&relay_toml).expect("relay config").relay;
    let mut relay = Spawned::start({
        let mut c = std::process::Command::new(binary("sallyport-relay"));
        c.arg("serve").arg("--config").arg(&relay_toml);
        c
    });
    let sink_addr = addr_field(&relay.wait_line("service listening", Duration::from_secs(10)), "addr");
    let ready = relay.wait_line("relay ready", Duration::from_secs(10));
    let quic = addr_field(&ready, "quic");
    let pid = relay.child.id();

    let (sink, web) = (sallyport_tests::targets::sink().await, sallyport_tests::targets::sink().await);
    let agent = sallyport_tests::RunningAgent::start(pki.agent_config(
        "winbox",
        &[quic],
        &[("web", web.addr), ("sink", sink.addr)],
        "",
    ));
    agent.wait_connected(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_kib = rss_kib(pid);

    // Each listener may hold half the cap; 200 connections per source address keeps each under
    // the default per-address cap.
    let per_kind = limits.max_connections / 2;
    let source = |i: usize| format!("127.0.7.{}", 1 + i / 200);
    let connect = |i: usize, to: SocketAddr| async move {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(format!("{}:0", source(i)).parse().expect("source")).expect("bind source");
        socket.connect(to).await
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let mut pushers = tokio::task::JoinSet::new();
    for i in 0..per_kind {
        let mut stream = connect(i, sink_addr).await.expect("connect to the TCP service");
        let stop = stop.clone();
        pushers.spawn(async move {
            let chunk = vec![0x5a; 64 * 1024];
            tokio::select! {
                () = stop.cancelled() => true,
                alive = async {
                    for _ in 0..8 {
                        if stream.write_all(&chunk).await.is_err() {
                            return false;
                        }
                    }
                    stop.cancelled().await;
                    true
                } => alive,
            }
        });
    }
    let head = format!(
        "GET / HTTP/1.1\r\nHost: web.home.lan\r\nX-Padding: {}\r\n",
        "p".repeat(limits.max_header_bytes - 1024)
    );
    let mut heads = Vec::with_capacity(per_kind);
    for i in 0..per_kind {
        let mut stream = connect(per_kind + i, http).await.expect("connect to the HTTP listener");
        stream.write_all(head.as_bytes()).await.expect("most of a request head");
        heads.push(stream);
    }
    // Let the pushed data fill the tunnel and the relay's buffers.
    let mut peak_kib = rss_kib(pid);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        peak_kib = peak_kib.max(rss_kib(pid));
    }
    // Every connection is still open: the HTTP ones wait for the rest of their head.
    let mut buf = [0u8; 1];
    let open = heads
        .iter()
        .filter(|s| matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count();
    stop.cancel();
    let mut pushing = 0;
    while let Some(alive) = pushers.join_next().await {
        pushing += usize::from(alive.unwrap_or(false));
    }
    let budget = limits.budget();
    println!(
        "memory budget {} MiB: max_connections {} ({} KiB each at worst, {} MiB reserved); {} HTTP heads of {} \
         KiB and {} stalled TCP pushes open: relay RSS {} KiB idle, {} KiB at most (+{} KiB, {:.1} KiB per \
         connection)",
        limits.memory_budget >> 20,
        limits.max_connections,
        budget.per_connection >> 10,
        budget.reserved >> 20,
        open,
        head.len() >> 10,
        pushing,
        idle_kib,
        peak_kib,
        peak_kib.saturating_sub(idle_kib),
        peak_kib.saturating_sub(idle_kib) as f64 / (2 * per_kind) as f64,
    );
    assert_eq!(open, per_kind, "every HTTP client is still waiting for its head to be read");
    assert_eq!(pushing, per_kind, "every pushing client is still connected");
    assert!(peak_kib * 1024 <= limits.memory_budget, "relay RSS {peak_kib} KiB is over the budget");
    agent.stop().await;
}

/// 300 clients that are not TLS on the HTTPS listener and 300 malformed requests on the HTTP
/// listener, from 30 addresses: each is refused and counted, and the log gets a few lines per
/// kind with a count of the rest, not a line each (spoofed or many sources must not fill a disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_clients_is_counted_in_full_but_logged_in_few_lines() {
    use sallyport_tests::process::{addr_field, binary, Spawned};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const EACH: usize = 300;
    let pki = TestPki::new();
    let free = || std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr");
    let (http, https) = (free(), free());
    let relay_toml = pki.dir().join("log-relay.toml");
    std::fs::write(
        &relay_toml,
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\n\
             key = \"relay.key\"\nhttp_listen = \"{http}\"\nhttps_listen = \"{https}\"\n\
             [services.web]\nagent = \"winbox\"\nhosts = [\"web.home.lan\"]\n\
             [services.tls]\nagent = \"winbox\"\nsni = [\"tls.home.lan\"]\n"
        ),
    )
    .expect("relay.toml");
    let mut relay = Spawned::start({
        let mut c = std::process::Command::new(binary("sallyport-relay"));
        c.arg("serve").arg("--config").arg(&relay_toml);
        c
    });
    let admin = addr_field(&relay.wait_line("relay ready", Duration::from_secs(10)), "admin");
    let started = std::time::Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..EACH {
        for (to, bytes) in
            [(https, &b"GET / HTTP/1.1\r\n\r\n"[..]), (http, &b"\x01\x02 nonsense\r\n\r\n"[..])]
        {
            clients.spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket.bind(format!("127.0.8.{}:0", 1 + i % 30).parse().expect("source")).expect("bind");
                let mut stream = socket.connect(to).await.expect("connect");
                stream.write_all(bytes).await.expect("write");
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
            });
        }
    }
    while clients.join_next().await.is_some() {}
    let (_, m) =
        sallyport_relay::cli::admin_client::request(admin, "GET", "/metrics", None).await.expect("metrics");
    assert_eq!(
        metric(&m, "sallyport_refusals_total{listener=\"https\",reason=\"not_tls\"}"),
        EACH as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "sallyport_refusals_total{listener=\"http\",reason=\"malformed\"}"),
        EACH as f64,
        "{m}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let periods = 1 + started.elapsed().as_secs() as usize / 10;
    let log = relay.drain();
    for needle in ["not a TLS ClientHello", "malformed request"] {
        let lines = log.iter().filter(|l| l.contains(needle)).count();
        println!("{EACH} refusals, {lines} lines with {needle:?} in {:?}", started.elapsed());
        assert!((1..=10 * periods).contains(&lines), "{lines} lines with {needle:?}");
    }
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
    let text = metrics(&relay).await;
    assert_eq!(
        sallyport_tests::metric(&text, "sallyport_handshake_failures_total{reason=\"lane_refused\"}"),
        3.0
    );
    assert_eq!(sallyport_tests::metric(&text, "sallyport_agent_connections{agent=\"winbox\"}"), 2.0);
    agent.stop().await;
    relay.stop().await;
}
