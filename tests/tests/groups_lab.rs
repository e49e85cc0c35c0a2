//! A web app on two Windows hosts in the network lab: each host behind the router's NAT with a
//! WSL2-style network behind it, nginx in each WSL2 side, an agent on each Windows host with the
//! configuration `agent add` writes (default timers), the relay on the homelab side with a
//! round-robin group and its default HTTP health check. Clients are plain HTTP/1.1 requests from
//! the homelab through the relay's HTTP listener.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use sallyport_tests::{
    lab::{addr, windows_host_ip, wsl_of_ip, Lab, Netns, Role, QUIC_PORT, RELAY_IP, WSL_IP},
    TestPki,
};

const HTTP_PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(30);

/// One request with `Host: host` to `to`: the status and the body, or why none came.
fn get(to: SocketAddr, host: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no answer")?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("no status")?;
    Ok((status, body.trim().to_owned()))
}

/// The web app through the relay: which member answered (its nginx's body), or why not.
fn web() -> Result<String, String> {
    match get(addr(RELAY_IP, HTTP_PORT), "web.lab", "/")? {
        (200, body) => Ok(body),
        (status, body) => Err(format!("{status} {body}")),
    }
}

/// The state word of each member of the `web` group on the relay's status page.
fn members() -> Vec<(String, String)> {
    let Ok((200, text)) = get(SocketAddr::from(([127, 0, 0, 1], 9090)), "127.0.0.1", "/status.txt") else {
        return Vec::new();
    };
    text.lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter(|cols| cols.len() >= 5 && cols[0] == "web" && cols[1] == "round-robin")
        .map(|cols| (cols[2].clone(), cols[3].clone()))
        .collect()
}

/// Waits until the members stand as `wanted`; says when they did.
fn wait_members(wanted: &[(&str, &str)]) -> Instant {
    let wanted: Vec<(String, String)> = wanted.iter().map(|(a, s)| (a.to_string(), s.to_string())).collect();
    let started = Instant::now();
    loop {
        let now = members();
        if now == wanted {
            return Instant::now();
        }
        assert!(started.elapsed() < WAIT, "members {now:?}, wanted {wanted:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the homelab side does, run in a thread inside the homelab's namespace.
enum Ask {
    Members(Vec<(&'static str, &'static str)>, mpsc::Sender<Instant>),
    Spread(usize, mpsc::Sender<std::collections::BTreeMap<String, usize>>),
    /// New requests at `per_second` for `seconds`: each one's start (since `Instant`) and result.
    Load(u32, u32, Instant, mpsc::Sender<Vec<(Duration, Result<String, String>)>>),
}

fn homelab(home: &Netns) -> mpsc::Sender<Ask> {
    let (tx, rx) = mpsc::channel::<Ask>();
    let name = home.name.clone();
    std::thread::spawn(move || {
        Netns { name }.enter().expect("enter the homelab's namespace");
        for ask in rx {
            match ask {
                Ask::Members(wanted, done) => {
                    let _ = done.send(wait_members(&wanted));
                }
                Ask::Spread(n, done) => {
                    let mut counts = std::collections::BTreeMap::new();
                    for _ in 0..n {
                        *counts.entry(web().unwrap_or_else(|e| format!("failed: {e}"))).or_default() += 1;
                    }
                    let _ = done.send(counts);
                }
                Ask::Load(per_second, seconds, since, done) => {
                    let every = Duration::from_secs(1) / per_second;
                    let (results_tx, results) = mpsc::channel();
                    let mut next = Instant::now();
                    for _ in 0..per_second * seconds {
                        let results_tx = results_tx.clone();
                        std::thread::spawn(move || {
                            let at = since.elapsed();
                            let _ = results_tx.send((at, web()));
                        });
                        next += every;
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    }
                    drop(results_tx);
                    let _ = done.send(results.iter().collect());
                }
            }
        }
    });
    tx
}

fn ask<T>(homelab: &mpsc::Sender<Ask>, make: impl FnOnce(mpsc::Sender<T>) -> Ask) -> T {
    let (tx, rx) = mpsc::channel();
    homelab.send(make(tx)).expect("the homelab thread runs");
    rx.recv_timeout(Duration::from_secs(120)).expect("the homelab thread answers")
}

#[test]
fn a_web_app_on_two_windows_hosts_survives_a_dead_server_and_a_dead_agent() {
    let mut lab = match Lab::double_nat() {
        Ok(lab) => lab,
        Err(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("network lab unavailable in CI: {reason}")
        }
        Err(reason) => return eprintln!("SKIPPED: {reason}"),
    };
    let second = lab.add_windows_host();
    let pki = TestPki::with_names(&["relay.lab", &RELAY_IP.to_string()]);
    let relay_toml = lab.dir().join("relay.toml");
    std::fs::write(
        &relay_toml,
        format!(
            "[relay]\nlisten = \"{}\"\nadmin = \"127.0.0.1:9090\"\nhttp_listen = \"{}\"\nca_cert = \"{}\"\n\
             cert = \"{}\"\nkey = \"{}\"\n\
             [services.web]\nagents = [\"winbox\", \"winbox2\"]\nstrategy = \"round-robin\"\nhosts = [\"web.lab\"]\n\
             [services.web.health]\ncheck = \"http\"\npath = \"/\"\n",
            addr(RELAY_IP, QUIC_PORT),
            addr(RELAY_IP, HTTP_PORT),
            pki.dir().join("ca.crt").display(),
            pki.dir().join("relay.crt").display(),
            pki.dir().join("relay.key").display(),
        ),
    )
    .expect("relay.toml");
    let relay = lab.spawn_binary(
        Role::Home,
        "sallyport-relay",
        &["serve", "--config", &relay_toml.display().to_string()],
    );
    lab.process(relay).wait_line("relay ready", WAIT);
    // nginx in each WSL2 side; each Windows host's agent reaches its own WSL2 address.
    let nginx = [
        lab.start_nginx(Role::Wsl, WSL_IP, 80, "winbox"),
        lab.start_nginx(Role::WslOf(second), wsl_of_ip(second), 80, "winbox2"),
    ];
    let mut agents = Vec::new();
    for (name, role, target) in
        [("winbox", Role::Win, WSL_IP), ("winbox2", Role::WinHost(second), wsl_of_ip(second))]
    {
        let bundle = pki.agent_bundle(name);
        let toml = bundle.join("agent.toml");
        std::fs::write(
            &toml,
            format!(
                "[agent]\nrelays = [\"{}\"]\nserver_name = \"relay.lab\"\nca_cert = \"ca.crt\"\ncert = \"agent.crt\"\n\
                 key = \"agent.key\"\n[services.web]\ntarget = \"tcp://{target}:80\"\n",
                addr(RELAY_IP, QUIC_PORT)
            ),
        )
        .expect("agent.toml");
        let index =
            lab.spawn_binary(role, "sallyport-agent", &["run", "--config", &toml.display().to_string()]);
        lab.process(index).wait_line("tunnel up", WAIT);
        agents.push(index);
    }
    println!("second Windows host at {} with WSL2 at {}", windows_host_ip(second), wsl_of_ip(second));
    let homelab = homelab(&lab.home);
    ask(&homelab, |done| Ask::Members(vec![("winbox", "healthy"), ("winbox2", "healthy")], done));

    // Round robin across the two hosts.
    let counts = ask(&homelab, |done| Ask::Spread(1000, done));
    println!("1,000 requests through the relay: {counts:?}");
    for member in ["winbox", "winbox2"] {
        let n = counts.get(member).copied().unwrap_or(0);
        assert!((450..=550).contains(&n), "{member} answered {n} of 1,000: {counts:?}");
    }

    // nginx killed behind winbox2's live agent: out within two intervals (default 2 s), the other
    // member answers every request, and back once it runs again.
    lab.process(nginx[1]).kill();
    let killed = Instant::now();
    let out = ask(&homelab, |done| Ask::Members(vec![("winbox", "healthy"), ("winbox2", "unhealthy")], done));
    let took = out - killed;
    println!("nginx killed behind a live agent: out of the group after {took:?} (interval 2 s, fall 2)");
    assert!(took < Duration::from_millis(4500), "{took:?}");
    let counts = ask(&homelab, |done| Ask::Spread(100, done));
    assert_eq!(counts.get("winbox"), Some(&100), "only the healthy member answers: {counts:?}");
    lab.start_nginx(Role::WslOf(second), wsl_of_ip(second), 80, "winbox2");
    let restarted = Instant::now();
    let back = ask(&homelab, |done| Ask::Members(vec![("winbox", "healthy"), ("winbox2", "healthy")], done));
    println!("nginx back: in the group again after {:?} (rise 2)", back - restarted);

    // kill -9 of winbox's agent while 50 new requests a second arrive.
    let since = Instant::now();
    let (load_tx, load_rx) = mpsc::channel();
    homelab.send(Ask::Load(50, 8, since, load_tx)).expect("load");
    std::thread::sleep(Duration::from_secs(3));
    lab.process(agents[0]).kill();
    let killed = since.elapsed();
    // Watched from here while the load runs (curl in the homelab's namespace, every 20 ms or so):
    // when the relay shows the agent away, an upper bound of when it found the tunnel gone.
    let gone = loop {
        let out = lab.home.output("curl", &["-s", "--max-time", "2", "http://127.0.0.1:9090/status.txt"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let away = text.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() >= 5 && cols[0] == "web" && cols[2] == "winbox" && cols[3] == "away"
        });
        if away {
            break since.elapsed() - killed;
        }
        assert!(since.elapsed() - killed < WAIT, "the relay never showed the killed agent away");
        std::thread::sleep(Duration::from_millis(10));
    };
    let results = load_rx.recv_timeout(Duration::from_secs(60)).expect("load results");
    let failed: Vec<&(Duration, Result<String, String>)> =
        results.iter().filter(|(_, r)| r.is_err()).collect();
    let last = failed.iter().map(|(at, _)| at.saturating_sub(killed)).max();
    println!(
        "kill -9 of an agent at 50 requests/s: {} of {} failed, the last started {last:?} after the kill; \
         the relay showed it away within {gone:?}",
        failed.len(),
        results.len()
    );
    assert!(gone < Duration::from_millis(2500), "the tunnel's idle timeout is 1.5 s: {gone:?}");
    for (at, result) in &results {
        if *at > killed + gone {
            assert!(result.is_ok(), "a request started {:?} after the kill failed: {result:?}", *at - killed);
        }
    }
}
