//! Lines a peer can cause at will are budgeted per peer: an agent flooding `Renew` writes a few
//! lines, not ten thousand, and one agent's flood of refusals never hides another's; what is held
//! back is summed up in one line per period.

use std::time::Duration;

use sallyport_proto::{AgentMessage, RelayMessage};
use sallyport_tests::{
    process::{addr_field, Spawned},
    raw::RawAgent,
    TestPki,
};

const ADMIN_TOKEN: &str = "log-budgets-test-admin-token";
const RENEWALS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_writes_a_few_lines_and_hides_no_other_agents_events() {
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token");
    let relay_toml = pki.dir().join("budget-relay.toml");
    let mut text = "[relay]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"ca.crt\"\n\
                    cert = \"relay.crt\"\nkey = \"relay.key\"\nadmin_token_file = \"admin.token\"\n\
                    revocations_file = \"revoked.toml\"\n"
        .to_owned();
    for agent in ["noisy", "thief", "victim"] {
        text.push_str(&format!("[services.{agent}]\nagent = \"{agent}\"\nlisten = \"127.0.0.1:0\"\n"));
    }
    std::fs::write(&relay_toml, text).expect("relay.toml");
    let mut relay = Spawned::relay(&relay_toml);
    let ready = relay.wait_line("relay ready", Duration::from_secs(10));
    let (admin, quic) = (addr_field(&ready, "admin"), addr_field(&ready, "quic"));
    let started = std::time::Instant::now();

    // An agent asks for ten thousand renewals it is not due (each refused).
    let mut noisy = RawAgent::connect_current(&pki, "noisy", &pki, quic, &["noisy"]).await.expect("noisy");
    let (_, csr) = sallyport_tests::raw::key_and_csr();
    let mut refused = 0;
    for _ in 0..RENEWALS / 100 {
        for _ in 0..100 {
            noisy.send(&AgentMessage::Renew { csr_pem: csr.clone() }).await;
        }
        let mut answers = 0;
        while answers < 100 {
            match tokio::time::timeout(Duration::from_secs(10), noisy.next()).await.expect("answer in time") {
                Some(RelayMessage::Renewed(Err(_))) => {
                    answers += 1;
                    refused += 1;
                }
                Some(RelayMessage::Renewed(Ok(_))) => panic!("a renewal that was not due was signed"),
                Some(_) => {}
                None => panic!("control stream ended"),
            }
        }
    }
    assert_eq!(refused, RENEWALS);

    // Two agents are revoked; one of them tries again and again (as many times as its address may
    // open handshakes), then the other once.
    let thief = pki.agent_bundle("thief");
    let victim = pki.agent_bundle("victim");
    for agent in ["thief", "victim"] {
        let (status, body) = sallyport_relay::cli::admin_client::request(
            admin,
            "POST",
            &format!("/agents/{agent}/revoke"),
            Some(ADMIN_TOKEN),
        )
        .await
        .expect("revoke");
        assert_eq!(status, 200, "{body}");
    }
    for _ in 0..50 {
        let attempt = RawAgent::connect_with(
            &thief.join("agent.crt"),
            &thief.join("agent.key"),
            &pki,
            quic,
            &["thief"],
        )
        .await;
        assert!(attempt.is_err(), "a revoked certificate got in");
    }
    // The victim is another host (the thief's address has used up its handshakes).
    let from = std::net::IpAddr::from([127, 0, 0, 3]);
    let attempt = RawAgent::connect_from(
        (&victim.join("agent.crt"), &victim.join("agent.key")),
        &pki,
        quic,
        &["victim"],
        from,
    )
    .await;
    assert!(attempt.is_err(), "a revoked certificate got in");

    // Within a period the held-back lines are summed up.
    relay.wait_line("log lines held back", Duration::from_secs(15));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let periods = 1 + started.elapsed().as_secs() as usize / 10;
    let log = relay.drain().to_vec();
    let count = |needle: &str| log.iter().filter(|l| l.contains(needle)).count();
    let not_renewed = count("agent certificate not renewed");
    println!("{RENEWALS} refused renewals in {:?}: {not_renewed} lines", started.elapsed());
    assert!((1..=3 * periods).contains(&not_renewed), "{not_renewed} lines for {RENEWALS} refusals");
    let thief_lines =
        log.iter().filter(|l| l.contains("revoked certificate refused") && l.contains("thief")).count();
    assert!((1..=3 * periods).contains(&thief_lines), "{thief_lines} lines for 50 attempts");
    assert!(
        log.iter().any(|l| l.contains("revoked certificate refused") && l.contains("victim")),
        "the victim's revoked certificate is logged after another agent's flood"
    );
    let summary: Vec<&String> = log.iter().filter(|l| l.contains("log lines held back")).collect();
    println!("{summary:?}");
    let held: u64 = summary
        .iter()
        .filter_map(|l| {
            l.split("left_out=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok()
        })
        .sum();
    assert!(held as usize >= RENEWALS - 3 * periods, "held-back lines are counted: {summary:?}");
    relay.kill();
}
