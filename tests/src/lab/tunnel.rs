//! Relay, agent and impairment proxy as processes in the lab, with real config files.

use std::time::Duration;

use super::{addr, Lab, Role, PROXY_IP, RELAY2_IP, RELAY_IP, WIN_IP};
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
    /// A TCP delay proxy (`sallyport-labtool tcp-delay`) on the agent-relay path instead, for
    /// tunnels over TCP: this one-way delay.
    pub tcp_delay: Option<Duration>,
    /// Extra lines for `[relay]` and `[agent]`.
    pub relay_extra: String,
    pub agent_extra: String,
    /// Two relays (at RELAY_IP and RELAY2_IP) instead of one; the agent keeps a tunnel to each.
    pub two_relays: bool,
}

impl TunnelSpec {
    pub fn new(services: &[(&str, u16, u16)]) -> Self {
        Self {
            services: services.iter().map(|(n, p, t)| ((*n).to_owned(), *p, *t)).collect(),
            impairment: None,
            tcp_delay: None,
            relay_extra: String::new(),
            agent_extra: String::new(),
            two_relays: false,
        }
    }

    pub fn two_relays(mut self) -> Self {
        self.two_relays = true;
        self
    }

    /// Puts the impairment proxy on the agent-relay path with these `labtool impair` flags.
    pub fn impaired(mut self, flags: &[&str]) -> Self {
        self.impairment = Some(flags.iter().map(|f| (*f).to_owned()).collect());
        self
    }

    /// Puts the TCP delay proxy on the agent-relay path: `delay` each way.
    pub fn tcp_delayed(mut self, delay: Duration) -> Self {
        self.tcp_delay = Some(delay);
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
    /// Process index of each relay (restarts replace the entry).
    pub relays: Vec<usize>,
    pub agent: usize,
    pub proxy: Option<usize>,
    relay_tomls: Vec<String>,
    agent_toml: String,
    _pki: TestPki,
}

impl LabTunnel {
    /// The first relay's process index.
    pub fn relay(&self) -> usize {
        self.relays[0]
    }

    /// The relay.toml of relay `i`.
    pub fn agent_toml(&self) -> &str {
        &self.agent_toml
    }

    pub fn relay_toml(&self, i: usize) -> &str {
        &self.relay_tomls[i]
    }
}

impl Lab {
    /// Writes the PKI and configs, starts the proxy (if any), the relays and the agent, and waits
    /// until the agent's tunnels are up.
    pub fn start_tunnel(&mut self, spec: &TunnelSpec) -> LabTunnel {
        let pki = TestPki::with_names(&["relay.lab", &RELAY_IP.to_string()]);
        let relay_ips: &[std::net::Ipv4Addr] =
            if spec.two_relays { &[RELAY_IP, RELAY2_IP] } else { &[RELAY_IP] };
        let bundle = pki.agent_bundle("winbox");
        let mut dials = Vec::new();
        let mut relay_tomls = Vec::new();
        for (i, ip) in relay_ips.iter().enumerate() {
            let mut relay = format!(
                "[relay]\nlisten = \"{}\"\nadmin = \"{}\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{}\n",
                addr(*ip, QUIC_PORT),
                addr(*ip, 9090),
                pki.dir().join("ca.crt").display(),
                pki.dir().join("relay.crt").display(),
                pki.dir().join("relay.key").display(),
                spec.relay_extra
            );
            for (name, port, _) in &spec.services {
                relay.push_str(&format!(
                    "[services.{name}]\nagent = \"winbox\"\nlisten = \"{}\"\n",
                    addr(*ip, *port)
                ));
            }
            let path = self.dir().join(format!("relay{i}.toml"));
            std::fs::write(&path, relay).expect("write relay.toml");
            relay_tomls.push(path.display().to_string());
            let proxied = spec.impairment.is_some() || spec.tcp_delay.is_some();
            let dial = if i == 0 && proxied { PROXY_IP } else { *ip };
            dials.push(format!("\"{}\"", addr(dial, QUIC_PORT)));
        }
        let mut agent = format!(
            "[agent]\nrelays = [{}]\nserver_name = \"relay.lab\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{}\n",
            dials.join(", "),
            bundle.join("ca.crt").display(),
            bundle.join("agent.crt").display(),
            bundle.join("agent.key").display(),
            spec.agent_extra
        );
        for (name, _, target) in &spec.services {
            agent.push_str(&format!("[services.{name}]\ntarget = \"tcp://{}\"\n", addr(WIN_IP, *target)));
        }
        let agent_toml = self.dir().join("agent.toml");
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
        let proxy = proxy.or_else(|| {
            let delay = spec.tcp_delay?;
            let listen = addr(PROXY_IP, QUIC_PORT).to_string();
            let upstream = addr(RELAY_IP, QUIC_PORT).to_string();
            let delay = format!("{}ms", delay.as_millis());
            let args = ["tcp-delay", "--listen", &listen, "--upstream", &upstream, "--delay", &delay];
            let index = self.spawn_binary(Role::Home, "sallyport-labtool", &args);
            self.process(index).wait_line("tcp-delay listening", WAIT);
            Some(index)
        });
        let mut tunnel = LabTunnel {
            relays: Vec::new(),
            agent: 0,
            proxy,
            relay_tomls,
            agent_toml: agent_toml.display().to_string(),
            _pki: pki,
        };
        for i in 0..relay_ips.len() {
            let index = self.start_relay(&tunnel, i);
            tunnel.relays.push(index);
        }
        tunnel.agent = self.start_agent(&tunnel);
        for _ in 1..relay_ips.len() {
            self.process(tunnel.agent).wait_line("tunnel up", WAIT);
        }
        tunnel
    }

    /// Starts (or restarts) relay `i` of `tunnel` and waits until it is ready.
    pub fn start_relay(&mut self, tunnel: &LabTunnel, i: usize) -> usize {
        let index =
            self.spawn_binary(Role::Home, "sallyport-relay", &["serve", "--config", &tunnel.relay_tomls[i]]);
        self.process(index).wait_line("relay ready", WAIT);
        index
    }

    /// Starts (or restarts) the agent of `tunnel` and waits until its (first) tunnel is up.
    pub fn start_agent(&mut self, tunnel: &LabTunnel) -> usize {
        let index = self.spawn_binary(Role::Win, "sallyport-agent", &["run", "--config", &tunnel.agent_toml]);
        self.process(index).wait_line("tunnel up", WAIT);
        index
    }

    /// Starts the transfer server on the windows side at `port`.
    pub fn start_transfer_server(&mut self, port: u16) -> usize {
        let listen = addr(WIN_IP, port).to_string();
        let index =
            self.spawn_binary(Role::Win, "sallyport-labtool", &["transfer-server", "--listen", &listen]);
        self.process(index).wait_line("transfer server listening", WAIT);
        index
    }

    /// Runs a batch of transfers from the homelab to `relay_ip:port` and returns its report.
    pub fn transfers_to(&mut self, relay_ip: std::net::Ipv4Addr, port: u16, args: &[&str]) -> TransferReport {
        let index = self.spawn_transfers(relay_ip, port, args);
        self.finish_transfers(index, Duration::from_secs(900))
    }

    /// [`Lab::transfers_to`] the first relay.
    pub fn transfers(&mut self, port: u16, args: &[&str]) -> TransferReport {
        self.transfers_to(RELAY_IP, port, args)
    }

    /// Starts a batch of transfers in the background; see [`Lab::finish_transfers`].
    pub fn spawn_transfers(&mut self, relay_ip: std::net::Ipv4Addr, port: u16, args: &[&str]) -> usize {
        let to = addr(relay_ip, port).to_string();
        let mut all = vec!["transfers", "--to", &to];
        all.extend_from_slice(args);
        self.spawn_binary(Role::Home, "sallyport-labtool", &all)
    }

    /// Waits for a background batch to finish and returns its report.
    pub fn finish_transfers(&mut self, index: usize, timeout: Duration) -> TransferReport {
        let process = self.process(index);
        process.wait_line("transfers:", timeout);
        TransferReport::parse(&process.log.join("\n"))
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
        let lines: Vec<String> =
            stdout.lines().filter(|l| l.starts_with("transfer ")).map(str::to_owned).collect();
        let summary = stdout.lines().find(|l| l.starts_with("transfers:")).unwrap_or_default().to_owned();
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
                ["result=short-eof", "result=mismatch", "result=timeout"].iter().any(|w| l.contains(w))
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
