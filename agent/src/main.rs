use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sallyport_agent::{Agent, Config};
use sallyport_proto::net::cli;
use tokio_util::sync::CancellationToken;

/// mimalloc returns memory freed after a bulk transfer to the system (glibc's allocator keeps it).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sallyport agent: an outbound QUIC tunnel that lets the relay reach this machine's services.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect to the relays and serve until stopped.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the configuration and identity without connecting.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    cli::exit_on_error(run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let config = Config::load(&config)?;
            let agent = Agent::new(config.clone())?;
            let id = agent.identity();
            let days = id.days_left;
            anyhow::ensure!(days >= 0, "{}: certificate has expired", config.tls.cert.display());
            println!("agent {}: certificate valid for {days} more days", id.name);
            for relay in &config.relays {
                println!("relay {relay} (certificate name {})", relay.server_name);
            }
            for service in config.services.values() {
                println!("service {} -> {}", service.name, service.target);
            }
            println!("{}: ok", config.path.display());
            Ok(())
        }
        Command::Run { config } => {
            cli::init_tracing().map_err(anyhow::Error::msg)?;
            let agent = Agent::new(Config::load(&config)?)?;
            serve(agent);
            Ok(())
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn serve(agent: Agent) {
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        cli::shutdown_signal().await;
        token.cancel();
    });
    agent.run(shutdown).await;
}
