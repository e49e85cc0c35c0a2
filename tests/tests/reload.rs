//! Changing relay.toml while the relay runs: on a change of the file (also an atomic symlink swap,
//! as a Kubernetes ConfigMap update arrives), on SIGHUP and through `sallyport-relay reload`.
//! Services that did not change keep their tunnels and connections; what was removed stops
//! taking clients at once and its connections end after `drain_grace`; a configuration that is
//! wrong changes nothing.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sallyport_tests::{
    lab::rss_kib,
    process::{addr_field, binary, Spawned},
    RunningAgent, TestPki,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const ADMIN_TOKEN: &str = "reload-test-admin-token";

fn free_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], sallyport_tests::servers::free_port()))
}

/// A relay.toml in the PKI's folder with the HTTP listener and admin server at `ports`, the admin token, `extra` in `[relay]`, then `services`.
fn relay_toml(pki: &TestPki, (http, admin): (SocketAddr, SocketAddr), extra: &str, services: &str) -> String {
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token file");
    format!(
        "[relay]\nlisten = \"127.0.0.1:0\"\nadmin = \"{admin}\"\nca_cert = \"{0}/ca.crt\"\ncert = \"{0}/relay.crt\"\n\
         key = \"{0}/relay.key\"\nadmin_token_file = \"{0}/admin.token\"\nrevocations_file = \"{0}/revoked.toml\"\n\
         http_listen = \"{http}\"\n{extra}\n{services}",
        pki.dir().display()
    )
}

/// Replaces `path` the way an editor or a ConfigMap update does: a new file renamed over it.
fn replace(path: &Path, text: &str) {
    let next = path.with_extension("toml.next");
    std::fs::write(&next, text).expect("write the new file");
    std::fs::rename(&next, path).expect("rename over the old one");
}

fn start_relay(path: &Path) -> (Spawned, SocketAddr, SocketAddr) {
    let mut relay = Spawned::relay(path);
    let ready = relay.wait_line("relay ready", Duration::from_secs(15));
    (relay, addr_field(&ready, "quic"), addr_field(&ready, "admin"))
}

async fn echo_once(stream: &mut TcpStream, greeting: &[u8]) -> bool {
    let mut buf = vec![0u8; greeting.len()];
    let mut greeted = vec![0u8; b"hello".len()];
    stream.write_all(greeting).await.is_ok()
        && tokio::time::timeout(Duration::from_secs(5), async {
            // The greeter says hello first (once per connection), then echoes.
            if greeted.iter().all(|b| *b == 0) {
                let _ = stream.peek(&mut greeted).await;
            }
            let mut got = Vec::new();
            while got.len() < b"hello".len() + greeting.len() && !got.ends_with(greeting) {
                let n = stream.read(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                got.extend_from_slice(&buf[..n]);
            }
            Some(got.ends_with(greeting))
        })
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

async fn http_status(http: SocketAddr, host: &str) -> u16 {
    let Ok(mut stream) = TcpStream::connect(http).await else { return 0 };
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

async fn metrics(admin: SocketAddr) -> String {
    sallyport_relay::cli::admin_client::request(admin, "GET", "/metrics", None).await.expect("metrics").1
}

use sallyport_tests::metric;

/// Whether a client of `addr` is turned away (reset at connect or before any answer).
async fn refused(addr: SocketAddr) -> bool {
    match TcpStream::connect(addr).await {
        Ok(mut stream) => !echo_once(&mut stream, b"x").await,
        Err(_) => true,
    }
}

/// `sallyport-relay reload --config PATH`: its exit status and output.
fn reload_command(path: &Path) -> (bool, String) {
    let out = std::process::Command::new(binary("sallyport-relay"))
        .args(["reload", "--config"])
        .arg(path)
        .output()
        .expect("sallyport-relay reload");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Agent winbox offering every service the tests name, each to the greeter.
async fn winbox(
    pki: &TestPki,
    quic: SocketAddr,
) -> (RunningAgent, (sallyport_tests::targets::Target, sallyport_tests::targets::Target)) {
    let greeter = sallyport_tests::targets::greeter(b"hello").await;
    let web = sallyport_tests::targets::http_ok("web").await;
    let mut services: Vec<(&str, SocketAddr)> =
        ["keep", "gone", "added"].iter().map(|s| (*s, greeter.addr)).collect();
    services.push(("web", web.addr));
    let agent = RunningAgent::start(pki.agent_config("winbox", &[quic], &services, ""));
    agent.wait_connected(Duration::from_secs(10)).await;
    (agent, (greeter, web))
}

/// The file changes: a service is added, one removed, one's host name changed. The tunnel and a
/// connection of the unchanged service live on; the removed service's listener closes at once
/// and its open connection ends after `drain_grace`; the log and a metric name the new hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_applies_without_dropping_what_did_not_change() {
    let pki = TestPki::new();
    let (http, keep, gone, added) = (free_port(), free_port(), free_port(), free_port());
    let ports = (http, free_port());
    let path: PathBuf = pki.dir().join("relay.toml");
    let before = relay_toml(
        &pki,
        ports,
        "drain_grace = \"1s\"",
        &format!(
            "[services.keep]\nagent = \"winbox\"\nlisten = \"{keep}\"\n\
             [services.gone]\nagent = \"winbox\"\nlisten = \"{gone}\"\n\
             [services.web]\nagent = \"winbox\"\nhosts = [\"a.home.lan\"]\n"
        ),
    );
    std::fs::write(&path, &before).expect("relay.toml");
    let (mut relay, quic, admin) = start_relay(&path);
    let first = relay.wait_line("configuration live", Duration::from_secs(5));
    let (agent, _greeter) = winbox(&pki, quic).await;

    let mut kept = TcpStream::connect(keep).await.expect("keep");
    assert!(echo_once(&mut kept, b"one").await, "the unchanged service works before");
    let mut leaving = TcpStream::connect(gone).await.expect("gone");
    assert!(echo_once(&mut leaving, b"one").await, "the service to remove works before");
    assert_eq!(http_status(http, "a.home.lan").await, 200);
    let session_before = metric(&metrics(admin).await, "sallyport_agents_connected");

    replace(
        &path,
        &relay_toml(
            &pki,
            ports,
            "drain_grace = \"1s\"",
            &format!(
                "[services.keep]\nagent = \"winbox\"\nlisten = \"{keep}\"\n\
                 [services.added]\nagent = \"winbox\"\nlisten = \"{added}\"\n\
                 [services.web]\nagent = \"winbox\"\nhosts = [\"b.home.lan\"]\n"
            ),
        ),
    );
    let applied = relay.wait_line("is live (was", Duration::from_secs(5));
    let reloaded_at = Instant::now();
    println!("{first}\n{applied}");
    assert!(applied.contains("added [\"added\"]") && applied.contains("removed [\"gone\"]"), "{applied}");
    assert!(applied.contains("changed [\"web\"]"), "{applied}");

    assert!(echo_once(&mut kept, b"two").await, "the unchanged service's connection lives on");
    let mut new = TcpStream::connect(added).await.expect("the added service listens");
    assert!(echo_once(&mut new, b"three").await, "and reaches the agent");
    assert!(TcpStream::connect(gone).await.is_err(), "the removed service's listener is closed");
    assert_eq!(http_status(http, "b.home.lan").await, 200, "the new host name routes");
    assert_eq!(http_status(http, "a.home.lan").await, 404, "the old one does not");
    // The removed service's connection drains: it ends once drain_grace (1 s) is over.
    let mut buf = [0u8; 16];
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match leaving.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    let drained = reloaded_at.elapsed();
    assert!(ended.is_ok(), "the removed service's connection must end after drain_grace");
    assert!(drained >= Duration::from_millis(800), "not before drain_grace: {drained:?}");
    println!("the removed service's connection ended {drained:?} after the reload (drain_grace 1 s)");

    let m = metrics(admin).await;
    let hash = applied.split("configuration ").nth(1).and_then(|r| r.split(' ').next()).expect("hash");
    assert_eq!(metric(&m, &format!("sallyport_config_info{{hash=\"{hash}\"}}")), 1.0, "{m}");
    assert_eq!(metric(&m, "sallyport_config_info"), 1.0, "one configuration is live: {m}");
    assert_eq!(metric(&m, "sallyport_config_reloads_total{result=\"applied\"}"), 1.0, "{m}");
    assert_eq!(metric(&m, "sallyport_agents_connected"), session_before, "the tunnel stayed");
    assert!(!relay.drain().iter().any(|l| l.contains("agent disconnected")), "the tunnel was never dropped");
    agent.stop().await;
}

/// A configuration that is wrong changes nothing: a bad key (the log names file and key), a key
/// only a restart may change (`sallyport-relay reload` answers why), an address already taken.
/// Then SIGHUP applies a good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_configuration_changes_nothing() {
    let pki = TestPki::new();
    let (http, keep, taken) =
        (free_port(), free_port(), std::net::TcpListener::bind("127.0.0.1:0").expect("taken"));
    let taken_addr = taken.local_addr().expect("addr");
    let ports = (http, free_port());
    let path: PathBuf = pki.dir().join("relay.toml");
    let services = format!("[services.keep]\nagent = \"winbox\"\nlisten = \"{keep}\"\n");
    let good = relay_toml(&pki, ports, "", &services);
    std::fs::write(&path, &good).expect("relay.toml");
    let (mut relay, quic, admin) = start_relay(&path);
    let (agent, _greeter) = winbox(&pki, quic).await;
    let mut kept = TcpStream::connect(keep).await.expect("keep");
    assert!(echo_once(&mut kept, b"one").await);
    let live = metrics(admin).await;

    // A misspelt key: refused whole, the log names the file and the key.
    replace(&path, &good.replace("http_listen", "http_lisen"));
    let line = relay.wait_line("configuration not reloaded", Duration::from_secs(5));
    assert!(line.contains("relay.toml") && line.contains("http_lisen"), "{line}");
    // A key that needs a restart: the relay refuses it through the admin API too.
    replace(&path, &good.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""));
    let (ok, answer) = reload_command(&path);
    assert!(!ok, "{answer}");
    assert!(answer.contains("key `relay.listen`: cannot change while the relay runs"), "{answer}");
    // A new service on an address that is taken: nothing changes, the error names the service.
    replace(
        &path,
        &relay_toml(
            &pki,
            ports,
            "",
            &format!("{services}[services.added]\nagent = \"winbox\"\nlisten = \"{taken_addr}\"\n"),
        ),
    );
    let (ok, answer) = reload_command(&path);
    assert!(!ok && answer.contains("cannot bind service \"added\""), "{answer}");

    assert!(echo_once(&mut kept, b"two").await, "the running configuration stays");
    let m = metrics(admin).await;
    assert_eq!(
        m.lines().find(|l| l.starts_with("sallyport_config_info")),
        live.lines().find(|l| l.starts_with("sallyport_config_info")),
        "the same configuration is live"
    );
    assert!(metric(&m, "sallyport_config_reloads_total{result=\"refused\"}") >= 3.0, "{m}");

    // SIGHUP with a good file applies it.
    drop(taken);
    let added = free_port();
    replace(
        &path,
        &relay_toml(
            &pki,
            ports,
            "",
            &format!("{services}[services.added]\nagent = \"winbox\"\nlisten = \"{added}\"\n"),
        ),
    );
    let pid = relay.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    relay.wait_line("is live (was", Duration::from_secs(5));
    let mut new = TcpStream::connect(added).await.expect("the added service listens");
    assert!(echo_once(&mut new, b"three").await);
    assert!(echo_once(&mut kept, b"four").await);
    agent.stop().await;
}

/// A ConfigMap update: the mounted folder's `..data` symlink is swapped to a new timestamped
/// folder; relay.toml is a symlink through it. The relay sees the new content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_is_seen() {
    let pki = TestPki::new();
    let (http, keep, added) = (free_port(), free_port(), free_port());
    let ports = (http, free_port());
    let mount = pki.dir().join("config");
    let write_version = |name: &str, text: &str| {
        let dir = mount.join(name);
        std::fs::create_dir_all(&dir).expect("version dir");
        std::fs::write(dir.join("relay.toml"), text).expect("relay.toml");
    };
    let services = format!("[services.keep]\nagent = \"winbox\"\nlisten = \"{keep}\"\n");
    write_version("..2026_11_29_01", &relay_toml(&pki, ports, "", &services));
    std::os::unix::fs::symlink("..2026_11_29_01", mount.join("..data")).expect("..data");
    std::os::unix::fs::symlink("..data/relay.toml", mount.join("relay.toml")).expect("relay.toml link");
    let (mut relay, quic, _admin) = start_relay(&mount.join("relay.toml"));
    let (agent, _greeter) = winbox(&pki, quic).await;

    write_version(
        "..2026_11_29_02",
        &relay_toml(
            &pki,
            ports,
            "",
            &format!("{services}[services.added]\nagent = \"winbox\"\nlisten = \"{added}\"\n"),
        ),
    );
    std::os::unix::fs::symlink("..2026_11_29_02", mount.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).expect("atomic swap");
    relay.wait_line("is live (was", Duration::from_secs(5));
    let mut new = TcpStream::connect(added).await.expect("the added service listens");
    assert!(echo_once(&mut new, b"hi").await);
    agent.stop().await;
}

/// 100 reloads in a row through the admin API, alternating two configurations: memory and the
/// relay's task count stay flat, and the tunnel stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_leave_memory_and_tasks_flat() {
    let pki = TestPki::new();
    let (http, keep, added) = (free_port(), free_port(), free_port());
    let ports = (http, free_port());
    let path: PathBuf = pki.dir().join("relay.toml");
    let services = format!("[services.keep]\nagent = \"winbox\"\nlisten = \"{keep}\"\n");
    let one = relay_toml(&pki, ports, "drain_grace = \"100ms\"", &services);
    let two = relay_toml(
        &pki,
        ports,
        "drain_grace = \"100ms\"",
        &format!(
            "{services}[services.added]\nagent = \"winbox\"\nlisten = \"{added}\"\n\
             [services.web]\nagent = \"winbox\"\nhosts = [\"web.home.lan\"]\n"
        ),
    );
    std::fs::write(&path, &one).expect("relay.toml");
    let (mut relay, quic, admin) = start_relay(&path);
    let (agent, _greeter) = winbox(&pki, quic).await;
    let pid = relay.child.id();
    let mut kept = TcpStream::connect(keep).await.expect("keep");
    let reload = || async {
        let (status, body) =
            sallyport_relay::cli::admin_client::request(admin, "POST", "/reload", Some(ADMIN_TOKEN))
                .await
                .expect("reload");
        assert_eq!(status, 200, "{body}");
    };
    let tasks = |m: &str| metric(m, "sallyport_tasks");
    // Warm up: both configurations once.
    for text in [&two, &one] {
        replace(&path, text);
        reload().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_before, tasks_before) = (rss_kib(pid), tasks(&metrics(admin).await));
    for i in 0..100 {
        replace(&path, if i % 2 == 0 { &two } else { &one });
        reload().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_after, tasks_after) = (rss_kib(pid), tasks(&metrics(admin).await));
    println!("100 reloads: relay RSS {rss_before} -> {rss_after} KiB, tasks {tasks_before} -> {tasks_after}");
    assert!(echo_once(&mut kept, b"still").await, "the unchanged service's connection lives on");
    assert_eq!(tasks_after, tasks_before, "no task is left behind");
    assert!(rss_after <= rss_before + 2048, "RSS grew from {rss_before} to {rss_after} KiB");
    assert!(!relay.drain().iter().any(|l| l.contains("agent disconnected")));
    agent.stop().await;
}

/// The agent's agent.toml changes while it runs (a file change, then SIGHUP): a new service is
/// offered on the live tunnel and reachable at once, a removed one refuses new clients while its
/// open connection finishes, and the tunnel is never re-established.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reload_offers_its_services_on_the_live_tunnel() {
    let pki = TestPki::new();
    let (http, keep, added) = (free_port(), free_port(), free_port());
    let ports = (http, free_port());
    let relay_path: PathBuf = pki.dir().join("relay.toml");
    std::fs::write(
        &relay_path,
        relay_toml(
            &pki,
            ports,
            "",
            &format!(
                "[services.keep]\nagent = \"winbox\"\nlisten = \"{keep}\"\n\
                 [services.added]\nagent = \"winbox\"\nlisten = \"{added}\"\n"
            ),
        ),
    )
    .expect("relay.toml");
    let (mut relay, quic, _admin) = start_relay(&relay_path);
    let greeter = sallyport_tests::targets::greeter(b"hello").await;
    let bundle = pki.agent_bundle("winbox");
    let agent_path = bundle.join("agent.toml");
    let agent_toml = |services: &[&str]| {
        let mut text = format!(
            "[agent]\nrelays = [\"{quic}\"]\nca_cert = \"ca.crt\"\ncert = \"agent.crt\"\nkey = \"agent.key\"\n"
        );
        for service in services {
            text.push_str(&format!("[services.{service}]\ntarget = \"tcp://{}\"\n", greeter.addr));
        }
        text
    };
    std::fs::write(&agent_path, agent_toml(&["keep"])).expect("agent.toml");
    let mut agent = Spawned::start({
        let mut c = std::process::Command::new(binary("sallyport-agent"));
        c.arg("run").arg("--config").arg(&agent_path);
        c
    });
    agent.wait_line("tunnel up", Duration::from_secs(15));
    let mut kept = TcpStream::connect(keep).await.expect("keep");
    assert!(echo_once(&mut kept, b"one").await);
    assert!(refused(added).await, "not offered yet: refused");

    // The file changes: `added` is offered on the live tunnel.
    replace(&agent_path, &agent_toml(&["keep", "added"]));
    let applied = agent.wait_line("is live (was", Duration::from_secs(5));
    assert!(applied.contains("services added [\"added\"]"), "{applied}");
    agent.wait_line("the relay publishes the services after the reload", Duration::from_secs(5));
    let mut new = TcpStream::connect(added).await.expect("added");
    assert!(echo_once(&mut new, b"two").await, "the new service is reachable without a reconnect");

    // SIGHUP after removing `keep`: new clients are refused, the open connection finishes.
    replace(&agent_path, &agent_toml(&["added"]));
    let pid = agent.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    let line = agent.wait_line("is live (was", Duration::from_secs(5));
    assert!(line.contains("removed [\"keep\"]"), "{line}");
    agent.wait_line("the relay publishes the services after the reload", Duration::from_secs(5));
    assert!(
        echo_once(&mut kept, b"three").await,
        "the open connection of a removed service finishes its work"
    );
    assert!(refused(keep).await, "a removed service refuses new clients");

    // A broken file changes nothing.
    replace(&agent_path, &agent_toml(&["added"]).replace("[agent]", "[agent]\nbogus = 1"));
    let line = agent.wait_line("configuration not reloaded", Duration::from_secs(5));
    assert!(line.contains("agent.toml") && line.contains("bogus"), "{line}");
    let mut again = TcpStream::connect(added).await.expect("added");
    assert!(echo_once(&mut again, b"four").await);

    let agent_log = agent.drain().join("\n");
    assert_eq!(agent_log.matches("tunnel up").count(), 1, "one tunnel all along:\n{agent_log}");
    assert!(!relay.drain().iter().any(|l| l.contains("agent disconnected")));
}

/// A reload after which no service names an agent closes that agent's tunnel at once: it is no
/// longer admitted, so it must not stay connected (and renewing its certificate) until it happens
/// to reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_no_service_names_any_more_is_disconnected_by_the_reload() {
    let pki = TestPki::new();
    let (keep, ports) = (free_port(), (free_port(), free_port()));
    let path: PathBuf = pki.dir().join("relay.toml");
    let services = |agent: &str| format!("[services.keep]\nagent = \"{agent}\"\nlisten = \"{keep}\"\n");
    std::fs::write(&path, relay_toml(&pki, ports, "", &services("winbox"))).expect("relay.toml");
    let (mut relay, quic, admin) = start_relay(&path);
    let (agent, _targets) = winbox(&pki, quic).await;
    assert_eq!(metric(&metrics(admin).await, "sallyport_agents_connected"), 1.0);

    replace(&path, &relay_toml(&pki, ports, "", &services("otherbox")));
    let replaced = Instant::now();
    let closed = relay.wait_line("no service names this agent any more", Duration::from_secs(5));
    assert!(closed.contains("winbox"), "{closed}");
    // The relay takes the session out of its registry, then says so.
    let gone = relay.wait_line("agent disconnected", Duration::from_secs(3));
    assert!(gone.contains("winbox"), "{gone}");
    println!("the agent's tunnel closed {:?} after the file changed", replaced.elapsed());
    assert_eq!(metric(&metrics(admin).await, "sallyport_agents_connected"), 0.0);
    agent.stop().await;
}
