//! End-to-end tests of the relay's routed listeners with real clients and servers: HTTP by Host
//! (curl, nginx, a Python WebSocket client and server), HTTPS by SNI without termination (curl and
//! `openssl s_client` against `openssl s_server`), and PROXY protocol v2 toward a target (nginx
//! reading it), plus the bad inputs each listener must survive. UDP services: `udp.rs`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use sallyport_tests::{
    servers::{self, curl, resolve},
    tools_or_skip, RunningAgent, RunningRelay, TestPki,
};

/// A TCP connection to `addr` from the loopback address `from`.
fn connect_from(addr: SocketAddr, from: &str) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&format!("{from}:0").parse::<SocketAddr>().expect("from").into()).expect("bind");
    socket.connect(&addr.into()).expect("connect");
    socket.into()
}

/// Sends raw bytes from `from` and reads the answer until the relay closes (or 10 s pass).
fn raw(addr: SocketAddr, from: &str, request: &[u8]) -> String {
    let mut stream = connect_from(addr, from);
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = stream.write_all(request);
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

use sallyport_tests::metric;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_by_host_with_forwarding_headers_and_clear_refusals() {
    tools_or_skip!("curl", "nginx");
    sallyport_tests::init_logging();
    let (a, b) = (servers::free_port(), servers::free_port());
    let _nginx = servers::nginx(&[
        (
            a,
            "",
            "location / { return 200 \"A $request_uri xff=$http_x_forwarded_for proto=$http_x_forwarded_proto \
             xfh=$http_x_forwarded_host fwd=$http_forwarded conn=$connection\\n\"; }",
        ),
        (b, "", "location / { return 200 \"B $request_uri host=$host\\n\"; }"),
    ]);
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        "http_listen = \"127.0.0.1:0\"",
        "[services.app-a]\nagent = \"winbox\"\nhosts = [\"a.home.lan\"]\n\
         [services.app-b]\nagent = \"winbox\"\nhosts = [\"b.home.lan\", \"b2.home.lan\"]\n\
         [services.gone]\nagent = \"winbox\"\nhosts = [\"gone.home.lan\"]\n\
         [services.away]\nagent = \"otherbox\"\nhosts = [\"away.home.lan\"]\n",
    ))
    .await;
    let closed = servers::free_port();
    let _agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!(
            "[services.app-a]\ntarget = \"tcp://127.0.0.1:{a}\"\n[services.app-b]\ntarget = \"tcp://127.0.0.1:{b}\"\n\
             [services.gone]\ntarget = \"tcp://127.0.0.1:{closed}\"\n"
        ),
    ));
    relay.wait_agent("winbox").await;
    let http = relay.http.expect("http listener");

    // Two names on one port reach two targets; keep-alive carries both requests of one curl.
    let (ok, body, err) = curl(&[
        "-v",
        "--resolve",
        &resolve("a.home.lan", http),
        "--resolve",
        &resolve("B.Home.Lan", http),
        &format!("http://a.home.lan:{}/one?x=1", http.port()),
        &format!("http://a.home.lan:{}/two", http.port()),
        &format!("http://B.Home.Lan:{}/three", http.port()),
    ]);
    assert!(ok, "curl: {err}");
    let lines: Vec<&str> = body.lines().collect();
    println!("curl through the HTTP listener:\n{body}");
    assert_eq!(lines.len(), 3, "{body}");
    assert!(lines[0].starts_with("A /one?x=1 xff=127.0.0.1 proto=http xfh=a.home.lan"), "{}", lines[0]);
    assert!(lines[0].contains("fwd=for=127.0.0.1;host=\"a.home.lan\";proto=http"), "{}", lines[0]);
    assert!(lines[1].starts_with("A /two "), "{}", lines[1]);
    assert_eq!(lines[2], format!("B /three host=b.home.lan"));
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing"),
        "keep-alive: {err}"
    );
    // Both of a's requests went over the same pooled target connection.
    let conns: Vec<&str> = lines[..2].iter().map(|l| l.rsplit("conn=").next().unwrap_or("")).collect();
    assert_eq!(conns[0], conns[1], "one pooled connection to the target: {lines:?}");

    // Refusals, each with its status and a short reason.
    let status = |host: &str, extra: &[&str]| {
        let url = format!("http://{host}:{}/", http.port());
        let resolved = resolve(host, http);
        let mut args = vec!["-o", "-", "-w", "\n%{http_code}", "--resolve", resolved.as_str()];
        args.extend_from_slice(extra);
        args.push(&url);
        let (_, body, _) = curl(&args);
        let (text, code) = body.rsplit_once('\n').unwrap_or_default();
        (code.to_owned(), text.to_owned())
    };
    let (code, text) = status("nobody.home.lan", &[]);
    assert_eq!(code, "404", "{text}");
    assert!(text.contains("no service is published under the host name \"nobody.home.lan\""), "{text}");
    let (code, text) = status("away.home.lan", &[]);
    assert_eq!(code, "503", "{text}");
    assert!(text.contains("the agent \"otherbox\" of service \"away\" is not connected"), "{text}");
    let (code, text) = status("gone.home.lan", &[]);
    assert_eq!(code, "502", "{text}");
    assert!(text.contains("the target refused the connection"), "{text}");
    // With a body bigger than the stream's window, sending fails (the agent stopped the stream)
    // before the refusal is read: the refusal is still the reason given.
    let body = tempfile::NamedTempFile::new().expect("body file");
    std::fs::write(body.path(), vec![b'x'; 8 << 20]).expect("body");
    let data = format!("@{}", body.path().display());
    for _ in 0..5 {
        let (code, text) = status("gone.home.lan", &["--data-binary", &data]);
        assert_eq!(code, "502", "{text}");
        assert!(text.contains("the target refused the connection"), "{text}");
    }
    println!("refusals: 404, 503, 502 as specified ({})", text.trim().replace('\n', ": "));

    // Absolute form naming another host than Host: 400, and the target never sees it.
    let answer = raw(
        http,
        "127.0.0.1",
        b"GET http://b.home.lan/x HTTP/1.1\r\nHost: a.home.lan\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("the request target names \"b.home.lan\" but the Host header names \"a.home.lan\""),
        "{answer}"
    );
    // Absolute form that agrees is carried in origin form.
    let answer = raw(
        http,
        "127.0.0.1",
        b"GET http://b2.home.lan:80/y HTTP/1.1\r\nHost: B2.home.lan\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("B /y host=b2.home.lan"), "{answer}");
    let m = relay.metrics().await;
    assert!(metric(&m, "sallyport_http_responses_total{service=\"app-a\",code=\"200\"}") >= 2.0, "{m}");
    assert_eq!(metric(&m, "sallyport_refusals_total{listener=\"http\",reason=\"unknown_host\"}"), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    tools_or_skip!("websockets");
    sallyport_tests::init_logging();
    let echo = servers::websocket_echo();
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        "http_listen = \"127.0.0.1:0\"",
        "[services.ws]\nagent = \"winbox\"\nhosts = [\"ws.home.lan\"]\n",
    ))
    .await;
    let _agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!("[services.ws]\ntarget = \"tcp://{}\"\n", echo.addr),
    ));
    relay.wait_agent("winbox").await;
    let http = relay.http.expect("http listener");
    let big = "x".repeat(200_000);
    let messages = ["hello", "through the tunnel", big.as_str()];
    let started = Instant::now();
    let echoed = tokio::task::spawn_blocking(move || {
        servers::websocket_exchange(http, "ws.home.lan", &["hello", "through the tunnel"])
    })
    .await
    .expect("client")
    .expect("websocket exchange");
    assert_eq!(echoed, messages[..2]);
    let echoed = servers::websocket_exchange(http, "ws.home.lan", &[messages[2]]).expect("big message");
    assert_eq!(echoed.len(), 1);
    assert_eq!(echoed[0].len(), big.len());
    println!("websocket: 3 messages echoed through the HTTP listener in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_routes_by_sni_without_terminating_tls() {
    tools_or_skip!("curl", "openssl");
    sallyport_tests::init_logging();
    let dir = tempfile::tempdir().expect("dir");
    let (nas, nas_crt) = servers::tls_server(dir.path(), "nas.home.lan");
    let (git, git_crt) = servers::tls_server(dir.path(), "git.home.lan");
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        "https_listen = \"127.0.0.1:0\"\nheader_timeout = \"2s\"",
        "[services.nas]\nagent = \"winbox\"\nsni = [\"nas.home.lan\"]\n\
         [services.git]\nagent = \"winbox\"\nsni = [\"git.home.lan\"]\n",
    ))
    .await;
    let _agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!(
            "[services.nas]\ntarget = \"tcp://{}\"\n[services.git]\ntarget = \"tcp://{}\"\n",
            nas.addr, git.addr
        ),
    ));
    relay.wait_agent("winbox").await;
    let https = relay.https.expect("https listener");

    // curl trusts only each target's own certificate: the handshake is with the target.
    for (name, crt) in [("nas.home.lan", &nas_crt), ("git.home.lan", &git_crt)] {
        let (ok, body, err) = curl(&[
            "--cacert",
            &crt.display().to_string(),
            "--resolve",
            &resolve(name, https),
            &format!("https://{name}:{}/", https.port()),
        ]);
        assert!(ok, "curl https://{name}: {err}");
        assert!(body.contains("s_server"), "{body}");
    }
    let (ok, _, err) = curl(&[
        "--cacert",
        &nas_crt.display().to_string(),
        "--resolve",
        &resolve("git.home.lan", https),
        &format!("https://git.home.lan:{}/", https.port()),
    ]);
    assert!(!ok, "git's certificate must not verify against nas's: {err}");

    let s_client = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &https.to_string()])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl runs");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let out = s_client(&["-servername", "git.home.lan"]);
    assert!(out.contains("CN = git.home.lan") || out.contains("CN=git.home.lan"), "{out}");
    println!("openssl s_client -servername git.home.lan: the target's certificate (CN = git.home.lan)");

    // No SNI, and an unknown name: closed (with an unrecognized_name alert), logged and counted.
    let out = s_client(&["-noservername"]);
    assert!(!out.contains("CN = "), "no certificate without a name: {out}");
    let out = s_client(&["-servername", "nobody.home.lan"]);
    assert!(out.contains("unrecognized name") || out.contains("alert number 112"), "{out}");
    // Not TLS at all, and a client that never finishes its ClientHello.
    let answer = raw(https, "127.0.0.1", b"GET / HTTP/1.1\r\nHost: nas.home.lan\r\n\r\n");
    assert!(answer.is_empty(), "{answer}");
    let started = Instant::now();
    let answer = raw(https, "127.0.0.1", &[22, 3, 1, 0, 200, 1]);
    assert!(answer.is_empty(), "{answer}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1800) && waited < Duration::from_secs(8), "{waited:?}");
    let m = relay.metrics().await;
    for reason in ["no_sni", "unknown_sni", "not_tls", "timeout"] {
        assert_eq!(
            metric(&m, &format!("sallyport_refusals_total{{listener=\"https\",reason=\"{reason}\"}}")),
            1.0,
            "{reason}: {m}"
        );
    }
    println!("https refusals: no SNI, unknown SNI, not TLS, partial ClientHello closed after {waited:?}");
    // The targets still serve.
    let out = s_client(&["-servername", "nas.home.lan"]);
    assert!(out.contains("CN = nas.home.lan") || out.contains("CN=nas.home.lan"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_gives_the_target_the_client_address() {
    tools_or_skip!("curl", "nginx");
    sallyport_tests::init_logging();
    let port = servers::free_port();
    let _nginx = servers::nginx(&[(
        port,
        "proxy_protocol",
        "location / { return 200 \"client=$proxy_protocol_addr:$proxy_protocol_port server=$proxy_protocol_server_addr\\n\"; }",
    )]);
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        "http_listen = \"127.0.0.1:0\"",
        "[services.web]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n\
         [services.site]\nagent = \"winbox\"\nhosts = [\"site.home.lan\"]\n",
    ))
    .await;
    let _agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!(
            "[services.web]\ntarget = \"tcp://127.0.0.1:{port}\"\nproxy_protocol = \"v2\"\n\
             [services.site]\ntarget = \"tcp://127.0.0.1:{port}\"\nproxy_protocol = \"v2\"\n"
        ),
    ));
    relay.wait_agent("winbox").await;
    let web = relay.service("web");
    let (ok, body, err) =
        curl(&["--interface", "127.0.0.7", "-w", "local=%{local_port}", &format!("http://{web}/")]);
    assert!(ok, "curl: {err}");
    println!("nginx behind PROXY v2 saw: {body}");
    let local = body.rsplit("local=").next().unwrap_or_default();
    assert!(body.starts_with(&format!("client=127.0.0.7:{local} server=127.0.0.1")), "{body}");
    // Through the HTTP listener too (pooled per client address).
    let http = relay.http.expect("http");
    let (ok, body, err) = curl(&[
        "--interface",
        "127.0.0.9",
        "--resolve",
        &resolve("site.home.lan", http),
        &format!("http://site.home.lan:{}/", http.port()),
    ]);
    assert!(ok, "curl: {err}");
    assert!(body.starts_with("client=127.0.0.9:"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_survives_bad_clients() {
    tools_or_skip!("curl", "nginx");
    sallyport_tests::init_logging();
    let port = servers::free_port();
    let _nginx = servers::nginx(&[(port, "", "location / { return 200 \"ok\\n\"; }")]);
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        "http_listen = \"127.0.0.1:0\"\nheader_timeout = \"2s\"\nmax_connections_per_ip = 50",
        "[services.app]\nagent = \"winbox\"\nhosts = [\"app.home.lan\"]\n",
    ))
    .await;
    let _agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!("[services.app]\ntarget = \"tcp://127.0.0.1:{port}\"\n"),
    ));
    relay.wait_agent("winbox").await;
    let http = relay.http.expect("http");
    let normal = move || {
        let (ok, body, err) = curl(&[
            "--interface",
            "127.0.0.2",
            "--resolve",
            &resolve("app.home.lan", http),
            &format!("http://app.home.lan:{}/", http.port()),
        ]);
        assert!(ok && body == "ok\n", "normal client: {body} {err}");
    };
    normal();

    // Garbage: 400 and closed.
    let answer = raw(http, "127.0.0.1", b"\x16\x03\x01garbage\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    // A 1 MiB header: 431 and closed, without reading it all.
    let started = Instant::now();
    let mut big = b"GET / HTTP/1.1\r\nHost: app.home.lan\r\nX-Big: ".to_vec();
    big.resize(big.len() + (1 << 20), b'a');
    big.extend_from_slice(b"\r\n\r\n");
    let answer = raw(http, "127.0.0.1", &big);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    println!("1 MiB header: 431 after {:?}", started.elapsed());
    normal();

    // Slow clients: one byte a second (from an address of its own, so that only the header
    // timeout can end it), and 60 connections from one address that say nothing.
    let slow = std::thread::spawn(move || {
        let mut stream = connect_from(http, "127.0.0.3");
        let started = Instant::now();
        for byte in b"GET / HTTP/1.1\r\nHost: app.home.lan\r\n".iter() {
            if stream.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        started.elapsed()
    });
    let idle: Vec<TcpStream> = (0..60).map(|_| TcpStream::connect(http).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(300));
    normal();
    let m = relay.metrics().await;
    let capped = metric(&m, "sallyport_refusals_total{listener=\"http\",reason=\"per_ip_cap\"}");
    assert!(capped >= 10.0, "over the per-address cap of 50: {m}");
    let dropped_after = slow.join().expect("slow client");
    println!(
        "slowloris: one byte a second was closed after {dropped_after:?} (header_timeout 2s); \
         {capped} of 61 connections from one address over the cap of 50 were closed at once"
    );
    assert!(
        dropped_after >= Duration::from_millis(1900) && dropped_after < Duration::from_secs(6),
        "closed by the 2 s header timeout: {dropped_after:?}"
    );
    // The idle ones are closed by the header timeout too.
    for mut stream in idle {
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = [0u8; 64];
        assert!(matches!(stream.read(&mut buf), Ok(0) | Err(_)), "idle connection closed");
    }
    normal();
    let m = relay.metrics().await;
    for reason in ["header_timeout", "header_too_large", "malformed"] {
        assert!(
            metric(&m, &format!("sallyport_refusals_total{{listener=\"http\",reason=\"{reason}\"}}")) >= 1.0,
            "{reason}: {m}"
        );
    }
}

/// One keep-alive request on `stream`; the response body.
async fn keep_alive_get(stream: &mut tokio::net::TcpStream, host: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.expect("request");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.expect("response");
        assert!(n > 0, "connection closed mid-response: {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse().ok())
                .expect("content-length");
            if body.len() >= length {
                return body[..length].to_owned();
            }
        }
    }
}

/// Two clients behind one address (one NAT) never share an upstream connection: what a target
/// ties to a connection (NTLM authentication, a PROXY header's client) stays with its client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_from_one_address_never_share_an_upstream_connection() {
    tools_or_skip!("nginx");
    sallyport_tests::init_logging();
    let port = servers::free_port();
    let _nginx = servers::nginx(&[(port, "", "location / { return 200 \"conn=$connection\\n\"; }")]);
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        "http_listen = \"127.0.0.1:0\"",
        "[services.app]\nagent = \"winbox\"\nhosts = [\"app.home.lan\"]\n",
    ))
    .await;
    let agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!("[services.app]\ntarget = \"tcp://127.0.0.1:{port}\"\n"),
    ));
    relay.wait_agent("winbox").await;
    let http = relay.http.expect("http listener");
    let mut alice = tokio::net::TcpStream::connect(http).await.expect("alice");
    let mut bob = tokio::net::TcpStream::connect(http).await.expect("bob");
    assert_eq!(alice.local_addr().expect("a").ip(), bob.local_addr().expect("b").ip(), "one address");
    let a1 = keep_alive_get(&mut alice, "app.home.lan").await;
    let b1 = keep_alive_get(&mut bob, "app.home.lan").await;
    let a2 = keep_alive_get(&mut alice, "app.home.lan").await;
    let b2 = keep_alive_get(&mut bob, "app.home.lan").await;
    println!("alice: {} then {}; bob: {} then {}", a1.trim(), a2.trim(), b1.trim(), b2.trim());
    assert_eq!(a1, a2, "a client keeps its upstream connection between requests");
    assert_eq!(b1, b2, "a client keeps its upstream connection between requests");
    assert_ne!(a1, b1, "two clients never share an upstream connection");
    agent.stop().await;
}
