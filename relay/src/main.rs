use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use sallyport_relay::{cli::check, trust::pki, Config};
use sallyport_runtime::cli;

/// mimalloc returns memory freed after a bulk transfer to the system (glibc's allocator keeps it).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sallyport relay: exposes services of agents behind NAT to the homelab.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the private CA, the relay's certificate and a starter relay.toml in DIR.
    Init {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// An IP address or DNS name agents use to reach the relay (repeat for several).
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
    },
    /// The private CA: rotate the intermediate the relays sign with.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Manage agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Run the relay.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
        /// This replica's name, for a relay.toml with a [cluster] table (in Kubernetes, the pod's
        /// name: `--replica $(POD_NAME)`).
        #[arg(long)]
        replica: Option<String>,
    },
    /// Ask the running relay to read its relay.toml again and apply it without dropping tunnels
    /// or connections of unchanged services (through the admin API, with the token of
    /// relay.admin_token_file). The relay also reloads on SIGHUP and when the file changes.
    Reload {
        #[arg(long, short, default_value = "relay.toml")]
        config: PathBuf,
    },
    /// Validate a configuration and its certificates without starting anything.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the Kubernetes Services exposing the relay's listeners (for deploy/k8s), from relay.toml.
    Manifests {
        #[arg(long, short, default_value = "relay.toml")]
        config: PathBuf,
        #[arg(long, default_value = "sallyport")]
        namespace: String,
        /// The relay's MetalLB IP, where agents dial (metallb.io/loadBalancerIPs).
        #[arg(long)]
        load_balancer_ip: Option<std::net::IpAddr>,
        /// The clients' MetalLB IP: the HTTP and HTTPS listeners and the services' ports, with
        /// externalTrafficPolicy Local (the relay sees each client's address).
        #[arg(long)]
        clients_ip: Option<std::net::IpAddr>,
        /// The UDP port agents dial, mapped to relay.listen's port.
        #[arg(long, default_value_t = 443)]
        quic_port: u16,
        /// externalTrafficPolicy of the clients' LoadBalancer Services: local (on --clients-ip;
        /// client addresses kept; the announcing node's replicas take clients) or cluster (on the
        /// relay's IP beside the agents; every replica takes clients; client addresses replaced by
        /// a node's). The agents' Service is always cluster.
        #[arg(long, default_value = "local")]
        external_traffic_policy: sallyport_relay::cli::manifests::TrafficPolicy,
    },
    /// Print an argon2id hash of a password read from standard input (one line), for a user of a
    /// service's login: [services.NAME.auth] users = { alice = "HASH" }.
    HashPassword,
    /// Print the relay's status (agents, services and their traffic, containers) as tables, from
    /// the admin API; the same as the status page on the admin port.
    Status {
        #[arg(long, short, default_value = "relay.toml")]
        config: PathBuf,
    },
    /// Join tokens: one string an agent redeems once with `sallyport-agent enroll` (needs
    /// relay.ca_key and relay.admin_token_file on the running relay).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// List the connected agents, their services and their containers (through the admin API).
    Agents {
        #[arg(long, short, default_value = "relay.toml")]
        config: PathBuf,
    },
    /// Start, stop, restart, inspect or read the logs of an agent's container (through the admin
    /// API, with the token of relay.admin_token_file).
    Container {
        /// start, stop, restart, status or logs.
        #[arg(value_parser = ["start", "stop", "restart", "status", "logs"])]
        action: String,
        /// The container's name in the agent's config.
        container: String,
        #[arg(long)]
        agent: String,
        /// Lines of output for `logs`.
        #[arg(long, default_value_t = 100)]
        tail: u32,
        #[arg(long, short, default_value = "relay.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Drain agent NAME on the running relay, for maintenance: no new connections of its services
    /// go to it (the other members of their groups take them), and those it carries may finish
    /// within the grace. Refused when it is the last healthy member of a service, unless --force.
    Drain {
        name: String,
        /// How long its connections may go on before they are cut (default: relay.drain_grace).
        #[arg(long)]
        grace: Option<String>,
        /// Drain it even when a service has no other healthy member.
        #[arg(long)]
        force: bool,
        #[arg(long, short, default_value = "relay.toml")]
        config: PathBuf,
    },
    /// End the drain of agent NAME: it takes new connections again.
    Undrain {
        name: String,
        #[arg(long, short, default_value = "relay.toml")]
        config: PathBuf,
    },
    /// Revoke agent NAME on the running relay: its tunnel closes at once, and every certificate of
    /// it issued up to now (renewals included) is refused from then on.
    Revoke {
        name: String,
        /// Also revoke this certificate serial (hex).
        #[arg(long)]
        serial: Option<String>,
        #[arg(long, short, default_value = "relay.toml")]
        config: PathBuf,
    },
    /// Issue a client certificate for agent NAME and write a bundle (CA, certificate, key, agent.toml).
    Add {
        name: String,
        /// The relay's state directory (holding ca.crt and ca.key).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Where to write the bundle.
        #[arg(long)]
        out: PathBuf,
        /// The relay address the agent dials, as HOST:PORT (default: the relay certificate's first
        /// name, port 443).
        #[arg(long)]
        relay: Option<String>,
        /// Certificate lifetime, e.g. "365d".
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make a new intermediate with the root's key and a new relay certificate signed by it, in
    /// DIR (the old files are kept in DIR/retired-<time>/). Agents keep their certificates and
    /// renew into the new intermediate; relays take it when restarted with the new files.
    Rotate {
        /// The relay's state directory (ca.crt, ca.key, relay.crt, relay.key).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The root's key (default: DIR/root.key), e.g. from the removable disk it is kept on.
        #[arg(long)]
        root_key: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token for agent NAME and print it.
    Create {
        #[arg(long)]
        agent: String,
        /// How long the token may be redeemed, e.g. "24h" (at most 30 days).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// An address agents dial, HOST:PORT (repeat for several; default: the relay
        /// certificate's first name, port 443).
        #[arg(long = "relay")]
        relays: Vec<String>,
        #[arg(long, short, default_value = "relay.toml")]
        config: PathBuf,
    },
    /// List tokens (id, agent, state, expiry); secrets are never shown again.
    List {
        #[arg(long, short, default_value = "relay.toml")]
        config: PathBuf,
    },
    /// Revoke a token by its id.
    Revoke {
        id: String,
        #[arg(long, short, default_value = "relay.toml")]
        config: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    cli::small_pages();
    sallyport_runtime::allocator::return_freed_memory_soon();
    cli::exit_on_error(run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { dir, sans } => {
            let report = pki::init(&dir, &sans)?;
            println!("CA certificate:    {} (the root agents and relays trust)", report.ca_cert.display());
            println!("relay certificate: {} (names: {})", report.relay_cert.display(), sans.join(", "));
            println!(
                "root key:          {} (move it off this machine: only `ca rotate` needs it; the relay signs with ca.key, an intermediate)",
                report.root_key.display()
            );
            match report.config {
                Some(path) => println!(
                    "starter config:    {} (edit its services, then: sallyport-relay serve --config {})",
                    path.display(),
                    path.display()
                ),
                None => println!("existing relay.toml left as it was"),
            }
            Ok(())
        }
        Command::Ca { command: CaCommand::Rotate { dir, root_key } } => {
            let report = sallyport_relay::trust::rotate::rotate(&dir, root_key.as_deref())?;
            if let Some(moved) = &report.root_key_moved {
                println!(
                    "ca.key was the root's key: it is now {} (move it off this machine)",
                    moved.display()
                );
            }
            println!(
                "new intermediate in {} and relay certificate in {} (names: {}); the old files are in {}",
                dir.join(pki::CA_KEY).display(),
                dir.join(pki::RELAY_CERT).display(),
                report.sans.join(", "),
                report.retired.display()
            );
            println!("give the relays the new ca.key, relay.crt and relay.key and restart them; agents keep working");
            Ok(())
        }
        Command::Reload { config } => {
            let config = Config::load(&config)?;
            print!("{}", admin_call(&config, "POST", "/reload".into(), true)?);
            Ok(())
        }
        Command::Agent { command: AgentCommand::Drain { name, grace, force, config } } => {
            let config = Config::load(&config)?;
            let mut path = format!("/agents/{name}/drain?force={force}");
            if let Some(grace) = grace {
                path.push_str(&format!("&grace={grace}"));
            }
            print!("{}", admin_call(&config, "POST", path, true)?);
            Ok(())
        }
        Command::Agent { command: AgentCommand::Undrain { name, config } } => {
            let config = Config::load(&config)?;
            print!("{}", admin_call(&config, "POST", format!("/agents/{name}/undrain"), true)?);
            Ok(())
        }
        Command::Agent { command: AgentCommand::Revoke { name, serial, config } } => {
            let config = Config::load(&config)?;
            let path = match serial {
                Some(serial) => format!("/agents/{name}/revoke?serial={serial}"),
                None => format!("/agents/{name}/revoke"),
            };
            print!("{}", admin_call(&config, "POST", path, true)?);
            Ok(())
        }
        Command::Agent { command: AgentCommand::Add { name, dir, out, relay, valid_for } } => {
            let relay = match relay {
                Some(r) => r,
                None => default_relay_addr(&dir)?,
            };
            let report = pki::add_agent(&dir, &name, &out, &relay, valid_for)?;
            println!("agent bundle for {name:?} in {}", report.dir.display());
            println!("copy that directory to the agent machine, edit {} and run:", report.config.display());
            println!("  sallyport-agent run --config agent.toml");
            Ok(())
        }
        Command::Check { config } => {
            let config = Config::load(&config)?;
            print!("{}", check::check(&config)?);
            println!("{}: ok", config.path.display());
            Ok(())
        }
        Command::Serve { config, replica } => {
            cli::init_tracing()?;
            let mut config = Config::load(&config)?;
            if let Some(replica) = replica {
                config.set_replica(&replica)?;
            }
            serve(config)
        }
        Command::Manifests {
            config,
            namespace,
            load_balancer_ip,
            clients_ip,
            quic_port,
            external_traffic_policy,
        } => {
            let config = Config::load(&config)?;
            let options = sallyport_relay::cli::manifests::ManifestOptions {
                namespace,
                load_balancer_ip,
                clients_ip,
                quic_port,
                traffic_policy: external_traffic_policy,
            };
            print!("{}", sallyport_relay::cli::manifests::render(&config, &options));
            Ok(())
        }
        Command::HashPassword => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let password = line.strip_suffix('\n').unwrap_or(&line);
            let password = password.strip_suffix('\r').unwrap_or(password);
            if password.is_empty() {
                anyhow::bail!("no password on standard input (one line: printf %s PASSWORD | sallyport-relay hash-password)");
            }
            println!("{}", sallyport_relay::access::auth::hash_password(password)?);
            Ok(())
        }
        Command::Status { config } => {
            let config = Config::load(&config)?;
            print!("{}", admin_call(&config, "GET", "/status.txt".into(), false)?);
            Ok(())
        }
        Command::Token { command: TokenCommand::Create { agent, ttl, relays, config } } => {
            let config = Config::load(&config)?;
            let path = format!("/tokens?agent={agent}&ttl_secs={}", ttl.as_secs());
            let created = admin_call(&config, "POST", path, true)?;
            println!("{}", sallyport_relay::cli::join_token::join_token(&config, &relays, &created)?);
            eprintln!(
                "join token for agent {agent:?}, valid {} and once; on the agent machine, saved in a file: sallyport-agent enroll --token-file FILE",
                humantime::format_duration(ttl)
            );
            Ok(())
        }
        Command::Token { command: TokenCommand::List { config } } => {
            let config = Config::load(&config)?;
            print!("{}", admin_call(&config, "GET", "/tokens".into(), true)?);
            Ok(())
        }
        Command::Token { command: TokenCommand::Revoke { id, config } } => {
            let config = Config::load(&config)?;
            print!("{}", admin_call(&config, "POST", format!("/tokens/{id}/revoke"), true)?);
            Ok(())
        }
        Command::Agents { config } => {
            let config = Config::load(&config)?;
            print!("{}", admin_call(&config, "GET", "/agents".into(), false)?);
            Ok(())
        }
        Command::Container { action, container, agent, tail, config } => {
            let config = Config::load(&config)?;
            let path = format!("/agents/{agent}/containers/{container}/{action}?tail={tail}");
            print!("{}", admin_call(&config, "POST", path, true)?);
            Ok(())
        }
    }
}

/// One admin API call; a non-200 answer is an error carrying the server's reason.
#[tokio::main(flavor = "current_thread")]
async fn admin_call(config: &Config, method: &str, path: String, with_token: bool) -> anyhow::Result<String> {
    // The token is read and checked as the relay reads it (one reader: ops::auth).
    let token = if with_token {
        match sallyport_relay::ops::auth::load_admin_token(config)? {
            Some(token) => Some(token.secret().to_owned()),
            None => anyhow::bail!(
                "{}: operator commands need relay.admin_token_file (the same file the relay reads)",
                config.path.display()
            ),
        }
    } else {
        None
    };
    let (status, body) =
        sallyport_relay::cli::admin_client::request(config.relay.admin, method, &path, token.as_deref())
            .await?;
    if status != 200 {
        anyhow::bail!("{} (HTTP {status})", body.trim_end());
    }
    Ok(body)
}

/// Runs the relay on `relay.threads` threads (one: everything on this thread).
fn serve(config: Config) -> anyhow::Result<()> {
    let threads = config.relay.threads;
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?
    };
    runtime.block_on(async {
        let relay = sallyport_relay::Relay::bind(config).await?;
        cli::until_signal(|stop| relay.run(stop)).await;
        Ok(())
    })
}

fn default_relay_addr(dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join(pki::RELAY_CERT);
    let pem = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let der = sallyport_runtime::tls::certs_from_pem(&pem, "relay certificate")?;
    let info = sallyport_runtime::tls::inspect(&der[0])?;
    let host = info.sans.first().context("relay certificate has no name: pass --relay HOST:PORT")?;
    Ok(sallyport_relay::cli::join_token::default_relay_addr(host))
}
