//! A relay cluster in the lab, the way k3s runs one: relay pods, each in its own namespace, behind
//! one Service address (MetalLB's IP) on the "node" (the homelab namespace), and kube-proxy
//! emulated the way it works in iptables mode: a nat chain that DNATs each new flow to a ready
//! endpoint chosen at random (`-m statistic --mode random`), rewritten atomically with
//! `iptables-restore` when endpoints change, stale UDP conntrack entries of a removed endpoint
//! deleted, and (`externalTrafficPolicy: Cluster`) the flows masqueraded toward the pods.
//!
//! ```text
//!  client 10.43.0.2 ── cli0 10.43.0.1 ┐
//!                                     home (node): VIP 10.4.0.50, DNAT ── pod0 10.42.0.1 ── relay-0 10.42.0.2
//!  router 10.4.0.1 (agent's NAT) ─────┘                               ── pod1 10.42.1.1 ── relay-1 10.42.1.2 ...
//! ```
//!
//! Two Services share the address, as the manifests render them: the agents' QUIC port publishes
//! every pod whose relay is alive (`publishNotReadyAddresses`: a starting replica must be reached
//! by agents before it is ready), the clients' ports only ready pods. An endpoint is alive while
//! its relay answers `/livez` and ready while it answers `/readyz` (probed every 100 ms, as
//! kubelet's probes and its notice of a dead container would) and it is not terminating: a pod
//! being deleted leaves the clients' endpoints at once, before its relay gets SIGTERM (the
//! manifests' preStop sleep covers the same race in k3s).

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use super::{addr, sh, Lab, Netns, Role, WIN_IP};
use crate::TestPki;

/// The Service's LoadBalancer address (MetalLB's IP) in the lab.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 50);
/// The clients' Service address when agents and clients have one each ([`Policy::Split`]).
pub const CLIENTS_VIP: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 51);
/// The homelab client's address in a cluster lab.
pub const CLIENT_NET_IP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 2);
const WAIT: Duration = Duration::from_secs(30);
/// QUIC port of every relay pod (and of the Service).
pub const QUIC: u16 = 4433;
const ADMIN: u16 = 9090;
/// The replica port of every relay pod.
pub const PEER: u16 = 9443;

/// Pod `i`'s address.
pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 42, u8::try_from(i).expect("a few pods"), 2)
}

/// How MetalLB delivers the Service address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// `externalTrafficPolicy: Cluster`: every ready pod, flows masqueraded (pods see the node).
    Cluster,
    /// `externalTrafficPolicy: Local`: only the pods on the node announcing the address, client
    /// addresses kept. Which pods those are is [`KubeProxy::announce`]'s to say.
    Local,
    /// As `sallyport-relay manifests` renders by default: the agents' Service on [`VIP`] with
    /// `Cluster` (masqueraded), the clients' on [`CLIENTS_VIP`] with `Local` (addresses kept; the
    /// lab's pods all sit on the one node that announces it).
    Split,
}

impl Policy {
    /// Where clients reach the services.
    pub fn clients_vip(&self) -> Ipv4Addr {
        if *self == Self::Split {
            CLIENTS_VIP
        } else {
            VIP
        }
    }
}

impl Lab {
    /// Adds `pods` relay namespaces and a client namespace behind the homelab "node", which holds
    /// the Service address and the kube-proxy chain.
    pub fn add_cluster(&mut self, pods: usize, policy: &Policy) {
        let id = &self.home.name[..self.home.name.len() - 1];
        let client = Netns { name: format!("{id}c") };
        self.home.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
        self.home.run("ip", &["addr", "add", &format!("{VIP}/32"), "dev", "eth0"]);
        attach(&self.home, &client, "cli0", CLIENT_NET_IP, Ipv4Addr::new(10, 43, 0, 1));
        self.client = Some(client);
        for i in 0..pods {
            let pod = Netns { name: format!("{id}p{i}") };
            let gw = Ipv4Addr::new(10, 42, u8::try_from(i).expect("a few pods"), 1);
            attach(&self.home, &pod, &format!("pod{i}"), pod_ip(i), gw);
            self.pods.push(pod);
        }
        let (vip, clients) = (VIP.to_string(), policy.clients_vip().to_string());
        if *policy == Policy::Split {
            self.home.run("ip", &["addr", "add", &format!("{CLIENTS_VIP}/32"), "dev", "eth0"]);
        }
        let quic = QUIC.to_string();
        for rule in [
            vec!["-N", "SP-AGENTS"],
            vec!["-N", "SP-SVC"],
            vec!["-A", "PREROUTING", "-d", &vip, "-p", "udp", "--dport", &quic, "-j", "SP-AGENTS"],
            vec!["-A", "PREROUTING", "-d", &clients, "-j", "SP-SVC"],
        ] {
            self.home.run("iptables", &[&["-t", "nat"][..], &rule].concat());
        }
        // kube-proxy masquerades what a Cluster Service delivers: all of it, or with Split the
        // agents' Service's only.
        let masquerade = ["-t", "nat", "-A", "POSTROUTING", "-m", "conntrack", "--ctstate", "DNAT"];
        match policy {
            Policy::Cluster => self.home.run("iptables", &[&masquerade[..], &["-j", "MASQUERADE"]].concat()),
            Policy::Split => self
                .home
                .run("iptables", &[&masquerade[..], &["--ctorigdst", &vip, "-j", "MASQUERADE"]].concat()),
            Policy::Local => String::new(),
        };
    }
}

/// Makes namespace `ns` with one link to `home` (`link` on home's side) at `ip`/24, routed via `gw`.
pub(super) fn attach(home: &Netns, ns: &Netns, link: &str, ip: Ipv4Addr, gw: Ipv4Addr) {
    sh(&format!("ip netns add {}", ns.name));
    ns.run("ip", &["link", "set", "lo", "up"]);
    sh(&format!("ip link add eth0 netns {} type veth peer name {link} netns {}", ns.name, home.name));
    ns.run("ip", &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns.run("ip", &["link", "set", "eth0", "up"]);
    ns.run("ip", &["route", "add", "default", "via", &gw.to_string()]);
    home.run("ip", &["addr", "add", &format!("{gw}/24"), "dev", link]);
    home.run("ip", &["link", "set", link, "up"]);
}

/// Emulated kube-proxy and endpoints controller for the Service in front of the relay pods.
#[derive(Debug)]
pub struct KubeProxy {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    home: String,
    pods: usize,
    stop: AtomicBool,
    state: Mutex<ProxyState>,
}

#[derive(Debug, Default)]
struct ProxyState {
    /// Pods being deleted: out of the endpoints whatever their probe says.
    terminating: BTreeSet<usize>,
    /// `Local` policy: the pods on the announcing node; `None`: every pod.
    announced: Option<BTreeSet<usize>>,
    /// The clients' endpoints in the chain now.
    endpoints: Vec<usize>,
    /// The agents' endpoints (alive pods) in their chain now.
    alive: Vec<usize>,
    /// Every change of the endpoints, with when it was applied.
    history: Vec<(Instant, Vec<usize>)>,
}

impl KubeProxy {
    /// Starts probing the pods of `lab` and keeping the Service chain in step.
    pub fn start(lab: &Lab) -> Self {
        let shared = Arc::new(Shared {
            home: lab.home.name.clone(),
            pods: lab.pods.len(),
            stop: AtomicBool::new(false),
            state: Mutex::default(),
        });
        let home = Netns { name: lab.home.name.clone() };
        let worker = shared.clone();
        let thread = std::thread::spawn(move || {
            home.enter().expect("enter the node's namespace");
            while !worker.stop.load(Ordering::Relaxed) {
                let alive: Vec<usize> = (0..worker.pods).filter(|i| probe(*i, "/livez")).collect();
                let ready: Vec<usize> = alive.iter().copied().filter(|i| probe(*i, "/readyz")).collect();
                worker.apply(&alive, &ready);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self { shared, thread: Some(thread) }
    }

    /// Marks pod `i` as being deleted (it leaves the endpoints now) or, with `false`, back.
    pub fn terminating(&self, i: usize, terminating: bool) {
        let mut state = self.shared.state.lock().expect("state");
        if terminating {
            state.terminating.insert(i);
        } else {
            state.terminating.remove(&i);
        }
        let (alive, ready) = (state.alive.clone(), state.endpoints.clone());
        drop(state);
        self.shared.apply(&alive, &ready);
    }

    /// `Local` policy: only `pods` (those on the announcing node) get the Service's traffic;
    /// MetalLB moving the address to another node is a new call.
    pub fn announce(&self, pods: &[usize]) {
        let mut state = self.shared.state.lock().expect("state");
        state.announced = Some(pods.iter().copied().collect());
        let (alive, ready) = (state.alive.clone(), state.endpoints.clone());
        drop(state);
        self.shared.apply(&alive, &ready);
    }

    /// The endpoints in the chain now.
    pub fn endpoints(&self) -> Vec<usize> {
        self.shared.state.lock().expect("state").endpoints.clone()
    }

    /// Waits until the endpoints are exactly `pods`.
    pub fn wait_endpoints(&self, pods: &[usize], timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if self.endpoints() == pods {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "endpoints {:?}, expected {pods:?}", self.endpoints());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// When the endpoints last changed to not include `pod`, after `since`.
    pub fn removed_at(&self, pod: usize, since: Instant) -> Option<Instant> {
        let state = self.shared.state.lock().expect("state");
        state.history.iter().find(|(at, eps)| *at >= since && !eps.contains(&pod)).map(|(at, _)| *at)
    }
}

impl Shared {
    /// Rewrites the chains for the alive pods (agents) and the ready ones that are not
    /// terminating (clients), both announced, if that changes them; deletes UDP conntrack entries
    /// of endpoints that left.
    fn apply(&self, probed_alive: &[usize], probed_ready: &[usize]) {
        let mut state = self.state.lock().expect("state");
        let announced = |i: &usize| state.announced.as_ref().is_none_or(|a| a.contains(i));
        let alive: Vec<usize> = probed_alive.iter().copied().filter(announced).collect();
        let endpoints: Vec<usize> = probed_ready
            .iter()
            .copied()
            .filter(|i| !state.terminating.contains(i))
            .filter(announced)
            .collect();
        if endpoints == state.endpoints && alive == state.alive {
            return;
        }
        let mut rules = String::from("*nat\n");
        for (chain, pods) in [("SP-AGENTS", &alive), ("SP-SVC", &endpoints)] {
            rules.push_str(&format!(":{chain} - [0:0]\n"));
            for (k, pod) in pods.iter().enumerate() {
                let left = pods.len() - k;
                let random = if left > 1 {
                    format!("-m statistic --mode random --probability {:.5} ", 1.0 / left as f64)
                } else {
                    String::new()
                };
                rules.push_str(&format!("-A {chain} {random}-j DNAT --to-destination {}\n", pod_ip(*pod)));
            }
        }
        rules.push_str("COMMIT\n");
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.home, "iptables-restore", "--noflush"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("iptables-restore");
        child.stdin.take().expect("stdin").write_all(rules.as_bytes()).expect("rules");
        assert!(child.wait().expect("iptables-restore").success(), "iptables-restore of {rules}");
        for gone in state.alive.iter().filter(|p| !alive.contains(p)) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", &self.home, "conntrack", "-D", "-p", "udp", "--orig-dst"])
                .arg(VIP.to_string())
                .args(["--reply-src", &pod_ip(*gone).to_string()])
                .output();
        }
        if endpoints != state.endpoints {
            state.history.push((Instant::now(), endpoints.clone()));
        }
        state.endpoints = endpoints;
        state.alive = alive;
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A probe: `GET path` on pod `i`'s admin port answers 200 within 300 ms.
fn probe(i: usize, path: &str) -> bool {
    let target = SocketAddr::from((pod_ip(i), ADMIN));
    let Ok(mut stream) = TcpStream::connect_timeout(&target, Duration::from_millis(300)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

/// Relays in the pods of a cluster lab and one agent that reaches them through the Service.
#[derive(Debug)]
pub struct LabCluster {
    /// Process index of each pod's relay (a restart replaces it).
    pub relays: Vec<Option<usize>>,
    pub agent: usize,
    pub proxy: KubeProxy,
    /// The relay.toml of each pod.
    pub tomls: Vec<String>,
    pub agent_toml: String,
    pub pki: TestPki,
    /// The admin token every replica has.
    pub token: String,
}

/// The port of the transfer service on the Service address, and its target on the windows side.
pub const TRANSFER_PORT: u16 = 7000;
pub const TRANSFER_TARGET: u16 = 7001;

impl LabCluster {
    /// Starts relays in the first `running` of the lab's pods (relay-0, the writer, first), the
    /// emulated kube-proxy, a transfer server and the agent; waits until the agent holds a tunnel
    /// to each running relay. Relays and agent run with the default timers. The agent opens a lane beside
    /// each tunnel (`lanes = 2`): through the Service a lane lands on any replica, and one that
    /// reaches another replica than its tunnel's is sent back to dial again.
    pub fn start(lab: &mut Lab, running: usize) -> Self {
        Self::start_with(lab, running, "", "")
    }

    /// [`start`](Self::start) with `relay_more` after each relay.toml's services (more services,
    /// `[access]`; relative paths land in the pod's folder, [`pod_dir`](Self::pod_dir)) and
    /// `agent_more` after the agent's.
    pub fn start_with(lab: &mut Lab, running: usize, relay_more: &str, agent_more: &str) -> Self {
        Self::start_keyed(lab, running, ("", relay_more), agent_more)
    }

    /// [`start_with`](Self::start_with) with `relay_keys` in each relay.toml's `[relay]` table
    /// (`http_listen`, ...).
    pub fn start_keyed(
        lab: &mut Lab,
        running: usize,
        (relay_keys, relay_more): (&str, &str),
        agent_more: &str,
    ) -> Self {
        let pki = TestPki::with_names(&["relay.lab"]);
        let token = "lab-admin-token-0123456789".to_owned();
        let token_file = lab.dir().join("admin.token");
        std::fs::write(&token_file, &token).expect("admin token");
        let mut tomls = Vec::new();
        for i in 0..lab.pods.len() {
            let dir = lab.dir().join(format!("pod{i}"));
            std::fs::create_dir_all(&dir).expect("pod dir");
            let text = format!(
                "[relay]\nlisten = \"0.0.0.0:{QUIC}\"\nadmin = \"0.0.0.0:{ADMIN}\"\nca_cert = \"{ca}\"\n\
                 cert = \"{crt}\"\nkey = \"{key}\"\nca_key = \"{cakey}\"\nadmin_token_file = \"{tok}\"\n\
                 revocations_file = \"revoked.toml\"\ntokens_file = \"tokens.toml\"\n{relay_keys}\n\n\
                 [cluster]\nwriter = \"relay-0\"\nwriter_peer = \"{writer}\"\n\n\
                 [services.transfer]\nagent = \"winbox\"\nlisten = \"0.0.0.0:{TRANSFER_PORT}\"\n{relay_more}",
                ca = pki.dir().join("ca.crt").display(),
                crt = pki.dir().join("relay.crt").display(),
                key = pki.dir().join("relay.key").display(),
                cakey = pki.dir().join("ca.key").display(),
                tok = token_file.display(),
                writer = addr(pod_ip(0), PEER),
            );
            let path = dir.join("relay.toml");
            std::fs::write(&path, text).expect("relay.toml");
            tomls.push(path.display().to_string());
        }
        let bundle = pki.agent_bundle("winbox");
        let agent = format!(
            "[agent]\nrelays = [\"{}\"]\nserver_name = \"relay.lab\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             lanes = 2\n\n\
             [services.transfer]\ntarget = \"tcp://{}\"\n{agent_more}",
            addr(VIP, QUIC),
            bundle.join("ca.crt").display(),
            bundle.join("agent.crt").display(),
            bundle.join("agent.key").display(),
            addr(WIN_IP, TRANSFER_TARGET),
        );
        let agent_toml = lab.dir().join("agent.toml").display().to_string();
        std::fs::write(&agent_toml, agent).expect("agent.toml");
        let proxy = KubeProxy::start(lab);
        let mut cluster =
            Self { relays: vec![None; lab.pods.len()], agent: 0, proxy, tomls, agent_toml, pki, token };
        for i in 0..running {
            cluster.start_relay(lab, i);
        }
        cluster.proxy.wait_endpoints(&(0..running).collect::<Vec<_>>(), WAIT);
        let listen = addr(WIN_IP, TRANSFER_TARGET).to_string();
        let server =
            lab.spawn_binary(Role::Win, "sallyport-labtool", &["transfer-server", "--listen", &listen]);
        lab.process(server).wait_line("transfer server listening", WAIT);
        cluster.agent =
            lab.spawn_binary(Role::Win, "sallyport-agent", &["run", "--config", &cluster.agent_toml]);
        for i in 0..running {
            cluster.wait_agent_at(lab, i, WAIT);
        }
        cluster
    }

    /// The folder of pod `i`'s relay.toml.
    pub fn pod_dir(&self, i: usize) -> std::path::PathBuf {
        std::path::Path::new(&self.tomls[i]).parent().expect("the pod's folder").to_owned()
    }

    /// Starts (or restarts) the relay of pod `i` as replica `relay-i` and waits until it is ready.
    pub fn start_relay(&mut self, lab: &mut Lab, i: usize) -> usize {
        let replica = format!("relay-{i}");
        let index = lab.spawn_binary(
            Role::Pod(i),
            "sallyport-relay",
            &["serve", "--config", &self.tomls[i], "--replica", &replica],
        );
        lab.process(index).wait_line("relay ready", WAIT);
        self.relays[i] = Some(index);
        index
    }

    /// Waits until the relay of pod `i` has the agent connected.
    pub fn wait_agent_at(&self, lab: &mut Lab, i: usize, timeout: Duration) -> Instant {
        let index = self.relays[i].expect("relay running");
        lab.process(index).wait_line("agent connected", timeout);
        Instant::now()
    }

    /// An admin call to pod `i`'s relay with the admin token (from the node): status and body.
    pub fn admin(&self, lab: &Lab, i: usize, method: &str, path: &str) -> (u16, String) {
        self.admin_as(lab, i, (method, path), Some(&self.token), "")
    }

    /// An admin call to pod `i`'s relay with `token` (none: no Authorization header) and `body`.
    pub fn admin_as(
        &self,
        lab: &Lab,
        i: usize,
        (method, path): (&str, &str),
        token: Option<&str>,
        body: &str,
    ) -> (u16, String) {
        let url = format!("http://{}{path}", addr(pod_ip(i), ADMIN));
        let auth = token.map(|t| format!("Authorization: Bearer {t}")).unwrap_or_else(|| "X-None: 1".into());
        let out = lab.home.output(
            "curl",
            &[
                "-sS",
                "-m",
                "10",
                "-X",
                method,
                "-H",
                &auth,
                "--data-binary",
                body,
                "-w",
                "\n%{http_code}",
                &url,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (status.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// The agent's connections at pod `i`'s relay (from its agents listing), 0 when absent.
    pub fn agent_connected_at(&self, lab: &Lab, i: usize) -> bool {
        let (status, body) = self.admin(lab, i, "GET", "/agents");
        status == 200 && body.contains("winbox")
    }

    /// Sends SIGTERM to pod `i`'s relay.
    pub fn sigterm(&self, lab: &mut Lab, i: usize) {
        let pid = lab.process(self.relays[i].expect("relay running")).child.id().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    }
}
