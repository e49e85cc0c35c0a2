//! Debian's fail2ban with the shipped filter and jail (`deploy/fail2ban/`), reading a relay pod's
//! access log in the lab (kube-proxy emulated, the clients' address with `Local`): a homelab host
//! the service's rules refuse is banned in the pod's firewall after five refusals, while another
//! host keeps working, and the agent's tunnel with it.

use std::time::{Duration, Instant};

use sallyport_tests::{
    lab::{lan_host_ip, Lab, LabCluster, Netns, Policy, Role, CLIENT_NET_IP, WIN_IP},
    lab_or_skip, servers, tools_or_skip,
};

const PORT: u16 = 7200;
const TARGET: u16 = 7201;
/// A second homelab host, beside [`CLIENT_NET_IP`].
const OTHER_HOST: &str = "10.43.0.3";

/// Whether a connection from `from` to the service is greeted (within 2 s).
fn greeted(client: &Netns, from: &str, to: std::net::Ipv4Addr) -> bool {
    let script = format!(
        "import socket, sys\ns = socket.create_connection(('{to}', {PORT}), timeout=2, source_address=('{from}', 0))\nsys.exit(0 if s.recv(1) else 1)"
    );
    client.output("python3", &["-c", &script]).status.success()
}

/// Starts Debian's fail2ban-server in `role`'s namespace with Debian's configuration, the shipped
/// jail `jail` and its filters, and `lab_keys` added to the jail (the log's path, ...; the poller
/// always); waits until the jail runs and returns the server's socket.
fn start_fail2ban(lab: &mut Lab, role: Role, (jail, filters): (&str, &[&str]), lab_keys: &str) -> String {
    let conf = lab.dir().join(format!("fail2ban-{jail}"));
    let copied = std::process::Command::new("cp").args(["-r", "/etc/fail2ban"]).arg(&conf).status();
    assert!(copied.is_ok_and(|s| s.success()));
    let _ = std::fs::remove_file(conf.join("jail.d/defaults-debian.conf"));
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/fail2ban");
    for filter in filters {
        let file = format!("filter.d/{filter}.conf");
        std::fs::copy(deploy.join(&file), conf.join(&file)).expect("filter");
    }
    let file = format!("jail.d/{jail}.local");
    std::fs::copy(deploy.join(&file), conf.join(&file)).expect("jail");
    std::fs::write(conf.join("jail.d/zz-lab.local"), format!("[{jail}]\n{lab_keys}backend = polling\n"))
        .expect("lab jail");
    let run = lab.dir().join(format!("f2b-{jail}"));
    std::fs::create_dir_all(&run).expect("run dir");
    std::fs::write(conf.join("fail2ban.local"), "[Definition]\ndbfile = :memory:\n").expect("fail2ban.local");
    let (socket, pid) = (run.join("f2b.sock"), run.join("f2b.pid"));
    let server = lab.spawn_program(
        role,
        "fail2ban-server",
        &[
            "-f",
            "-x",
            "-c",
            &conf.display().to_string(),
            "-s",
            &socket.display().to_string(),
            "-p",
            &pid.display().to_string(),
            "--logtarget",
            "stderr",
            "--loglevel",
            "INFO",
        ],
    );
    lab.process(server).wait_line(&format!("Jail '{jail}' started"), Duration::from_secs(30));
    socket.display().to_string()
}

/// Waits (5 s at most) until `ns`'s firewall holds `rule` (fail2ban lists a ban before its action
/// has run); asserts it does and returns the rules.
fn wait_rule(ns: &Netns, rule: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rules = ns.run("iptables", &["-S"]);
        if rules.contains(rule) || Instant::now() > deadline {
            assert!(rules.contains(rule), "{rule} not in:\n{rules}");
            return rules;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (20 s at most) until the jail of the fail2ban server at `socket` in `ns` has banned `ip`,
/// running `between` before each look; asserts it did.
fn wait_banned(
    ns: &Netns,
    (socket, jail): (&str, &str),
    ip: &str,
    started: Instant,
    mut between: impl FnMut(),
) {
    let banned = loop {
        between();
        let status = ns.output("fail2ban-client", &["-s", socket, "status", jail]);
        let text = String::from_utf8_lossy(&status.stdout).into_owned();
        if text.contains(ip) || started.elapsed() > Duration::from_secs(20) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let line = banned.lines().filter(|l| l.contains("Banned IP")).collect::<Vec<_>>().join("");
    println!("{jail}: banned after {:?}: {line}", started.elapsed());
    assert!(banned.contains(&format!("Banned IP list:\t{ip}")), "{banned}");
}

#[test]
fn fail2ban_bans_a_refused_host_in_the_pods_firewall_while_another_keeps_working() {
    tools_or_skip!("fail2ban-server", "fail2ban-client");
    let mut lab = lab_or_skip!();
    let policy = Policy::Split;
    lab.add_cluster(1, &policy);
    let client = lab.client.as_ref().expect("the client network");
    client.run("ip", &["addr", "add", &format!("{OTHER_HOST}/24"), "dev", "eth0"]);
    let relay_more = format!(
        "[services.rdp]\nagent = \"winbox\"\nlisten = \"0.0.0.0:{PORT}\"\n\
         [access]\ndefault = [\"deny {CLIENT_NET_IP}\", \"allow all\"]\nlog = \"access.log\"\n"
    );
    let agent_more = format!("[services.rdp]\ntarget = \"tcp://{WIN_IP}:{TARGET}\"\n");
    let listen = format!("{WIN_IP}:{TARGET}");
    let greeter = lab.spawn_binary(Role::Win, "sallyport-labtool", &["greeter", "--listen", &listen]);
    lab.process(greeter).wait_line("greeter listening", Duration::from_secs(10));
    let cluster = LabCluster::start_with(&mut lab, 1, &relay_more, &agent_more);
    let log = cluster.pod_dir(0).join("access.log");
    std::fs::write(&log, "").expect("the access log exists before fail2ban watches it");

    // fail2ban in the pod's namespace: Debian's configuration, the shipped filter and jail, and
    // what the lab changes (the log's path, the port, the poller).
    let socket = start_fail2ban(
        &mut lab,
        Role::Pod(0),
        ("sallyport", &["sallyport"]),
        &format!("logpath = {}\nport = {PORT}\n", log.display()),
    );

    let clients = policy.clients_vip();
    let client = lab.client.as_ref().expect("the client network");
    assert!(greeted(client, OTHER_HOST, clients), "the other host is served");
    let started = Instant::now();
    let refused = (0..6).filter(|_| !greeted(client, &CLIENT_NET_IP.to_string(), clients)).count();
    assert_eq!(refused, 6, "the refused host is reset by the rules");
    // fail2ban reads the refusals and bans the host in the pod's firewall.
    wait_banned(&lab.pods[0], (&socket, "sallyport"), &CLIENT_NET_IP.to_string(), started, || ());
    wait_rule(&lab.pods[0], &format!("-A f2b-sallyport -s {CLIENT_NET_IP}/32 -j REJECT"));
    // The banned host no longer reaches the relay at all; the other host and the agent go on.
    // The log has all six refusals first (fail2ban banned on five; the writer may be behind).
    let own = format!("\"client_ip\":\"{CLIENT_NET_IP}\"");
    servers::wait_for_log(&log, |text| text.matches(&own).count() >= 6);
    let lines_before = std::fs::read_to_string(&log).unwrap_or_default().lines().count();
    assert!(!greeted(client, &CLIENT_NET_IP.to_string(), clients), "the banned host is refused");
    std::thread::sleep(Duration::from_millis(300));
    let lines_after = std::fs::read_to_string(&log).unwrap_or_default().lines().count();
    assert_eq!(
        lines_before, lines_after,
        "the ban holds at the firewall: the relay never sees the banned host"
    );
    assert!(greeted(client, OTHER_HOST, clients), "the other host is still served");
}

/// The kubelet's part, emulated: the relay's stdout lines that are access log lines (JSON; its own
/// log goes to stderr as text) appended to the node's container log file in the CRI format
/// (`TIME stdout F LINE`, the time with nanoseconds).
fn kubelet_writes(lines: &[String], log: &std::path::Path) -> usize {
    let mut text = String::new();
    for line in lines.iter().filter(|l| l.starts_with("{\"time\":\"")) {
        let time = line.split('"').nth(3).expect("the line's time");
        text.push_str(&format!("{}000000Z stdout F {line}\n", time.trim_end_matches('Z')));
    }
    let mut file = std::fs::OpenOptions::new().append(true).open(log).expect("container log");
    std::io::Write::write_all(&mut file, text.as_bytes()).expect("append");
    text.lines().count()
}

/// The ban in k3s itself: the relay writes its access log to stdout, the node keeps it as the
/// kubelet does, and Debian's fail2ban on the node (the namespace holding the clients' address and
/// kube-proxy's DNAT) with the shipped k3s filter and jail bans the refused host in the node's
/// FORWARD chain; a host on another network and the agent's tunnel keep working.
#[test]
fn fail2ban_on_the_node_bans_from_the_kubelets_log_in_the_forward_chain() {
    tools_or_skip!("fail2ban-server", "fail2ban-client");
    let mut lab = lab_or_skip!();
    let policy = Policy::Split;
    lab.add_cluster(1, &policy);
    let other = lab.add_lan_host();
    let relay_more = format!(
        "[services.rdp]\nagent = \"winbox\"\nlisten = \"0.0.0.0:{PORT}\"\n\
         [access]\ndefault = [\"deny {CLIENT_NET_IP}\", \"allow all\"]\nlog = \"stdout\"\n"
    );
    let agent_more = format!("[services.rdp]\ntarget = \"tcp://{WIN_IP}:{TARGET}\"\n");
    let listen = format!("{WIN_IP}:{TARGET}");
    let greeter = lab.spawn_binary(Role::Win, "sallyport-labtool", &["greeter", "--listen", &listen]);
    lab.process(greeter).wait_line("greeter listening", Duration::from_secs(10));
    let cluster = LabCluster::start_with(&mut lab, 1, &relay_more, &agent_more);
    let relay = cluster.relays[0].expect("relay-0 runs");
    let containers = lab.dir().join("var-log-containers");
    std::fs::create_dir_all(&containers).expect("dir");
    let log = containers.join("sallyport-relay-0_sallyport_relay-4f1c2e.log");
    std::fs::write(&log, "").expect("the container log exists before fail2ban watches it");
    let logpath = containers.join("sallyport-relay-*_sallyport_relay-*.log");
    let socket = start_fail2ban(
        &mut lab,
        Role::Home,
        ("sallyport-k3s", &["sallyport", "sallyport-k3s"]),
        &format!("logpath = {}\n", logpath.display()),
    );

    let clients = policy.clients_vip();
    let second = lan_host_ip(other).to_string();
    assert!(greeted(lab.ns(Role::Host(other)), &second, clients), "the other host is served");
    let first = CLIENT_NET_IP.to_string();
    let refused = (0..6).filter(|_| !greeted(lab.ns(Role::Client), &first, clients)).count();
    assert_eq!(refused, 6, "the refused host is reset by the rules");
    let started = Instant::now();
    let mut seen = 0;
    let home = Netns { name: lab.home.name.clone() };
    wait_banned(&home, (&socket, "sallyport-k3s"), &first, started, || {
        let lines = lab.process(relay).drain().to_vec();
        kubelet_writes(&lines[seen..], &log);
        seen = lines.len();
    });
    let rules = wait_rule(&lab.home, &format!("-A f2b-sallyport-k3s -s {first}/32 -j REJECT"));
    assert!(rules.contains("-A FORWARD -p tcp -j f2b-sallyport-k3s"), "{rules}");

    // The banned host no longer reaches the pod; the other host and the agent's tunnel go on.
    assert!(!greeted(lab.ns(Role::Client), &first, clients), "the banned host is refused");
    assert!(greeted(lab.ns(Role::Host(other)), &second, clients), "the other host is still served");
    // The relay logged the six refusals (fail2ban banned on five) and nothing from the host since.
    let own = format!("\"client_ip\":\"{first}\"");
    let from_first = |lab: &mut Lab| lab.process(relay).drain().iter().filter(|l| l.contains(&own)).count();
    let deadline = Instant::now() + Duration::from_secs(5);
    while from_first(&mut lab) < 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(from_first(&mut lab), 6, "the ban holds at the node: the relay never sees the banned host");
    assert!(cluster.agent_connected_at(&lab, 0), "the agent's tunnel goes on");
}
