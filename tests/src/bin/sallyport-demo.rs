//! A working relay + agent on this machine, from an embedded default configuration.
//!
//! It creates a private CA and certificates in a temporary directory, writes `relay.toml` and
//! `agent.toml` there, starts a small HTTP service standing in for a Windows-side target, and runs
//! relay and agent with those files. Then it prints the command that reaches the service through
//! the tunnel. `--once` makes that request itself, prints the answer and exits.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context};
use sallyport_relay::trust::pki;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

const RELAY_TOML: &str = r#"# The demo relay: QUIC on loopback, one TCP service for agent "demo".
[relay]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
ca_cert = "ca.crt"
cert = "relay.crt"
key = "relay.key"
drain_grace = "2s"

[services.hello]
agent = "demo"
listen = "127.0.0.1:0"
"#;

const BODY: &str = "Hello from behind the NAT: this answer came through a Sallyport tunnel.\n";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let once = std::env::args().any(|a| a == "--once");
    let logging = match std::env::var_os("RUST_LOG") {
        Some(_) => sallyport_runtime::cli::init_tracing().map_err(anyhow::Error::from),
        None => Ok(()),
    };
    let result = match logging {
        Ok(()) => demo(once).await,
        Err(e) => Err(e),
    };
    sallyport_runtime::cli::exit_on_error(result)
}

async fn demo(once: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let d = dir.path();
    pki::init(d, &["127.0.0.1".into()])?;
    std::fs::write(d.join("relay.toml"), RELAY_TOML)?;
    let relay_config = sallyport_relay::Config::load(&d.join("relay.toml"))?;
    let relay = sallyport_relay::Relay::bind(relay_config).await?;
    let (quic, public) = (relay.quic_addr(), relay.service_addrs()["hello"]);

    let target = sample_service().await?;
    let bundle = d.join("agent-demo");
    pki::add_agent(d, "demo", &bundle, &quic.to_string(), pki::AGENT_VALIDITY)?;
    let agent_toml = bundle.join("agent.toml");
    let starter = std::fs::read_to_string(&agent_toml)?;
    let text = starter
        .replace("[services.example]", "[services.hello]")
        .replace("tcp://127.0.0.1:8080", &format!("tcp://{target}"));
    std::fs::write(&agent_toml, text)?;
    let agent = sallyport_agent::Agent::new(sallyport_agent::Config::load(&agent_toml)?)?;

    let shutdown = CancellationToken::new();
    let mut agents = relay.agents();
    let relay_task = tokio::spawn(relay.run(shutdown.clone()));
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(10), agents.wait_for(|a| a.contains_key("demo")))
        .await
        .context("the agent did not connect within 10 s")??;

    println!("Sallyport demo is running (files in {}):", d.display());
    println!("  relay    QUIC on {quic}, config {}", d.join("relay.toml").display());
    println!("  agent    \"demo\", tunnel up, config {}", agent_toml.display());
    println!("  service  \"hello\": relay listens on {public}, agent dials tcp://{target}");
    println!();
    println!("Reach the service through the tunnel:");
    println!("  curl http://{public}/");
    if once {
        let answer = fetch(public).await?;
        print!("\n{answer}");
        if !answer.ends_with(BODY) {
            bail!("unexpected answer through the tunnel");
        }
    } else {
        println!("\nCtrl-C stops relay and agent.");
        sallyport_runtime::shutdown_signal().await;
    }
    shutdown.cancel();
    let _ = tokio::join!(relay_task, agent_task);
    Ok(())
}

/// A tiny HTTP server standing in for the service on the Windows side.
async fn sample_service() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
                    BODY.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// What `curl http://ADDR/` would print, headers included.
async fn fetch(addr: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET / HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer)).await??;
    Ok(answer)
}
