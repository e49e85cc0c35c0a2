//! The systems under comparison, each carrying client connections from an entry port to a target:
//! direct (no tunnel), Sallyport, rathole and bore, optionally across a path with a round trip of
//! twice `delay` between the tunnel's two halves.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::Context;

use crate::{lab::rss_kib, process::Spawned, TestPki};

const READY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Direct,
    Sallyport,
    Rathole,
    Bore,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Direct, Kind::Sallyport, Kind::Rathole, Kind::Bore];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Sallyport => "sallyport",
            Self::Rathole => "rathole",
            Self::Bore => "bore",
        }
    }
}

/// Where the programs are.
#[derive(Debug)]
pub struct Tools {
    pub rathole: PathBuf,
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
        let tools = Self {
            rathole: tools_dir.join("bin/rathole"),
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

/// A loopback port free right now.
pub fn free_port() -> u16 {
    loop {
        let Ok(tcp) = TcpListener::bind("127.0.0.1:0") else { continue };
        let Ok(port) = tcp.local_addr().map(|a| a.port()) else { continue };
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn spawn(program: &PathBuf, args: &[String]) -> Spawned {
    let mut command = Command::new(program);
    command.args(args);
    Spawned::start(command)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts `kind` toward `target`, with a delayed path between its halves if `delay` is given.
pub fn start(
    kind: Kind,
    target: SocketAddr,
    delay: Option<Duration>,
    tools: &Tools,
) -> anyhow::Result<Tunnel> {
    let mut procs = Vec::new();
    let delay_arg = delay.map(|d| format!("{}ms", d.as_millis()));
    let tcp_delay = |procs: &mut Vec<Spawned>, listen: SocketAddr, upstream: SocketAddr| {
        if let Some(d) = &delay_arg {
            let args = [
                "tcp-delay",
                "--listen",
                &listen.to_string(),
                "--upstream",
                &upstream.to_string(),
                "--delay",
                d,
            ];
            let mut p = spawn(&tools.labtool, &args.map(str::to_owned));
            p.wait_line("tcp-delay listening", READY);
            procs.push(p);
        }
    };
    let (entry, server, client) = match kind {
        Kind::Direct => {
            if delay.is_some() {
                let entry = loopback(free_port());
                tcp_delay(&mut procs, entry, target);
                (entry, None, None)
            } else {
                (target, None, None)
            }
        }
        Kind::Sallyport => {
            let (quic, entry) = (loopback(free_port()), loopback(free_port()));
            let dir = tools.dir.path();
            let pki = tools.pki.dir();
            let relay = format!(
                "[relay]\nlisten = \"{quic}\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"{0}/ca.crt\"\ncert = \"{0}/relay.crt\"\nkey = \"{0}/relay.key\"\nmemory_budget = \"5GiB\"\nmax_connections = 30000\nmax_connections_per_ip = 30000\n[services.bench]\nagent = \"bench\"\nlisten = \"{entry}\"\n",
                pki.display()
            );
            let bundle = tools.pki.agent_bundle("bench");
            let mut dial = quic;
            if let Some(d) = &delay_arg {
                dial = loopback(free_port());
                let args =
                    ["impair", "--listen", &dial.to_string(), "--upstream", &quic.to_string(), "--delay", d];
                let mut p = spawn(&tools.labtool, &args.map(str::to_owned));
                p.wait_line("impair listening", READY);
                procs.push(p);
            }
            let agent = format!(
                "[agent]\nrelays = [\"{dial}\"]\nca_cert = \"{0}/ca.crt\"\ncert = \"{0}/agent.crt\"\nkey = \"{0}/agent.key\"\n[services.bench]\ntarget = \"tcp://{target}\"\n",
                bundle.display()
            );
            std::fs::write(dir.join("relay.toml"), relay)?;
            std::fs::write(dir.join("agent.toml"), agent)?;
            let mut r = spawn(
                &tools.relay,
                &["serve".into(), "--config".into(), dir.join("relay.toml").display().to_string()],
            );
            r.wait_line("relay ready", READY);
            procs.push(r);
            let mut a = spawn(
                &tools.agent,
                &["run".into(), "--config".into(), dir.join("agent.toml").display().to_string()],
            );
            a.wait_line("tunnel up", READY);
            procs.push(a);
            (entry, Some(procs.len() - 2), Some(procs.len() - 1))
        }
        Kind::Rathole => {
            let (control, entry) = (loopback(free_port()), loopback(free_port()));
            let mut remote = control;
            if delay.is_some() {
                remote = loopback(free_port());
                tcp_delay(&mut procs, remote, control);
            }
            let dir = tools.dir.path();
            std::fs::write(
                dir.join("rathole-server.toml"),
                format!("[server]\nbind_addr = \"{control}\"\ndefault_token = \"bench\"\n[server.services.bench]\nbind_addr = \"{entry}\"\n"),
            )?;
            std::fs::write(
                dir.join("rathole-client.toml"),
                format!("[client]\nremote_addr = \"{remote}\"\ndefault_token = \"bench\"\n[client.services.bench]\nlocal_addr = \"{target}\"\n"),
            )?;
            let mut s = spawn(
                &tools.rathole,
                &["--server".into(), dir.join("rathole-server.toml").display().to_string()],
            );
            s.wait_line("Listening at", READY);
            procs.push(s);
            let mut c = spawn(
                &tools.rathole,
                &["--client".into(), dir.join("rathole-client.toml").display().to_string()],
            );
            c.wait_line("Control channel established", READY);
            procs.push(c);
            (entry, Some(procs.len() - 2), Some(procs.len() - 1))
        }
        Kind::Bore => {
            // bore's control port is fixed (7835); a delayed path sits on 127.0.0.2.
            let entry = loopback(free_port());
            let port = entry.port().to_string();
            let mut s = spawn(
                &tools.bore,
                &["server", "--bind-addr", "127.0.0.1", "--min-port", &port, "--max-port", &port]
                    .map(str::to_owned),
            );
            s.wait_line("server listening", READY);
            procs.push(s);
            let mut to = "127.0.0.1";
            if delay.is_some() {
                to = "127.0.0.2";
                tcp_delay(&mut procs, "127.0.0.2:7835".parse()?, "127.0.0.1:7835".parse()?);
            }
            let target_port = target.port().to_string();
            let mut c = spawn(
                &tools.bore,
                &["local", &target_port, "--local-host", "127.0.0.1", "--to", to, "--port", &port]
                    .map(str::to_owned),
            );
            c.wait_line("listening at", READY);
            procs.push(c);
            (entry, Some(procs.len() - 2), Some(procs.len() - 1))
        }
    };
    Ok(Tunnel { kind, entry, procs, server, client })
}
