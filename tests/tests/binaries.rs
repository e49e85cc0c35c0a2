//! The two binaries run as a user runs them: real processes, real config files, real signals.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use sallyport_tests::{
    process::{addr_field, binary, Spawned},
    targets::{self, Target},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const WAIT: Duration = Duration::from_secs(20);
const GREETING: &[u8; 34] = b"* OK sallyport test server ready\r\n";

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

struct Setup {
    _dir: tempfile::TempDir,
    relay: Spawned,
    agent: Spawned,
    service: SocketAddr,
    _target: Target,
}

/// `init`, `agent add`, `check` and `serve`/`run` as the README tells a user, with a greeting
/// target behind the agent.
async fn setup() -> Setup {
    let (relay_bin, agent_bin): (PathBuf, PathBuf) = (binary("sallyport-relay"), binary("sallyport-agent"));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    run(Command::new(&relay_bin).args(["init", "--san", "127.0.0.1", "--dir"]).arg(d));
    let relay_toml = d.join("relay.toml");
    let starter = std::fs::read_to_string(&relay_toml).expect("relay.toml");
    let config = starter
        .replace("0.0.0.0:4433", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("0.0.0.0:8080", "127.0.0.1:0")
        .replace("drain_grace = \"20s\"", "drain_grace = \"3s\"");
    std::fs::write(&relay_toml, config).expect("write relay.toml");
    run(Command::new(&relay_bin).arg("check").arg("--config").arg(&relay_toml));

    let mut relay = Spawned::start({
        let mut c = Command::new(&relay_bin);
        c.arg("serve").arg("--config").arg(&relay_toml);
        c
    });
    let service = addr_field(&relay.wait_line("service listening", WAIT), "addr");
    let quic = addr_field(&relay.wait_line("relay ready", WAIT), "quic");

    let target = targets::greeter(GREETING).await;
    let bundle = d.join("winbox");
    run(Command::new(&relay_bin)
        .args(["agent", "add", "winbox", "--relay", &quic.to_string(), "--dir"])
        .arg(d)
        .arg("--out")
        .arg(&bundle));
    let agent_toml = bundle.join("agent.toml");
    let starter = std::fs::read_to_string(&agent_toml).expect("agent.toml");
    let config = starter
        .replace("127.0.0.1:8080", &target.addr.to_string())
        .replace("key = \"agent.key\"", "key = \"agent.key\"\nhandshake_timeout = \"2s\"");
    std::fs::write(&agent_toml, config).expect("write agent.toml");
    run(Command::new(&agent_bin).arg("check").arg("--config").arg(&agent_toml));

    let mut agent = Spawned::start({
        let mut c = Command::new(&agent_bin);
        c.arg("run").arg("--config").arg(&agent_toml);
        c
    });
    agent.wait_line("tunnel up", WAIT);
    relay.wait_line("agent connected", WAIT);
    Setup { _dir: dir, relay, agent, service, _target: target }
}

/// Connects through the relay and checks the greeting and an echo.
async fn greeted(service: SocketAddr) -> TcpStream {
    let mut client = TcpStream::connect(service).await.expect("connect through the relay");
    let mut greeting = [0u8; 34];
    client.read_exact(&mut greeting).await.expect("greeting through the tunnel");
    assert_eq!(&greeting, GREETING);
    client.write_all(b"a001 NOOP\r\n").await.expect("write");
    let mut echo = [0u8; 11];
    client.read_exact(&mut echo).await.expect("echo");
    assert_eq!(&echo, b"a001 NOOP\r\n");
    client
}

fn signal(child: &std::process::Child, signal: &str) {
    let status =
        Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_carry_a_connection_and_drain_on_sigterm() {
    let mut s = setup().await;
    drop(greeted(s.service).await);

    // SIGTERM: the relay drains, tells the agent it is going away, and exits 0.
    signal(&s.relay.child, "TERM");
    s.relay.wait_line("relay stopped", WAIT);
    let exit = s.relay.child.wait().expect("relay exit");
    assert!(exit.success(), "relay exit status {exit:?}");
    s.agent.wait_line("relay going away", WAIT);
    // The agent does not give up: it keeps trying to reconnect.
    s.agent.wait_line("cannot connect", WAIT);
    signal(&s.agent.child, "TERM");
    s.agent.wait_line("agent stopped", WAIT);
    assert!(s.agent.child.wait().expect("agent exit").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_relay_resets_its_clients_instead_of_closing_them() {
    let mut s = setup().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(greeted(s.service).await);
    }
    s.relay.kill();
    for mut client in clients {
        let mut buf = [0u8; 64];
        let end = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await.expect("no hang");
        match end {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a client of a killed relay must see a reset, got {other:?}"),
        }
    }
}

/// `THP_enabled` of a running process, from /proc (Linux 6.x reports it; older kernels do not).
fn huge_pages_enabled(child: &std::process::Child) -> Option<bool> {
    sallyport_tests::lab::status_field(child.id(), "THP_enabled").map(|v| v != "0")
}

/// Both binaries opt out of transparent huge pages, which would otherwise keep 2 MiB resident for
/// every byte a burst touches in quinn's receive buffer (memory after a bulk transfer: 33 instead
/// of 17 MiB per side).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_run_on_small_pages() {
    let s = setup().await;
    drop(greeted(s.service).await);
    for (name, child) in [("relay", &s.relay.child), ("agent", &s.agent.child)] {
        match huge_pages_enabled(child) {
            Some(enabled) => assert!(!enabled, "the {name} runs with transparent huge pages enabled"),
            None => eprintln!("this kernel does not report THP_enabled; nothing to check"),
        }
    }
}
