//! Service groups: one service carried by several agents, spread by a strategy, members taken out
//! by their health checks, by their tunnel going away (at once), and by a drain.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use sallyport_tests::{
    process::{binary, Spawned},
    targets, RunningAgent, RunningRelay, TestPki,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const ADMIN_TOKEN: &str = "groups-test-admin-token";

/// Which member answered: the one-byte greeting of its target, or the error.
async fn who(addr: SocketAddr) -> Result<u8, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.map_err(|e| format!("{:?}", e.kind()))?;
        Ok(byte[0])
    };
    tokio::time::timeout(Duration::from_secs(2), exchange).await.unwrap_or_else(|_| Err("timed out".into()))
}

/// A target at `addr` that greets with `greeting` and echoes, until the task is aborted.
async fn greeter_at(addr: SocketAddr, greeting: &'static [u8]) -> tokio::task::JoinHandle<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    };
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if stream.write_all(greeting).await.is_ok() {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    })
}

/// The relay's status text.
async fn status(relay: &RunningRelay) -> String {
    let (code, body) = sallyport_relay::cli::admin_client::request(relay.admin, "GET", "/status.txt", None)
        .await
        .expect("status");
    assert_eq!(code, 200, "{body}");
    body
}

/// The health word of each member of `service` on the status page.
async fn members(relay: &RunningRelay, service: &str) -> BTreeMap<String, String> {
    status(relay)
        .await
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| {
            let strategies = ["failover", "round-robin", "least-connections", "client-address"];
            cols.len() >= 5 && cols[0] == service && strategies.contains(&cols[1])
        })
        .map(|cols| (cols[2].to_owned(), cols[3].to_owned()))
        .collect()
}

/// The connections member `agent` of `service` carries now, from the status page.
async fn open_on(relay: &RunningRelay, service: &str, agent: &str) -> usize {
    status(relay)
        .await
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.len() >= 5 && cols[0] == service && cols[2] == agent)
        .and_then(|cols| cols[4].parse().ok())
        .unwrap_or(0)
}

/// Waits until the members of `service` stand as `wanted`; says how long it took.
async fn wait_members(relay: &RunningRelay, service: &str, wanted: &[(&str, &str)]) -> Duration {
    let started = Instant::now();
    let wanted: BTreeMap<String, String> =
        wanted.iter().map(|(a, s)| (a.to_string(), s.to_string())).collect();
    loop {
        let now = members(relay, service).await;
        if now == wanted {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "members of {service}: {now:?}, wanted {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a reload put `strategy` in force for `service`.
async fn wait_strategy(relay: &RunningRelay, service: &str, strategy: &str) {
    let started = Instant::now();
    while !status(relay).await.lines().any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.len() >= 5 && cols[0] == service && cols[1] == strategy
    }) {
        assert!(started.elapsed() < Duration::from_secs(15), "the reload to {strategy} never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin(relay: &RunningRelay, path: &str) -> (u16, String) {
    sallyport_relay::cli::admin_client::request(relay.admin, "POST", path, Some(ADMIN_TOKEN))
        .await
        .expect("admin call")
}

/// Round robin spreads 1,000 connections within 10 % of even; a target that stops behind its live
/// agent leaves the group within two check intervals while the other member serves every client,
/// and comes back after its successes; least-connections follows a member holding connections;
/// client-address affinity keeps one address on one member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_spread_and_health_checks_take_a_failed_target_out_and_back() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let group = |strategy: &str| {
        format!(
            "[services.web]\nagents = [\"a\", \"b\"]\nstrategy = \"{strategy}\"\nlisten = \"127.0.0.1:0\"\n\
             [services.web.health]\ncheck = \"tcp\"\ninterval = \"500ms\"\ntimeout = \"300ms\"\n"
        )
    };
    let config = pki.relay_config_file("", &group("round-robin"));
    let mut relay = RunningRelay::start(config).await;
    let target_a = targets::greeter(b"A").await;
    let b_addr = SocketAddr::from(([127, 0, 0, 1], sallyport_tests::servers::free_port()));
    let target_b = greeter_at(b_addr, b"B").await;
    let agent = |name: &str, target: SocketAddr| {
        RunningAgent::start(pki.agent_config_toml(
            name,
            &[relay.quic],
            "",
            &format!("[services.web]\ntarget = \"tcp://{target}\"\n"),
        ))
    };
    let (a, b) = (agent("a", target_a.addr), agent("b", b_addr));
    relay.wait_agent("a").await;
    relay.wait_agent("b").await;
    wait_members(&relay, "web", &[("a", "healthy"), ("b", "healthy")]).await;
    let web = relay.service("web");

    let mut counts = BTreeMap::<u8, usize>::new();
    for _ in 0..1000 {
        *counts.entry(who(web).await.expect("answered")).or_default() += 1;
    }
    println!("round robin over 1,000 connections: {counts:?}");
    for member in [b'A', b'B'] {
        let n = counts.get(&member).copied().unwrap_or(0);
        assert!((450..=550).contains(&n), "member {} took {n} of 1,000: {counts:?}", member as char);
    }

    // B's target stops: out within two intervals (1 s) and a report's way, and A serves all.
    target_b.abort();
    let killed = Instant::now();
    wait_members(&relay, "web", &[("a", "healthy"), ("b", "unhealthy")]).await;
    let out = killed.elapsed();
    println!("a stopped target left the group after {out:?} (interval 500 ms, fall 2)");
    assert!(out < Duration::from_millis(1500), "{out:?}");
    for _ in 0..100 {
        assert_eq!(who(web).await, Ok(b'A'), "only the healthy member takes clients");
    }
    let metrics = relay.metrics().await;
    for line in [
        "sallyport_group_member_state{service=\"web\",agent=\"b\",state=\"unhealthy\"} 1",
        "sallyport_group_member_state{service=\"web\",agent=\"a\",state=\"healthy\"} 1",
        "sallyport_group_members_usable{service=\"web\"} 1",
        "sallyport_group_members{service=\"web\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in\n{metrics}");
    }
    let _target_b = greeter_at(b_addr, b"B").await;
    let back = wait_members(&relay, "web", &[("a", "healthy"), ("b", "healthy")]).await;
    println!("the restarted target was back after {back:?} (rise 2)");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.extend(who(web).await);
    }
    assert_eq!(seen.len(), 2, "both members serve again");

    // Least connections: A holds 10 long connections (taken in round robin, B's closed), then a
    // reload to least-connections sends the next 10 to B.
    let mut held = Vec::new();
    while held.len() < 10 {
        let mut stream = TcpStream::connect(web).await.expect("connect");
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("greeting");
        if byte[0] == b'A' {
            held.push(stream);
        }
    }
    std::fs::write(pki.dir().join("relay.toml"), TestPki::relay_text("", &group("least-connections")))
        .expect("relay.toml");
    wait_strategy(&relay, "web", "least-connections").await;
    let mut to_b = 0;
    let mut open = Vec::new();
    for _ in 0..10 {
        let mut stream = TcpStream::connect(web).await.expect("connect");
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("greeting");
        to_b += usize::from(byte[0] == b'B');
        open.push(stream);
    }
    println!("with 10 connections held on A, {to_b} of the next 10 went to B");
    assert_eq!(to_b, 10, "least-connections sends new clients to the member holding fewer");
    // The reload changed the strategy and retired nothing: the connections held across it echo.
    for stream in held.iter_mut().chain(open.iter_mut()) {
        stream.write_all(b"ping").await.expect("write");
        let mut echoed = [0u8; 4];
        stream.read_exact(&mut echoed).await.expect("a connection held across the reload goes on");
        assert_eq!(&echoed, b"ping");
    }
    drop((held, open));

    // Affinity: each of 100 connections from one address reaches the same member.
    std::fs::write(pki.dir().join("relay.toml"), TestPki::relay_text("", &group("client-address")))
        .expect("relay.toml");
    wait_strategy(&relay, "web", "client-address").await;
    let first = who(web).await.expect("answered");
    for _ in 0..100 {
        assert_eq!(who(web).await, Ok(first), "one client address stays on one member");
    }
    a.stop().await;
    b.stop().await;
    relay.stop().await;
}

/// `kill -9` of one agent process while 50 new connections a second arrive: its members leave at
/// once when its tunnel is found gone (its check interval is 60 s, so no health check can have
/// done it: Pangolin's bug), within the tunnel's idle timeout (1.5 s by default) of the kill; no
/// connection started after that fails, and the other member's open connections go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_traffic_leaves_its_group_at_once() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let services =
        "[services.web]\nagents = [\"a\", \"b\"]\nstrategy = \"round-robin\"\nlisten = \"127.0.0.1:0\"\n\
                    [services.web.health]\ncheck = \"tcp\"\ninterval = \"60s\"\n";
    let mut relay = RunningRelay::start(pki.relay_config_file("", services)).await;
    let (target_a, target_b) = (targets::greeter(b"A").await, targets::greeter(b"B").await);
    // Agent a is a process of its own with the configuration `agent add` writes (default timers).
    let bundle = pki.agent_bundle("a");
    let path = bundle.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nrelays = [\"{}\"]\nca_cert = \"ca.crt\"\ncert = \"agent.crt\"\nkey = \"agent.key\"\n\
             [services.web]\ntarget = \"tcp://{}\"\n",
            relay.quic, target_a.addr
        ),
    )
    .expect("agent.toml");
    let mut a = Spawned::start({
        let mut c = std::process::Command::new(binary("sallyport-agent"));
        c.arg("run").arg("--config").arg(&path);
        c
    });
    let b = RunningAgent::start(pki.agent_config_toml(
        "b",
        &[relay.quic],
        "",
        &format!("[services.web]\ntarget = \"tcp://{}\"\n", target_b.addr),
    ));
    relay.wait_agent("a").await;
    relay.wait_agent("b").await;
    wait_members(&relay, "web", &[("a", "healthy"), ("b", "healthy")]).await;
    let web = relay.service("web");
    // A connection to B held through it all.
    let mut kept = loop {
        let mut stream = TcpStream::connect(web).await.expect("connect");
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("greeting");
        if byte[0] == b'B' {
            break stream;
        }
    };

    let results = Arc::new(std::sync::Mutex::new(Vec::<(Duration, Result<u8, String>)>::new()));
    let start = Instant::now();
    let load = {
        let results = results.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            let mut ticks = tokio::time::interval(Duration::from_millis(20));
            for _ in 0..300 {
                ticks.tick().await;
                let results = results.clone();
                tasks.push(tokio::spawn(async move {
                    let at = start.elapsed();
                    let answer = who(web).await;
                    results.lock().expect("results").push((at, answer));
                }));
            }
            for task in tasks {
                task.await.expect("connection task");
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.kill();
    let killed = start.elapsed();
    relay.wait_agent_gone("a").await;
    let gone = start.elapsed() - killed;
    wait_members(&relay, "web", &[("a", "away"), ("b", "healthy")]).await;
    load.await.expect("load");
    let results = results.lock().expect("results").clone();
    let failed: Vec<&(Duration, Result<u8, String>)> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let last_failed = failed.iter().map(|(at, _)| at.saturating_sub(killed)).max();
    println!(
        "kill -9 at {killed:?}: the relay saw the tunnel gone {gone:?} later; {} of {} connections failed, \
         the last one started {last_failed:?} after the kill",
        failed.len(),
        results.len()
    );
    assert!(gone < Duration::from_secs(2), "the tunnel's idle timeout is 1.5 s: {gone:?}");
    for (at, result) in &results {
        if *at > killed + gone {
            assert!(
                result.is_ok(),
                "a connection started {:?} after the kill failed: {result:?}",
                *at - killed
            );
        }
    }
    kept.write_all(b"still here").await.expect("write");
    let mut echoed = [0u8; 10];
    kept.read_exact(&mut echoed).await.expect("the other member's connection goes on");
    assert_eq!(&echoed, b"still here");
    b.stop().await;
    relay.stop().await;
}

/// `agent drain` during 20 long transfers and steady new connections: every transfer finishes
/// whole (SHA-256 checked), no new connection reaches the drained agent after the command;
/// draining the last healthy member is refused unless forced; undrain brings it back. Then the
/// agent drains itself (`sallyport-agent drain`) and undrains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_agent_finishes_its_transfers_and_takes_no_new_connection() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token");
    let services = "[services.bulk]\nagents = [\"a\", \"b\"]\nstrategy = \"round-robin\"\nlisten = \"127.0.0.1:0\"\n\
                    [services.who]\nagents = [\"a\", \"b\"]\nstrategy = \"round-robin\"\nlisten = \"127.0.0.1:0\"\n";
    let mut relay = RunningRelay::start(pki.relay_config_file(
        "admin_token_file = \"admin.token\"\nrevocations_file = \"revoked.toml\"",
        services,
    ))
    .await;
    let (bulk_a, bulk_b) = (targets::transfer_server().await, targets::transfer_server().await);
    let (who_a, who_b) = (targets::greeter(b"A").await, targets::greeter(b"B").await);
    let agent = |name: &str, bulk: SocketAddr, greeter: SocketAddr| {
        RunningAgent::start(pki.agent_config_toml(
            name,
            &[relay.quic],
            "",
            &format!(
                "[services.bulk]\ntarget = \"tcp://{bulk}\"\n[services.who]\ntarget = \"tcp://{greeter}\"\n"
            ),
        ))
    };
    let (a, b) = (agent("a", bulk_a.addr, who_a.addr), agent("b", bulk_b.addr, who_b.addr));
    relay.wait_agent("a").await;
    relay.wait_agent("b").await;
    let (bulk, web) = (relay.service("bulk"), relay.service("who"));

    // 20 transfers of 16 MiB down, half of them on a.
    const DOWN: u64 = 16 << 20;
    let transfers: Vec<_> = (0..20u64)
        .map(|seed| tokio::spawn(sallyport_tests::transfer::run(bulk, 1 << 10, DOWN, seed)))
        .collect();
    // Drained once a carries its share of them (the status page's open connections).
    let started = Instant::now();
    while open_on(&relay, "bulk", "a").await < 10 {
        assert!(started.elapsed() < Duration::from_secs(15), "the transfers never reached a");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, body) = admin(&relay, "/agents/a/drain?grace=5m").await;
    assert_eq!(code, 200, "{body}");
    println!("{}", body.trim());
    for _ in 0..100 {
        assert_eq!(who(web).await, Ok(b'B'), "no new connection reaches the drained agent");
    }
    let text = status(&relay).await;
    let draining = members(&relay, "who").await;
    assert_eq!(draining.get("a").map(String::as_str), Some("draining"), "{text}");
    let (code, body) = admin(&relay, "/agents/b/drain").await;
    assert_eq!(code, 409, "the last healthy member: {body}");
    assert!(body.contains("last healthy member"), "{body}");
    let mut finished = 0;
    for transfer in transfers {
        let report = transfer.await.expect("task").expect("the transfer finished whole");
        assert_eq!(report.down, DOWN);
        finished += 1;
    }
    println!("{finished} transfers finished whole while a drained");
    let (code, body) = admin(&relay, "/agents/a/undrain").await;
    assert_eq!(code, 200, "{body}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.extend(who(web).await);
    }
    assert_eq!(seen.len(), 2, "both members serve again after undrain");

    // The agent asks for its own drain (`sallyport-agent drain` on its host writes the file the
    // running agent looks for): the relay follows, and again when it is undrained.
    let a_config = pki.dir().join("agent-a").join("agent.toml");
    assert!(sallyport_agent::drain::set(&a_config, true).expect("drain file"));
    let took = wait_members(&relay, "who", &[("a", "draining"), ("b", "healthy")]).await;
    println!("the agent's own drain reached the relay after {took:?}");
    for _ in 0..50 {
        assert_eq!(who(web).await, Ok(b'B'), "no new connection reaches the agent that asked for a drain");
    }
    assert!(sallyport_agent::drain::set(&a_config, false).expect("drain file"));
    wait_members(&relay, "who", &[("a", "healthy"), ("b", "healthy")]).await;
    a.stop().await;
    b.stop().await;
    relay.stop().await;
}

/// A real NTLM exchange (pyspnego on both ends) through the HTTP listener to a server that binds
/// the login to its TCP connection, as IIS does, with lanes on (the agent's streams spread over
/// several connections): the three messages and the requests after them reach the
/// target on one connection, so the login holds; a wrong password is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ntlm_logins_hold_through_the_relay_with_lanes_on() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let iis = sallyport_tests::ntlm::server();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        "http_listen = \"127.0.0.1:0\"",
        "[services.intranet]\nagent = \"winbox\"\nhosts = [\"intranet.home.lan\"]\n",
    ))
    .await;
    // Lanes on (on two cores the agent's default is its tunnel alone).
    let agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "lanes = 4",
        &format!("[services.intranet]\ntarget = \"tcp://{}\"\n", iis.addr),
    ));
    relay.wait_agent("winbox").await;
    let started = Instant::now();
    while relay.connections("winbox").unwrap_or(0) < 2 {
        assert!(started.elapsed() < Duration::from_secs(15), "no lane came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("the agent holds {:?} connections to the relay", relay.connections("winbox"));
    let http = relay.http.expect("http listener");
    for round in 0..5 {
        let lines = tokio::task::spawn_blocking(move || {
            sallyport_tests::ntlm::exchange(http, "intranet.home.lan", sallyport_tests::ntlm::PASSWORD)
        })
        .await
        .expect("client")
        .expect("the exchange ran");
        assert!(lines[0].starts_with("401 NTLM"), "{lines:?}");
        assert!(lines[1].starts_with("401 NTLM "), "a challenge: {lines:?}");
        let logged: Vec<&String> = lines[2..].iter().collect();
        assert_eq!(logged.len(), 4, "{lines:?}");
        let connection = logged[0].rsplit(' ').next().expect("port").to_owned();
        for line in &logged {
            assert!(line.starts_with("200 hello HOMELAB\\alice on connection "), "round {round}: {lines:?}");
            assert!(line.ends_with(&connection), "one target connection for the client's: {lines:?}");
        }
    }
    let spread = relay.streams_per_connection("winbox");
    println!("data streams per tunnel connection: {spread:?}");
    assert!(
        spread.iter().filter(|&&n| n > 0).count() > 1,
        "the streams went over several connections: {spread:?}"
    );
    let refused = tokio::task::spawn_blocking(move || {
        sallyport_tests::ntlm::exchange(http, "intranet.home.lan", "wrong password")
    })
    .await
    .expect("client")
    .expect("the exchange ran");
    assert!(refused[2].starts_with("401 refused"), "{refused:?}");
    agent.stop().await;
    relay.stop().await;
}
