//! A copied agent identity (its key and certificate from a backup, an image, a stolen disk): it
//! never shares the agent's clients, it is counted and alerted on, and a session ends with its
//! certificate.

use std::time::Duration;

use sallyport_proto::RelayMessage;
use sallyport_tests::{
    metric,
    raw::{key_and_csr, RawAgent},
    RunningAgent, RunningRelay, TestPki,
};

const ADMIN_TOKEN: &str = "identity-test-admin-token";

/// The real agent holds its tunnel; a copy of its bundle connects from another address, again and
/// again: each time refused with a reason that says so, counted for the alert, and the agent's
/// traffic never moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_identity_is_refused_beside_the_live_agent_and_counted() {
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(pki.relay_config(&[("svc", "winbox")], "")).await;
    let target = sallyport_tests::targets::transfer_server().await;
    let agent = RunningAgent::start(pki.agent_config("winbox", &[relay.quic], &[("svc", target.addr)], ""));
    relay.wait_agent("winbox").await;
    let bundle = pki.agent_bundle("winbox");
    let (cert, key) = (bundle.join("agent.crt"), bundle.join("agent.key"));
    let svc = relay.service("svc");
    let flowing = tokio::spawn(sallyport_tests::transfer::run(svc, 8 << 20, 8 << 20, 1));
    for attempt in 0..3 {
        let copy =
            RawAgent::connect_from((&cert, &key), &pki, relay.quic, &["svc"], "127.0.0.2".parse().unwrap())
                .await;
        let reason = match copy {
            Ok(raw) => match raw.answer {
                RelayMessage::Refused { reason } => reason,
                other => panic!("attempt {attempt}: the copy was admitted: {other:?}"),
            },
            Err(closed) => closed,
        };
        assert!(reason.contains("live session from another address"), "{reason}");
    }
    flowing.await.expect("task").expect("the agent's transfer went on intact");
    let body = relay.metrics().await;
    assert_eq!(metric(&body, "sallyport_identity_conflicts_total{agent=\"winbox\"}"), 3.0, "{body}");
    // The same bundle from the agent's own address is the agent reconnecting: it takes over.
    let again = RawAgent::connect_with(&cert, &key, &pki, relay.quic, &["svc"]).await.expect("reconnect");
    assert!(matches!(again.answer, RelayMessage::Welcome(_)), "{:?}", again.answer);
    agent.stop().await;
    relay.stop().await;
}

/// A relay that enrolls agents with certificates of `validity`, and an agent `fresh` enrolled
/// there: its directory (agent.crt, agent.key).
async fn enrolled(pki: &TestPki, validity: &str) -> (RunningRelay, tempfile::TempDir) {
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let config = pki.relay_config(
        &[("svc", "fresh")],
        &format!(
            "admin_token_file = \"admin.token\"\nca_key = \"ca.key\"\ntokens_file = \"tokens.toml\"\n\
             revocations_file = \"revoked.toml\"\nagent_cert_validity = \"{validity}\""
        ),
    );
    let relay = RunningRelay::start(config.clone()).await;
    let (status, body) = sallyport_relay::cli::admin_client::request(
        relay.admin,
        "POST",
        "/tokens?agent=fresh",
        Some(ADMIN_TOKEN),
    )
    .await
    .expect("admin");
    assert_eq!(status, 200, "{body}");
    let token = sallyport_relay::cli::join_token::join_token(&config, &[relay.quic.to_string()], &body)
        .expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    sallyport_agent::enroll::enroll(&token, dir.path()).await.expect("enrolls");
    (relay, dir)
}

/// When `cert` ends, and when it is due for renewal (a third of its lifetime left).
fn lifetime(cert: &std::path::Path) -> (i64, i64) {
    let info = sallyport_runtime::tls::inspect(
        &sallyport_runtime::tls::certs_from_pem(&std::fs::read(cert).expect("cert"), "cert").expect("pem")[0],
    )
    .expect("inspect");
    (info.not_after_unix, info.not_after_unix - (info.not_after_unix - info.not_before_unix) / 3)
}

/// A session ends when its certificate does: an agent renews long before, a copy that cannot
/// renew is cut off at its certificate's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_closed_at_its_certificates_end() {
    let pki = TestPki::new();
    let (relay, dir) = enrolled(&pki, "10s").await;
    let (cert, key) = (dir.path().join("agent.crt"), dir.path().join("agent.key"));
    let mut raw = RawAgent::connect_with(&cert, &key, &pki, relay.quic, &["svc"]).await.expect("admitted");
    let started = std::time::Instant::now();
    let left = (lifetime(&cert).0 - sallyport_runtime::clock::unix_now() as i64).max(0) as u64;
    let ended =
        tokio::time::timeout(Duration::from_secs(left + 5), async { while raw.next().await.is_some() {} })
            .await;
    assert!(ended.is_ok(), "the session outlived its certificate");
    let reason = raw.connection.close_reason().map(|r| r.to_string()).unwrap_or_default();
    println!("session closed {:?} after it began, {left} s of certificate left: {reason}", started.elapsed());
    assert!(reason.contains("certificate expired"), "{reason}");
    relay.stop().await;
}

/// A certificate renews once, for one key (asking again for that key is how an agent recovers a
/// lost answer); once the renewed certificate has connected, the old one (and any copy of it) is
/// refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_retires_the_old_certificate_and_renews_for_one_key() {
    let pki = TestPki::new();
    let (relay, dir) = enrolled(&pki, "15s").await;
    let (cert, key) = (dir.path().join("agent.crt"), dir.path().join("agent.key"));
    let mut raw = RawAgent::connect_with(&cert, &key, &pki, relay.quic, &["svc"]).await.expect("admitted");
    let due = lifetime(&cert).1;
    let wait = (due - sallyport_runtime::clock::unix_now() as i64 + 1).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(wait)).await;

    let (new_key, csr) = key_and_csr();
    let renewed = raw.renew(&csr).await.expect("renewed when due");
    let (_, other_csr) = key_and_csr();
    let again = raw.renew(&other_csr).await.expect_err("a second key for the same certificate");
    println!("the same certificate renewed again for another key: {again}");
    assert!(again.contains("renewed already, for another key"), "{again}");

    let renewed_dir = tempfile::tempdir().expect("tempdir");
    let (new_cert, new_key_file) =
        (renewed_dir.path().join("agent.crt"), renewed_dir.path().join("agent.key"));
    std::fs::write(&new_cert, renewed).expect("cert");
    std::fs::write(&new_key_file, new_key).expect("key");
    // The old certificate still connects until the renewed one has.
    drop(RawAgent::connect_with(&cert, &key, &pki, relay.quic, &["svc"]).await.expect("old still in"));
    let fresh = RawAgent::connect_with(&new_cert, &new_key_file, &pki, relay.quic, &["svc"]).await;
    assert!(matches!(fresh.expect("renewed admitted").answer, RelayMessage::Welcome(_)));
    let old = RawAgent::connect_with(&cert, &key, &pki, relay.quic, &["svc"]).await;
    let refused = match old {
        Err(reason) => reason,
        Ok(raw) => format!("{:?}", raw.answer),
    };
    println!("the old certificate after the renewed one connected: {refused}");
    assert!(refused.contains("replaced by a newer one"), "{refused}");
    relay.stop().await;
}
