//! The systems under comparison, each carrying client connections from an entry port to a target:
//! direct (no tunnel), Sallyport, rathole (plain TCP and its noise transport) and bore, optionally
//! across a path with a round trip of twice `delay` between the tunnel's two halves, on one of two
//! grounds: everything on one loopback, or across the network lab's double NAT at Ethernet MTU.

use std::{
    cell::RefCell,
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::Context;

use crate::{
    lab::{rss_kib, Lab, PROXY_IP, RELAY_IP, ROUTER_HOME_IP, WSL_IP},
    process::Spawned,
    servers::free_port_on,
    TestPki,
};

const READY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Direct,
    Sallyport,
    /// Sallyport on two threads each side: the relay with `threads = 2`, the agent with a lane
    /// beside its tunnel (`lanes = 2`). On a 2-core machine the defaults are one thread each.
    SallyportTwoThreads,
    /// Sallyport with `agent.transport = "tcp"`: TLS over TCP, streams multiplexed by HTTP/2 (what
    /// an agent falls back to where UDP does not get out).
    SallyportTcp,
    /// Sallyport with access rules and the access log on: a list of 100 rules whose last one
    /// admits the client (every new connection scans it all), and one JSON line per connection
    /// written to a file.
    SallyportGated,
    /// Sallyport with the service on a round-robin group of two agents (two agent processes on
    /// the agent's side, each with the defaults): what spreading clients over members costs.
    SallyportGroup,
    /// The same group with only its first agent running: the relay's group machinery (health,
    /// drains, the turn) on every connection without a second agent process on the machine.
    SallyportGroupOneUp,
    /// rathole over plain TCP: no encryption.
    Rathole,
    /// rathole over its noise transport (Noise_NK_25519_ChaChaPoly_BLAKE2s): encrypted, the fair
    /// peer of an encrypted tunnel.
    RatholeNoise,
    Bore,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Direct,
        Kind::Sallyport,
        Kind::SallyportTwoThreads,
        Kind::SallyportTcp,
        Kind::SallyportGated,
        Kind::SallyportGroup,
        Kind::SallyportGroupOneUp,
        Kind::Rathole,
        Kind::RatholeNoise,
        Kind::Bore,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Sallyport => "sallyport",
            Self::SallyportTwoThreads => "sallyport-2-threads",
            Self::SallyportTcp => "sallyport-tcp",
            Self::SallyportGated => "sallyport-gated",
            Self::SallyportGroup => "sallyport-group",
            Self::SallyportGroupOneUp => "sallyport-group-1-up",
            Self::Rathole => "rathole",
            Self::RatholeNoise => "rathole-noise",
            Self::Bore => "bore",
        }
    }

    /// A peer whose failure in a workload is a finding, not the end of the run.
    pub fn is_peer(self) -> bool {
        matches!(self, Self::Rathole | Self::RatholeNoise | Self::Bore)
    }
}

/// Where the systems run.
#[derive(Debug)]
pub enum Ground {
    /// Both halves, the targets and the clients on one loopback interface (packets up to 64 KiB).
    Loopback,
    /// The network lab with a double NAT: tunnel servers and clients on the homelab side, tunnel
    /// clients and targets on the WSL2 side behind two masquerading routers, 1,500-byte MTU.
    /// This process runs in the lab's homelab namespace.
    Nat { lab: Box<Lab>, forwarded: RefCell<BTreeSet<u16>> },
}

impl Ground {
    pub fn nat(lab: Lab) -> Self {
        Self::Nat { lab: Box::new(lab), forwarded: RefCell::new(BTreeSet::new()) }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Nat { .. } => "NAT",
        }
    }

    /// A command on the homelab side (relay halves, delay proxies, clients): where this process is.
    pub fn home(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        Command::new(program)
    }

    /// A command on the agent's side (tunnel clients and targets).
    pub fn agent_side(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self {
            Self::Loopback => Command::new(program),
            Self::Nat { lab, .. } => {
                lab.wsl.as_ref().map_or_else(|| Command::new(&program), |ns| ns.command(&program))
            }
        }
    }

    /// Where tunnel servers and their service ports listen.
    pub fn relay_ip(&self) -> IpAddr {
        match self {
            Self::Loopback => Ipv4Addr::LOCALHOST.into(),
            Self::Nat { .. } => RELAY_IP.into(),
        }
    }

    /// Where targets listen.
    pub fn target_ip(&self) -> IpAddr {
        match self {
            Self::Loopback => Ipv4Addr::LOCALHOST.into(),
            Self::Nat { .. } => WSL_IP.into(),
        }
    }

    /// Where delay proxies listen (a second address, for peers with a fixed control port).
    pub fn proxy_ip(&self) -> IpAddr {
        match self {
            Self::Loopback => Ipv4Addr::new(127, 0, 0, 2).into(),
            Self::Nat { .. } => PROXY_IP.into(),
        }
    }

    /// Where a homelab client reaches `target` without a tunnel: the target itself on loopback,
    /// port forwarding through both NATs on the NAT ground.
    pub fn direct(&self, target: SocketAddr) -> SocketAddr {
        match self {
            Self::Loopback => target,
            Self::Nat { lab, forwarded } => {
                if forwarded.borrow_mut().insert(target.port()) {
                    lab.forward_port(target.port());
                }
                SocketAddr::new(ROUTER_HOME_IP.into(), target.port())
            }
        }
    }
}

/// Where the programs are.
#[derive(Debug)]
pub struct Tools {
    pub rathole: PathBuf,
    /// The noise transport's X25519 key pair (`rathole --genkey`): private, public.
    noise_keys: (String, String),
    pub bore: PathBuf,
    pub labtool: PathBuf,
    pub relay: PathBuf,
    pub agent: PathBuf,
    pub dir: tempfile::TempDir,
    pki: TestPki,
}

impl Tools {
    /// `tools_dir` holds `bin/rathole` and `bin/bore`; the Sallyport binaries sit beside this one.
    pub fn new(tools_dir: PathBuf) -> anyhow::Result<Self> {
        let here = std::env::current_exe()?.parent().context("binary directory")?.to_owned();
        let rathole = tools_dir.join("bin/rathole");
        anyhow::ensure!(rathole.exists(), "{} is missing (scripts/bench.sh installs it)", rathole.display());
        let genkey = Command::new(&rathole).arg("--genkey").output().context("rathole --genkey")?;
        let text = String::from_utf8_lossy(&genkey.stdout).into_owned();
        let keys: Vec<&str> =
            text.lines().map(str::trim).filter(|l| l.len() == 44 && l.ends_with('=')).collect();
        anyhow::ensure!(
            genkey.status.success() && keys.len() == 2,
            "rathole --genkey gave no key pair (is it built with its noise feature?): {text}"
        );
        let tools = Self {
            noise_keys: (keys[0].to_owned(), keys[1].to_owned()),
            rathole,
            bore: tools_dir.join("bin/bore"),
            labtool: here.join("sallyport-labtool"),
            relay: here.join("sallyport-relay"),
            agent: here.join("sallyport-agent"),
            dir: tempfile::tempdir()?,
            pki: TestPki::new(),
        };
        for path in [&tools.rathole, &tools.bore, &tools.labtool, &tools.relay, &tools.agent] {
            anyhow::ensure!(
                path.exists(),
                "{} is missing (scripts/bench.sh builds and installs everything)",
                path.display()
            );
        }
        Ok(tools)
    }
}

/// A running system: client connections to `entry` reach the target.
#[derive(Debug)]
pub struct Tunnel {
    pub kind: Kind,
    pub entry: SocketAddr,
    /// Every process started for it (tunnel halves and delay proxies).
    procs: Vec<Spawned>,
    /// The homelab half (relay / server) and the NAT-side half (agent / client), if any.
    server: Option<usize>,
    client: Option<usize>,
}

impl Tunnel {
    /// Resident memory of the server half and of the client half, in KiB (0 for direct).
    pub fn rss_kib(&self) -> (u64, u64) {
        let rss = |i: Option<usize>| i.map_or(0, |i| rss_kib(self.procs[i].child.id()));
        (rss(self.server), rss(self.client))
    }

    /// CPU seconds used so far by both tunnel halves.
    pub fn cpu_seconds(&self) -> f64 {
        [self.server, self.client].into_iter().flatten().map(|i| cpu_seconds(self.procs[i].child.id())).sum()
    }
}

/// User + system CPU time of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<f64>().ok()).sum();
    ticks / 100.0
}

fn spawn(mut command: Command, args: &[String]) -> Spawned {
    command.args(args);
    Spawned::start(command)
}

/// Starts `kind` on `ground` toward `target`, with a delayed path between its halves if `delay`
/// is given.
pub fn start(
    kind: Kind,
    ground: &Ground,
    target: SocketAddr,
    delay: Option<Duration>,
    tools: &Tools,
) -> anyhow::Result<Tunnel> {
    let mut procs = Vec::new();
    let delay_arg = delay.map(|d| format!("{}ms", d.as_millis()));
    let at = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
    // A delay proxy on the homelab side: `listen` forwards to `upstream` with the delay each way.
    let delayed = |procs: &mut Vec<Spawned>, mode: &str, listen: SocketAddr, upstream: SocketAddr| {
        let d = delay_arg.as_deref().unwrap_or("0ms");
        let args = [mode, "--listen", &listen.to_string(), "--upstream", &upstream.to_string(), "--delay", d];
        let mut p = spawn(ground.home(&tools.labtool), &args.map(str::to_owned));
        p.wait_line(&format!("{mode} listening"), READY);
        procs.push(p);
    };
    let home = ground.relay_ip();
    let (entry, server, client) = match kind {
        Kind::Direct => {
            let direct = ground.direct(target);
            if delay.is_some() {
                let entry = at(ground.proxy_ip(), free_port_on(ground.proxy_ip()));
                delayed(&mut procs, "tcp-delay", entry, direct);
                (entry, None, None)
            } else {
                (direct, None, None)
            }
        }
        Kind::Sallyport
        | Kind::SallyportTwoThreads
        | Kind::SallyportTcp
        | Kind::SallyportGated
        | Kind::SallyportGroup
        | Kind::SallyportGroupOneUp => {
            // The defaults, or one thread each side, or over TCP.
            let (relay_extra, agent_extra, lanes) = match kind {
                Kind::SallyportTwoThreads => ("threads = 2\n", "lanes = 2\n", 2),
                Kind::SallyportTcp => ("", "transport = \"tcp\"\n", sallyport_agent::config::default_lanes()),
                _ => ("", "", sallyport_agent::config::default_lanes()),
            };
            let (quic, entry) = (at(home, free_port_on(home)), at(home, free_port_on(home)));
            let dir = tools.dir.path();
            let pki = tools.pki.dir();
            let names: &[&str] = if kind == Kind::SallyportGroup { &["bench", "bench2"] } else { &["bench"] };
            let members = if matches!(kind, Kind::SallyportGroup | Kind::SallyportGroupOneUp) {
                "agents = [\"bench\", \"bench2\"]\nstrategy = \"round-robin\"".to_owned()
            } else {
                "agent = \"bench\"".to_owned()
            };
            let mut relay = format!(
                "[relay]\nlisten = \"{quic}\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"{0}/ca.crt\"\ncert = \"{0}/relay.crt\"\nkey = \"{0}/relay.key\"\nmemory_budget = \"5GiB\"\nmax_connections = 30000\nmax_connections_per_ip = 30000\n{relay_extra}[services.bench]\n{members}\nlisten = \"{entry}\"\n",
                pki.display()
            );
            if kind == Kind::SallyportGated {
                // 99 networks the client is not in, then the one rule that admits it.
                let mut rules: Vec<String> =
                    (0..99).map(|i| format!("\"deny 10.{}.{}.0/24\"", 200 + i / 100, i % 100)).collect();
                rules.push("\"allow all\"".into());
                relay.push_str(&format!(
                    "[access]\ndefault = [{}]\nlog = \"{}\"\n",
                    rules.join(", "),
                    dir.join("access.log").display()
                ));
            }
            let mut dial = quic;
            if delay.is_some() {
                dial = at(ground.proxy_ip(), free_port_on(ground.proxy_ip()));
                let mode = if kind == Kind::SallyportTcp { "tcp-delay" } else { "impair" };
                delayed(&mut procs, mode, dial, quic);
            }
            std::fs::write(dir.join("relay.toml"), relay)?;
            let mut r = spawn(
                ground.home(&tools.relay),
                &["serve".into(), "--config".into(), dir.join("relay.toml").display().to_string()],
            );
            r.wait_line("relay ready", READY);
            procs.push(r);
            let server = procs.len() - 1;
            for name in names {
                let bundle = tools.pki.agent_bundle(name);
                let agent = format!(
                    "[agent]\nrelays = [\"{dial}\"]\nserver_name = \"localhost\"\nca_cert = \"{0}/ca.crt\"\ncert = \"{0}/agent.crt\"\nkey = \"{0}/agent.key\"\n{agent_extra}[services.bench]\ntarget = \"tcp://{target}\"\n",
                    bundle.display()
                );
                let toml = dir.join(format!("{name}.toml"));
                std::fs::write(&toml, agent)?;
                let mut a = spawn(
                    ground.agent_side(&tools.agent),
                    &["run".into(), "--config".into(), toml.display().to_string()],
                );
                a.wait_line("tunnel up", READY);
                for _ in 1..lanes {
                    a.wait_line("lane up", READY);
                }
                procs.push(a);
            }
            // The first agent's memory is the client's figure.
            (entry, Some(server), Some(server + 1))
        }
        Kind::Rathole | Kind::RatholeNoise => {
            let (control, entry) = (at(home, free_port_on(home)), at(home, free_port_on(home)));
            let mut remote = control;
            if delay.is_some() {
                remote = at(ground.proxy_ip(), free_port_on(ground.proxy_ip()));
                delayed(&mut procs, "tcp-delay", remote, control);
            }
            let (server_transport, client_transport) = if kind == Kind::RatholeNoise {
                let (private, public) = &tools.noise_keys;
                (
                    format!("[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n"),
                    format!("[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n"),
                )
            } else {
                Default::default()
            };
            let dir = tools.dir.path();
            std::fs::write(
                dir.join("rathole-server.toml"),
                format!("[server]\nbind_addr = \"{control}\"\ndefault_token = \"bench\"\n{server_transport}[server.services.bench]\nbind_addr = \"{entry}\"\n"),
            )?;
            std::fs::write(
                dir.join("rathole-client.toml"),
                format!("[client]\nremote_addr = \"{remote}\"\ndefault_token = \"bench\"\n{client_transport}[client.services.bench]\nlocal_addr = \"{target}\"\n"),
            )?;
            let mut s = spawn(
                ground.home(&tools.rathole),
                &["--server".into(), dir.join("rathole-server.toml").display().to_string()],
            );
            s.wait_line("Listening at", READY);
            procs.push(s);
            let mut c = spawn(
                ground.agent_side(&tools.rathole),
                &["--client".into(), dir.join("rathole-client.toml").display().to_string()],
            );
            c.wait_line("Control channel established", READY);
            procs.push(c);
            (entry, Some(procs.len() - 2), Some(procs.len() - 1))
        }
        Kind::Bore => {
            // bore's control port is fixed (7835); a delayed path sits on the proxy address.
            let entry = at(home, free_port_on(home));
            let port = entry.port().to_string();
            let bind = home.to_string();
            let mut s = spawn(
                ground.home(&tools.bore),
                &["server", "--bind-addr", &bind, "--min-port", &port, "--max-port", &port]
                    .map(str::to_owned),
            );
            s.wait_line("server listening", READY);
            procs.push(s);
            let mut to = home;
            if delay.is_some() {
                to = ground.proxy_ip();
                delayed(&mut procs, "tcp-delay", at(to, 7835), at(home, 7835));
            }
            let (target_port, target_host, to) =
                (target.port().to_string(), target.ip().to_string(), to.to_string());
            let mut c = spawn(
                ground.agent_side(&tools.bore),
                &["local", &target_port, "--local-host", &target_host, "--to", &to, "--port", &port]
                    .map(str::to_owned),
            );
            c.wait_line("listening at", READY);
            procs.push(c);
            (entry, Some(procs.len() - 2), Some(procs.len() - 1))
        }
    };
    Ok(Tunnel { kind, entry, procs, server, client })
}
