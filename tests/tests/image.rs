//! The relay's container image (built by `./scripts/image.sh`) runs as the Kubernetes manifests
//! run it: unprivileged, read-only root filesystem, no capabilities, with the homelab overlay's
//! relay.toml and a mounted TLS directory. It answers /readyz, an agent outside the container
//! connects through it, and SIGTERM drains it to exit code 0. Skips without an engine or image
//! (fails in CI).

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use sallyport_tests::{
    docker::{self, Cleanup},
    docker_or_skip, targets, transfer, RunningAgent, TestPki,
};

const IMAGE: &str = concat!("sallyport-relay:", env!("CARGO_PKG_VERSION"));

fn image_or_skip() -> bool {
    let present =
        Command::new("docker").args(["image", "inspect", IMAGE]).output().is_ok_and(|o| o.status.success());
    if !present {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "{IMAGE} missing in CI: ./scripts/test.sh builds it"
        );
        eprintln!("SKIPPED: no image {IMAGE}: build it with ./scripts/image.sh");
    }
    present
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_image_serves_with_the_overlay_config_and_drains_on_sigterm() {
    docker_or_skip!();
    if !image_or_skip() {
        return;
    }
    let name = format!("sallyport-image-test-{}", std::process::id());
    let mut cleanup = Cleanup::new("image-test-none");
    cleanup.also(&name);

    // The TLS directory the Secret would provide, readable by the image's user only.
    let pki = TestPki::new();
    let tls = tempfile::tempdir().expect("tempdir");
    for file in ["ca.crt", "relay.crt", "relay.key"] {
        std::fs::copy(pki.dir().join(file), tls.path().join(file)).expect("copy TLS file");
    }
    std::fs::write(tls.path().join("admin.token"), "image-test-admin-token\n").expect("token");
    std::fs::write(tls.path().join("read.token"), "image-test-read-only-token\n").expect("token");
    // The state volume the PersistentVolumeClaim would provide, writable by the image's user.
    let state = tempfile::tempdir().expect("tempdir");
    for dir in [tls.path(), state.path()] {
        let chown = Command::new("chown").args(["-R", "65532:65532"]).arg(dir).status().expect("chown");
        assert!(chown.success());
    }
    let overlay = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/overlays/homelab/relay.toml");

    let mount_tls = format!("{}:/etc/sallyport/tls:ro", tls.path().display());
    let mount_config = format!("{}:/etc/sallyport/config/relay.toml:ro", overlay.display());
    let mount_state = format!("{}:/var/lib/sallyport", state.path().display());
    docker::docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--read-only",
        "--user",
        "65532:65532",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-v",
        &mount_tls,
        "-v",
        &mount_config,
        "-v",
        &mount_state,
        IMAGE,
        // As the StatefulSet runs it: the overlay's relay.toml has a [cluster]; this is its writer.
        "serve",
        "--config",
        "/etc/sallyport/config/relay.toml",
        "--replica",
        "sallyport-relay-0",
    ]);
    let ip = docker::inspect(&name, "{{.NetworkSettings.IPAddress}}");
    let admin: SocketAddr = format!("{ip}:9090").parse().expect("admin address");

    let started = Instant::now();
    loop {
        if let Ok((200, _)) = sallyport_relay::cli::admin_client::request(admin, "GET", "/readyz", None).await
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "relay in the container not ready: {}",
            docker::docker(&["logs", &name])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("relay container ready in {:?}", started.elapsed());

    // An agent outside the container: the overlay's agent "winbox", its mssql service pointing at
    // a transfer server here.
    let target = targets::transfer_server().await;
    let relay_quic: SocketAddr = format!("{ip}:4433").parse().expect("quic address");
    let agent = RunningAgent::start(pki.agent_config(
        "winbox",
        &[relay_quic],
        &[("mssql", target.addr)],
        "server_name = \"localhost\"",
    ));
    // The pod's admin port listens beyond loopback: reads about agents need the token.
    let token = Some("image-test-admin-token");
    let (status, _) =
        sallyport_relay::cli::admin_client::request(admin, "GET", "/agents", None).await.expect("admin");
    assert_eq!(status, 401, "the agent listing needs the admin token off loopback");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, listing) =
            sallyport_relay::cli::admin_client::request(admin, "GET", "/agents", token).await.expect("admin");
        if listing.contains("agent winbox") {
            break;
        }
        assert!(Instant::now() < deadline, "agent never connected: {listing}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = transfer::run(format!("{ip}:1433").parse().expect("service"), 500_000, 700_000, 9)
        .await
        .expect("transfer through the containerized relay");
    assert_eq!((report.up, report.down), (500_000, 700_000));
    let (_, metrics) =
        sallyport_relay::cli::admin_client::request(admin, "GET", "/metrics", token).await.expect("metrics");
    assert!(
        metrics.contains("sallyport_connections_total{service=\"mssql\",result=\"completed\"} 1"),
        "{metrics}"
    );

    // A revocation lands on the state volume, as it would on the claim.
    let (status, body) =
        sallyport_relay::cli::admin_client::request(admin, "POST", "/agents/winbox/revoke", token)
            .await
            .expect("revoke");
    assert_eq!(status, 200, "{body}");
    let saved =
        std::fs::read_to_string(state.path().join("revoked.toml")).expect("revocations on the volume");
    assert!(saved.contains("winbox"), "{saved}");

    // SIGTERM (what Kubernetes sends after preStop): drain, tell the agent, exit 0.
    let stopping = Instant::now();
    docker::docker(&["stop", "-t", "30", &name]);
    let code = docker::inspect(&name, "{{.State.ExitCode}}");
    println!("SIGTERM -> exited with {code} after {:?}", stopping.elapsed());
    assert_eq!(code, "0", "{}", docker::docker(&["logs", &name]));
    let logs = Command::new("docker").args(["logs", &name]).output().expect("logs");
    let logs = String::from_utf8_lossy(&logs.stderr);
    assert!(logs.contains("draining") && logs.contains("relay stopped"), "{logs}");
    agent.stop().await;
}
