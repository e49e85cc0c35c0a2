//! The login gate on a terminated HTTPS service, in a real browser: Debian's headless Chromium
//! trusts only the relay's certificate (by its public key), is asked to log in, logs in with basic
//! auth, and the access log names the user over `https`.

use std::{path::Path, process::Command};

use sallyport_tests::{servers, tools_or_skip, RunningAgent, RunningRelay, TestPki};

const PASSWORD: &str = "correct horse";

/// The base64 SHA-256 of a certificate's public key, as Chromium's
/// `--ignore-certificate-errors-spki-list` takes it.
fn spki_sha256(crt: &Path) -> String {
    let script = format!(
        "openssl x509 -pubkey -noout -in '{}' | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
        crt.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().expect("openssl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// What headless Chromium rendered at `url` (its DOM), `trust` naming the one public key it
/// accepts besides the system's.
fn chromium(profile: &Path, url: &str, trust: Option<&str>) -> String {
    let mut command = Command::new("chromium");
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--host-resolver-rules=MAP app.home.lan 127.0.0.1");
    if let Some(spki) = trust {
        command.arg(format!("--ignore-certificate-errors-spki-list={spki}"));
    }
    let out = command.arg(url).output().expect("chromium runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_logs_in_to_a_terminated_https_service() {
    tools_or_skip!("chromium", "openssl", "nginx");
    sallyport_tests::init_logging();
    let port = servers::free_port();
    let web = servers::nginx(&[(
        port,
        "",
        "location / { return 200 \"app $request_uri user=$http_remote_user proto=$http_x_forwarded_proto auth=$http_authorization\\n\"; }",
    )]);
    let pki = TestPki::new();
    let (crt, key) = servers::self_signed(pki.dir(), "app.home.lan");
    let mut relay = RunningRelay::start(pki.relay_config_file(
        "https_listen = \"127.0.0.1:0\"",
        &format!(
            "[certificates.app]\ncert = \"{}\"\nkey = \"{}\"\n\
             [access]\nlog = \"access.log\"\n\
             [services.app]\nagent = \"winbox\"\nsni = [\"app.home.lan\"]\ntls = \"terminate\"\n\
             [services.app.auth]\nrealm = \"Windows app\"\nusers = {{ alice = \"{}\" }}\n",
            crt.display(),
            key.display(),
            servers::hash_password(PASSWORD)
        ),
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
    let spki = spki_sha256(&crt);
    let profile = tempfile::tempdir().expect("profile");
    let (profile_dir, port) = (profile.path().to_owned(), https.port());
    let pages = tokio::task::spawn_blocking(move || {
        let url = format!("https://app.home.lan:{port}/dashboard");
        let logged_in =
            format!("https://alice:{}@app.home.lan:{port}/dashboard", PASSWORD.replace(' ', "%20"));
        let wrong = format!("https://alice:wrong@app.home.lan:{port}/dashboard");
        [
            chromium(&profile_dir.join("untrusting"), &logged_in, None),
            chromium(&profile_dir.join("anonymous"), &url, Some(&spki)),
            chromium(&profile_dir.join("wrong"), &wrong, Some(&spki)),
            chromium(&profile_dir.join("alice"), &logged_in, Some(&spki)),
        ]
    })
    .await
    .expect("chromium");
    let [untrusting, anonymous, wrong, alice] = &pages;
    // A browser that does not trust the certificate never gets to the page.
    assert!(!untrusting.contains("app /dashboard"), "{untrusting}");
    assert!(
        !anonymous.contains("app /dashboard") && !wrong.contains("app /dashboard"),
        "{anonymous}\n{wrong}"
    );
    // Logged in: the app sees the user and HTTPS; the credentials go no further than the relay.
    assert!(alice.contains("app /dashboard user=alice proto=https auth=\n"), "{alice}");
    println!("Chromium logged in as alice over TLS the relay terminated: {}", alice.trim());

    let log = servers::wait_for_log(&pki.dir().join("access.log"), |t| t.contains("\"user\":\"alice\""));
    let lines: Vec<&str> = log.lines().collect();
    println!("access log:\n{}", lines.join("\n"));
    assert!(lines.iter().any(|l| l.contains("\"status\":401") && l.contains("\"kind\":\"https\"")), "{log}");
    assert!(
        lines.iter().any(|l| l.contains("\"user\":\"alice\"")
            && l.contains("\"status\":200")
            && l.contains("\"kind\":\"https\"")),
        "{log}"
    );
    assert!(!log.contains(PASSWORD) && !log.contains("wrong"), "no password in the log: {log}");
}
