//! HTTPS services the relay terminates: certificates from files picked by SNI (wildcards too),
//! HTTP/1.1 and HTTP/2 from clients, the decrypted requests routed like HTTP ones (forwarding
//! headers, HSTS, a redirect from plain HTTP, the access log), a passthrough service on the same
//! port, clean refusals for no or unknown names, and a certificate swapped by symlink (as
//! cert-manager renews into a mounted Secret) while requests flow.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use sallyport_tests::{
    metric,
    servers::{self, curl, free_port, resolve, set_mode},
    tools_or_skip, RunningAgent, RunningRelay, TestPki,
};

/// A self-signed certificate with subject `cn` for `names`, its key private (0600), as
/// `tls.crt` and `tls.key` in `dir`.
fn certificate(dir: &Path, cn: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    servers::certificate(dir, "tls", cn, names)
}

/// The subject of the certificate the relay's HTTPS listener shows for `name` (`None`: no
/// certificate, and what openssl printed).
fn served_subject(https: SocketAddr, name: Option<&str>) -> Result<String, String> {
    let mut command = Command::new("openssl");
    command.args(["s_client", "-connect", &https.to_string()]);
    match name {
        Some(name) => command.args(["-servername", name]),
        None => command.arg("-noservername"),
    };
    let out = command.stdin(std::process::Stdio::null()).output().expect("openssl runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    text.lines().find_map(|l| l.strip_prefix("subject=").map(|s| s.trim().to_owned())).ok_or(text)
}

/// nginx answering with what the relay told it of the request.
fn header_echo() -> servers::Server {
    let port = free_port();
    servers::nginx(&[(
        port,
        "",
        "location / { return 200 \"proto=$http_x_forwarded_proto host=$host xff=$http_x_forwarded_for uri=$request_uri\\n\"; }",
    )])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_https_serves_http1_and_h2_beside_passthrough_and_refuses_cleanly() {
    tools_or_skip!("curl", "openssl", "nginx");
    sallyport_tests::init_logging();
    let web = header_echo();
    let dir = tempfile::tempdir().expect("dir");
    let (nas, nas_crt) = servers::tls_server(dir.path(), "nas.home.lan");
    let pki = TestPki::new();
    let (crt, _) = certificate(&pki.dir().join("certs/home"), "home", &["app.home.lan", "*.wild.home.lan"]);
    let https_port = free_port();
    let http_port = free_port();
    let mut relay = RunningRelay::start(pki.relay_config_file(
        &format!(
            "https_listen = \"127.0.0.1:{https_port}\"\nhttps_public_port = {https_port}\n\
             http_listen = \"127.0.0.1:{http_port}\"\nheader_timeout = \"2s\""
        ),
        "[certificates.home]\ncert = \"certs/home/tls.crt\"\nkey = \"certs/home/tls.key\"\n\
         [access]\ndefault = [\"allow 127.0.0.0/8\"]\nlog = \"access.log\"\n\
         [services.app]\nagent = \"winbox\"\nsni = [\"app.home.lan\"]\ntls = \"terminate\"\nhsts = \"1d\"\nredirect_http = true\n\
         [services.wild]\nagent = \"winbox\"\nsni = [\"grafana.wild.home.lan\"]\ntls = \"terminate\"\n\
         [services.nas]\nagent = \"winbox\"\nsni = [\"nas.home.lan\"]\n",
    ))
    .await;
    let _agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!(
            "[services.app]\ntarget = \"tcp://{web}\"\n[services.wild]\ntarget = \"tcp://{web}\"\n\
             [services.nas]\ntarget = \"tcp://{nas}\"\n",
            web = web.addr,
            nas = nas.addr
        ),
    ));
    relay.wait_agent("winbox").await;
    let https = relay.https.expect("https listener");
    let crt = crt.display().to_string();

    // HTTP/1.1 and HTTP/2, verified against the relay's certificate for the name.
    for (version, flag) in [("1.1", "--http1.1"), ("2", "--http2")] {
        let (ok, out, err) = curl(&[
            flag,
            "--cacert",
            &crt,
            "--resolve",
            &resolve("app.home.lan", https),
            "-D",
            "-",
            "-w",
            "version=%{http_version}\n",
            &format!("https://app.home.lan:{}/page?x=1", https.port()),
        ]);
        println!("curl {flag} https://app.home.lan/page?x=1:\n{out}");
        assert!(ok, "curl {flag}: {err}");
        assert!(out.contains("proto=https host=app.home.lan xff=127.0.0.1 uri=/page?x=1"), "{out}");
        assert!(out.to_ascii_lowercase().contains("strict-transport-security: max-age=86400"), "{out}");
        assert!(out.contains(&format!("version={version}")), "{out}");
    }
    // A wildcard certificate covers one label.
    let (ok, out, err) = curl(&[
        "--cacert",
        &crt,
        "--resolve",
        &resolve("grafana.wild.home.lan", https),
        &format!("https://grafana.wild.home.lan:{}/", https.port()),
    ]);
    assert!(ok && out.contains("host=grafana.wild.home.lan"), "{out} {err}");
    // Plain HTTP for the terminated name: a permanent redirect to HTTPS, path and query kept.
    let http = relay.http.expect("http listener");
    let (ok, out, err) = curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--resolve",
        &resolve("app.home.lan", http),
        &format!("http://app.home.lan:{}/login?next=%2F", http.port()),
    ]);
    assert!(ok, "{err}");
    let location = format!("location: https://app.home.lan:{}/login?next=%2F", https.port());
    assert!(
        out.starts_with("HTTP/1.1 308") && out.to_ascii_lowercase().contains(&location.to_ascii_lowercase()),
        "{out}"
    );
    println!("plain HTTP: {}", out.lines().next().unwrap_or_default());

    // The passthrough service on the same port still shows its own certificate.
    let (ok, out, err) = curl(&[
        "--cacert",
        &nas_crt.display().to_string(),
        "--resolve",
        &resolve("nas.home.lan", https),
        &format!("https://nas.home.lan:{}/", https.port()),
    ]);
    assert!(ok && out.contains("s_server"), "passthrough: {err}");
    assert_eq!(served_subject(https, Some("nas.home.lan")).as_deref(), Ok("CN = nas.home.lan"));
    assert_eq!(served_subject(https, Some("app.home.lan")).as_deref(), Ok("CN = home"));
    // No server name, and a name no service lists: no certificate at all, never another's.
    for name in [None, Some("nobody.home.lan"), Some("other.app.home.lan")] {
        let shown = served_subject(https, name);
        assert!(shown.is_err(), "{name:?} was shown {shown:?}");
    }
    println!("no SNI, unknown names: an unrecognized_name alert, no certificate");

    // The access log names the terminated requests as https, with their HTTP fields.
    let log = servers::wait_for_log(&pki.dir().join("access.log"), |t| {
        t.lines().filter(|l| l.contains("\"service\":\"app\"")).count() >= 2
    });
    let app: Vec<&str> = log.lines().filter(|l| l.contains("\"service\":\"app\"")).collect();
    println!("access log: {}", app[0]);
    for line in &app {
        assert!(line.contains("\"kind\":\"https\"") && line.contains("\"status\":200"), "{line}");
        assert!(
            line.contains("\"host\":\"app.home.lan\"") && line.contains("\"uri\":\"/page?x=1\""),
            "{line}"
        );
    }
    // Its expiry is exported, and the status page lists it.
    let m = relay.metrics().await;
    let expiry =
        metric(&m, "sallyport_certificate_expiry_timestamp_seconds{certificate=\"service\",name=\"home\"}");
    let left = expiry
        - std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("now").as_secs_f64();
    assert!(left > 86_400.0 && left < 3.0 * 86_400.0, "{expiry}: {m}");
    let (status, page) = sallyport_relay::cli::admin_client::request(relay.admin, "GET", "/status.txt", None)
        .await
        .expect("status");
    assert_eq!(status, 200);
    println!(
        "{}",
        page.lines().skip_while(|l| !l.starts_with("CERTIFICATE")).take(3).collect::<Vec<_>>().join("\n")
    );
    assert!(page.contains("home") && page.contains("*.wild.home.lan"), "{page}");
}

#[test]
fn bad_certificate_keys_are_refused_with_file_key_and_reason() {
    tools_or_skip!("openssl");
    let pki = TestPki::new();
    let (_, key) = certificate(&pki.dir().join("certs/home"), "home", &["app.home.lan"]);
    let load = |services: &str| {
        let text = TestPki::relay_text(
            "https_listen = \"127.0.0.1:0\"",
            &format!("[certificates.home]\ncert = \"certs/home/tls.crt\"\nkey = \"certs/home/tls.key\"\n{services}"),
        );
        let path = pki.dir().join("relay.toml");
        std::fs::write(&path, &text).expect("write");
        sallyport_relay::Config::load(&path).map(|_| ()).map_err(|e| e.to_string())
    };
    let terminated =
        |name: &str| format!("[services.app]\nagent = \"winbox\"\nsni = [\"{name}\"]\ntls = \"terminate\"\n");
    load(&terminated("app.home.lan")).expect("a covered name loads");
    let e = load(&terminated("git.home.lan")).expect_err("an uncovered name");
    println!("{e}");
    assert!(e.contains("relay.toml") && e.contains("services.app.sni") && e.contains("git.home.lan"), "{e}");
    let e =
        load(&format!("{}hsts = \"1d\"\n", terminated("app.home.lan").replace("tls = \"terminate\"\n", "")))
            .expect_err("hsts on passthrough");
    assert!(e.contains("services.app.hsts"), "{e}");
    // An ACME table: names it orders, a challenge the relay answers on a listener it has.
    let acme = |names: &str, challenge: &str| {
        let text = TestPki::relay_text(
            "https_listen = \"127.0.0.1:0\"",
            &format!(
                "[certificates.media]\nacme = {{ names = [{names}], directory = \"https://acme.home.lan/directory\", \
                 challenge = \"{challenge}\", store = \"acme\" }}\n{}",
                terminated("media.home.lan")
            ),
        );
        let path = pki.dir().join("relay.toml");
        std::fs::write(&path, &text).expect("write");
        sallyport_relay::Config::load(&path).map(|_| ()).map_err(|e| e.to_string())
    };
    acme("\"media.home.lan\"", "tls-alpn-01").expect("an ACME certificate not issued yet covers its names");
    for (names, challenge, key, why) in [
        ("\"*.home.lan\"", "tls-alpn-01", "acme.names", "DNS-01"),
        ("\"media.home.lan\"", "http-01", "acme.challenge", "relay.http_listen"),
        ("\"media.home.lan\"", "dns-01", "acme.challenge", "\"http-01\""),
        ("\"other.home.lan\"", "tls-alpn-01", "services.app.sni", "media.home.lan"),
    ] {
        let e = acme(names, challenge).expect_err(key);
        println!("{e}");
        assert!(e.contains(key) && e.contains(why), "{e}");
    }
    set_mode(&key, 0o644);
    let e = load(&terminated("app.home.lan")).expect_err("a world-readable key");
    println!("{e}");
    assert!(e.contains("certificates.home") && e.contains("readable by every user"), "{e}");
    // `sallyport-relay check` says the same, and fails.
    let out = Command::new(sallyport_tests::process::binary("sallyport-relay"))
        .arg("check")
        .arg("--config")
        .arg(pki.dir().join("relay.toml"))
        .output()
        .expect("check runs");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !out.status.success() && said.contains("certificates.home") && said.contains("mode 0644"),
        "{said}"
    );
    set_mode(&key, 0o600);
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").expect("garble");
    let e = load(&terminated("app.home.lan")).expect_err("a broken key");
    println!("{e}");
    assert!(e.contains("certificates.home"), "{e}");
}

/// A cert-manager Secret mounted as a volume: `tls.crt` and `tls.key` are symlinks into `..data`,
/// itself a symlink to a timestamped folder; a renewal writes a new folder and swaps `..data`.
struct SecretVolume {
    dir: PathBuf,
    version: u32,
}

impl SecretVolume {
    fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("dir");
        let mut volume = Self { dir, version: 0 };
        volume.renew();
        std::os::unix::fs::symlink("..data/tls.crt", volume.dir.join("tls.crt")).expect("tls.crt");
        std::os::unix::fs::symlink("..data/tls.key", volume.dir.join("tls.key")).expect("tls.key");
        volume
    }

    /// A new certificate (subject `home v{n}`) in a new folder, then `..data` swapped to it at once.
    fn renew(&mut self) {
        self.version += 1;
        let folder = format!("..2026_12_07_v{}", self.version);
        certificate(&self.dir.join(&folder), &format!("home v{}", self.version), &["app.home.lan"]);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&folder, &tmp).expect("..data_tmp");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_by_symlink_is_served_within_seconds_while_requests_flow() {
    tools_or_skip!("curl", "openssl", "nginx");
    sallyport_tests::init_logging();
    let web = header_echo();
    let pki = TestPki::new();
    let mut volume = SecretVolume::new(pki.dir().join("secret"));
    let mut relay = RunningRelay::start(pki.relay_config_file(
        "https_listen = \"127.0.0.1:0\"",
        "[certificates.home]\ncert = \"secret/tls.crt\"\nkey = \"secret/tls.key\"\n\
         [services.app]\nagent = \"winbox\"\nsni = [\"app.home.lan\"]\ntls = \"terminate\"\n",
    ))
    .await;
    let _agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!("[services.app]\ntarget = \"tcp://{}\"\n", web.addr),
    ));
    relay.wait_agent("winbox").await;
    let https = relay.https.expect("https listener");
    assert_eq!(served_subject(https, Some("app.home.lan")).as_deref(), Ok("CN = home v1"));

    // 20 requests a second, each a new connection (so each handshake shows the certificate of
    // the moment), none checking the certificate: what counts is that none fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flow = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let (ok, out, err) = curl(&[
                    "-k",
                    "--resolve",
                    &resolve("app.home.lan", https),
                    &format!("https://app.home.lan:{}/", https.port()),
                ]);
                results.push(if ok && out.contains("proto=https") {
                    Ok(())
                } else {
                    Err(format!("{out}{err}"))
                });
                std::thread::sleep(Duration::from_millis(50).saturating_sub(started.elapsed()));
            }
            results
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    volume.renew();
    let swapped = Instant::now();
    let took = loop {
        let subject = served_subject(https, Some("app.home.lan"));
        if subject.as_deref() == Ok("CN = home v2") {
            break swapped.elapsed();
        }
        assert!(swapped.elapsed() < Duration::from_secs(10), "still {subject:?} 10 s after the swap");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = tokio::task::spawn_blocking(move || flow.join().expect("flow")).await.expect("join");
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    println!(
        "certificate swapped by symlink: served {took:?} later; {} requests at 20 a second, {} failed",
        results.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(results.len() >= 20, "{}", results.len());
    // A bad renewal (a key that is not the certificate's) keeps the good certificate in service.
    let data = std::fs::read_link(pki.dir().join("secret/..data")).expect("..data");
    let other = pki.dir().join("other");
    let (_, other_key) = certificate(&other, "other", &["app.home.lan"]);
    std::fs::copy(&other_key, pki.dir().join("secret").join(&data).join("tls.key")).expect("wrong key");
    // The relay's look at the files sees it: the status page says why, then what is served counts.
    let looked = Instant::now();
    loop {
        let (_, page) = sallyport_relay::cli::admin_client::request(relay.admin, "GET", "/status.txt", None)
            .await
            .expect("status");
        if page.contains("is not the key of the certificate") {
            break;
        }
        assert!(
            looked.elapsed() < Duration::from_secs(10),
            "no problem shown 10 s after the wrong key: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served_subject(https, Some("app.home.lan")).as_deref(), Ok("CN = home v2"));
    println!("a key that is not the certificate's: the previous certificate stays, the status page says why");
}
