//! Containers in a service group, against the real Docker Engine: a stopped on-demand container
//! counts as available (no health check starts it), so failover's first member starts it for the
//! next client instead of sending it elsewhere; once its start fails, that member is out and the
//! clients go to the next one. Skips where no engine answers; fails in CI.

use std::time::{Duration, Instant};

use sallyport_tests::{
    docker::{self, Cleanup, IMAGE_PORT},
    docker_or_skip, targets, transfer, RunningAgent, RunningRelay, TestPki,
};
use tokio::io::AsyncReadExt;

/// A failover group: agent `first` carries the service in its container `name`, agent `second`
/// with a greeter.
async fn group(
    pki: &TestPki,
    (first, name): (&str, &str),
    container: &str,
) -> (RunningRelay, RunningAgent, RunningAgent, targets::Target) {
    sallyport_tests::init_logging();
    let services = format!(
        "[services.svc]\nagents = [\"{first}\", \"second\"]\nstrategy = \"failover\"\nlisten = \"127.0.0.1:0\"\n\
         [services.svc.health]\ncheck = \"tcp\"\ninterval = \"500ms\"\n"
    );
    let mut relay = RunningRelay::start(pki.relay_config_toml("", &services)).await;
    let first_agent = RunningAgent::start(pki.agent_config_toml(
        first,
        &[relay.quic],
        "",
        &format!("[docker]\nstop_grace = \"1s\"\nstart_timeout = \"20s\"\n{container}\n[services.svc]\ntarget = \"container://{name}:{IMAGE_PORT}\"\n"),
    ));
    let greeter = targets::greeter(b"B").await;
    let second = RunningAgent::start(pki.agent_config_toml(
        "second",
        &[relay.quic],
        "",
        &format!("[services.svc]\ntarget = \"tcp://{}\"\n", greeter.addr),
    ));
    relay.wait_agent(first).await;
    relay.wait_agent("second").await;
    (relay, first_agent, second, greeter)
}

/// The health word of each member of `svc` on the status page, once they stand as `wanted`.
async fn wait_members(relay: &RunningRelay, wanted: &[(&str, &str)]) -> Duration {
    let started = Instant::now();
    loop {
        let (_, text) = sallyport_relay::cli::admin_client::request(relay.admin, "GET", "/status.txt", None)
            .await
            .expect("status");
        let now: Vec<(String, String)> = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|c| c.len() >= 5 && c[0] == "svc" && c[1] == "failover")
            .map(|c| (c[2].to_owned(), c[3].to_owned()))
            .collect();
        if now.iter().map(|(a, s)| (a.as_str(), s.as_str())).eq(wanted.iter().copied()) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "members {now:?}, wanted {wanted:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_starts_the_first_members_stopped_container_instead_of_sending_clients_elsewhere() {
    docker_or_skip!();
    let image = docker::test_image();
    let _cleanup = Cleanup::new("dock-group");
    let pki = TestPki::new();
    let container =
        format!("[containers.grouped]\nimage = \"{image}\"\nstart = \"on-demand\"\nidle_stop = \"1h\"\n");
    let (relay, first, second, _greeter) = group(&pki, ("dock-group", "grouped"), &container).await;
    assert!(!docker::running("sallyport-grouped"), "nothing runs before the first client");
    // Its check never starts it: a stopped on-demand container is available.
    wait_members(&relay, &[("dock-group", "healthy"), ("second", "healthy")]).await;
    assert!(!docker::running("sallyport-grouped"), "a health check started the container");

    // The first client starts it on the first member (the greeter of the second would fail the
    // transfer's protocol).
    let report =
        transfer::run(relay.service("svc"), 100_000, 1 << 20, 3).await.expect("carried by the container");
    assert_eq!(report.down, 1 << 20);
    let stats = first.containers.stats("grouped").expect("declared");
    println!("the first member started its container for the client: {:?}", stats.last_cold_start);
    assert_eq!(stats.starts, 1);
    // Running, its port is what the check looks at now.
    wait_members(&relay, &[("dock-group", "healthy"), ("second", "healthy")]).await;
    first.stop().await;
    second.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_container_fails_to_start_leaves_the_group_and_clients_go_to_the_next() {
    docker_or_skip!();
    let image = docker::test_image();
    let _cleanup = Cleanup::new("dock-fails");
    let pki = TestPki::new();
    let container =
        format!("[containers.failing]\nimage = \"{image}\"\ncommand = [\"/transfer-server\", \"no-such-subcommand\"]\n");
    let (relay, first, second, _greeter) = group(&pki, ("dock-fails", "failing"), &container).await;
    wait_members(&relay, &[("dock-fails", "healthy"), ("second", "healthy")]).await;
    // The first client goes to the first member, whose start fails: that client is refused.
    let mut client = tokio::net::TcpStream::connect(relay.service("svc")).await.expect("connect");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut got)).await;
    assert!(got.is_empty(), "a container that did not start served {got:?}");
    let out = wait_members(&relay, &[("dock-fails", "unhealthy"), ("second", "healthy")]).await;
    println!(
        "the member whose container failed to start left the group {out:?} after its client was refused"
    );
    assert_eq!(first.containers.stats("failing").expect("declared").failed_starts, 1);
    for _ in 0..20 {
        let mut stream = tokio::net::TcpStream::connect(relay.service("svc")).await.expect("connect");
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("the next member answers");
        assert_eq!(&byte, b"B");
    }
    first.stop().await;
    second.stop().await;
    relay.stop().await;
}
