//! Attacks on the relay's trust boundaries, each while legitimate traffic keeps flowing: the
//! attack fails, is counted, and nobody else notices.

use std::{net::SocketAddr, time::Duration};

use sallyport_proto::{datagram::Datagram, RelayMessage};
use sallyport_tests::{raw::RawAgent, RunningRelay, TestPki};

/// `GET /metrics` on the relay's admin server.
async fn metrics(relay: &RunningRelay) -> String {
    let (status, body) = sallyport_relay::cli::admin_client::request(relay.admin, "GET", "/metrics", None)
        .await
        .expect("metrics");
    assert_eq!(status, 200, "{body}");
    body
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn encode(datagram: &Datagram<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(datagram.encoded_len());
    datagram.encode(&mut out);
    out
}

/// A compromised agent that learned the id of another agent's UDP flow sends datagrams for it:
/// they never reach that flow's client, they are counted, and the real answers still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_answer_another_agents_udp_flows() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        "",
        "[services.dns]\nagent = \"winbox\"\nudp = \"127.0.0.1:0\"\n\
         [services.other]\nagent = \"intruder\"\nudp = \"127.0.0.1:0\"\n",
    ))
    .await;
    let owner = RawAgent::connect(&pki, "winbox", &pki, relay.quic, &["dns"]).await.expect("owner admitted");
    assert!(matches!(owner.answer, RelayMessage::Welcome(_)), "{:?}", owner.answer);
    let intruder =
        RawAgent::connect(&pki, "intruder", &pki, relay.quic, &["other"]).await.expect("intruder admitted");
    relay.wait_agent("winbox").await;
    relay.wait_agent("intruder").await;

    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("client socket");
    let dns: SocketAddr = relay.service("dns");
    let mut flow_ids = Vec::new();
    for round in 0..20u32 {
        client.send_to(format!("query {round}").as_bytes(), dns).await.expect("query");
        // The owner learns the flow from the relay's datagram, as any agent does.
        let opened = tokio::time::timeout(Duration::from_secs(5), owner.connection.read_datagram())
            .await
            .expect("datagram to the owner in time")
            .expect("owner's tunnel up");
        let flow = match Datagram::decode(&opened).expect("valid datagram") {
            Datagram::Open { flow, service, .. } => {
                assert_eq!(service, "dns");
                flow
            }
            Datagram::Data { flow, .. } => flow,
            Datagram::Unknown { .. } => panic!("the relay does not send Unknown"),
        };
        flow_ids.push(flow);
        // The intruder, told the id, races the owner with answers of its own.
        for _ in 0..5 {
            let evil = encode(&Datagram::Data { flow, payload: b"evil" });
            intruder.connection.send_datagram(evil.into()).expect("intruder sends");
        }
        let good = encode(&Datagram::Data { flow, payload: format!("answer {round}").as_bytes() });
        owner.connection.send_datagram(good.into()).expect("owner answers");
        let mut buf = [0u8; 256];
        let (len, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("answer in time")
            .expect("receive");
        assert_eq!(from, dns);
        assert_eq!(
            &buf[..len],
            format!("answer {round}").as_bytes(),
            "only the owner's answer reaches the client"
        );
    }
    // Nothing of the intruder's arrives late either.
    let mut buf = [0u8; 256];
    let late = tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await;
    assert!(late.is_err(), "an intruder's datagram reached the client: {late:?}");

    let m = metrics(&relay).await;
    let foreign = metric(&m, "sallyport_refusals_total{listener=\"dns\",reason=\"foreign_flow\"}");
    println!("20 flows, 100 forged datagrams: {foreign} counted as foreign, 0 delivered; ids {flow_ids:?}");
    assert!(foreign >= 90.0, "forged datagrams are counted: {foreign}\n{m}");
    // Flow ids are not a counter an agent could walk.
    let sequential = flow_ids.windows(2).filter(|w| w[1] == w[0].wrapping_add(1)).count();
    assert!(sequential < 3, "flow ids look sequential: {flow_ids:?}");
    assert_eq!(relay.connected(), vec!["intruder".to_owned(), "winbox".to_owned()]);
    relay.stop().await;
}
