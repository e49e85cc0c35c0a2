//! Attacks on the TLS the relay terminates, while a real client keeps being served: handshakes
//! left half done (a ClientHello, then nothing) are cut after `header_timeout` and held under the
//! per-address cap, and garbage after a completed handshake closes that connection only.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use sallyport_tests::{metric, servers, tools_or_skip, RunningAgent, RunningRelay, TestPki};

/// A real ClientHello for `name` (rustls' first flight).
fn client_hello(name: &str) -> Vec<u8> {
    let roots = rustls::RootCertStore::empty();
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let mut client =
        rustls::ClientConnection::new(Arc::new(config), name.to_owned().try_into().expect("name"))
            .expect("client");
    let mut hello = Vec::new();
    client.write_tls(&mut hello).expect("ClientHello");
    hello
}

fn curl_ok(https: SocketAddr, crt: &str) -> bool {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert", crt, "--resolve"])
        .arg(format!("app.home.lan:{}:{}", https.port(), https.ip()))
        .arg(format!("https://app.home.lan:{}/", https.port()))
        .output()
        .expect("curl runs");
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("proto=https")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_done_handshakes_and_garbage_cost_the_attacker_only() {
    tools_or_skip!("curl", "openssl", "nginx");
    sallyport_tests::init_logging();
    let port = servers::free_port();
    let web =
        servers::nginx(&[(port, "", "location / { return 200 \"proto=$http_x_forwarded_proto\\n\"; }")]);
    let pki = TestPki::new();
    let (crt, key) = servers::self_signed(pki.dir(), "app.home.lan");
    let mut relay = RunningRelay::start(pki.relay_config_file(
        "https_listen = \"127.0.0.1:0\"\nheader_timeout = \"2s\"\nmax_connections_per_ip = 50",
        &format!(
            "[certificates.app]\ncert = \"{}\"\nkey = \"{}\"\n\
             [services.app]\nagent = \"winbox\"\nsni = [\"app.home.lan\"]\ntls = \"terminate\"\n",
            crt.display(),
            key.display()
        ),
    ))
    .await;
    let _agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!("[services.app]\ntarget = \"tcp://{}\"\n", web.addr),
    ));
    relay.wait_agent("winbox").await;
    let https = relay.https.expect("https listener");
    let crt = crt.display().to_string();
    assert!(curl_ok(https, &crt), "served before the attack");

    let attack_crt = crt.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let crt = attack_crt;
        // 80 connections from one address send a ClientHello for the service, then nothing.
        let hello = client_hello("app.home.lan");
        let started = Instant::now();
        let mut stalled = Vec::new();
        for _ in 0..80 {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
            socket.bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into()).expect("bind 127.0.0.2");
            if socket.connect(&https.into()).is_err() {
                continue;
            }
            let mut stream: TcpStream = socket.into();
            let _ = stream.write_all(&hello);
            stream.set_read_timeout(Some(Duration::from_secs(6))).expect("timeout");
            stalled.push(stream);
        }
        // Garbage after a completed handshake, from a third address.
        let garbage = Command::new("sh")
            .args(["-c", "head -c 65536 /dev/urandom | openssl s_client -quiet -connect \"$1\" -servername app.home.lan -CAfile \"$2\" 2>&1; echo rc=$?", "-"])
            .arg(https.to_string())
            .arg(&crt)
            .output()
            .expect("openssl runs");
        // A real client from another address is served all along, once every 100 ms.
        let (mut served, mut asked) = (0, 0);
        while started.elapsed() < Duration::from_secs(3) {
            asked += 1;
            served += usize::from(curl_ok(https, &crt));
            std::thread::sleep(Duration::from_millis(100));
        }
        // Each stalled connection: reset at once (over the cap) or closed at the handshake timeout.
        let mut ended = Vec::new();
        for mut stream in stalled {
            let mut buf = [0u8; 4096];
            let ended_at = loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break started.elapsed(),
                    Ok(_) => {}
                }
            };
            ended.push(ended_at);
        }
        (served, asked, ended, String::from_utf8_lossy(&garbage.stdout).into_owned())
    })
    .await
    .expect("attack");
    let (served, asked, ended, garbage) = outcome;
    let latest = ended.iter().max().copied().unwrap_or_default();
    println!(
        "80 half-done handshakes from one address (cap 50): {} ended, the last after {latest:?}; \
         the real client was served {served} of {asked} times; garbage after a handshake: {}",
        ended.len(),
        garbage.lines().last().unwrap_or_default()
    );
    assert_eq!(served, asked, "the real client was served throughout");
    assert!(latest < Duration::from_secs(5), "a half-done handshake outlived the timeout: {latest:?}");
    let m = relay.metrics().await;
    let capped = metric(&m, "sallyport_refusals_total{listener=\"https\",reason=\"per_ip_cap\"}");
    let timed_out = metric(&m, "sallyport_refusals_total{listener=\"https\",reason=\"timeout\"}");
    println!("refused over the per-address cap: {capped}, cut at the handshake timeout: {timed_out}");
    let malformed = metric(&m, "sallyport_refusals_total{listener=\"https\",reason=\"malformed\"}");
    assert!(capped >= 30.0 && timed_out >= 1.0 && malformed == 1.0, "{m}");
    assert!(curl_ok(https, &crt), "served after the attack");
}
