//! The agent's containers against the real Docker Engine on this machine: created from
//! `agent.toml`, started by the first connection, stopped when idle, recovered after being killed
//! from outside, and never touching a container the agent does not own. Skips where no engine
//! answers; fails in CI.

use std::time::{Duration, Instant};

use sallyport_agent::{ContainerError, ContainerState, Containers};
use sallyport_tests::{
    docker::{self, Cleanup, IMAGE_PORT},
    docker_or_skip, transfer, RunningAgent, RunningRelay, TestPki,
};

const MIB: u64 = 1024 * 1024;

/// `[containers.NAME]` for the test image, plus `[services.svc]` pointing at its port.
fn container_config(name: &str, image: &str, lines: &str) -> String {
    format!(
        "\n[containers.{name}]\nimage = \"{image}\"\n{lines}\n\n[services.svc]\ntarget = \"container://{name}:{IMAGE_PORT}\"\n"
    )
}

async fn tunnel(pki: &TestPki, agent: &str, containers: &str) -> (RunningRelay, RunningAgent) {
    sallyport_tests::init_logging();
    let mut relay = RunningRelay::start(pki.relay_config(&[("svc", agent)], "")).await;
    let config = pki.agent_config(agent, &[relay.quic], &[], containers);
    let running = RunningAgent::start(config);
    relay.wait_agent(agent).await;
    (relay, running)
}

/// Waits until `check` holds for the container's state.
async fn wait_state(
    containers: &Containers,
    name: &str,
    what: &str,
    check: impl Fn(&ContainerState) -> bool,
) {
    let mut state = containers.watch(name).expect("declared");
    let waited = tokio::time::timeout(Duration::from_secs(30), state.wait_for(|s| check(s))).await.is_ok();
    assert!(waited, "{name} not {what} within 30 s: {:?}", *state.borrow());
}

fn is_running(state: &ContainerState) -> bool {
    matches!(state, ContainerState::Running { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_start_carries_data_intact_then_idle_stop_then_starts_again() {
    docker_or_skip!();
    let image = docker::test_image();
    let _cleanup = Cleanup::new("dock-ondemand");
    let pki = TestPki::new();
    let lines = "start = \"on-demand\"\nidle_stop = \"2s\"\nmemory = \"64MiB\"\ncpus = 0.5";
    // The test server does not handle SIGTERM: a short grace keeps the stop quick.
    let config = format!("[docker]\nstop_grace = \"1s\"\n{}", container_config("od", &image, lines));
    let (relay, agent) = tunnel(&pki, "dock-ondemand", &config).await;
    let name = "sallyport-od";
    assert!(!docker::running(name), "nothing runs before the first connection");

    let report = transfer::run(relay.service("svc"), MIB, 3 * MIB, 7).await.expect("first connection intact");
    assert_eq!((report.up, report.down), (MIB, 3 * MIB));
    let stats = agent.containers.stats("od").expect("declared");
    let cold = stats.last_cold_start.expect("the first connection started the container");
    println!("cold start (create + start + port open): {cold:?}");
    assert_eq!(stats.starts, 1);

    // The declared limits reached the engine, and the container carries the agent's labels.
    assert_eq!(docker::inspect(name, "{{.HostConfig.Memory}}"), (64 * MIB).to_string());
    assert_eq!(docker::inspect(name, "{{.HostConfig.NanoCpus}}"), "500000000");
    assert_eq!(docker::inspect(name, "{{index .Config.Labels \"io.sallyport.agent\"}}"), "dock-ondemand");

    // Idle stop two seconds after the last connection closed.
    let closed = Instant::now();
    wait_state(&agent.containers, "od", "stopped", |s| matches!(s, ContainerState::Stopped { .. })).await;
    let idle = closed.elapsed();
    println!("stopped {idle:?} after the last connection closed (idle_stop 2 s, stop grace 1 s)");
    assert!(idle >= Duration::from_millis(1500), "stopped too early: {idle:?}");
    assert!(!docker::running(name));

    // The next connection starts it again (its address is looked up anew).
    let report = transfer::run(relay.service("svc"), 100_000, 100_000, 8).await.expect("after idle stop");
    assert_eq!(report.down, 100_000);
    assert_eq!(agent.containers.stats("od").expect("declared").starts, 2);
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_share_one_cold_start() {
    docker_or_skip!();
    let image = docker::test_image();
    let _cleanup = Cleanup::new("dock-shared");
    let pki = TestPki::new();
    let (relay, agent) = tunnel(&pki, "dock-shared", &container_config("shared", &image, "")).await;
    let svc = relay.service("svc");
    let transfers: Vec<_> =
        (0..8u64).map(|i| tokio::spawn(transfer::run(svc, 200_000 + i, 300_000 + i, i))).collect();
    for (i, t) in transfers.into_iter().enumerate() {
        let report = t.await.expect("task").unwrap_or_else(|e| panic!("transfer {i}: {e}"));
        assert_eq!(report.down, 300_000 + i as u64);
    }
    let stats = agent.containers.stats("shared").expect("declared");
    println!(
        "8 concurrent first connections: {} start(s), cold start {:?}",
        stats.starts, stats.last_cold_start
    );
    assert_eq!(stats.starts, 1, "one start shared by all waiting connections");
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_container_killed_from_outside_is_restarted_and_serves_again() {
    docker_or_skip!();
    let image = docker::test_image();
    let _cleanup = Cleanup::new("dock-always");
    let pki = TestPki::new();
    let (relay, agent) =
        tunnel(&pki, "dock-always", &container_config("keep", &image, "start = \"always\"")).await;
    wait_state(&agent.containers, "keep", "running", is_running).await;
    let first_ip = docker::inspect("sallyport-keep", "{{.NetworkSettings.IPAddress}}");

    let killed = Instant::now();
    docker::docker(&["kill", "sallyport-keep"]);
    wait_state(&agent.containers, "keep", "seen dead", |s| !is_running(s)).await;
    wait_state(&agent.containers, "keep", "restarted", is_running).await;
    println!("killed from outside -> running again in {:?}", killed.elapsed());
    let report = transfer::run(relay.service("svc"), 50_000, 50_000, 3).await.expect("serves after restart");
    assert_eq!(report.down, 50_000);
    println!(
        "address before {first_ip}, after {}",
        docker::inspect("sallyport-keep", "{{.NetworkSettings.IPAddress}}")
    );
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_the_agent_does_not_own_is_never_touched() {
    docker_or_skip!();
    let image = docker::test_image();
    let mut cleanup = Cleanup::new("dock-foreign");
    cleanup.also("sallyport-foreign");
    // Someone else's container, under the very name the agent would use.
    let id = docker::docker(&["create", "--name", "sallyport-foreign", &image]);
    let pki = TestPki::new();
    let (relay, agent) = tunnel(&pki, "dock-foreign", &container_config("foreign", &image, "")).await;
    let refused = transfer::run(relay.service("svc"), 10, 10, 1).await;
    assert!(refused.is_err(), "the connection is refused: {refused:?}");
    let direct = agent.containers.connect("foreign", IMAGE_PORT).await.map(|_| ());
    assert_eq!(direct, Err(ContainerError::NotOwned("sallyport-foreign".into())));
    println!("{}", direct.expect_err("refused"));
    assert_eq!(docker::inspect("sallyport-foreign", "{{.Id}}"), id, "not replaced");
    assert!(!docker::running("sallyport-foreign"), "not started");
    assert_eq!(
        agent.containers.status("foreign").await,
        Err(ContainerError::NotOwned("sallyport-foreign".into()))
    );
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failures_are_clear_errors() {
    docker_or_skip!();
    let image = docker::test_image();
    let _cleanup = Cleanup::new("dock-errors");
    let pki = TestPki::new();
    let containers = format!(
        "[docker]\nstart_timeout = \"20s\"\n\
         [containers.noimage]\nimage = \"sallyport-test-absent:none\"\n\
         [containers.exits]\nimage = \"{image}\"\ncommand = [\"/transfer-server\", \"no-such-subcommand\"]\n"
    );
    let (relay, agent) = tunnel(&pki, "dock-errors", &containers).await;
    let c = &agent.containers;
    let missing = c.connect("noimage", IMAGE_PORT).await.map(|_| ()).expect_err("no image");
    println!("{missing}");
    assert_eq!(missing, ContainerError::ImageMissing { image: "sallyport-test-absent:none".into() });
    let exited = c.connect("exits", IMAGE_PORT).await.map(|_| ()).expect_err("exits");
    println!("{exited}");
    assert!(matches!(exited, ContainerError::ExitedDuringStart { code: 2, .. }), "{exited:?}");
    let undeclared = c.connect("nope", IMAGE_PORT).await.map(|_| ()).expect_err("undeclared");
    assert_eq!(undeclared, ContainerError::NotDeclared("nope".into()));
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_engine_is_a_refusal_naming_the_endpoint() {
    let pki = TestPki::new();
    let containers = "[docker]\nendpoint = \"unix:///nonexistent/docker.sock\"\n\
         [containers.x]\nimage = \"anything\"\n\n[services.svc]\ntarget = \"container://x:80\"\n";
    let mut relay = RunningRelay::start(pki.relay_config(&[("svc", "dock-noengine")], "")).await;
    let agent = RunningAgent::start(pki.agent_config("dock-noengine", &[relay.quic], &[], containers));
    relay.wait_agent("dock-noengine").await;
    assert!(transfer::run(relay.service("svc"), 10, 10, 1).await.is_err());
    let e = agent.containers.connect("x", 80).await.map(|_| ()).expect_err("no engine");
    println!("{e}");
    assert!(
        matches!(&e, ContainerError::EngineUnreachable { endpoint, .. } if endpoint == "unix:///nonexistent/docker.sock"),
        "{e:?}"
    );
    agent.stop().await;
    relay.stop().await;
}
