//! The two binaries run as a user runs them: real processes, real config files, a real signal.

use std::{process::Command, time::Duration};

use sallyport_tests::{
    process::{addr_field, binary, Spawned},
    targets,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const WAIT: Duration = Duration::from_secs(20);

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_agent_binaries_carry_a_tcp_connection() {
    let (relay_bin, agent_bin) = (binary("sallyport-relay"), binary("sallyport-agent"));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    run(Command::new(&relay_bin)
        .args(["init", "--san", "127.0.0.1", "--dir"])
        .arg(d));
    let relay_toml = d.join("relay.toml");
    let starter = std::fs::read_to_string(&relay_toml).expect("relay.toml");
    let config = starter
        .replace("0.0.0.0:4433", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("0.0.0.0:8080", "127.0.0.1:0")
        .replace("drain_grace = \"20s\"", "drain_grace = \"3s\"");
    std::fs::write(&relay_toml, config).expect("write relay.toml");
    run(Command::new(&relay_bin)
        .arg("check")
        .arg("--config")
        .arg(&relay_toml));

    let mut relay = Spawned::start({
        let mut c = Command::new(&relay_bin);
        c.arg("serve").arg("--config").arg(&relay_toml);
        c
    });
    let service = addr_field(&relay.wait_line("service listening", WAIT), "addr");
    let quic = addr_field(&relay.wait_line("relay ready", WAIT), "quic");

    let target = targets::greeter(b"* OK sallyport test server ready\r\n").await;
    let bundle = d.join("winbox");
    run(Command::new(&relay_bin)
        .args([
            "agent",
            "add",
            "winbox",
            "--relay",
            &quic.to_string(),
            "--dir",
        ])
        .arg(d)
        .arg("--out")
        .arg(&bundle));
    let agent_toml = bundle.join("agent.toml");
    let starter = std::fs::read_to_string(&agent_toml).expect("agent.toml");
    std::fs::write(
        &agent_toml,
        starter.replace("127.0.0.1:8080", &target.addr.to_string()),
    )
    .expect("write agent.toml");
    run(Command::new(&agent_bin)
        .arg("check")
        .arg("--config")
        .arg(&agent_toml));

    let mut agent = Spawned::start({
        let mut c = Command::new(&agent_bin);
        c.arg("run").arg("--config").arg(&agent_toml);
        c
    });
    agent.wait_line("tunnel up", WAIT);
    relay.wait_line("agent connected", WAIT);

    let mut client = TcpStream::connect(service)
        .await
        .expect("connect through the relay");
    let mut greeting = [0u8; 34];
    client
        .read_exact(&mut greeting)
        .await
        .expect("greeting through the tunnel");
    assert_eq!(&greeting, b"* OK sallyport test server ready\r\n");
    client.write_all(b"a001 NOOP\r\n").await.expect("write");
    let mut echo = [0u8; 11];
    client.read_exact(&mut echo).await.expect("echo");
    assert_eq!(&echo, b"a001 NOOP\r\n");
    drop(client);

    // SIGTERM: the relay drains, tells the agent it is going away, and exits 0.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(relay.child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    relay.wait_line("relay stopped", WAIT);
    let exit = relay.child.wait().expect("relay exit");
    assert!(exit.success(), "relay exit status {exit:?}");
    agent.wait_line("relay going away", WAIT);
}
