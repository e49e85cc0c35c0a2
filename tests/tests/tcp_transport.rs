//! The tunnel over TLS and TCP (HTTP/2 streams), in this process: what QUIC carries it carries
//! (transfers, half-close, resets, UDP), one bulk stream does not starve the others, `auto` falls
//! back to it when QUIC gets no answer, the HTTPS listener's port serves it beside SNI passthrough,
//! and its port refuses strangers while traffic flows.

use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use sallyport_runtime::link::Transport;
use sallyport_tests::{
    metric, servers, targets, tools_or_skip, transfer, RunningAgent, RunningRelay, TestPki,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

const MIB: u64 = 1024 * 1024;

async fn udp_echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("udp bind");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Sends `count` numbered datagrams through `service`, each resent until its echo comes; returns
/// how many came back intact.
async fn echo(service: SocketAddr, count: u32) -> u32 {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("udp bind");
    socket.connect(service).await.expect("connect");
    let mut echoed = 0;
    let mut buf = [0u8; 65_536];
    for n in 0..count {
        let datagram: Vec<u8> =
            n.to_be_bytes().iter().copied().cycle().take(100 + (n as usize * 37) % 8000).collect();
        for _ in 0..10 {
            socket.send(&datagram).await.expect("send");
            if let Ok(Ok(got)) = tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await
            {
                if buf[..got] == datagram[..] {
                    echoed += 1;
                    break;
                }
            }
        }
    }
    echoed
}

/// A target that sends zeros as fast as it is read, forever.
async fn firehose() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let zeros = vec![0u8; 64 * 1024];
                while stream.write_all(&zeros).await.is_ok() {}
            });
        }
    });
    addr
}

fn services_toml(services: &[(&str, &str)]) -> String {
    services.iter().map(|(name, target)| format!("[services.{name}]\ntarget = \"{target}\"\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_over_tcp_carries_what_quic_carries() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        "",
        "[services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n\
         [services.refused]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n\
         [services.dies]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n\
         [services.counts]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n\
         [services.echo]\nagent = \"winbox\"\nudp = \"127.0.0.1:0\"\n",
    ))
    .await;
    let tcp = relay.tcp.expect("the tunnel's TCP listener");
    assert_eq!(tcp.port(), relay.quic.port(), "TCP takes the QUIC port unless told otherwise");
    let (target, dies, counts, udp) = (
        targets::transfer_server().await,
        targets::dies_mid_transfer(100_000).await,
        targets::counts_then_replies().await,
        udp_echo().await,
    );
    let closed = targets::closed_port().await;
    let agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[tcp],
        "transport = \"tcp\"",
        &services_toml(&[
            ("svc", &format!("tcp://{}", target.addr)),
            ("refused", &format!("tcp://{closed}")),
            ("dies", &format!("tcp://{}", dies.addr)),
            ("counts", &format!("tcp://{}", counts.addr)),
            ("echo", &format!("udp://{udp}")),
        ]),
    ));
    relay.wait_agent("winbox").await;
    agent.wait_connected(Duration::from_secs(5)).await;
    let (transport, why) = agent.transport().expect("connected");
    assert_eq!(transport, Transport::Tcp);
    assert!(why.contains("agent.transport"), "{why}");
    // The relay sees the transport, and the agent's reason once its first control message is in.
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay.transport("winbox").is_none_or(|(_, why)| why.is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (seen, said) = relay.transport("winbox").expect("session");
    assert_eq!((seen, said.as_str()), (Transport::Tcp, why.as_str()));
    println!("relay sees transport {seen} ({said})");

    let svc = relay.service("svc");
    for (up, down) in [(MIB, MIB), (32 * MIB, 0), (0, 32 * MIB), (16 * MIB, 16 * MIB)] {
        let started = Instant::now();
        let report = transfer::run(svc, up, down, up ^ down ^ 7).await.expect("transfer intact");
        assert_eq!((report.up, report.down), (up, down));
        println!("over TCP: up {} MiB, down {} MiB in {:?}", up / MIB, down / MIB, started.elapsed());
    }
    // Many at once.
    let batch: Vec<_> = (0..100).map(|i| tokio::spawn(transfer::run(svc, 50_000, 50_000, i))).collect();
    for t in batch {
        t.await.expect("task").expect("concurrent transfer intact");
    }

    // A target that refuses: the client gets a reset, not a clean close.
    let mut client = TcpStream::connect(relay.service("refused")).await.expect("connect");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await.expect("no hang");
    assert!(matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{read:?}");
    // A target that dies mid-transfer: a reset after what it sent, never a clean EOF. The target
    // sends and dies at once, so the reset can reach the client before its connect is seen
    // through: then the connect itself reports it.
    let mut got = 0usize;
    let end = match TcpStream::connect(relay.service("dies")).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Err(e),
        Err(e) => panic!("connect: {e}"),
        Ok(mut client) => loop {
            match tokio::time::timeout(Duration::from_secs(5), client.read(&mut [0u8; 65_536]))
                .await
                .expect("no hang")
            {
                Ok(0) => break Ok(()),
                Ok(n) => got += n,
                Err(e) => break Err(e),
            }
        },
    };
    assert!(end.is_err(), "a target that dies must reach the client as a reset (got {got} bytes then EOF)");
    // Half-close: the client ends its side and still receives the reply.
    let mut client = TcpStream::connect(relay.service("counts")).await.expect("connect");
    client.write_all(&[1u8; 12_345]).await.expect("write");
    client.shutdown().await.expect("half-close");
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut reply))
        .await
        .expect("no hang")
        .expect("clean end");
    assert!(reply.contains("12345"), "{reply}");
    // UDP rides the link stream as datagrams, up to 8 KB here.
    let echoed = echo(relay.service("echo"), 200).await;
    assert_eq!(echoed, 200, "every datagram echoed");
    println!("half-close, resets and 200 UDP datagrams (100 B to 8 KB) over TCP: ok");

    agent.stop().await;
    relay.stop().await;
}

/// Stalled readers hold their own streams' windows, not the connection: small exchanges keep
/// going beside them and beside a bulk download that runs at full speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bulk_stream_does_not_starve_the_others() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        "",
        "[services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n\
         [services.bulk]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    let (target, hose) = (targets::transfer_server().await, firehose().await);
    let agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.tcp.expect("tcp")],
        "transport = \"tcp\"\nlanes = 1",
        &services_toml(&[("svc", &format!("tcp://{}", target.addr)), ("bulk", &format!("tcp://{hose}"))]),
    ));
    relay.wait_agent("winbox").await;
    let bulk = relay.service("bulk");
    // Eight clients that never read: each stream fills its window and the buffers behind it.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        stalled.push(TcpStream::connect(bulk).await.expect("connect"));
    }
    // One that reads as fast as it can.
    let drained = Arc::new(AtomicU64::new(0));
    let reader = {
        let drained = drained.clone();
        tokio::spawn(async move {
            let mut client = TcpStream::connect(bulk).await.expect("connect");
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = client.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                drained.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = drained.load(Ordering::Relaxed);
    let mut took = Vec::new();
    for i in 0..30 {
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), transfer::run(relay.service("svc"), 20_000, 20_000, i))
            .await
            .expect("a small exchange is not starved")
            .expect("intact");
        took.push(started.elapsed());
    }
    let during = drained.load(Ordering::Relaxed) - before;
    took.sort();
    println!(
        "30 exchanges of 20 KB each way beside 8 stalled streams and a bulk download ({} MiB meanwhile): median {:?}, max {:?}",
        during / MIB,
        took[took.len() / 2],
        took[took.len() - 1]
    );
    assert!(during > 8 * MIB, "the bulk download kept flowing: {during} bytes");
    reader.abort();
    drop(stalled);
    agent.stop().await;
    relay.stop().await;
}

/// QUIC gets no answer at the relay's address (nothing listens on its UDP port there): `auto`
/// waits a few seconds, then the tunnel comes up over TCP, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_when_quic_gets_no_answer() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let port = servers::free_port();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        &format!("tcp_listen = \"127.0.0.1:{port}\""),
        "[services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    assert_ne!(relay.quic.port(), port);
    let target = targets::transfer_server().await;
    let started = Instant::now();
    let agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[SocketAddr::from(([127, 0, 0, 1], port))],
        "",
        &services_toml(&[("svc", &format!("tcp://{}", target.addr))]),
    ));
    agent.wait_connected(Duration::from_secs(8)).await;
    let up_after = started.elapsed();
    let (transport, why) = agent.transport().expect("connected");
    println!("auto: up over {transport} after {up_after:?}: {why}");
    assert_eq!(transport, Transport::Tcp);
    assert!(why.contains("QUIC got no answer"), "{why}");
    assert!(up_after < Duration::from_secs(5), "up over TCP within 5 s of the start: {up_after:?}");
    relay.wait_agent("winbox").await;
    transfer::run(relay.service("svc"), MIB, MIB, 3).await.expect("intact");
    agent.stop().await;
    relay.stop().await;
}

/// One TCP port (the LoadBalancer's 443) for both: a ClientHello offering the tunnel's ALPN goes to
/// the tunnel, any other to SNI routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_port_serves_the_tunnel_and_sni_passthrough_side_by_side() {
    tools_or_skip!("curl");
    sallyport_tests::init_logging();
    let dir = tempfile::tempdir().expect("dir");
    let (nas, nas_crt) = servers::tls_server(dir.path(), "nas.home.lan");
    let pki = TestPki::new();
    let port = servers::free_port();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        &format!("https_listen = \"127.0.0.1:{port}\"\ntcp_listen = \"127.0.0.1:{port}\""),
        "[services.nas]\nagent = \"winbox\"\nsni = [\"nas.home.lan\"]\n\
         [services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    let https = relay.https.expect("https");
    assert_eq!((https.port(), relay.tcp), (port, Some(https)));
    let target = targets::transfer_server().await;
    let agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[https],
        "transport = \"tcp\"",
        &services_toml(&[
            ("nas", &format!("tcp://{}", nas.addr)),
            ("svc", &format!("tcp://{}", target.addr)),
        ]),
    ));
    relay.wait_agent("winbox").await;
    assert_eq!(relay.transport("winbox").map(|t| t.0), Some(Transport::Tcp));
    // A transfer through the tunnel that came in on the HTTPS port, while curl goes through the
    // same port to the target's own TLS.
    let svc = relay.service("svc");
    let flowing = tokio::spawn(async move { transfer::run(svc, 16 * MIB, 16 * MIB, 9).await });
    for _ in 0..5 {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert", &nas_crt.display().to_string()])
            .args(["--resolve", &format!("nas.home.lan:{port}:127.0.0.1")])
            .arg(format!("https://nas.home.lan:{port}/"))
            .output()
            .expect("curl runs");
        assert!(
            out.status.success(),
            "curl through SNI passthrough: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    flowing.await.expect("task").expect("the tunnel's transfer intact");
    let body = admin_metrics(&relay).await;
    assert_eq!(metric(&body, "sallyport_agent_transport{agent=\"winbox\",transport=\"tcp\"}"), 1.0, "{body}");
    println!("port {port}: the tunnel over TCP and SNI passthrough side by side");
    agent.stop().await;
    relay.stop().await;
}

/// The tunnel's TCP port is a trust boundary: a certificate from another CA, none at all, and
/// bytes that are not TLS are each refused, while an agent's traffic flows on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_port_refuses_strangers_while_traffic_flows() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(
        pki.relay_config_toml("", "[services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n"),
    )
    .await;
    let tcp = relay.tcp.expect("tcp");
    let target = targets::transfer_server().await;
    let agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[tcp],
        "transport = \"tcp\"",
        &services_toml(&[("svc", &format!("tcp://{}", target.addr))]),
    ));
    relay.wait_agent("winbox").await;
    let svc = relay.service("svc");
    let flowing: Vec<_> = (0..4).map(|i| tokio::spawn(transfer::run(svc, 8 * MIB, 8 * MIB, i))).collect();

    // Another CA's agent: its certificate does not chain to the relay's CA.
    let other = TestPki::new();
    let mallory = other.agent_bundle("winbox");
    let identity = sallyport_runtime::tls::Identity::from_pem(
        &std::fs::read(mallory.join("agent.crt")).expect("crt"),
        &std::fs::read(mallory.join("agent.key")).expect("key"),
    )
    .expect("identity");
    let roots = sallyport_runtime::tls::roots_from_pem(&std::fs::read(pki.dir().join("ca.crt")).expect("ca"))
        .expect("roots");
    let config =
        sallyport_runtime::tls::client_rustls(roots.clone(), identity, &[sallyport_proto::ALPN_TUNNEL])
            .expect("config");
    let refused = tls_then_read(tcp, config).await;
    assert!(refused.is_err(), "a foreign CA's certificate is refused: {refused:?}");
    // No certificate at all (the relay has no enrollment: a client certificate is required).
    let mut config = rustls::ClientConfig::builder_with_provider(sallyport_runtime::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![sallyport_proto::ALPN_TUNNEL.to_vec()];
    let refused = tls_then_read(tcp, config).await;
    assert!(refused.is_err(), "no certificate is refused: {refused:?}");
    // Not TLS at all.
    let mut junk = TcpStream::connect(tcp).await.expect("connect");
    junk.write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n").await.expect("write");
    let mut out = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(15), junk.read_to_end(&mut out)).await.expect("closed");
    assert!(read.is_err() || !out.starts_with(b"HTTP"), "{out:?}");

    for t in flowing {
        t.await.expect("task").expect("the agent's transfers went on intact");
    }
    assert!(relay.transport("winbox").is_some(), "the agent is still connected");
    let body = admin_metrics(&relay).await;
    assert!(metric(&body, "sallyport_handshake_failures_total{reason=\"tls\"}") >= 2.0, "{body}");
    agent.stop().await;
    relay.stop().await;
}

/// A TLS handshake with the tunnel's ALPN, then one read: an error unless the relay accepted the
/// peer and kept the connection open.
async fn tls_then_read(addr: SocketAddr, config: rustls::ClientConfig) -> Result<usize, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = sallyport_runtime::tls::server_name("relay").map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // TLS 1.3: the client's certificate is checked after the client's handshake is done; the
    // refusal arrives as an alert on the first read.
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(0)) => Err("closed".into()),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Ok(0),
    }
}

async fn admin_metrics(relay: &RunningRelay) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", &format!("http://{}/metrics", relay.admin)])
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The tunnel over TCP is where the operator put it, and nowhere else: with the HTTPS listener on
/// a port of its own, a ClientHello offering the tunnel's ALPN there goes to SNI routing (and is
/// refused) instead of to the tunnel; with `tcp_tunnel = false` there is no TCP way in at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_over_tcp_is_only_where_it_is_configured() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let (https_port, tcp_port) = (servers::free_port(), servers::free_port());
    let relay = RunningRelay::start(pki.relay_config_toml(
        &format!("https_listen = \"127.0.0.1:{https_port}\"\ntcp_listen = \"127.0.0.1:{tcp_port}\""),
        "[services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    let https = relay.https.expect("https");
    let connected = |agent: &RunningAgent| {
        let mut status = agent.status.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(3),
                status.wait_for(|s| {
                    s.values().any(|t| matches!(t, sallyport_agent::TunnelStatus::Connected { .. }))
                }),
            )
            .await
            .is_ok()
        }
    };
    let at_https = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[https],
        "transport = \"tcp\"",
        &services_toml(&[]),
    ));
    assert!(
        !connected(&at_https).await,
        "the HTTPS port handed a tunnel on although the tunnel has its own port"
    );
    at_https.stop().await;
    let at_tcp = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.tcp.expect("tcp")],
        "transport = \"tcp\"",
        &services_toml(&[]),
    ));
    assert!(connected(&at_tcp).await, "the tunnel's own TCP port takes the agent");
    at_tcp.stop().await;
    relay.stop().await;

    let off = RunningRelay::start(pki.relay_config_toml(
        "tcp_tunnel = false",
        "[services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    assert_eq!(off.tcp, None, "no TCP listener for the tunnel");
    let over_tcp = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[off.quic],
        "transport = \"tcp\"",
        &services_toml(&[]),
    ));
    assert!(!connected(&over_tcp).await, "an agent got in over TCP with the TCP tunnel off");
    over_tcp.stop().await;
    off.stop().await;
}
