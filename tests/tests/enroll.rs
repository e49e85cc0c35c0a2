//! Join tokens end to end: a relay with enrollment on, tokens made through its admin API, agents
//! enrolling with `sallyport_agent::enroll` and then connecting with the identity they got.

use std::{net::SocketAddr, time::Duration};

use sallyport_agent::enroll::{enroll, EnrollError};
use sallyport_proto::{enroll::JoinToken, ALPN_TUNNEL};
use sallyport_runtime::tls;
use sallyport_tests::{targets, transfer, RunningAgent, RunningRelay, TestPki};

const ADMIN_TOKEN: &str = "enroll-test-admin-token";

struct Setup {
    pki: TestPki,
    relay: RunningRelay,
    config: sallyport_relay::Config,
}

async fn relay_with_enrollment() -> Setup {
    relay_with_enrollment_and("").await
}

/// A relay with enrollment on (CA key, admin token) and `extra` in its `[relay]` table.
async fn relay_with_enrollment_and(extra: &str) -> Setup {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let extra = format!(
        "admin_token_file = \"admin.token\"\nca_key = \"ca.key\"\ntokens_file = \"tokens.toml\"\n\
         revocations_file = \"revoked.toml\"\n{extra}"
    );
    let config = pki.relay_config(&[("svc", "fresh")], &extra);
    let relay = RunningRelay::start(config.clone()).await;
    Setup { pki, relay, config }
}

impl Setup {
    /// `sallyport-relay token create` through the admin API.
    async fn token(&self, agent: &str, ttl_secs: u64) -> String {
        let path = format!("/tokens?agent={agent}&ttl_secs={ttl_secs}");
        let (status, body) =
            sallyport_relay::cli::admin_client::request(self.relay.admin, "POST", &path, Some(ADMIN_TOKEN))
                .await
                .expect("admin");
        assert_eq!(status, 200, "{body}");
        sallyport_relay::cli::join_token::join_token(&self.config, &[self.relay.quic.to_string()], &body)
            .expect("token string")
    }

    async fn revoke(&self, token: &str) {
        let id = JoinToken::decode(token).expect("token").id;
        let path = format!("/tokens/{id:016x}/revoke");
        let (status, body) =
            sallyport_relay::cli::admin_client::request(self.relay.admin, "POST", &path, Some(ADMIN_TOKEN))
                .await
                .expect("admin");
        assert_eq!(status, 200, "{body}");
    }
}

fn refused(result: Result<sallyport_agent::enroll::Enrolled, EnrollError>) -> String {
    match result {
        Err(EnrollError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_enrolls_and_the_agent_then_connects_with_mutual_tls() {
    let mut s = relay_with_enrollment().await;
    let token = s.token("fresh", 3600).await;
    println!("token: {} characters", token.len());
    let dir = tempfile::tempdir().expect("tempdir");
    // A key file left readable by others from before is made private, not kept as it was.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(dir.path().join("agent.key"), "old").expect("old key");
        std::fs::set_permissions(dir.path().join("agent.key"), std::fs::Permissions::from_mode(0o644))
            .expect("mode");
    }
    let enrolled = enroll(&token, dir.path()).await.expect("enrolls");
    assert_eq!(enrolled.agent, "fresh");
    assert!(enrolled.config_written);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("agent.key")).expect("key").permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is private");
    }
    // The written agent.toml works once a service is added.
    let target = targets::transfer_server().await;
    let mut text = std::fs::read_to_string(&enrolled.config).expect("agent.toml");
    text.push_str(&format!("\n[services.svc]\ntarget = \"tcp://{}\"\n", target.addr));
    std::fs::write(&enrolled.config, text).expect("edit agent.toml");
    let config = sallyport_agent::Config::load(&enrolled.config).expect("written config loads");
    let agent = RunningAgent::start(config);
    s.relay.wait_agent("fresh").await;
    let report =
        transfer::run(s.relay.service("svc"), 100_000, 100_000, 1).await.expect("through the tunnel");
    assert_eq!(report.down, 100_000);

    // The token is single use.
    let again = tempfile::tempdir().expect("tempdir");
    assert_eq!(refused(enroll(&token, again.path()).await), "join token already used");
    agent.stop().await;
    s.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_revoked_and_wrong_secret_tokens_are_refused() {
    let s = relay_with_enrollment().await;
    let dir = tempfile::tempdir().expect("tempdir");

    let short = s.token("fresh", 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(refused(enroll(&short, dir.path()).await), "join token expired");

    let revoked = s.token("fresh", 3600).await;
    s.revoke(&revoked).await;
    assert_eq!(refused(enroll(&revoked, dir.path()).await), "join token revoked");

    let mut forged = JoinToken::decode(&s.token("fresh", 3600).await).expect("token");
    forged.secret[0] ^= 0x55;
    assert_eq!(refused(enroll(&forged.encode(), dir.path()).await), "invalid join token");
    assert!(!dir.path().join("agent.key").exists(), "nothing written on refusal");

    let e = enroll("spjoin1.garbage!", dir.path()).await.expect_err("damaged");
    println!("{e}");
    assert!(e.to_string().contains("damaged"), "{e}");
    s.relay.stop().await;
}

/// A network that lets no UDP out: nothing answers QUIC at the token's address, so enrollment
/// goes over TLS on TCP to the same address (the relay's `tcp_listen`), and the agent it wrote
/// then connects (over TCP too, chosen by `auto`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_goes_over_tcp_when_quic_gets_no_answer() {
    let port = {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        tcp.local_addr().expect("addr").port()
    };
    let mut s = relay_with_enrollment_and(&format!("tcp_listen = \"127.0.0.1:{port}\"")).await;
    let path = "/tokens?agent=fresh&ttl_secs=600";
    let (status, body) =
        sallyport_relay::cli::admin_client::request(s.relay.admin, "POST", path, Some(ADMIN_TOKEN))
            .await
            .expect("admin");
    assert_eq!(status, 200, "{body}");
    let token =
        sallyport_relay::cli::join_token::join_token(&s.config, &[format!("127.0.0.1:{port}")], &body)
            .expect("token string");
    let dir = tempfile::tempdir().expect("tempdir");
    let started = std::time::Instant::now();
    let enrolled = enroll(&token, dir.path()).await.expect("enrolls over TCP");
    println!("enrolled over TCP in {:?} (QUIC waited 3 s first)", started.elapsed());
    assert_eq!(enrolled.agent, "fresh");
    let target = targets::transfer_server().await;
    let mut text = std::fs::read_to_string(&enrolled.config).expect("agent.toml");
    text.push_str(&format!("\n[services.svc]\ntarget = \"tcp://{}\"\n", target.addr));
    std::fs::write(&enrolled.config, text).expect("edit agent.toml");
    let agent = RunningAgent::start(sallyport_agent::Config::load(&enrolled.config).expect("config"));
    s.relay.wait_agent("fresh").await;
    assert_eq!(s.relay.transport("fresh").map(|t| t.0), Some(sallyport_runtime::link::Transport::Tcp));
    transfer::run(s.relay.service("svc"), 100_000, 100_000, 2).await.expect("through the tunnel");
    // Single use over TCP too.
    let again = tempfile::tempdir().expect("tempdir");
    assert_eq!(refused(enroll(&token, again.path()).await), "join token already used");
    agent.stop().await;
    s.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_ca_does_not_match_the_token_never_gets_the_secret() {
    let s = relay_with_enrollment().await;
    let token = s.token("fresh", 3600).await;
    let mut other_ca = JoinToken::decode(&token).expect("token");
    other_ca.ca_sha256[31] ^= 1;
    let dir = tempfile::tempdir().expect("tempdir");
    let e = enroll(&other_ca.encode(), dir.path()).await.expect_err("wrong CA");
    println!("{e}");
    assert!(matches!(e, EnrollError::WrongRelay(_)), "{e:?}");
    // The secret was not spent: the genuine token still works.
    enroll(&token, dir.path()).await.expect("the same token, right CA");
    s.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_enrollments_with_one_token_exactly_one_wins() {
    let s = relay_with_enrollment().await;
    for round in 0..5 {
        let token = s.token("fresh", 3600).await;
        let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
        let (ra, rb) = tokio::join!(enroll(&token, a.path()), enroll(&token, b.path()));
        let wins = [ra.is_ok(), rb.is_ok()].iter().filter(|ok| **ok).count();
        assert_eq!(wins, 1, "round {round}: {ra:?} / {rb:?}");
        let loser = if ra.is_ok() { rb } else { ra };
        assert_eq!(refused(loser), "join token already used");
    }
    s.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_enrollment_on_a_tunnel_without_a_client_certificate_is_still_refused() {
    let s = relay_with_enrollment().await;
    let ca = std::fs::read(s.pki.dir().join("ca.crt")).expect("ca");
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(tls::roots_from_pem(&ca).expect("roots"))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_TUNNEL.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).expect("quic crypto");
    let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("endpoint");
    let connection = endpoint
        .connect_with(quinn::ClientConfig::new(std::sync::Arc::new(crypto)), s.relay.quic, "127.0.0.1")
        .expect("connect")
        .await
        .expect("the handshake itself completes (enrollment needs it to)");
    let closed =
        tokio::time::timeout(Duration::from_secs(5), connection.closed()).await.expect("closed by the relay");
    println!("tunnel without a certificate: {closed}");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, sallyport_runtime::code(sallyport_proto::codes::close::REFUSED));
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert!(s.relay.connected().is_empty());
    s.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_agent_closes_its_tunnel_and_refuses_its_certificate() {
    let mut s = relay_with_enrollment().await;
    let token = s.token("fresh", 3600).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let enrolled = enroll(&token, dir.path()).await.expect("enrolls");
    let target = targets::transfer_server().await;
    let mut text = std::fs::read_to_string(&enrolled.config).expect("agent.toml");
    text.push_str(&format!("\n[services.svc]\ntarget = \"tcp://{}\"\n", target.addr));
    std::fs::write(&enrolled.config, text).expect("edit");
    let agent = RunningAgent::start(sallyport_agent::Config::load(&enrolled.config).expect("config"));
    s.relay.wait_agent("fresh").await;

    let started = std::time::Instant::now();
    let (status, body) = sallyport_relay::cli::admin_client::request(
        s.relay.admin,
        "POST",
        "/agents/fresh/revoke",
        Some(ADMIN_TOKEN),
    )
    .await
    .expect("admin");
    assert_eq!(status, 200, "{body}");
    println!("{}", body.trim());
    s.relay.wait_agent_gone("fresh").await;
    println!("revoked -> tunnel closed in {:?}", started.elapsed());
    // The agent keeps retrying with the revoked certificate and stays out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(s.relay.connected().is_empty(), "a revoked certificate got back in");
    assert!(transfer::run(s.relay.service("svc"), 10, 10, 1).await.is_err());
    agent.stop().await;
    s.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_renewed_over_the_tunnel_before_expiry_without_dropping_it() {
    let s = relay_with_enrollment_and("agent_cert_validity = \"12s\"").await;
    let token = s.token("fresh", 3600).await;
    let Setup { mut relay, pki: _pki, .. } = s;
    let dir = tempfile::tempdir().expect("tempdir");
    let enrolled = enroll(&token, dir.path()).await.expect("enrolls");
    let issued = std::time::Instant::now();
    let target = targets::transfer_server().await;
    let mut text = std::fs::read_to_string(&enrolled.config).expect("agent.toml");
    text.push_str(&format!("\n[services.svc]\ntarget = \"tcp://{}\"\n", target.addr));
    std::fs::write(&enrolled.config, text).expect("edit");
    let config = sallyport_agent::Config::load(&enrolled.config).expect("config");
    let first = RunningAgent::start(config.clone());
    relay.wait_agent("fresh").await;
    let tunnel = relay.session_id("fresh");
    let original = std::fs::read_to_string(dir.path().join("agent.crt")).expect("cert");

    // Renewed with a third of the lifetime left, over the tunnel that stays up.
    let deadline = issued + Duration::from_secs(12);
    loop {
        let now = std::fs::read_to_string(dir.path().join("agent.crt")).unwrap_or_default();
        if !now.is_empty() && now != original {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not renewed before the certificate expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("renewed {:?} after issue (lifetime 12 s, due at 8 s)", issued.elapsed());
    assert_eq!(relay.session_id("fresh"), tunnel, "the tunnel was not dropped by the renewal");

    // After the original certificate expired, a new connection gets in with the renewed one.
    tokio::time::sleep(
        deadline.saturating_duration_since(std::time::Instant::now()) + Duration::from_secs(1),
    )
    .await;
    // One agent per identity: a second one with the same name would replace the first, which
    // would dial back and replace it in turn, so the first goes before the second comes.
    first.stop().await;
    let second = RunningAgent::start(config);
    let waited = std::time::Instant::now();
    while relay.session_id("fresh").is_none() || relay.session_id("fresh") == tunnel {
        assert!(waited.elapsed() < Duration::from_secs(10), "the renewed certificate was not accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report =
        transfer::run(relay.service("svc"), 10_000, 10_000, 3).await.expect("through the renewed identity");
    assert_eq!(report.down, 10_000);
    second.stop().await;
    relay.stop().await;
}
