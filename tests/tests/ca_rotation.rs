//! The root CA stays offline: relays sign with an intermediate, which the operator rotates with
//! the root's key; agents keep their certificates, renew into the new intermediate and never
//! re-enroll.

use std::{net::SocketAddr, time::Duration};

use sallyport_agent::enroll::enroll;
use sallyport_relay::trust::{pki, rotate};
use sallyport_runtime::tls;
use sallyport_tests::{servers, targets, transfer, RunningAgent, RunningRelay, TestPki};

const ADMIN_TOKEN: &str = "rotation-test-admin-token";

fn chain(path: &std::path::Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    tls::certs_from_pem(&std::fs::read(path).expect("read certificate"), "test").expect("pem")
}

/// The intermediate a certificate file carries after its leaf.
fn intermediate_of(path: &std::path::Path) -> Vec<u8> {
    chain(path).get(1).expect("a certificate with its intermediate").to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_intermediate_keeps_every_agent_without_re_enrolling() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let extra = "admin_token_file = \"admin.token\"\nca_key = \"ca.key\"\ntokens_file = \"tokens.toml\"\n\
                 revocations_file = \"revoked.toml\"\nagent_cert_validity = \"20s\"";
    let mut config = pki.relay_config(&[("svc", "fresh"), ("other", "winbox")], extra);
    config.relay.listen = at(servers::free_port());
    let mut relay = RunningRelay::start(config.clone()).await;
    let old_intermediate = intermediate_of(&pki.dir().join(pki::RELAY_CERT));

    // One agent enrolled with a join token (renews over the tunnel), one from an offline bundle.
    let (status, body) = sallyport_relay::cli::admin_client::request(
        relay.admin,
        "POST",
        "/tokens?agent=fresh&ttl_secs=600",
        Some(ADMIN_TOKEN),
    )
    .await
    .expect("admin");
    assert_eq!(status, 200, "{body}");
    let token = sallyport_relay::cli::join_token::join_token(&config, &[relay.quic.to_string()], &body)
        .expect("token");
    let enrolled_dir = tempfile::tempdir().expect("tempdir");
    let enrolled = enroll(&token, enrolled_dir.path()).await.expect("enrolls");
    let agent_crt = enrolled_dir.path().join("agent.crt");
    assert_eq!(intermediate_of(&agent_crt), old_intermediate, "enrolled under the intermediate");
    let target = targets::transfer_server().await;
    let text = std::fs::read_to_string(&enrolled.config).expect("agent.toml");
    let mut text =
        text.replacen("[agent]\n", "[agent]\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n", 1);
    text.push_str(&format!("\n[services.svc]\ntarget = \"tcp://{}\"\n", target.addr));
    std::fs::write(&enrolled.config, text).expect("edit agent.toml");
    let fresh = RunningAgent::start(sallyport_agent::Config::load(&enrolled.config).expect("config"));
    let winbox =
        RunningAgent::start(pki.agent_config("winbox", &[relay.quic], &[("other", target.addr)], ""));
    relay.wait_agent("fresh").await;
    relay.wait_agent("winbox").await;
    transfer::run(relay.service("svc"), 1000, 1000, 1).await.expect("fresh before rotation");
    transfer::run(relay.service("other"), 1000, 1000, 1).await.expect("winbox before rotation");

    // The operator rotates with the root's key, kept away from the relay's files.
    let offline = tempfile::tempdir().expect("offline disk");
    let root_key = offline.path().join("root.key");
    std::fs::rename(pki.dir().join(pki::ROOT_KEY), &root_key).expect("move the root key offline");
    let report = rotate::rotate(pki.dir(), Some(&root_key)).expect("rotate");
    println!("rotated: names {:?}, old files in {}", report.sans, report.retired.display());
    let new_intermediate = intermediate_of(&pki.dir().join(pki::RELAY_CERT));
    assert_ne!(new_intermediate, old_intermediate);

    // The relay restarts with the new files (as pods do with an updated Secret).
    relay.stop().await;
    let mut relay = RunningRelay::start(config.clone()).await;
    relay.wait_agent("fresh").await;
    relay.wait_agent("winbox").await;
    transfer::run(relay.service("svc"), 1000, 1000, 2).await.expect("enrolled agent after rotation");
    transfer::run(relay.service("other"), 1000, 1000, 2).await.expect("bundled agent after rotation");
    assert_eq!(intermediate_of(&agent_crt), old_intermediate, "still the old certificate");

    // The enrolled agent's renewal (due at two thirds of 20 s) is signed by the new intermediate.
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    while intermediate_of(&agent_crt) != new_intermediate {
        assert!(std::time::Instant::now() < deadline, "no renewal under the new intermediate");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tls::verify_chain(&chain(&agent_crt), &chain(&pki.dir().join(pki::CA_CERT))[0])
        .expect("chains to the root");

    // A bundle made after the rotation is signed by the new intermediate and gets in too.
    let bundle = pki.agent_bundle("late");
    assert_eq!(intermediate_of(&bundle.join("agent.crt")), new_intermediate);
    assert_eq!(
        std::fs::read(bundle.join("ca.crt")).expect("ca"),
        std::fs::read(pki.dir().join(pki::CA_CERT)).expect("ca"),
        "bundles carry the root, never the intermediate, as their CA"
    );
    fresh.stop().await;
    winbox.stop().await;
    relay.stop().await;
}

/// The relay signs only with an intermediate: given the root's own key it does not start, and
/// says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_given_the_root_key_refuses_to_start() {
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    let config = pki.relay_config(
        &[("svc", "winbox")],
        "admin_token_file = \"admin.token\"\nca_key = \"root.key\"\ntokens_file = \"tokens.toml\"\n\
         revocations_file = \"revoked.toml\"",
    );
    let e = sallyport_relay::Relay::bind(config).await.expect_err("the root's key is refused");
    let e = e.to_string();
    println!("{e}");
    assert!(e.contains("relay.ca_key") && e.contains("root CA's key") && e.contains("ca rotate"), "{e}");
}
