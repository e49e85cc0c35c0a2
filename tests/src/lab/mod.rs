//! The network lab: three Linux network namespaces joined by veth pairs, built and torn down by the
//! test that uses them.
//!
//! ```text
//!  homelab 10.4.0.0/24                 router (NAT)               windows 172.28.0.0/24
//!  relay 10.4.0.60 (second: .62)    ── 10.4.0.1 | 172.28.0.1 ── agent + targets 172.28.0.10
//!  impairment proxy 10.4.0.61
//! ```
//!
//! The router masquerades the windows side behind 10.4.0.1 and forwards only replies back in, so
//! the homelab has a route to 172.28.0.0/24 and still cannot open a connection there: just like a
//! home router in front of a Windows box. [`Lab::double_nat`] adds the WSL2 side: a fourth
//! namespace behind the windows one, which masquerades 172.29.0.0/24 behind 172.28.0.10 the way
//! Windows does for a WSL2 VM in NAT mode:
//!
//! ```text
//!  ... windows 172.28.0.10 | 172.29.0.1 (NAT) ── wsl 172.29.0.10 (agent + targets)
//! ```
//!
//! Every link is a veth pair with Ethernet's 1,500-byte MTU. Every lab has unique namespace names, so tests run in
//! parallel; dropping the [`Lab`] kills its processes and deletes its namespaces, also when a test
//! panics. Labs left behind by a killed test run are removed by the next one.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::process::{binary, Spawned};

mod batch;
mod cluster;
mod hosts;
mod one_at_a_time;
mod servers;
mod tunnel;
mod windows_hosts;
pub use batch::{output_text, transfer_spec, TRANSFER_PORT};
pub use cluster::{
    pod_ip, KubeProxy, LabCluster, Policy, CLIENTS_VIP, CLIENT_NET_IP, PEER, TRANSFER_PORT as CLUSTER_PORT,
    VIP,
};
pub use hosts::lan_host_ip;
pub use servers::postgres_data;
pub use tunnel::{LabTunnel, TransferReport, TunnelSpec, QUIC_PORT};
pub use windows_hosts::{windows_host_ip, wsl_of_ip};

pub const RELAY_IP: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 60);
/// A second relay, for drain and high-availability tests.
pub const RELAY2_IP: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 62);
pub const PROXY_IP: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 61);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 70);
pub const ROUTER_HOME_IP: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 1);
pub const ROUTER_WIN_IP: Ipv4Addr = Ipv4Addr::new(172, 28, 0, 1);
pub const WIN_IP: Ipv4Addr = Ipv4Addr::new(172, 28, 0, 10);
/// The windows host's address toward its WSL2 network, and the WSL2 side's own address.
pub const WIN_WSL_IP: Ipv4Addr = Ipv4Addr::new(172, 29, 0, 1);
pub const WSL_IP: Ipv4Addr = Ipv4Addr::new(172, 29, 0, 10);

/// Prefix of every lab namespace: `spl<pid>x<n><role>`.
const PREFIX: &str = "spl";

/// One network namespace.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Moves the calling thread into this namespace; threads it starts afterwards are in it too.
    /// A program calls this before it starts any other thread (an async runtime included).
    pub fn enter(&self) -> std::io::Result<()> {
        use std::os::fd::AsFd;
        let file = std::fs::File::open(format!("/run/netns/{}", self.name))?;
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        Ok(())
    }

    /// Runs `program args` in this namespace and returns its output, whatever the exit status.
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    /// Runs `program args` in this namespace and panics with its output unless it succeeds.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.output(program, args);
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "[{}] {program} {}: {text}", self.name, args.join(" "));
        text
    }
}

/// Why a lab cannot be built on this machine.
fn missing_prerequisite() -> Option<String> {
    if !Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n")) {
        return Some("the network lab needs root (network namespaces, iptables)".into());
    }
    for tool in ["ip", "iptables", "conntrack"] {
        if !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(format!("the network lab needs `{tool}` (scripts/install-deps.sh installs it)"));
        }
    }
    None
}

/// A built lab: homelab, router and windows namespaces, and the processes started in them.
#[derive(Debug)]
pub struct Lab {
    pub home: Netns,
    pub router: Netns,
    pub win: Netns,
    /// The WSL2 side, in a double-NAT lab.
    pub wsl: Option<Netns>,
    /// Relay pods behind a Service address, in a cluster lab ([`Lab::add_cluster`]).
    pub pods: Vec<Netns>,
    /// Where homelab clients of a cluster lab run.
    pub client: Option<Netns>,
    /// More homelab hosts of a cluster lab, each on a network of its own ([`Lab::add_lan_host`]).
    pub hosts: Vec<Netns>,
    /// More Windows hosts, each with its WSL2 side ([`Lab::add_windows_host`]).
    pub windows: Vec<(Netns, Netns)>,
    dir: tempfile::TempDir,
    processes: Vec<Spawned>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Builds a lab, or explains why it cannot and returns from the test. In CI (`CI=true`) a missing
/// prerequisite is a failure, not a skip: `.ci/run` installs everything the lab needs.
#[macro_export]
macro_rules! lab_or_skip {
    () => {
        match $crate::lab::Lab::nat() {
            Ok(lab) => lab,
            Err(reason) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("network lab unavailable in CI: {reason}");
                }
                eprintln!("SKIPPED: {reason}");
                return;
            }
        }
    };
}

impl Lab {
    /// Builds the NAT topology.
    pub fn nat() -> Result<Self, String> {
        if let Some(reason) = missing_prerequisite() {
            return Err(reason);
        }
        remove_stale_labs();
        let id = format!("{PREFIX}{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let ns = |role: &str| Netns { name: format!("{id}{role}") };
        let lab = Self {
            home: ns("h"),
            router: ns("r"),
            win: ns("w"),
            wsl: None,
            pods: Vec::new(),
            client: None,
            hosts: Vec::new(),
            windows: Vec::new(),
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            processes: Vec::new(),
        };
        for n in [&lab.home, &lab.router, &lab.win] {
            sh(&format!("ip netns add {}", n.name));
            n.run("ip", &["link", "set", "lo", "up"]);
        }
        let (h, r, w) = (&lab.home.name, &lab.router.name, &lab.win.name);
        sh(&format!("ip link add eth0 netns {h} type veth peer name home0 netns {r}"));
        sh(&format!("ip link add eth0 netns {w} type veth peer name win0 netns {r}"));
        lab.home.run("ip", &["addr", "add", &format!("{RELAY_IP}/24"), "dev", "eth0"]);
        for extra in [PROXY_IP, RELAY2_IP, CLIENT_IP] {
            lab.home.run("ip", &["addr", "add", &format!("{extra}/24"), "dev", "eth0"]);
        }
        lab.home.run("ip", &["link", "set", "eth0", "up"]);
        // The homelab knows the way to the windows network: only the router's policy keeps it out.
        lab.home.run("ip", &["route", "add", "172.28.0.0/24", "via", &ROUTER_HOME_IP.to_string()]);
        lab.win.run("ip", &["addr", "add", &format!("{WIN_IP}/24"), "dev", "eth0"]);
        lab.win.run("ip", &["link", "set", "eth0", "up"]);
        lab.win.run("ip", &["route", "add", "default", "via", &ROUTER_WIN_IP.to_string()]);
        lab.router.run("ip", &["addr", "add", &format!("{ROUTER_HOME_IP}/24"), "dev", "home0"]);
        lab.router.run("ip", &["addr", "add", &format!("{ROUTER_WIN_IP}/24"), "dev", "win0"]);
        lab.router.run("ip", &["link", "set", "home0", "up"]);
        lab.router.run("ip", &["link", "set", "win0", "up"]);
        lab.router.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
        for rule in [
            "-t nat -A POSTROUTING -o home0 -j MASQUERADE",
            "-P FORWARD DROP",
            "-A FORWARD -i win0 -o home0 -j ACCEPT",
            "-A FORWARD -i home0 -o win0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        ] {
            let args: Vec<&str> = rule.split_whitespace().collect();
            lab.router.run("iptables", &args);
        }
        Ok(lab)
    }

    /// Builds the NAT topology with a WSL2-style network behind the windows namespace, which
    /// masquerades it and lets only replies back in.
    pub fn double_nat() -> Result<Self, String> {
        let mut lab = Self::nat()?;
        let wsl = Netns { name: format!("{}l", &lab.win.name[..lab.win.name.len() - 1]) };
        sh(&format!("ip netns add {}", wsl.name));
        wsl.run("ip", &["link", "set", "lo", "up"]);
        sh(&format!("ip link add eth0 netns {} type veth peer name wsl0 netns {}", wsl.name, lab.win.name));
        wsl.run("ip", &["addr", "add", &format!("{WSL_IP}/24"), "dev", "eth0"]);
        wsl.run("ip", &["link", "set", "eth0", "up"]);
        wsl.run("ip", &["route", "add", "default", "via", &WIN_WSL_IP.to_string()]);
        lab.win.run("ip", &["addr", "add", &format!("{WIN_WSL_IP}/24"), "dev", "wsl0"]);
        lab.win.run("ip", &["link", "set", "wsl0", "up"]);
        lab.win.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
        for rule in [
            "-t nat -A POSTROUTING -o eth0 -j MASQUERADE",
            "-P FORWARD DROP",
            "-A FORWARD -i wsl0 -o eth0 -j ACCEPT",
            "-A FORWARD -i eth0 -o wsl0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        ] {
            let args: Vec<&str> = rule.split_whitespace().collect();
            lab.win.run("iptables", &args);
        }
        lab.wsl = Some(wsl);
        Ok(lab)
    }

    /// Forwards TCP and UDP `port` from the homelab side of the router through every NAT of the
    /// lab to the innermost host (WSL2 in a double-NAT lab): the port forwarding a tunnel makes
    /// unnecessary, as a baseline over the same path.
    pub fn forward_port(&self, port: u16) {
        let port = port.to_string();
        let mut hops = vec![(&self.router, "home0", "win0", WIN_IP)];
        if self.wsl.is_some() {
            hops.push((&self.win, "eth0", "wsl0", WSL_IP));
        }
        for (ns, outside, inside, to) in hops {
            for proto in ["tcp", "udp"] {
                let to = format!("{to}:{port}");
                let dnat = ["-t", "nat", "-A", "PREROUTING", "-i", outside, "-p", proto, "--dport", &port];
                ns.run("iptables", &[&dnat[..], &["-j", "DNAT", "--to-destination", &to]].concat());
                ns.run(
                    "iptables",
                    &[
                        "-A", "FORWARD", "-i", outside, "-o", inside, "-p", proto, "--dport", &port, "-j",
                        "ACCEPT",
                    ],
                );
            }
        }
    }

    /// A directory for this lab's files, removed with the lab.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts a workspace binary (`sallyport-relay`, ...) inside `ns`; it is killed with the lab.
    /// Returns its index for [`Lab::process`].
    pub fn spawn_binary(&mut self, ns: Role, name: &str, args: &[&str]) -> usize {
        let path: PathBuf = binary(name);
        let mut command = self.ns(ns).command(path);
        command.args(args);
        self.spawn(command)
    }

    /// Starts any program inside `ns`; it is killed with the lab.
    pub fn spawn_program(&mut self, ns: Role, program: &str, args: &[&str]) -> usize {
        let mut command = self.ns(ns).command(program);
        command.args(args);
        self.spawn(command)
    }

    fn spawn(&mut self, command: Command) -> usize {
        self.processes.push(Spawned::start(command));
        self.processes.len() - 1
    }

    pub fn process(&mut self, index: usize) -> &mut Spawned {
        &mut self.processes[index]
    }

    pub fn ns(&self, role: Role) -> &Netns {
        match role {
            Role::Home => &self.home,
            Role::Router => &self.router,
            Role::Win => &self.win,
            Role::Wsl => self.wsl.as_ref().expect("a double-NAT lab (Lab::double_nat)"),
            Role::Pod(i) => &self.pods[i],
            Role::Client => self.client.as_ref().expect("a cluster lab (Lab::add_cluster)"),
            Role::Host(i) => &self.hosts[i],
            Role::WinHost(i) => &self.windows[i].0,
            Role::WslOf(i) => &self.windows[i].1,
        }
    }

    /// Proves the NAT: a TCP listener in the windows namespace is reachable from the windows side
    /// itself and cannot be reached from the homelab. Panics otherwise.
    pub fn assert_homelab_cannot_reach_windows(&mut self) {
        let port = "47001";
        let listener = self.spawn_program(Role::Win, "python3", &["-c", LISTENER, &WIN_IP.to_string(), port]);
        self.process(listener).wait_line("listening", Duration::from_secs(10));
        let probe =
            |ns: &Netns| ns.output("python3", &["-c", PROBE, &WIN_IP.to_string(), port]).status.success();
        assert!(probe(&self.win), "the probe listener does not work at all");
        assert!(!probe(&self.home), "the homelab reached a listener behind the NAT directly");
        self.process(listener).kill();
    }

    /// Drops every packet crossing the router (both ways) until [`Lab::heal`].
    pub fn cut(&self) {
        self.router.run("iptables", &["-I", "FORWARD", "1", "-j", "DROP"]);
    }

    pub fn heal(&self) {
        self.router.run("iptables", &["-D", "FORWARD", "-j", "DROP"]);
    }

    /// Changes the NAT mapping of every flow: new source ports from a different range, and the
    /// conntrack table flushed so existing flows get remapped on their next packet.
    pub fn remap_nat(&self) {
        self.router.run("iptables", &["-t", "nat", "-F", "POSTROUTING"]);
        self.router.run(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "home0",
                "-p",
                "udp",
                "-j",
                "MASQUERADE",
                "--to-ports",
                "40000-40999",
            ],
        );
        self.router.run("iptables", &["-t", "nat", "-A", "POSTROUTING", "-o", "home0", "-j", "MASQUERADE"]);
        let _ = self.router.output("conntrack", &["-F"]);
    }

    /// Resident memory of a process, in KiB.
    pub fn rss_kib(&mut self, index: usize) -> u64 {
        let pid = self.processes[index].child.id();
        rss_kib(pid)
    }
}

/// Resident memory of `pid` in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS")
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// The value of field `key` in `/proc/PID/status`, trimmed (None if the process is gone or the
/// kernel does not report the field).
pub fn status_field(pid: u32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(':').map(|v| v.trim().to_owned()))
}

/// The three places in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Home,
    Router,
    Win,
    /// The WSL2 side of a double-NAT lab.
    Wsl,
    /// Relay pod `i` of a cluster lab.
    Pod(usize),
    /// The homelab client network of a cluster lab.
    Client,
    /// Homelab host `i` beside the client ([`Lab::add_lan_host`]).
    Host(usize),
    /// Windows host `i` beyond the first ([`Lab::add_windows_host`]).
    WinHost(usize),
    /// The WSL2 side of Windows host `i`.
    WslOf(usize),
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.processes {
            p.kill();
        }
        let windows = self.windows.iter().flat_map(|(win, wsl)| [win, wsl]);
        let extra =
            self.wsl.iter().chain(&self.pods).chain(self.client.as_ref()).chain(&self.hosts).chain(windows);
        for n in [&self.home, &self.router, &self.win].into_iter().chain(extra) {
            let _ = Command::new("ip").args(["netns", "del", &n.name]).status();
        }
    }
}

pub(crate) fn sh(command: &str) {
    let out = Command::new("sh").args(["-c", command]).output().expect("sh");
    assert!(out.status.success(), "{command}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Deletes lab namespaces whose creating process is gone.
fn remove_stale_labs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A socket address in the lab.
pub fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

const LISTENER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print("listening", file=sys.stderr, flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"ok"); c.close()
"#;

const PROBE: &str = r#"
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    sys.exit(0 if c.recv(2) == b"ok" else 1)
except OSError:
    sys.exit(1)
"#;
