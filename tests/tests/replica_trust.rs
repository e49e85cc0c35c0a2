//! What replicas say to each other, attacked on the path between them: a capture sees no admin
//! token and no join-token secret, and a writer that does not hold the relay's key is not
//! believed, so its empty revocation list un-revokes nothing.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sallyport_tests::{
    metric,
    process::{addr_field, binary, Spawned},
    TestPki,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const ADMIN_TOKEN: &str = "replica-trust-admin-token";

/// Writes `relay-N.toml` for a replica of `pki`'s relay reaching the writer at `writer_peer`.
fn replica_toml(pki: &TestPki, n: usize, writer_peer: &str) -> PathBuf {
    replica_toml_syncing(pki, n, writer_peer, "200ms")
}

/// [`replica_toml`] with `sync_interval` as given.
fn replica_toml_syncing(pki: &TestPki, n: usize, writer_peer: &str, sync_interval: &str) -> PathBuf {
    let path = pki.dir().join(format!("relay-{n}.toml"));
    std::fs::write(
        &path,
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\n\
             key = \"relay.key\"\nca_key = \"ca.key\"\nadmin_token_file = \"admin.token\"\n\
             tokens_file = \"tokens-{n}.toml\"\nrevocations_file = \"revoked-{n}.toml\"\n\
             agent_cert_validity = \"15s\"\n\n\
             [cluster]\nwriter = \"relay-0\"\nwriter_peer = \"{writer_peer}\"\npeer_listen = \"127.0.0.1:0\"\n\
             sync_interval = \"{sync_interval}\"\n\n[services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .expect("relay.toml");
    path
}

/// Starts replica `n` from `toml`; returns it with its admin and replica-port addresses.
fn start(toml: &Path, n: usize) -> (Spawned, SocketAddr, SocketAddr) {
    let (relay, admin, peer, _) = start_with_quic(toml, n);
    (relay, admin, peer)
}

/// [`start`], with the QUIC address too.
fn start_with_quic(toml: &Path, n: usize) -> (Spawned, SocketAddr, SocketAddr, SocketAddr) {
    let mut relay = Spawned::start({
        let mut c = std::process::Command::new(binary("sallyport-relay"));
        c.arg("serve").arg("--config").arg(toml).arg("--replica").arg(format!("relay-{n}"));
        c
    });
    let mut line = |needle: &str| match relay.log.iter().find(|l| l.contains(needle)) {
        Some(line) => line.clone(),
        None => relay.wait_line(needle, Duration::from_secs(10)),
    };
    let ready = line("relay ready");
    let peer = addr_field(&line("replica port listening"), "addr");
    (relay, addr_field(&ready, "admin"), peer, addr_field(&ready, "quic"))
}

/// A TCP proxy to `upstream` that keeps every byte it carries, both ways.
async fn capturing_proxy(upstream: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let at = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else { continue };
            let kept = kept.clone();
            tokio::spawn(async move {
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let copy = |kept: Arc<Mutex<Vec<u8>>>| {
                    move |mut from: tokio::net::tcp::OwnedReadHalf,
                          mut to: tokio::net::tcp::OwnedWriteHalf| async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf).await {
                            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            kept.lock().expect("capture").extend_from_slice(&buf[..n]);
                        }
                        let _ = to.shutdown().await;
                    }
                };
                tokio::join!(copy(kept.clone())(cr, sw), copy(kept)(sr, cw));
            });
        }
    });
    (at, seen)
}

async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    sallyport_relay::cli::admin_client::request(addr, method, path, Some(ADMIN_TOKEN)).await.expect("admin")
}

/// Polls the replica's metrics until its last report reached the writer (`want` 1) or failed (0).
async fn writer_reachable(admin_addr: SocketAddr, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = admin(admin_addr, "GET", "/metrics").await;
        if metric(&body, "sallyport_writer_reachable") == want {
            return;
        }
        assert!(Instant::now() < deadline, "writer_reachable never became {want}:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_talk_in_tls_and_believe_only_a_writer_with_the_relays_key() {
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let (_writer, _, writer_peer) = start(&replica_toml(&pki, 0, "127.0.0.1:1"), 0);
    let (proxy, captured) = capturing_proxy(writer_peer).await;
    let (_follower, follower_admin, _) = start(&replica_toml(&pki, 1, &proxy.to_string()), 1);
    writer_reachable(follower_admin, 1.0).await;

    // Through the follower: a join token made (forwarded), redeemed by an enrolling agent (the
    // follower checks it at the writer), and a revocation (forwarded, then synced).
    let (status, created) = admin(follower_admin, "POST", "/tokens?agent=newbox&ttl_secs=600").await;
    assert_eq!(status, 200, "{created}");
    let secret = created.split_whitespace().nth(1).expect("ID SECRET").to_owned();
    let (status, body) = admin(follower_admin, "POST", "/agents/winbox/revoke").await;
    assert_eq!(status, 200, "{body}");
    let follower_revoked = pki.dir().join("revoked-1.toml");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&follower_revoked).unwrap_or_default().contains("winbox") {
        assert!(Instant::now() < deadline, "the revocation never reached the follower's file");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let seen = captured.lock().expect("capture").clone();
    let text = String::from_utf8_lossy(&seen);
    println!(
        "{} bytes between the replicas, first byte {:#04x}",
        seen.len(),
        seen.first().copied().unwrap_or(0)
    );
    assert!(seen.len() > 1000, "the replicas talked through the capture");
    assert_eq!(seen[0], 0x16, "the first byte is a TLS handshake record");
    for secret_text in [ADMIN_TOKEN, &secret, "winbox", "newbox", "cluster/v1"] {
        assert!(!text.contains(secret_text), "{secret_text:?} crossed in clear");
    }

    // A writer without the relay's key (another CA's relay certificate) answering a third replica:
    // its answers are never read, and the revocation the replica holds stays.
    let other = TestPki::new();
    let stranger = sallyport_runtime::tls::Identity::from_pem(
        &std::fs::read(other.dir().join("relay.crt")).expect("crt"),
        &std::fs::read(other.dir().join("relay.key")).expect("key"),
    )
    .expect("identity");
    let fake = Arc::new(sallyport_runtime::replica_tls::server(stranger).expect("tls"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let fake_at = listener.local_addr().expect("addr");
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = answered.clone();
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(fake);
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let empty = "serving = []\nagents = []\n[revocations]\n";
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{empty}", empty.len());
                let _ = tls.write_all(answer.as_bytes()).await;
            }
        }
    });
    std::fs::copy(&follower_revoked, pki.dir().join("revoked-2.toml")).expect("copy revocations");
    let (mut third, third_admin, _) = start(&replica_toml(&pki, 2, &fake_at.to_string()), 2);
    third.wait_line("cannot sync with the writer", Duration::from_secs(10));
    writer_reachable(third_admin, 0.0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(answered.load(std::sync::atomic::Ordering::Relaxed), 0, "no handshake with the fake writer");
    let kept = std::fs::read_to_string(pki.dir().join("revoked-2.toml")).expect("revocations");
    assert!(kept.contains("winbox"), "the revocation holds: {kept}");
}

/// A thief holding a copy of a due identity keeps a tunnel to the follower and asks it for a
/// renewal right after the operator revoked the agent at the writer, long before the follower's
/// next report (every 5 s here): the follower takes the writer's revocations before it signs, so
/// nothing is issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_at_a_follower_does_not_escape_a_revocation_made_at_the_writer() {
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let (_writer, writer_admin, writer_peer) = start(&replica_toml(&pki, 0, "127.0.0.1:1"), 0);
    let follower_toml = replica_toml_syncing(&pki, 1, &writer_peer.to_string(), "5s");
    let (_follower, follower_admin, _, follower_quic) = start_with_quic(&follower_toml, 1);
    writer_reachable(follower_admin, 1.0).await;

    let (status, created) = admin(writer_admin, "POST", "/tokens?agent=winbox&ttl_secs=600").await;
    assert_eq!(status, 200, "{created}");
    let config = sallyport_relay::Config::load(&follower_toml).expect("config");
    let token = sallyport_relay::cli::join_token::join_token(&config, &[follower_quic.to_string()], &created)
        .expect("join token");
    let dir = tempfile::tempdir().expect("tempdir");
    sallyport_agent::enroll::enroll(&token, dir.path()).await.expect("enrolls through the follower");
    let (cert, key) = (dir.path().join("agent.crt"), dir.path().join("agent.key"));
    let mut thief = sallyport_tests::raw::RawAgent::connect_with(&cert, &key, &pki, follower_quic, &["svc"])
        .await
        .expect("admitted");
    // Due with a third (5 s) of its 15 s left.
    let info = sallyport_runtime::tls::inspect(
        &sallyport_runtime::tls::certs_from_pem(&std::fs::read(&cert).expect("cert"), "cert").expect("pem")
            [0],
    )
    .expect("inspect");
    let due = info.not_after_unix - (info.not_after_unix - info.not_before_unix) / 3;
    let wait = (due - sallyport_runtime::clock::unix_now() as i64 + 1).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(wait)).await;

    let (status, body) = admin(writer_admin, "POST", "/agents/winbox/revoke").await;
    assert_eq!(status, 200, "{body}");
    let cutoff: u64 = body.split_whitespace().find_map(|w| w.parse().ok()).expect("the cutoff in the answer");
    assert!(
        cutoff >= sallyport_runtime::clock::unix_now() + 30,
        "the cutoff is set ahead for the replicas: {body}"
    );
    let (_, csr) = sallyport_tests::raw::key_and_csr();
    thief.send(&sallyport_proto::AgentMessage::Renew { csr_pem: csr }).await;
    // The answer is a refusal, or the tunnel closes first (taking the writer's revocations also
    // closes the revoked agent's tunnel); either way the follower counts what it did.
    let answer = loop {
        match tokio::time::timeout(Duration::from_secs(10), thief.next()).await.expect("an answer in time") {
            Some(sallyport_proto::RelayMessage::Renewed(result)) => break Some(result),
            Some(_) => continue,
            None => break None,
        }
    };
    println!("renewal at the follower right after the revocation at the writer: {answer:?}");
    if let Some(answer) = answer {
        let refused = answer.expect_err("nothing is issued for a revoked agent");
        assert!(refused.contains("revoked"), "{refused}");
    }
    let (_, metrics) = admin(follower_admin, "GET", "/metrics").await;
    let renewals = |result: &str| {
        metric(&metrics, &format!("sallyport_certificate_renewals_total{{result=\"{result}\"}}"))
    };
    assert_eq!(renewals("issued"), 0.0, "{metrics}");
    assert_eq!(renewals("revoked"), 1.0, "the follower judged the renewal with the writer's revocation");
}
