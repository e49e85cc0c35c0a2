//! Relay, agent and impairment proxy as processes in the lab, with real config files.

use std::time::Duration;

use super::{addr, Lab, Role, PROXY_IP, RELAY_IP, WIN_IP};
use crate::TestPki;

const WAIT: Duration = Duration::from_secs(30);

/// QUIC port of the relay (and of the proxy in front of it).
pub const QUIC_PORT: u16 = 4433;

/// What to run.
#[derive(Debug, Clone)]
pub struct TunnelSpec {
    /// Services: name, relay port in the homelab, target port on the windows side.
    pub services: Vec<(String, u16, u16)>,
    /// Arguments of `sallyport-labtool impair` (delay, loss, ...); `None`: no proxy.
    pub impairment: Option<Vec<String>>,
    /// Extra lines for `[relay]` and `[agent]`.
    pub relay_extra: String,
    pub agent_extra: String,
}

impl TunnelSpec {
    pub fn new(services: &[(&str, u16, u16)]) -> Self {
        Self {
            services: services
                .iter()
                .map(|(n, p, t)| ((*n).to_owned(), *p, *t))
                .collect(),
            impairment: None,
            relay_extra: String::new(),
            agent_extra: String::new(),
        }
    }

    /// Puts the impairment proxy on the agent-relay path with these `labtool impair` flags.
    pub fn impaired(mut self, flags: &[&str]) -> Self {
        self.impairment = Some(flags.iter().map(|f| (*f).to_owned()).collect());
        self
    }

    pub fn relay_extra(mut self, lines: &str) -> Self {
        self.relay_extra = lines.to_owned();
        self
    }

    pub fn agent_extra(mut self, lines: &str) -> Self {
        self.agent_extra = lines.to_owned();
        self
    }
}

/// A tunnel in a lab: the indices of its processes and its config files.
#[derive(Debug)]
pub struct LabTunnel {
    pub relay: usize,
    pub agent: usize,
    pub proxy: Option<usize>,
    relay_toml: String,
    agent_toml: String,
    _pki: TestPki,
}

impl Lab {
    /// Writes the PKI and configs, starts the proxy (if any), the relay and the agent, and waits
    /// until the agent's tunnel is up.
    pub fn start_tunnel(&mut self, spec: &TunnelSpec) -> LabTunnel {
        let pki = TestPki::with_names(&["relay.lab", &RELAY_IP.to_string()]);
        let mut relay = format!(
            "[relay]\nlisten = \"{}\"\nadmin = \"{}\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{}\n",
            addr(RELAY_IP, QUIC_PORT),
            addr(RELAY_IP, 9090),
            pki.dir().join("ca.crt").display(),
            pki.dir().join("relay.crt").display(),
            pki.dir().join("relay.key").display(),
            spec.relay_extra
        );
        let bundle = pki.agent_bundle("winbox");
        let dial = if spec.impairment.is_some() {
            PROXY_IP
        } else {
            RELAY_IP
        };
        let mut agent = format!(
            "[agent]\nrelays = [\"{}\"]\nserver_name = \"relay.lab\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nhandshake_timeout = \"3s\"\n{}\n",
            addr(dial, QUIC_PORT),
            bundle.join("ca.crt").display(),
            bundle.join("agent.crt").display(),
            bundle.join("agent.key").display(),
            spec.agent_extra
        );
        for (name, port, target) in &spec.services {
            relay.push_str(&format!(
                "[services.{name}]\nagent = \"winbox\"\nlisten = \"{}\"\n",
                addr(RELAY_IP, *port)
            ));
            agent.push_str(&format!(
                "[services.{name}]\ntarget = \"tcp://{}\"\n",
                addr(WIN_IP, *target)
            ));
        }
        let relay_toml = self.dir().join("relay.toml");
        let agent_toml = self.dir().join("agent.toml");
        std::fs::write(&relay_toml, relay).expect("write relay.toml");
        std::fs::write(&agent_toml, agent).expect("write agent.toml");

        let proxy = spec.impairment.as_ref().map(|flags| {
            let listen = addr(PROXY_IP, QUIC_PORT).to_string();
            let upstream = addr(RELAY_IP, QUIC_PORT).to_string();
            let mut args = vec!["impair", "--listen", &listen, "--upstream", &upstream];
            args.extend(flags.iter().map(String::as_str));
            let index = self.spawn_binary(Role::Home, "sallyport-labtool", &args);
            self.process(index).wait_line("impair listening", WAIT);
            index
        });
        let mut tunnel = LabTunnel {
            relay: 0,
            agent: 0,
            proxy,
            relay_toml: relay_toml.display().to_string(),
            agent_toml: agent_toml.display().to_string(),
            _pki: pki,
        };
        tunnel.relay = self.start_relay(&tunnel);
        tunnel.agent = self.start_agent(&tunnel);
        tunnel
    }

    /// Starts (or restarts) the relay of `tunnel` and waits until it is ready.
    pub fn start_relay(&mut self, tunnel: &LabTunnel) -> usize {
        let index = self.spawn_binary(
            Role::Home,
            "sallyport-relay",
            &["serve", "--config", &tunnel.relay_toml],
        );
        self.process(index).wait_line("relay ready", WAIT);
        index
    }

    /// Starts (or restarts) the agent of `tunnel` and waits until its tunnel is up.
    pub fn start_agent(&mut self, tunnel: &LabTunnel) -> usize {
        let index = self.spawn_binary(
            Role::Win,
            "sallyport-agent",
            &["run", "--config", &tunnel.agent_toml],
        );
        self.process(index).wait_line("tunnel up", WAIT);
        index
    }

    /// Starts the transfer server on the windows side at `port`.
    pub fn start_transfer_server(&mut self, port: u16) -> usize {
        let listen = addr(WIN_IP, port).to_string();
        let index = self.spawn_binary(
            Role::Win,
            "sallyport-labtool",
            &["transfer-server", "--listen", &listen],
        );
        self.process(index)
            .wait_line("transfer server listening", WAIT);
        index
    }

    /// Runs a batch of transfers from the homelab to the relay's `port` and returns its report.
    pub fn transfers(&mut self, port: u16, args: &[&str]) -> TransferReport {
        let to = addr(RELAY_IP, port).to_string();
        let mut all = vec!["transfers", "--to", &to];
        all.extend_from_slice(args);
        let out = self
            .home
            .command(crate::process::binary("sallyport-labtool"))
            .args(&all)
            .output()
            .expect("labtool");
        TransferReport::parse(&String::from_utf8_lossy(&out.stdout))
    }
}

/// The parsed output of `labtool transfers`.
#[derive(Debug, Clone, Default)]
pub struct TransferReport {
    pub lines: Vec<String>,
    pub summary: String,
}

impl TransferReport {
    pub fn parse(stdout: &str) -> Self {
        let lines: Vec<String> = stdout
            .lines()
            .filter(|l| l.starts_with("transfer "))
            .map(str::to_owned)
            .collect();
        let summary = stdout
            .lines()
            .find(|l| l.starts_with("transfers:"))
            .unwrap_or_default()
            .to_owned();
        Self { lines, summary }
    }

    /// How many transfers ended with `word` (`ok`, `reset`, `short-eof`, ...).
    pub fn count(&self, word: &str) -> usize {
        let needle = format!("result={word} ");
        self.lines.iter().filter(|l| l.contains(&needle)).count()
    }

    /// Lines of transfers that broke the failure semantics: short EOF, mismatch, hang.
    pub fn violations(&self) -> Vec<&String> {
        self.lines
            .iter()
            .filter(|l| {
                ["result=short-eof", "result=mismatch", "result=timeout"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .collect()
    }

    /// A number from the summary line (`bytes`, `seconds`, `ok`, ...).
    pub fn field(&self, key: &str) -> f64 {
        self.summary
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}
