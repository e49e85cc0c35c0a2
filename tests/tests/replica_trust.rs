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
    replica_toml_for(pki, n, writer_peer, sync_interval, "15s", &["winbox"])
}

/// [`replica_toml_syncing`] with agent certificates valid for `validity` and a service for each
/// of `agents` (`svc` for the first).
fn replica_toml_for(
    pki: &TestPki,
    n: usize,
    writer_peer: &str,
    sync_interval: &str,
    validity: &str,
    agents: &[&str],
) -> PathBuf {
    let path = pki.dir().join(format!("relay-{n}.toml"));
    let mut services = String::new();
    for (i, agent) in agents.iter().enumerate() {
        let name = if i == 0 { "svc".to_owned() } else { format!("svc-{agent}") };
        services.push_str(&format!("\n[services.{name}]\nagent = \"{agent}\"\nlisten = \"127.0.0.1:0\"\n"));
    }
    std::fs::write(
        &path,
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\n\
             key = \"relay.key\"\nca_key = \"ca.key\"\nadmin_token_file = \"admin.token\"\n\
             tokens_file = \"tokens-{n}.toml\"\nrevocations_file = \"revoked-{n}.toml\"\n\
             agent_cert_validity = \"{validity}\"\n\n\
             [cluster]\nwriter = \"relay-0\"\nwriter_peer = \"{writer_peer}\"\npeer_listen = \"127.0.0.1:0\"\n\
             sync_interval = \"{sync_interval}\"\n{services}"
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
    start_skewed(toml, n, None)
}

/// libfaketime, which moves a process's wall clock (Debian's `faketime`).
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// [`start_with_quic`] with the replica's wall clock moved by `skew` (as `"+30s"`), through
/// libfaketime; its monotonic clock is left as it is.
fn start_skewed(toml: &Path, n: usize, skew: Option<&str>) -> (Spawned, SocketAddr, SocketAddr, SocketAddr) {
    let mut relay = Spawned::start({
        let mut c = std::process::Command::new(binary("sallyport-relay"));
        c.arg("serve").arg("--config").arg(toml).arg("--replica").arg(format!("relay-{n}"));
        if let Some(skew) = skew {
            c.env("LD_PRELOAD", FAKETIME).env("FAKETIME", skew).env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
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

/// NM2, swept: for each phase, the operator revokes one agent at the writer and its thief (whose
/// certificate is due) renews at a follower that much later, from 0 to 2 s. None is signed, and
/// after a restart of the follower none of the stolen certificates gets in.
async fn renewals_after_a_revocation_sweep(skew: Option<&str>) {
    const PHASES_MS: [u64; 7] = [0, 250, 500, 750, 1000, 1500, 2000];
    const PHASES: usize = PHASES_MS.len();
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let agents: Vec<String> = (0..PHASES).map(|i| format!("thief{i}")).collect();
    let names: Vec<&str> = agents.iter().map(String::as_str).collect();
    let (_writer, writer_admin, writer_peer) =
        start(&replica_toml_for(&pki, 0, "127.0.0.1:1", "200ms", "36s", &names), 0);
    let follower_toml = replica_toml_for(&pki, 1, &writer_peer.to_string(), "5s", "36s", &names);
    let (follower, follower_admin, _, follower_quic) = start_skewed(&follower_toml, 1, skew);
    if skew.is_some() {
        // The follower's log stamps its own (moved) time: the skew is real.
        let line = follower.log.iter().find(|l| l.contains("relay ready")).expect("ready line");
        // `2026-12-04T21:35:11.085766Z ...`: the time of day, against this process's.
        let clock = line.split_once('T').and_then(|(_, t)| t.get(..8)).expect("a timestamp");
        let secs: Vec<i64> = clock.split(':').map(|p| p.parse().expect("a number")).collect();
        let stamped = secs[0] * 3600 + secs[1] * 60 + secs[2];
        let now = (sallyport_runtime::clock::unix_now() % 86_400) as i64;
        let ahead = (stamped - now).rem_euclid(86_400);
        assert!((25..=40).contains(&ahead), "the follower's clock is {ahead} s ahead: {line}");
    }
    writer_reachable(follower_admin, 1.0).await;
    let config = sallyport_relay::Config::load(&follower_toml).expect("config");

    let mut thieves = Vec::new();
    let mut bundles = Vec::new();
    for agent in &agents {
        let (status, created) =
            admin(writer_admin, "POST", &format!("/tokens?agent={agent}&ttl_secs=600")).await;
        assert_eq!(status, 200, "{created}");
        let token =
            sallyport_relay::cli::join_token::join_token(&config, &[follower_quic.to_string()], &created)
                .expect("join token");
        let dir = tempfile::tempdir().expect("tempdir");
        sallyport_agent::enroll::enroll(&token, dir.path()).await.expect("enrolls through the follower");
        let (cert, key) = (dir.path().join("agent.crt"), dir.path().join("agent.key"));
        let service = if thieves.is_empty() { "svc".to_owned() } else { format!("svc-{agent}") };
        let thief =
            sallyport_tests::raw::RawAgent::connect_with(&cert, &key, &pki, follower_quic, &[&service])
                .await
                .expect("admitted");
        thieves.push(thief);
        bundles.push(dir);
    }
    // Every certificate is due (a third of its 36 s left) on the follower's clock, skewed or not:
    // wait 24 s from the last one's issue, as the follower counts it; the sweep then takes 6 s.
    tokio::time::sleep(Duration::from_secs(25)).await;

    let mut answers = Vec::new();
    for ((agent, thief), phase) in agents.iter().zip(thieves.iter_mut()).zip(PHASES_MS) {
        let (status, body) = admin(writer_admin, "POST", &format!("/agents/{agent}/revoke")).await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(phase)).await;
        let (_, csr) = sallyport_tests::raw::key_and_csr();
        // The follower may have closed the revoked tunnel already (it took the writer's
        // revocations): then nothing can be asked, which is as good as refused.
        let answer = match thief.try_send(&sallyport_proto::AgentMessage::Renew { csr_pem: csr }).await {
            Err(_) => None,
            Ok(()) => loop {
                match tokio::time::timeout(Duration::from_secs(10), thief.next())
                    .await
                    .expect("an answer in time")
                {
                    Some(sallyport_proto::RelayMessage::Renewed(result)) => break Some(result),
                    Some(_) => continue,
                    None => break None,
                }
            },
        };
        if let Some(Ok(_)) = &answer {
            panic!("a renewal {phase} ms after the revocation was signed (follower clock {skew:?})");
        }
        let closed = thief.connection.close_reason().map(|r| r.to_string());
        let refused = answer.map(|a| a.expect_err("refused"));
        // Refused for the revocation, or the tunnel closed for it (the follower took the writer's
        // revocations before it would sign, which also closes the revoked agent's tunnel).
        let why = refused.clone().or(closed.clone()).unwrap_or_default();
        assert!(why.contains("revoked"), "{phase} ms: refused {refused:?}, closed {closed:?}");
        answers.push((phase, refused, closed));
    }
    println!("follower clock {skew:?}: {answers:?}");
    let (_, metrics) = admin(follower_admin, "GET", "/metrics").await;
    let issued = metric(&metrics, "sallyport_certificate_renewals_total{result=\"issued\"}");
    assert_eq!(issued, 0.0, "{metrics}");

    // After a restart of the follower, no stolen certificate gets in.
    drop(thieves);
    drop(follower);
    let (_follower, _, _, follower_quic) = start_skewed(&follower_toml, 1, skew);
    for (agent, dir) in agents.iter().zip(&bundles) {
        let (cert, key) = (dir.path().join("agent.crt"), dir.path().join("agent.key"));
        let again =
            sallyport_tests::raw::RawAgent::connect_with(&cert, &key, &pki, follower_quic, &["svc"]).await;
        assert!(again.is_err(), "{agent}'s stolen certificate got back in after a restart");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_in_the_two_seconds_after_a_revocation_are_refused_at_a_follower() {
    renewals_after_a_revocation_sweep(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_after_a_revocation_are_refused_at_a_follower_whose_clock_is_30_s_ahead() {
    if !Path::new(FAKETIME).exists() {
        assert!(std::env::var("CI").is_err(), "faketime missing in CI");
        eprintln!("SKIPPED: faketime (libfaketime) is not installed");
        return;
    }
    renewals_after_a_revocation_sweep(Some("+30s")).await;
}
