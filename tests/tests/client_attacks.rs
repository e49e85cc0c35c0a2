//! Attacks from homelab clients, each while legitimate traffic keeps flowing: caps per address
//! that upgraded and plain connections both count against, idle connections, the admin server
//! beyond loopback, the memory budget, floods of bad clients and the log budget.

use std::{net::SocketAddr, time::Duration};

use sallyport_tests::{metric, RunningRelay, TestPki};

const ADMIN_TOKEN: &str = "attacks-test-admin-token";

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
    let (relay, agent) = RunningRelay::with_winbox(
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
    let m = relay.metrics().await;
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
    let (relay, agent) = RunningRelay::with_winbox(
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
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "sallyport_connections_total{service=\"short\",result=\"idle\"}"), 1.0, "{m}");
    agent.stop().await;
    relay.stop().await;
}

/// The read-only token: Prometheus's, which must not be able to mint join tokens or run containers.
const READ_TOKEN: &str = "client-attacks-read-only-token";

/// An admin server bound beyond loopback tells nothing about agents without the admin token or the
/// read-only one; the kubelet's probes stay open. The read-only token reads and does nothing else,
/// and container commands can be switched off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_server_beyond_loopback_needs_the_token_for_reads() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    std::fs::write(pki.dir().join("read.token"), READ_TOKEN).expect("token file");
    let mut config = pki.relay_config(
        &[("svc", "winbox")],
        "admin_token_file = \"admin.token\"\nread_token_file = \"read.token\"\nrevocations_file = \"revoked.toml\"\n\
         container_commands = false",
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
    // The read-only token (Prometheus's) reads, and nothing more.
    for path in ["/agents", "/metrics", "/", "/status.txt"] {
        assert_eq!(get(path, Some(READ_TOKEN)).await.0, 200, "{path} with the read-only token");
    }
    let post = |path: &'static str, token: &'static str| async move {
        sallyport_relay::cli::admin_client::request(admin, "POST", path, Some(token))
            .await
            .expect("admin answers")
    };
    for path in
        ["/tokens?agent=newbox", "/agents/winbox/revoke", "/agents/winbox/containers/web/start", "/reload"]
    {
        let (status, body) = post(path, READ_TOKEN).await;
        assert_eq!(status, 403, "POST {path} with the read-only token: {body}");
        assert!(body.contains("only reads"), "{body}");
    }
    assert_eq!(get("/tokens", Some(READ_TOKEN)).await.0, 403, "the token list is not a read about agents");
    // Container commands switched off: refused even with the admin token.
    let (status, body) = post("/agents/winbox/containers/web/start", ADMIN_TOKEN).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("relay.container_commands = false"), "{body}");
    relay.stop().await;
}

/// The relay with the defaults `init` writes, every connection its memory budget allows open at
/// once in the state that costs it most: half are HTTP clients stuck just short of the longest
/// request head, half push into a TCP service whose upstream never reads (so the tunnel's flow
/// control holds their data back). The relay keeps them all and stays within its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_relay_stays_within_its_memory_budget() {
    full_relay_within_budget("quic").await;
}

/// The same over the TCP transport: its lanes share the agent's windows and are counted in the
/// budget as QUIC's are. Both run the agent with 8 connections (its tunnel and 7 lanes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_relay_stays_within_its_memory_budget_with_its_agent_over_tcp() {
    full_relay_within_budget("tcp").await;
}

async fn full_relay_within_budget(transport: &str) {
    use sallyport_tests::{
        lab::rss_kib,
        process::{addr_field, Spawned},
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
    let mut relay = Spawned::relay(&relay_toml);
    let sink_addr = addr_field(&relay.wait_line("service listening", Duration::from_secs(10)), "addr");
    let ready = relay.wait_line("relay ready", Duration::from_secs(10));
    let (quic, admin) = (addr_field(&ready, "quic"), addr_field(&ready, "admin"));
    let pid = relay.child.id();

    let (sink, web) = (sallyport_tests::targets::sink().await, sallyport_tests::targets::sink().await);
    let agent = sallyport_tests::RunningAgent::start(pki.agent_config(
        "winbox",
        &[quic],
        &[("web", web.addr), ("sink", sink.addr)],
        // 8 connections: the tunnel and 7 lanes (the relay's default cap), all held by the budget.
        &format!("transport = \"{transport}\"\nlanes = 8"),
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
    let (_, m) =
        sallyport_relay::cli::admin_client::request(admin, "GET", "/metrics", None).await.expect("metrics");
    let transports =
        metric(&m, &format!("sallyport_agent_transport{{agent=\"winbox\",transport=\"{transport}\"}}"));
    assert_eq!(transports, 1.0, "the agent is over {transport}: {m}");
    assert_eq!(metric(&m, "sallyport_agent_connections{agent=\"winbox\"}"), 8.0, "tunnel and 7 lanes: {m}");
    println!(
        "agent over {transport} with {} connections (tunnel and lanes); memory budget {} MiB: max_connections {} ({} KiB each at worst, {} MiB reserved); {} HTTP heads of {} \
         KiB and {} stalled TCP pushes open: relay RSS {} KiB idle, {} KiB at most (+{} KiB, {:.1} KiB per \
         connection)",
        metric(&m, "sallyport_agent_connections{agent=\"winbox\"}"),
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
    use sallyport_tests::process::{addr_field, Spawned};
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
    let mut relay = Spawned::relay(&relay_toml);
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

/// `GET path` on `addr` naming the server as `host`; the status code.
async fn status_with_host(addr: SocketAddr, path: &str, host: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
}

/// DNS rebinding: a web page the relay's host opens points a name of its own at 127.0.0.1 and
/// reads the loopback admin server through it. Reads about agents answer only requests that name
/// the server as localhost or by its address; probes and local tools are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loopback_admin_server_does_not_answer_a_rebound_name() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let (relay, _agent) = RunningRelay::with_winbox(
        &pki,
        "",
        "[services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n",
        "[services.svc]\ntarget = \"tcp://127.0.0.1:9\"\n",
    )
    .await;
    let admin = relay.admin;
    for path in ["/agents", "/metrics", "/status.txt", "/"] {
        assert_eq!(status_with_host(admin, path, "rebound.evil.example").await, 403, "{path}");
        assert_eq!(status_with_host(admin, path, "rebound.evil.example:9090").await, 403, "{path}");
        assert_eq!(status_with_host(admin, path, &admin.to_string()).await, 200, "{path}");
        assert_eq!(
            status_with_host(admin, path, &format!("localhost:{}", admin.port())).await,
            200,
            "{path}"
        );
    }
    assert_eq!(status_with_host(admin, "/livez", "rebound.evil.example").await, 200, "probes stay open");
    assert!(relay.metrics().await.contains("sallyport_"), "local tools still read");
}
