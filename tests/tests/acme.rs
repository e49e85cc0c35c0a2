//! Certificates the relay orders itself by ACME, against Debian's pebble (Let's Encrypt's test
//! server): `http-01` answered by the relay's HTTP listener and `tls-alpn-01` by its HTTPS
//! listener, the names resolved by dnsmasq; curl with pebble's root verifies what the relay
//! serves; a lifetime of 30 s makes the relay renew at two thirds of it while requests flow.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use sallyport_tests::{
    process::Spawned,
    servers::{self, free_port},
    tools_or_skip, RunningAgent, RunningRelay, TestPki,
};

/// Pebble on loopback, its validations sent to the relay's ports, its DNS from `dns`.
struct Pebble {
    _process: Spawned,
    directory: String,
    /// Pebble's own listener certificate (what the relay trusts to reach the directory).
    listener_ca: PathBuf,
    /// The root pebble issues under.
    root: PathBuf,
}

fn pebble(dir: &Path, dns: SocketAddr, (http_port, tls_port): (u16, u16), validity_secs: u64) -> Pebble {
    // rustls takes no self-signed leaf as its own anchor: a CA, and pebble's certificate from it.
    let (ca, cert, key) = (dir.join("pebble-ca.crt"), dir.join("pebble.crt"), dir.join("pebble.key"));
    let d = dir.display();
    let script = format!(
        "set -e; cd '{d}'; \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=pebble-ca -keyout pebble-ca.key -out pebble-ca.crt; \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost -keyout pebble.key -out pebble.csr; \
         printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > pebble.ext; \
         openssl x509 -req -in pebble.csr -CA pebble-ca.crt -CAkey pebble-ca.key -CAcreateserial -days 2 -extfile pebble.ext -out pebble.crt"
    );
    let out = Command::new("sh").args(["-c", &script]).output().expect("openssl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (listen, management) = (free_port(), free_port());
    let config = dir.join("pebble.json");
    std::fs::write(
        &config,
        format!(
            "{{\"pebble\": {{\"listenAddress\": \"127.0.0.1:{listen}\", \"managementListenAddress\": \"127.0.0.1:{management}\", \
             \"certificate\": \"{}\", \"privateKey\": \"{}\", \"httpPort\": {http_port}, \"tlsPort\": {tls_port}, \
             \"ocspResponderURL\": \"\", \"externalAccountBindingRequired\": false, \"certificateValidityPeriod\": {validity_secs}}}}}",
            cert.display(),
            key.display()
        ),
    )
    .expect("pebble.json");
    let mut command = Command::new("pebble");
    command.arg("-config").arg(&config).arg("-dnsserver").arg(dns.to_string());
    command.env("PEBBLE_VA_NOSLEEP", "1").env("PEBBLE_WFE_NONCEREJECT", "0").env("PEBBLE_AUTHZREUSE", "0");
    let mut process = Spawned::start(command);
    process.wait_line("ACME directory available", Duration::from_secs(15));
    let root = dir.join("pebble-root.pem");
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&ca)
        .arg(format!("https://127.0.0.1:{management}/roots/0"))
        .arg("-o")
        .arg(&root)
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "pebble's root: {}", String::from_utf8_lossy(&out.stderr));
    Pebble { _process: process, directory: format!("https://127.0.0.1:{listen}/dir"), listener_ca: ca, root }
}

/// The subject and issuer of what the relay shows for `name`, or why none.
fn served(https: SocketAddr, name: &str) -> Option<(String, String)> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &https.to_string(), "-servername", name])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |prefix: &str| text.lines().find_map(|l| l.strip_prefix(prefix).map(|s| s.trim().to_owned()));
    Some((line("serial=").or_else(|| certificate_serial(&text))?, line("issuer=")?))
}

/// The served certificate's serial, from the PEM s_client prints.
fn certificate_serial(s_client: &str) -> Option<String> {
    let begin = s_client.find("-----BEGIN CERTIFICATE-----")?;
    let end = s_client.find("-----END CERTIFICATE-----")? + "-----END CERTIFICATE-----".len();
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    std::io::Write::write_all(child.stdin.as_mut()?, &s_client.as_bytes()[begin..end]).ok()?;
    let out = child.wait_with_output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("serial=").to_owned())
}

fn curl_verified(https: SocketAddr, name: &str, root: &Path) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(root)
        .arg("--resolve")
        .arg(format!("{name}:{}:127.0.0.1", https.port()))
        .arg(format!("https://{name}:{}/", https.port()))
        .output()
        .expect("curl runs");
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() && body.contains("proto=https") {
        Ok(body)
    } else {
        Err(format!("{body}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_orders_by_http_01_and_tls_alpn_01_and_renews_while_requests_flow() {
    tools_or_skip!("pebble", "dnsmasq", "dig", "curl", "openssl", "nginx");
    sallyport_tests::init_logging();
    let dns = servers::dnsmasq("home.lan", "127.0.0.1");
    let port = free_port();
    let web = servers::nginx(&[(
        port,
        "",
        "location / { return 200 \"proto=$http_x_forwarded_proto host=$host\\n\"; }",
    )]);
    let pki = TestPki::new();
    let (http_port, https_port) = (free_port(), free_port());
    let pebble = pebble(pki.dir(), dns.addr, (http_port, https_port), 30);
    let acme = |challenge: &str, name: &str| {
        format!(
            "acme = {{ names = [\"{name}\"], directory = \"{}\", challenge = \"{challenge}\", ca = \"{}\", \
             store = \"acme\", contact = [\"mailto:admin@home.lan\"] }}",
            pebble.directory,
            pebble.listener_ca.display()
        )
    };
    let relay = RunningRelay::start(pki.relay_config_file(
        &format!("http_listen = \"127.0.0.1:{http_port}\"\nhttps_listen = \"127.0.0.1:{https_port}\""),
        &format!(
            "[certificates.web]\n{}\n[certificates.alpn]\n{}\n\
             [services.web]\nagent = \"winbox\"\nsni = [\"web.home.lan\"]\ntls = \"terminate\"\n\
             [services.alpn]\nagent = \"winbox\"\nsni = [\"alpn.home.lan\"]\ntls = \"terminate\"\n",
            acme("http-01", "web.home.lan"),
            acme("tls-alpn-01", "alpn.home.lan")
        ),
    ))
    .await;
    let mut relay = relay;
    let _agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!(
            "[services.web]\ntarget = \"tcp://{w}\"\n[services.alpn]\ntarget = \"tcp://{w}\"\n",
            w = web.addr
        ),
    ));
    relay.wait_agent("winbox").await;
    let https = relay.https.expect("https listener");
    let root = pebble.root.clone();

    // Both are ordered soon after the start, each by its own challenge.
    let started = Instant::now();
    let mut first = Vec::new();
    for name in ["web.home.lan", "alpn.home.lan"] {
        let (root, owned) = (root.clone(), name.to_owned());
        let issued = tokio::task::spawn_blocking(move || loop {
            let name = owned.as_str();
            if let Ok(body) = curl_verified(https, name, &root) {
                return Ok::<_, String>((body, served(https, name)));
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(curl_verified(https, name, &root).unwrap_err());
            }
            std::thread::sleep(Duration::from_millis(250));
        })
        .await
        .expect("wait");
        let (body, shown) =
            issued.unwrap_or_else(|e| panic!("{name}: no verified certificate within 60 s: {e}"));
        println!(
            "{name}: verified with pebble's root {:?} after the start: {} ({shown:?})",
            started.elapsed(),
            body.trim()
        );
        first.push(shown.expect("served"));
    }
    for (_, issuer) in &first {
        assert!(issuer.contains("Pebble Intermediate"), "{issuer}");
    }
    let store = pki.dir().join("acme");
    for file in ["web/tls.crt", "web/tls.key", "alpn/tls.crt", "alpn/tls.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.join(file)).expect(file).permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    assert!(std::fs::read_dir(&store)
        .expect("store")
        .any(|e| { e.expect("entry").file_name().to_string_lossy().starts_with("account-") }));

    // Renewal at two thirds of 30 s, while a client makes 10 new connections a second.
    let stop = Arc::new(AtomicBool::new(false));
    let flow = {
        let (stop, root) = (stop.clone(), root.clone());
        std::thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                results.push(curl_verified(https, "web.home.lan", &root));
                std::thread::sleep(Duration::from_millis(100));
            }
            results
        })
    };
    let renewed = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let shown = served(https, "web.home.lan");
            if shown.as_ref().is_some_and(|s| s.0 != first[0].0) {
                return shown;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
    .await
    .expect("renewal");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let results = flow.join().expect("flow");
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    println!(
        "renewed: {renewed:?} {:?} after the first order; {} requests at 10 a second, {} failed",
        started.elapsed(),
        results.len(),
        failed.len()
    );
    assert!(renewed.is_some(), "no renewal within 45 s");
    assert!(failed.is_empty(), "{failed:?}");
    let (_, page) = sallyport_relay::cli::admin_client::request(relay.admin, "GET", "/status.txt", None)
        .await
        .expect("status");
    println!(
        "{}",
        page.lines().skip_while(|l| !l.starts_with("CERTIFICATE")).take(3).collect::<Vec<_>>().join("\n")
    );
    assert!(page.contains("ACME http-01") && page.contains("ACME tls-alpn-01"), "{page}");
}

/// `relay-N.toml` of a two-replica cluster whose writer orders `web.home.lan` from `pebble`.
fn replica_toml(
    pki: &TestPki,
    n: usize,
    pebble: &Pebble,
    (http, https): (u16, u16),
    writer_peer: &str,
) -> PathBuf {
    let path = pki.dir().join(format!("relay-{n}.toml"));
    std::fs::write(
        &path,
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\n\
             key = \"relay.key\"\nhttp_listen = \"127.0.0.1:{http}\"\nhttps_listen = \"127.0.0.1:{https}\"\n\
             [cluster]\nwriter = \"relay-0\"\nwriter_peer = \"{writer_peer}\"\npeer_listen = \"127.0.0.1:0\"\n\
             sync_interval = \"500ms\"\n\
             [certificates.web]\nacme = {{ names = [\"web.home.lan\"], directory = \"{}\", ca = \"{}\", store = \"acme-{n}\" }}\n\
             [services.web]\nagent = \"winbox\"\nsni = [\"web.home.lan\"]\ntls = \"terminate\"\n",
            pebble.directory,
            pebble.listener_ca.display()
        ),
    )
    .expect("relay.toml");
    path
}

fn start_replica(toml: &Path, n: usize) -> (Spawned, SocketAddr) {
    let mut command = Command::new(sallyport_tests::process::binary("sallyport-relay"));
    command.arg("serve").arg("--config").arg(toml).arg("--replica").arg(format!("relay-{n}"));
    let mut relay = Spawned::start(command);
    let peer = relay.wait_line("replica port listening", Duration::from_secs(10));
    (relay, sallyport_tests::process::addr_field(&peer, "addr"))
}

#[test]
fn only_the_writer_orders_and_the_other_replica_serves_the_same_certificate() {
    tools_or_skip!("pebble", "dnsmasq", "dig", "openssl", "curl");
    let dns = servers::dnsmasq("home.lan", "127.0.0.1");
    let pki = TestPki::new();
    let writer_ports = (free_port(), free_port());
    let follower_https = free_port();
    let pebble = pebble(pki.dir(), dns.addr, writer_ports, 3600);
    let (mut writer, writer_peer) =
        start_replica(&replica_toml(&pki, 0, &pebble, writer_ports, "127.0.0.1:1"), 0);
    let follower_toml =
        replica_toml(&pki, 1, &pebble, (free_port(), follower_https), &writer_peer.to_string());
    let (mut follower, _) = start_replica(&follower_toml, 1);
    let started = Instant::now();
    writer.wait_line("ACME certificate issued", Duration::from_secs(60));
    let writers = served(SocketAddr::from(([127, 0, 0, 1], writer_ports.1)), "web.home.lan")
        .expect("the writer serves it");
    let follower_addr = SocketAddr::from(([127, 0, 0, 1], follower_https));
    let deadline = Instant::now() + Duration::from_secs(15);
    let followers = loop {
        if let Some(shown) = served(follower_addr, "web.home.lan") {
            break shown;
        }
        assert!(
            Instant::now() < deadline,
            "the follower serves no certificate 15 s after the writer's order"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    println!(
        "the writer ordered {writers:?}; the follower served the same {:?} after the start",
        started.elapsed()
    );
    assert_eq!(followers, writers, "one certificate for both replicas");
    let ordered = |relay: &mut Spawned| {
        relay.drain().iter().filter(|l| l.contains("ordering a certificate by ACME")).count()
    };
    assert_eq!((ordered(&mut writer), ordered(&mut follower)), (1, 0), "only the writer orders");
    let verified = curl_verified_handshake(follower_addr, "web.home.lan", &pebble.root);
    assert!(verified, "the follower's certificate verifies with pebble's root");
}

/// Whether curl completes a TLS handshake with `addr` as `name`, trusting only `root` (the
/// service has no agent here: the handshake is what counts, the 503 after it does not).
fn curl_verified_handshake(addr: SocketAddr, name: &str, root: &Path) -> bool {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(root)
        .arg("--resolve")
        .arg(format!("{name}:{}:127.0.0.1", addr.port()))
        .arg(format!("https://{name}:{}/", addr.port()))
        .output()
        .expect("curl runs");
    out.status.success()
}
