use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sallyport_agent::{Agent, Config};
use sallyport_runtime::cli;

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
    /// Validate the configuration and identity; with --connect, also tell which transports
    /// (QUIC, TCP) reach each relay.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Try a handshake with each relay over QUIC and over TCP (a running agent's tunnels are
        /// not disturbed).
        #[arg(long)]
        connect: bool,
    },
    /// Redeem a join token (from `sallyport-relay token create`): generate this agent's key,
    /// get its certificate from the relay, and write agent.key, agent.crt, ca.crt and (if missing)
    /// agent.toml into DIR.
    Enroll {
        /// The join token. Prefer --token-file: a command line is visible to every local user.
        #[arg(required_unless_present = "token_file", conflicts_with = "token_file")]
        token: Option<String>,
        /// A file holding the join token (`-`: standard input).
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Ask the relays to send this agent no new connections (before a reboot, say): those it
    /// carries go on. The running agent tells its relays within a second; it holds across restarts
    /// until `undrain`.
    Drain {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// End the drain: the relays send this agent new connections again.
    Undrain {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run as a Windows service (install, uninstall, start, stop, status).
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Copy the bundle (agent.toml, certificate, key, CA) to %ProgramData%\Sallyport, restrict it
    /// to SYSTEM and Administrators, and register the service (automatic delayed start, restart on
    /// failure).
    Install {
        /// The agent.toml of the bundle to install.
        #[arg(long, short)]
        config: PathBuf,
        /// Take in hand a %ProgramData%\Sallyport that someone other than SYSTEM or
        /// Administrators created before the install (its access is reset either way).
        #[arg(long)]
        take_over: bool,
    },
    /// Create the service's folder (or reset an existing one) so that only SYSTEM and
    /// Administrators can change it or read the key, before anything is written in it.
    Prepare {
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Take in hand a folder someone other than SYSTEM or Administrators owns.
        #[arg(long)]
        take_over: bool,
        /// Also create its `wsl` folder, where this user (a SID: the MSI passes the installing
        /// user's) may write the WSL helper's address files.
        #[arg(long, value_name = "SID")]
        wsl_writer: Option<String>,
    },
    /// Stop and remove the service (the files in %ProgramData%\Sallyport stay).
    Uninstall,
    /// Delete the service's folder: config, identity and logs (the MSI's REMOVEDATA=1).
    RemoveData {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    Start,
    Stop,
    /// Make the running service read its agent.toml again (the parameter-change control; the same
    /// as `sc.exe control sallyport-agent paramchange`).
    Reload,
    Status,
    /// The service's entry point (the Service Control Manager starts this).
    #[command(hide = true)]
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    cli::small_pages();
    cli::exit_on_error(run(Cli::parse()))
}

/// `check --connect`: which transports reach each relay, and what `auto` will do.
fn check_connect(agent: &Agent, config: &Config) -> anyhow::Result<()> {
    use sallyport_runtime::link::Transport;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let results = runtime.block_on(agent.probe_transports());
    let mut reachable = 0;
    for relay in &config.relays {
        let relay = relay.to_string();
        let mut works = Vec::new();
        for (_, transport, result) in results.iter().filter(|r| r.0 == relay) {
            match result {
                Ok(took) => {
                    println!("relay {relay}: {transport} ok (handshake in {} ms)", took.as_millis());
                    works.push(*transport);
                }
                Err(e) => println!("relay {relay}: {transport} fails: {e}"),
            }
        }
        let quic = works.contains(&Transport::Quic);
        let tcp = works.contains(&Transport::Tcp);
        let verdict = match (quic, tcp) {
            (true, _) => "auto uses QUIC".to_owned(),
            (false, true) => format!(
                "auto falls back to TCP after {:?} without an answer over UDP (UDP to the relay's port \
                 is blocked on the way, or the relay's UDP port is not reachable)",
                sallyport_agent::config::QUIC_WAIT
            ),
            (false, false) => "no transport reaches this relay: check the address, the relay, and \
                               the certificate names above"
                .to_owned(),
        };
        println!("relay {relay}: {verdict}");
        if quic || tcp {
            reachable += 1;
        }
    }
    anyhow::ensure!(
        reachable == config.relays.len(),
        "{} of {} relays unreachable",
        config.relays.len() - reachable,
        config.relays.len()
    );
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config, connect } => {
            let config = Config::load(&config)?;
            let agent = Agent::new(config.clone())?;
            let id = agent.identity();
            let days = id.days_left;
            anyhow::ensure!(days >= 0, "{}: certificate has expired", config.agent.cert.display());
            println!("agent {}: certificate valid for {days} more days", id.name);
            for relay in &config.relays {
                println!("relay {relay} (certificate name {})", relay.server_name);
            }
            for service in config.services.values() {
                println!("service {} -> {}", service.name, service.target);
            }
            println!("{}: ok", config.path.display());
            if connect {
                check_connect(&agent, &config)?;
            }
            Ok(())
        }
        Command::Service { command } => service(command),
        Command::Enroll { token, token_file, dir } => {
            let token = match (token, token_file) {
                (_, Some(file)) => read_token(&file)?,
                (Some(token), None) => {
                    eprintln!(
                        "note: a token on the command line is visible to every local user while enroll runs; \
                         --token-file FILE (or - for standard input) keeps it out of the process list"
                    );
                    token
                }
                (None, None) => {
                    anyhow::bail!("give the join token as --token-file FILE (or - for standard input)")
                }
            };
            let enrolled = enroll(&token, &dir)?;
            println!("enrolled as agent {:?}; identity in {}", enrolled.agent, enrolled.dir.display());
            #[cfg(windows)]
            {
                use sallyport_agent::{
                    events,
                    service::{eventlog::EventLog, EVENT_SOURCE},
                };
                let text =
                    format!("enrolled as agent {:?}; identity in {}", enrolled.agent, enrolled.dir.display());
                // The log file is the service's; an enrollment is on record in the Event Log only.
                if let Err(e) = EventLog::open(EVENT_SOURCE)
                    .and_then(|log| log.report(events::id::ENROLLED, events::Severity::Information, &text))
                {
                    eprintln!("note: the enrollment could not be written to the Event Log: {e}");
                }
            }
            if enrolled.config_written {
                println!(
                    "wrote {}: add your services, then: sallyport-agent run --config {}",
                    enrolled.config.display(),
                    enrolled.config.display()
                );
            } else {
                println!("{} exists and was left as it is", enrolled.config.display());
            }
            Ok(())
        }
        Command::Drain { config } | Command::Undrain { config } if !config.exists() => {
            anyhow::bail!("{}: no such file", config.display())
        }
        Command::Drain { config } => {
            let changed = sallyport_agent::drain::set(&config, true)
                .map_err(|e| anyhow::anyhow!("{}: {e}", sallyport_agent::drain::path(&config).display()))?;
            let said = if changed { "draining" } else { "already draining" };
            println!(
                "{said}: the relays send no new connections to this agent (those it carries go on);                  `sallyport-agent undrain --config {}` ends it",
                config.display()
            );
            Ok(())
        }
        Command::Undrain { config } => {
            let changed = sallyport_agent::drain::set(&config, false)
                .map_err(|e| anyhow::anyhow!("{}: {e}", sallyport_agent::drain::path(&config).display()))?;
            println!(
                "{}",
                if changed { "undrained: the relays send new connections again" } else { "was not draining" }
            );
            Ok(())
        }
        Command::Run { config } => {
            cli::init_tracing()?;
            let agent = Agent::new(Config::load(&config)?)?;
            serve(agent);
            Ok(())
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn serve(agent: Agent) {
    cli::until_signal(|stop| agent.run(stop)).await;
}

#[cfg(windows)]
fn service(command: ServiceCommand) -> anyhow::Result<()> {
    use sallyport_agent::service::{self, windows};
    match command {
        ServiceCommand::Install { config, take_over } => {
            // Validate before installing anything: a service that cannot start helps nobody.
            Agent::new(Config::load(&config)?)?;
            let exe = std::env::current_exe()?;
            windows::check_binary(&exe)?;
            let data_dir = service::data_dir(std::env::var_os("ProgramData"));
            sallyport_agent::acl::prepare(&data_dir, take_over)?;
            let copied = service::stage_bundle(&config, &data_dir)?;
            let installed = service::config_path(&data_dir);
            Agent::new(Config::load(&installed)?)?;
            windows::install(&exe, &installed)?;
            println!(
                "copied {} files to {} (SYSTEM and Administrators only)",
                copied.len(),
                data_dir.display()
            );
            println!("installed service {} running {}", service::SERVICE_NAME, exe.display());
            println!("start it with: sallyport-agent service start");
            println!("logs: {}", service::log_dir(&data_dir).display());
            Ok(())
        }
        ServiceCommand::Prepare { dir, take_over, wsl_writer } => {
            let dir = dir.unwrap_or_else(|| service::data_dir(std::env::var_os("ProgramData")));
            let done = sallyport_agent::acl::prepare(&dir, take_over)?;
            println!(
                "{}: {} (SYSTEM and Administrators only)",
                dir.display(),
                match done {
                    sallyport_agent::acl::Prepare::Create => "created",
                    sallyport_agent::acl::Prepare::Reset => "access reset",
                }
            );
            if let Some(writer) = wsl_writer {
                let wsl = sallyport_agent::acl::prepare_wsl(&dir, &writer)?;
                println!("{}: {writer} may write the WSL helper's files here", wsl.display());
            }
            Ok(())
        }
        ServiceCommand::RemoveData { dir } => {
            let dir = dir.unwrap_or_else(|| service::data_dir(std::env::var_os("ProgramData")));
            // Deletes a whole tree as an administrator: only what looks like the service's folder.
            anyhow::ensure!(
                !dir.exists() || dir.file_name().is_some_and(|n| n == "Sallyport") || dir.join("agent.toml").exists(),
                "{} does not look like the agent's folder (named Sallyport, or holding agent.toml): not removed",
                dir.display()
            );
            // A link is removed as itself: what it points at is never walked (std's removal does
            // not follow links inside the tree either).
            use sallyport_agent::acl::walk::Tree as _;
            if sallyport_agent::acl::walk::StdTree.kind(&dir)? == sallyport_agent::acl::walk::EntryKind::Link
            {
                sallyport_agent::acl::walk::remove_link(&dir)?;
                println!("{} was a link to elsewhere: the link removed, nothing behind it", dir.display());
                return Ok(());
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => println!("removed {}", dir.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("{} is already gone", dir.display())
                }
                Err(e) => anyhow::bail!("{}: cannot remove: {e}", dir.display()),
            }
            Ok(())
        }
        ServiceCommand::Uninstall => {
            windows::uninstall()?;
            println!("service {} removed", service::SERVICE_NAME);
            Ok(())
        }
        ServiceCommand::Start => windows::start(),
        ServiceCommand::Stop => windows::stop(),
        ServiceCommand::Reload => {
            windows::reload()?;
            println!("asked {} to reload its configuration (see its log)", service::SERVICE_NAME);
            Ok(())
        }
        ServiceCommand::Status => {
            println!("{}", windows::status()?);
            Ok(())
        }
        ServiceCommand::Run { config } => windows::run_dispatcher(config),
    }
}

#[cfg(not(windows))]
fn service(_command: ServiceCommand) -> anyhow::Result<()> {
    anyhow::bail!(
        "Windows services exist on Windows only; on Linux install deploy/linux/sallyport-agent.service (systemd: \
         `systemctl reload sallyport-agent` sends SIGHUP, which reloads agent.toml)"
    )
}

/// The join token in `file` (`-`: standard input): its first non-empty line.
fn read_token(file: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::Read;
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .take(64 * 1024)
            .read_to_string(&mut text)
            .context("standard input: cannot read the join token")?;
    } else {
        std::fs::File::open(file)
            .and_then(|f| f.take(64 * 1024).read_to_string(&mut text))
            .with_context(|| format!("{}: cannot read the join token", file.display()))?;
    }
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(str::to_owned)
        .with_context(|| format!("{}: no join token in it", file.display()))
}

#[tokio::main(flavor = "current_thread")]
async fn enroll(token: &str, dir: &std::path::Path) -> anyhow::Result<sallyport_agent::enroll::Enrolled> {
    Ok(sallyport_agent::enroll::enroll(token, dir).await?)
}
