//! UDP services end to end: DNS through the tunnel with dig against dnsmasq, ten thousand flows,
//! and a flow whose target is not listening yet.

use std::time::{Duration, Instant};

use sallyport_tests::{
    metric,
    servers::{self, dig, dns_query},
    tools_or_skip, RunningAgent, RunningRelay, TestPki,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_dns_through_the_tunnel_and_ten_thousand_flows() {
    tools_or_skip!("dig", "dnsmasq");
    sallyport_tests::init_logging();
    let dns = servers::dnsmasq("nas.home.lan", "10.9.8.7");
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        // Flows outlive the test, so every flow beyond the cap is an eviction.
        "udp_max_flows = 2000\nudp_flow_idle = \"120s\"",
        "[services.dns]\nagent = \"winbox\"\nudp = \"127.0.0.1:0\"\n",
    ))
    .await;
    let agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "udp_max_flows = 1000",
        &format!("[services.dns]\ntarget = \"udp://{}\"\n", dns.addr),
    ));
    relay.wait_agent("winbox").await;
    let port = relay.service("dns");
    let answer = tokio::task::spawn_blocking(move || dig(port, "nas.home.lan")).await.expect("dig");
    assert_eq!(answer.as_deref(), Some("10.9.8.7"));
    println!("dig @relay nas.home.lan -> 10.9.8.7");

    // A client that keeps one socket: once answered and active it is an established flow, and it
    // sits in the same /24 as the first 250 flood sources.
    let steady = std::net::UdpSocket::bind("127.0.1.251:0").expect("bind steady client");
    steady.set_read_timeout(Some(std::time::Duration::from_secs(2))).expect("timeout");
    let ask_steady = move |steady: &std::net::UdpSocket| {
        let query = dns_query("nas.home.lan");
        steady.send_to(&query, port).expect("steady send");
        let mut buf = [0u8; 512];
        // An answer carries the query's id and the address.
        matches!(steady.recv(&mut buf), Ok(n) if n > 12 && buf[..2] == query[..2] && buf[..n].ends_with(&[10, 9, 8, 7]))
    };
    // Two exchanges make it a conversation the flow tables keep through a flood.
    assert!(ask_steady(&steady) && ask_steady(&steady), "the steady client is answered before the flood");

    // 10,000 flows (each a client address) sending one query each, while dig keeps asking.
    let kernel_drops_before = udp_receive_buffer_errors();
    let flood = tokio::task::spawn_blocking(move || {
        let query = dns_query("flood.home.lan");
        let started = Instant::now();
        for i in 0..10_000u32 {
            let from = format!("127.0.{}.{}:0", 1 + i / 250, 1 + i % 250);
            let socket = std::net::UdpSocket::bind(from.as_str()).expect("bind");
            socket.send_to(&query, port).expect("send");
        }
        started.elapsed()
    });
    let mut answered = 0;
    let mut asked = 0;
    let (mut steady_answered, mut steady_asked) = (0, 0);
    let mut steady = Some(steady);
    while !flood.is_finished() {
        asked += 1;
        let t = Instant::now();
        let got = tokio::task::spawn_blocking(move || dig(port, "nas.home.lan")).await.expect("dig");
        eprintln!("dig during the flood: {got:?} in {:?}", t.elapsed());
        if got.as_deref() == Some("10.9.8.7") {
            answered += 1;
        }
        let socket = steady.take().expect("steady socket");
        let (socket, ok) = tokio::task::spawn_blocking(move || {
            let ok = ask_steady(&socket);
            (socket, ok)
        })
        .await
        .expect("steady client");
        steady = Some(socket);
        steady_asked += 1;
        steady_answered += usize::from(ok);
    }
    let took = flood.await.expect("flood");
    for _ in 0..3 {
        asked += 1;
        let t = Instant::now();
        let got = tokio::task::spawn_blocking(move || dig(port, "nas.home.lan")).await.expect("dig");
        eprintln!("dig after the flood: {got:?} in {:?}", t.elapsed());
        if got.as_deref() == Some("10.9.8.7") {
            answered += 1;
        }
    }
    let m = relay.metrics().await;
    let kernel_drops = udp_receive_buffer_errors() - kernel_drops_before;
    let evicted = metric(&m, "sallyport_refusals_total{listener=\"dns\",reason=\"flow_evicted\"}");
    let up = metric(&m, "sallyport_udp_datagrams_total{service=\"dns\",direction=\"up\"}");
    let down = metric(&m, "sallyport_udp_datagrams_total{service=\"dns\",direction=\"down\"}");
    let open = metric(&m, "sallyport_udp_flows{service=\"dns\"}");
    println!(
        "10,000 UDP flows sent in {took:?}: relay carried {up} datagrams up and {down} down, evicted {evicted} flows \
         (cap 2000), {open} open; the kernel dropped {kernel_drops} UDP datagrams on full receive buffers (system-wide); \
         dig answered {answered} of {asked} during and after"
    );
    // What the kernel dropped never reached the relay, so the relay's own figures are checked
    // against what it did read: each flood datagram is a new flow, and each dig is one more (its
    // retries, at most two, come from the same address).
    assert!(up >= 4_000.0, "the relay read at least twice its cap of new flows: {up} datagrams; {m}");
    assert_eq!(open, 2000.0, "flows capped at 2000: {m}");
    let dig_retries = 2.0 * (asked as f64 + 1.0);
    assert!(
        evicted <= up - 2000.0 && evicted >= up - 2000.0 - dig_retries,
        "every flow beyond the cap evicted the oldest: {evicted} evicted of {up} datagrams: {m}"
    );
    assert!(answered == asked && answered >= 4, "normal client kept working: {answered}/{asked}");
    println!("the steady client (same /24 as 250 flood sources) was answered {steady_answered} of {steady_asked} times during the flood");
    assert_eq!(steady_answered, steady_asked, "an established flow survives the flood");
    // An oversized datagram is counted and dropped, and the service goes on.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.send_to(&vec![0u8; 8000], port).expect("send big");
    let answer = tokio::task::spawn_blocking(move || dig(port, "nas.home.lan")).await.expect("dig");
    assert_eq!(answer.as_deref(), Some("10.9.8.7"));
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "sallyport_refusals_total{listener=\"dns\",reason=\"oversized\"}"), 1.0, "{m}");
    agent.stop().await;
}

/// The kernel's count of UDP datagrams dropped on full receive buffers, system-wide
/// (`RcvbufErrors` in `/proc/net/snmp`).
fn udp_receive_buffer_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").expect("read /proc/net/snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next().expect("Udp header"), udp.next().expect("Udp values"));
    let column = names.split_whitespace().position(|n| n == "RcvbufErrors").expect("RcvbufErrors column");
    values.split_whitespace().nth(column).and_then(|v| v.parse().ok()).expect("RcvbufErrors value")
}

/// A UDP flow whose target is not listening yet gets port-unreachable back (ECONNREFUSED on the
/// agent's connected socket, WSAECONNRESET on Windows): the flow stays, and once the target
/// listens, the same client's datagrams are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flow_survives_port_unreachable_until_its_target_listens() {
    sallyport_tests::init_logging();
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], servers::free_port()));
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(
        pki.relay_config_toml("", "[services.echo]\nagent = \"winbox\"\nudp = \"127.0.0.1:0\"\n"),
    )
    .await;
    let agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!("[services.echo]\ntarget = \"udp://{target}\"\n"),
    ));
    relay.wait_agent("winbox").await;
    let service = relay.service("echo");
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    for _ in 0..5 {
        client.send_to(b"anyone there?", service).await.expect("send");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await.is_err(),
        "an answer from a target that is not there"
    );
    let echo = tokio::net::UdpSocket::bind(target).await.expect("target binds");
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let mut answered = None;
    for attempt in 0..10 {
        client.send_to(b"now?", service).await.expect("send");
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await
        {
            answered = Some((attempt, buf[..n].to_vec()));
            break;
        }
    }
    println!("answered after port-unreachable: {answered:?}");
    assert_eq!(answered.map(|(_, b)| b), Some(b"now?".to_vec()));
    agent.stop().await;
    relay.stop().await;
}

/// A UDP echo that puts `name` in front of what it sends back.
async fn named_echo(name: &'static str) -> std::net::SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let answer = [name.as_bytes(), &buf[..n]].concat();
            let _ = socket.send_to(&answer, from).await;
        }
    });
    addr
}

/// A reload gives a UDP service to another agent: a client that keeps its flow (its source port)
/// is answered by the new agent, and the old one's answers for that flow are no longer taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_service_moved_to_another_agent_takes_its_clients_along() {
    let pki = TestPki::new();
    let port = servers::free_port();
    let text = |agent: &str| {
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\n\
             key = \"relay.key\"\n[services.echo]\nagent = \"{agent}\"\nudp = \"127.0.0.1:{port}\"\n\
             [services.spare]\nagent = \"second\"\nlisten = \"127.0.0.1:0\"\n"
        )
    };
    let path = pki.dir().join("relay.toml");
    std::fs::write(&path, text("first")).expect("relay.toml");
    let config = sallyport_relay::Config::load(&path).expect("config");
    let mut relay = RunningRelay::start(config).await;
    let (echo_a, echo_b) = (named_echo("A:").await, named_echo("B:").await);
    let service = |target| format!("[services.echo]\ntarget = \"udp://{target}\"\n");
    let first = RunningAgent::start(pki.agent_config_toml("first", &[relay.quic], "", &service(echo_a)));
    let second = RunningAgent::start(pki.agent_config_toml("second", &[relay.quic], "", &service(echo_b)));
    relay.wait_agent("first").await;
    relay.wait_agent("second").await;

    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(ask(&client, port).await.as_deref(), Some("A:ping"));
    let tmp = path.with_extension("next");
    std::fs::write(&tmp, text("second")).expect("write");
    std::fs::rename(&tmp, &path).expect("replace");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if ask(&client, port).await.as_deref() == Some("B:ping") {
            break;
        }
        assert!(Instant::now() < deadline, "the same client never reached the service's new agent");
    }
    println!("the client's flow moved to the service's new agent");
    first.stop().await;
    second.stop().await;
    relay.stop().await;
}

/// Sends `ping` from `client` to the relay's UDP port until an answer comes (or 20 tries).
async fn ask(client: &tokio::net::UdpSocket, port: u16) -> Option<String> {
    let relay = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut buf = [0u8; 64];
    for _ in 0..20 {
        client.send_to(b"ping", relay).await.expect("send");
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(250), client.recv_from(&mut buf)).await
        {
            return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    None
}
