//! Who may reach what, in the lab with kube-proxy emulated and the clients' Service on its own
//! `Local` address (as `sallyport-relay manifests` renders it): two homelab hosts on networks of
//! their own use a Redis, a PostgreSQL, a web app by Host, a TLS app by SNI and a DNS server on the
//! Windows side with their real clients (redis-cli, psql, curl, dig). The relay's rules let one in
//! and refuse the other the kind's way; a reload swaps the rules and both follow, while the agent's
//! tunnel and a Redis connection opened before the reload go on; a file that does not validate is
//! refused whole and the rules in force stay.

use std::time::Duration;

use sallyport_tests::{
    lab::{lan_host_ip, Lab, LabCluster, Netns, Policy, Role, CLIENT_NET_IP, WIN_IP},
    lab_or_skip, servers, tools_or_skip,
};

const REDIS: u16 = 6379;
const PG: u16 = 5432;
const DNS: u16 = 53;

/// What each kind answered one host.
#[derive(Debug, PartialEq, Eq)]
struct Answers {
    redis: String,
    psql: String,
    http: String,
    https: String,
    dns: String,
}

/// Asks every service from `host` through the clients' address `vip` with the real clients.
fn ask(host: &Netns, vip: std::net::Ipv4Addr) -> Answers {
    let vip = vip.to_string();
    let text = |out: std::process::Output| String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let redis = text(host.output("redis-cli", &["-h", &vip, "-p", &REDIS.to_string(), "PING"]));
    let psql = text(host.output(
        "env",
        &[
            "PGCONNECT_TIMEOUT=3",
            "psql",
            "-h",
            &vip,
            "-p",
            &PG.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            "select 6 * 7",
        ],
    ));
    // curl's status code (000: no HTTP answer) with `args` before the URL.
    let code = |args: &[&str]| {
        let fixed = ["-sk", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"];
        text(host.output("curl", &[&fixed[..], args].concat()))
    };
    let http = code(&["-H", "Host: web.home.lan", &format!("http://{vip}/")]);
    let https = code(&["--resolve", &format!("tls.home.lan:443:{vip}"), "https://tls.home.lan/"]);
    let dns = text(host.output(
        "dig",
        &[&format!("@{vip}"), "-p", &DNS.to_string(), "nas.home.lan", "+short", "+time=1", "+tries=2"],
    ));
    let dns = dns.lines().find(|l| !l.starts_with(';')).unwrap_or_default().to_owned();
    Answers { redis, psql, http, https, dns }
}

fn served() -> Answers {
    Answers {
        redis: "PONG".into(),
        psql: "42".into(),
        http: "200".into(),
        https: "200".into(),
        dns: "10.9.8.7".into(),
    }
}

/// What a refused host gets: redis-cli and psql see their connection reset (no answer), curl a 403
/// on HTTP and a reset on HTTPS (no status), dig no answer.
fn refused() -> Answers {
    Answers {
        redis: String::new(),
        psql: String::new(),
        http: "403".into(),
        https: "000".into(),
        dns: String::new(),
    }
}

/// The Windows side: Redis, PostgreSQL, a web app, a TLS app and a DNS server.
fn windows_services(lab: &mut Lab) -> String {
    lab.start_redis(6380);
    lab.start_postgres(5433);
    let site = lab.dir().join("site");
    std::fs::create_dir_all(&site).expect("site");
    std::fs::write(site.join("index.html"), "web app\n").expect("index");
    lab.start_http(8080, &site);
    let (crt, key) = servers::self_signed(lab.dir(), "tls.home.lan");
    let (crt, key) = (crt.display().to_string(), key.display().to_string());
    let tls = lab.spawn_program(
        Role::Win,
        "openssl",
        &["s_server", "-www", "-accept", &format!("{WIN_IP}:8443"), "-cert", &crt, "-key", &key],
    );
    lab.process(tls).wait_line("ACCEPT", Duration::from_secs(10));
    let args = servers::dnsmasq_args(std::net::SocketAddr::from((WIN_IP, 5353)), "nas.home.lan", "10.9.8.7");
    let dns = lab.spawn_program(Role::Win, "dnsmasq", &args.iter().map(String::as_str).collect::<Vec<_>>());
    lab.process(dns).wait_line("started", Duration::from_secs(10));
    format!(
        "[services.redis]\ntarget = \"tcp://{WIN_IP}:6380\"\n[services.pg]\ntarget = \"tcp://{WIN_IP}:5433\"\n\
         [services.web]\ntarget = \"tcp://{WIN_IP}:8080\"\n[services.tls]\ntarget = \"tcp://{WIN_IP}:8443\"\n\
         [services.dns]\ntarget = \"udp://{WIN_IP}:5353\"\n"
    )
}

/// A Redis connection from the client network kept open across the reload: PING, then PING again
/// once `flag` exists.
const KEPT: &str = r#"
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
def ping():
    s.sendall(b"PING\r\n")
    return s.recv(64).decode().strip()
print("kept before", ping(), flush=True)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.05)
print("kept after", ping(), flush=True)
"#;

#[test]
fn rules_hold_for_real_clients_on_two_lan_hosts_and_follow_a_reload() {
    tools_or_skip!("redis-cli", "psql", "curl", "dig", "dnsmasq", "openssl");
    let mut lab = lab_or_skip!();
    let policy = Policy::Split;
    lab.add_cluster(1, &policy);
    let other = lab.add_lan_host();
    let agent_more = windows_services(&mut lab);
    let (first, second) = (CLIENT_NET_IP, lan_host_ip(other));
    let rules = |allowed: std::net::Ipv4Addr| format!("default = [\"allow {allowed}/32\", \"deny all\"]");
    let services = format!(
        "[services.redis]\nagent = \"winbox\"\nlisten = \"0.0.0.0:{REDIS}\"\n\
         [services.pg]\nagent = \"winbox\"\nlisten = \"0.0.0.0:{PG}\"\n\
         [services.web]\nagent = \"winbox\"\nhosts = [\"web.home.lan\"]\n\
         [services.tls]\nagent = \"winbox\"\nsni = [\"tls.home.lan\"]\n\
         [services.dns]\nagent = \"winbox\"\nudp = \"0.0.0.0:{DNS}\"\n\
         [access]\nlog = \"access.log\"\n"
    );
    let cluster = LabCluster::start_keyed(
        &mut lab,
        1,
        (
            "http_listen = \"0.0.0.0:80\"\nhttps_listen = \"0.0.0.0:443\"",
            &format!("{services}{}\n", rules(first)),
        ),
        &agent_more,
    );
    let vip = policy.clients_vip();
    let (one, two) = (lab.ns(Role::Client), lab.ns(Role::Host(other)));
    let (before_one, before_two) = (ask(one, vip), ask(two, vip));
    println!("allowed {first}: {before_one:?}\nrefused {second}: {before_two:?}");
    assert_eq!(before_one, served(), "the allowed host ({first})");
    assert_eq!(before_two, refused(), "the refused host ({second})");

    // A connection from the first host, open before the rules change.
    let flag = lab.dir().join("reloaded");
    let kept = lab.spawn_program(
        Role::Client,
        "python3",
        &["-u", "-c", KEPT, &vip.to_string(), &REDIS.to_string(), &flag.display().to_string()],
    );
    let line = lab.process(kept).wait_line("kept before", Duration::from_secs(10));
    assert!(line.ends_with("PONG"), "{line}");

    // A file that does not validate is refused whole: the rules in force stay.
    let toml = cluster.pod_dir(0).join("relay.toml");
    let text = std::fs::read_to_string(&toml).expect("relay.toml");
    let swapped = text.replace(&rules(first), &rules(second));
    assert_ne!(swapped, text);
    std::fs::write(&toml, text.replace(&rules(first), "default = [\"allow 10.44.0.300/32\"]"))
        .expect("bad file");
    let (status, body) = cluster.admin(&lab, 0, "POST", "/reload");
    println!("a bad rule: {status} {body}");
    assert!(
        status >= 400 && body.contains("access.default") && body.contains("10.44.0.300"),
        "{status} {body}"
    );
    assert_eq!(ask(lab.ns(Role::Host(other)), vip).http, "403", "the refused file changed nothing");

    // The rules swap: the second host is let in, the first refused; its open connection goes on,
    // and the agent's tunnel is the one it was.
    let relay = cluster.relays[0].expect("relay-0 runs");
    let tunnel_lines = |log: &[String]| {
        let count = |what: &str| log.iter().filter(|l| l.contains(what)).count();
        (count("agent connected"), count("agent disconnected"))
    };
    let tunnels_before = tunnel_lines(lab.process(relay).drain());
    std::fs::write(&toml, swapped).expect("relay.toml");
    let (status, body) = cluster.admin(&lab, 0, "POST", "/reload");
    assert_eq!(status, 200, "{body}");
    std::fs::write(&flag, "").expect("flag");
    let line = lab.process(kept).wait_line("kept after", Duration::from_secs(10));
    assert!(line.ends_with("PONG"), "the connection opened before the reload: {line}");
    let (one, two) = (lab.ns(Role::Client), lab.ns(Role::Host(other)));
    let (after_one, after_two) = (ask(one, vip), ask(two, vip));
    println!("after the reload, {first}: {after_one:?}\n{second}: {after_two:?}");
    assert_eq!(after_two, served(), "the newly allowed host ({second})");
    assert_eq!(after_one, refused(), "the newly refused host ({first})");
    let tunnels_after = tunnel_lines(lab.process(relay).drain());
    assert_eq!(
        tunnels_after, tunnels_before,
        "(agent connected, disconnected) lines: the tunnel was replaced"
    );
    let (_, metrics) = cluster.admin(&lab, 0, "GET", "/metrics");
    let dropped =
        sallyport_tests::metric(&metrics, "sallyport_refusals_total{listener=\"dns\",reason=\"denied\"}");
    assert!(dropped >= 2.0, "the refused host's datagrams are counted: {dropped}");

    // The access log names both hosts with the results they got.
    let log = std::fs::read_to_string(cluster.pod_dir(0).join("access.log")).expect("access log");
    for (host, result) in [(first, "completed"), (first, "denied"), (second, "completed"), (second, "denied")]
    {
        for service in ["redis", "pg", "web", "tls"] {
            let found = log.lines().any(|l| {
                l.contains(&format!("\"client_ip\":\"{host}\""))
                    && l.contains(&format!("\"service\":\"{service}\""))
                    && l.contains(&format!("\"result\":\"{result}\""))
            });
            assert!(found, "no {result} line for {host} on {service}:\n{log}");
        }
    }
}
