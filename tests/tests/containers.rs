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
         [containers.exits]\nimage = \"{image}\"\ncommand = [\"/transfer-server\", \"no-such-subcommand\"]\n\
         [containers.hog]\nimage = \"{image}\"\nmemory = \"16MiB\"\ncommand = [\"/transfer-server\", \"hog\", \"--mib\", \"256\"]\n"
    );
    let (relay, agent) = tunnel(&pki, "dock-errors", &containers).await;
    let c = &agent.containers;
    let missing = c.connect("noimage", IMAGE_PORT).await.map(|_| ()).expect_err("no image");
    println!("{missing}");
    assert_eq!(missing, ContainerError::ImageMissing { image: "sallyport-test-absent:none".into() });
    let exited = c.connect("exits", IMAGE_PORT).await.map(|_| ()).expect_err("exits");
    println!("{exited}");
    assert!(matches!(exited, ContainerError::ExitedDuringStart { code: 2, .. }), "{exited:?}");
    let oom = c.connect("hog", IMAGE_PORT).await.map(|_| ()).expect_err("out of memory");
    println!("{oom}");
    assert_eq!(oom, ContainerError::OutOfMemory { name: "hog".into(), limit: "16 MiB".into() });
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

/// The admin API as the CLI uses it.
async fn admin(relay: &RunningRelay, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    sallyport_relay::cli::admin_client::request(relay.admin, method, path, token)
        .await
        .expect("admin answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_commands_start_stop_restart_status_and_logs_with_the_admin_token() {
    docker_or_skip!();
    let image = docker::test_image();
    let _cleanup = Cleanup::new("dock-commands");
    let pki = TestPki::new();
    let token_file = pki.dir().join("admin.token");
    std::fs::write(&token_file, "s3cret-token-0123456789\n").expect("token file");
    let relay_extra = format!(
        "admin_token_file = \"{}\"\nrevocations_file = \"revoked.toml\"\nidle_timeout = \"10s\"",
        token_file.display()
    );
    let mut relay = RunningRelay::start(pki.relay_config(&[("svc", "dock-commands")], &relay_extra)).await;
    let config =
        format!("[docker]\nstop_grace = \"1s\"\n{}", container_config("cmd", &image, "start = \"manual\""));
    let agent = RunningAgent::start(pki.agent_config("dock-commands", &[relay.quic], &[], &config));
    relay.wait_agent("dock-commands").await;
    let token = Some("s3cret-token-0123456789");
    let base = "/agents/dock-commands/containers/cmd";

    // Commands need the token; reads do not.
    assert_eq!(admin(&relay, "POST", &format!("{base}/start"), None).await.0, 401);
    assert_eq!(admin(&relay, "POST", &format!("{base}/start"), Some("s3cret-token-012345678X")).await.0, 401);
    assert!(!docker::running("sallyport-cmd"), "refused commands do nothing");

    let (status, body) = admin(&relay, "POST", &format!("{base}/start"), token).await;
    assert_eq!(status, 200, "{body}");
    println!("start: {}", body.trim());
    assert!(docker::running("sallyport-cmd"));
    let (_, body) = admin(&relay, "POST", &format!("{base}/status"), token).await;
    assert_eq!(body.trim(), "cmd: running");
    // Started is not yet logged: the server writes its line once it listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, logs) = admin(&relay, "POST", &format!("{base}/logs?tail=5"), token).await;
        if logs.contains("transfer server listening") {
            break;
        }
        assert!(Instant::now() < deadline, "the container never logged that it listens: {logs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The agent's container states reach the relay's agent listing.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, listing) = admin(&relay, "GET", "/agents", None).await;
        if listing.contains("container cmd running") {
            println!("{}", listing.trim());
            break;
        }
        assert!(Instant::now() < deadline, "listing never showed the container running: {listing}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let started = docker::inspect("sallyport-cmd", "{{.State.StartedAt}}");
    let (status, body) = admin(&relay, "POST", &format!("{base}/restart"), token).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(docker::inspect("sallyport-cmd", "{{.State.StartedAt}}"), started, "restarted");
    let report = transfer::run(relay.service("svc"), 20_000, 20_000, 5).await.expect("serves after restart");
    assert_eq!(report.down, 20_000);

    let (status, body) = admin(&relay, "POST", &format!("{base}/stop"), token).await;
    assert_eq!((status, body.trim()), (200, "cmd stopped"));
    assert!(!docker::running("sallyport-cmd"));

    // Only declared containers, only connected agents, only known actions.
    let (status, body) = admin(&relay, "POST", "/agents/dock-commands/containers/other/start", token).await;
    assert_eq!(status, 502);
    assert!(body.contains("not declared"), "{body}");
    assert_eq!(admin(&relay, "POST", "/agents/nobody/containers/cmd/start", token).await.0, 404);
    assert_eq!(admin(&relay, "POST", &format!("{base}/explode"), token).await.0, 400);

    // The CLI speaks to the same API, reading the admin address and token from relay.toml.
    let cli_config = pki.dir().join("cli-relay.toml");
    std::fs::write(
        &cli_config,
        format!(
            "[relay]\nadmin = \"{}\"\nadmin_token_file = \"admin.token\"\nrevocations_file = \"revoked.toml\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\nkey = \"relay.key\"\n\
             [services.svc]\nagent = \"dock-commands\"\nlisten = \"127.0.0.1:1\"\n",
            relay.admin
        ),
    )
    .expect("cli config");
    let cli = move |args: &[&str]| {
        let out = std::process::Command::new(sallyport_tests::process::binary("sallyport-relay"))
            .args(args)
            .arg("--config")
            .arg(&cli_config)
            .output()
            .expect("relay CLI runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cli_run = tokio::task::spawn_blocking(move || {
        let started = cli(&["container", "start", "--agent", "dock-commands", "cmd"]);
        let status = cli(&["container", "status", "--agent", "dock-commands", "cmd"]);
        let wrong = cli(&["container", "start", "--agent", "dock-commands", "nope"]);
        let agents = cli(&["agents"]);
        let table = cli(&["status"]);
        assert!(table.0 && table.1.contains("CONTAINER") && table.1.contains("cmd"), "{table:?}");
        (started, status, wrong, agents)
    })
    .await
    .expect("CLI task");
    let (started, status, wrong, agents) = cli_run;
    assert!(started.0, "{started:?}");
    assert_eq!(status.1.trim(), "cmd: running", "{status:?}");
    assert!(!wrong.0 && wrong.2.contains("not declared"), "{wrong:?}");
    assert!(agents.1.contains("agent dock-commands"), "{agents:?}");
    println!("CLI: {} / {} / error: {}", started.1.trim(), status.1.trim(), wrong.2.trim());
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_going_away_and_coming_back_is_survived() {
    docker_or_skip!();
    let image = docker::test_image();
    let _cleanup = Cleanup::new("dock-engine");
    let mut engine = docker::EngineProxy::start();
    let pki = TestPki::new();
    let config = format!(
        "[docker]\nendpoint = \"{}\"\nstart_timeout = \"10s\"\n{}",
        engine.endpoint(),
        container_config("eng", &image, "start = \"on-demand\"")
    );
    let (relay, agent) = tunnel(&pki, "dock-engine", &config).await;
    let report = transfer::run(relay.service("svc"), 10_000, 10_000, 1).await.expect("engine up");
    assert_eq!(report.down, 10_000);

    engine.down().await;
    let gone = Instant::now();
    wait_state(&agent.containers, "eng", "engine-down", |s| *s == ContainerState::EngineDown).await;
    println!("engine gone -> agent saw it in {:?}", gone.elapsed());
    // Stopped from outside while the agent cannot see: it must re-list when the engine returns.
    docker::docker(&["stop", "-t", "1", "sallyport-eng"]);
    let e = agent.containers.connect("eng", IMAGE_PORT).await.map(|_| ()).expect_err("no engine");
    assert!(matches!(e, ContainerError::EngineUnreachable { .. }), "{e:?}");
    assert!(
        transfer::run(relay.service("svc"), 10, 10, 2).await.is_err(),
        "refused while the engine is away"
    );

    engine.up();
    let back = Instant::now();
    wait_state(&agent.containers, "eng", "re-listed", |s| matches!(s, ContainerState::Stopped { .. })).await;
    println!("engine back -> re-listed in {:?}", back.elapsed());
    let report =
        transfer::run(relay.service("svc"), 30_000, 30_000, 3).await.expect("works after the engine returns");
    assert_eq!(report.down, 30_000);
    agent.stop().await;
    relay.stop().await;
}

/// A container whose logs run to megabytes: `logs` answers with their end, cut to fit one control
/// frame with a marker, and the tunnel (and the service behind it) stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabytes_of_container_logs_come_back_cut_and_leave_the_tunnel_up() {
    docker_or_skip!();
    sallyport_tests::init_logging();
    let image = docker::test_image();
    let _cleanup = Cleanup::new("dock-chatty");
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), "chatty-token-0123456789").expect("token file");
    let mut relay = RunningRelay::start(pki.relay_config(
        &[("svc", "dock-chatty")],
        "admin_token_file = \"admin.token\"\nrevocations_file = \"revoked.toml\"",
    ))
    .await;
    let command = format!(
        "command = [\"/transfer-server\", \"transfer-server\", \"--listen\", \"0.0.0.0:{IMAGE_PORT}\", \"--chatter\", \"3000000\"]\nstart = \"manual\""
    );
    let config = format!("[docker]\nstop_grace = \"1s\"\n{}", container_config("chatty", &image, &command));
    let agent = RunningAgent::start(pki.agent_config("dock-chatty", &[relay.quic], &[], &config));
    relay.wait_agent("dock-chatty").await;
    let tunnel = relay.session_id("dock-chatty");
    let token = Some("chatty-token-0123456789");
    let base = "/agents/dock-chatty/containers/chatty";
    let (status, body) = admin(&relay, "POST", &format!("{base}/start"), token).await;
    assert_eq!(status, 200, "{body}");

    // The chatter is written before the server listens. The engine copies a container's output
    // into its log behind it, so the last line can reach the log a moment after the server
    // listens: the test waits, through the engine itself, until the log is whole.
    transfer::run(relay.service("svc"), 1000, 1000, 1).await.expect("the container serves");
    let last_line = "transfer server listening on 0.0.0.0:9000";
    let whole = Instant::now();
    loop {
        let tail = std::process::Command::new("docker")
            .args(["logs", "--tail", "1", "sallyport-chatty"])
            .output()
            .expect("docker logs runs");
        if String::from_utf8_lossy(&tail.stderr).trim_end().ends_with(last_line) {
            break;
        }
        assert!(whole.elapsed() < Duration::from_secs(30), "the engine's log lacks its last line after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waited = whole.elapsed();
    let (status, logs) = admin(&relay, "POST", &format!("{base}/logs?tail=10000"), token).await;
    assert_eq!(status, 200, "{}", &logs[..logs.len().min(300)]);
    println!(
        "logs of 10,000 lines of 200 bytes (whole in the engine's log {:?} after the first transfer): {} \
         bytes back, starting {:?}",
        waited,
        logs.len(),
        &logs[..40]
    );
    assert!(logs.starts_with("[... ") && logs.contains(" bytes left out ...]"), "{:?}", &logs[..80]);
    assert!(logs.len() > 50_000 && logs.len() <= sallyport_proto::MAX_CONTROL_FRAME, "{}", logs.len());
    assert!(logs.trim_end().ends_with(last_line), "the end of the log is kept");

    assert_eq!(relay.session_id("dock-chatty"), tunnel, "the tunnel stayed up");
    transfer::run(relay.service("svc"), 100_000, 100_000, 2).await.expect("still serves");
    let (status, body) = admin(&relay, "POST", &format!("{base}/status"), token).await;
    assert_eq!((status, body.trim()), (200, "chatty: running"));
    agent.stop().await;
    relay.stop().await;
}
