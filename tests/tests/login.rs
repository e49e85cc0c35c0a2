//! A login in front of HTTP services, end to end with curl and nginx: basic auth with an argon2id
//! hash from `sallyport-relay hash-password`, a bearer token, a bypass path, forward auth against
//! a small real auth server (Python's http.server: a session cookie passes with `Remote-User`,
//! anything else is redirected to its login page), failed logins from one host answered 429 while
//! another host logs in, the user in the access log, and no password or token in it.

use std::{net::SocketAddr, process::Command};

use sha2::Digest;

use sallyport_tests::{metric, process::Spawned, servers, tools_or_skip, RunningRelay, TestPki};

const PASSWORD: &str = "correct horse battery";
const TOKEN: &str = "ci-secret-token-4f9a";

/// The auth server: `/verify` answers 200 with `Remote-User: bob` to a request whose cookie is
/// `session=good`, and 302 to its login page (naming the original URL) to anything else.
const AUTH_SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if "session=good" in (self.headers.get("Cookie") or ""):
            self.send_response(200); self.send_header("Remote-User", "bob"); self.send_header("Remote-Groups", "admins")
            self.send_header("Content-Length", "0"); self.end_headers(); return
        target = "http://" + (self.headers.get("X-Forwarded-Host") or "") + (self.headers.get("X-Forwarded-Uri") or "")
        body = ("login first, " + (self.headers.get("X-Forwarded-For") or "") + "\n").encode()
        self.send_response(302); self.send_header("Location", "http://auth.home.lan/login?rd=" + target)
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
if len(sys.argv) > 3:
    # HTTPS with the certificate and key named after the port.
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[2], sys.argv[3])
    server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// curl from `ip` to `url` on the relay's HTTP port with `args`: status, body and headers.
fn curl(http: SocketAddr, ip: &str, host: &str, path: &str, args: &[&str]) -> (String, String, String) {
    let url = format!("http://{host}:{}{path}", http.port());
    let resolve = format!("{host}:{}:127.0.0.1", http.port());
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--interface",
            ip,
            "--resolve",
            &resolve,
            "-D",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .arg(&url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = text.rsplit_once('\n').unwrap_or_default();
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (code.to_owned(), body.to_owned(), headers.to_ascii_lowercase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_tokens_bypass_and_forward_auth_guard_web_apps() {
    tools_or_skip!("curl", "nginx", "python3", "fail2ban-regex");
    sallyport_tests::init_logging();
    let upstream = servers::free_port();
    let _nginx = servers::nginx(&[(
        upstream,
        "",
        "location / { return 200 \"app $request_uri user=$http_remote_user groups=$http_remote_groups auth=$http_authorization\\n\"; }",
    )]);
    let auth_port = servers::free_port();
    let mut auth_server = Command::new("python3");
    auth_server.args(["-c", AUTH_SERVER, &auth_port.to_string()]);
    let _auth_server = Spawned::start(auth_server);
    servers::wait_tcp(SocketAddr::from(([127, 0, 0, 1], auth_port)), "auth server");
    let token_sha = sallyport_runtime::hex::encode(&sha2::Sha256::digest(TOKEN.as_bytes()));
    let pki = TestPki::new();
    let (relay, agent) = RunningRelay::with_winbox(
        &pki,
        "http_listen = \"127.0.0.1:0\"",
        &format!(
            "[services.admin]\nagent = \"winbox\"\nhosts = [\"admin.home.lan\"]\n\
             [services.admin.auth]\nrealm = \"Windows admin\"\nusers = {{ alice = \"{}\" }}\n\
             tokens = {{ ci = \"sha256:{token_sha}\" }}\nbypass = [\"/api/\"]\n\
             [services.portal]\nagent = \"winbox\"\nhosts = [\"portal.home.lan\"]\n\
             [services.portal.auth]\nforward = \"http://127.0.0.1:{auth_port}/verify\"\nforward_headers = [\"Remote-User\", \"Remote-Groups\"]\n\
             [access]\nlog = \"access.log\"\n",
            servers::hash_password(PASSWORD)
        ),
        &format!(
            "[services.admin]\ntarget = \"tcp://127.0.0.1:{upstream}\"\n[services.portal]\ntarget = \"tcp://127.0.0.1:{upstream}\"\n"
        ),
    )
    .await;
    let http = relay.http.expect("http listener");
    let right = format!("alice:{PASSWORD}");
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let results = tokio::task::spawn_blocking(move || {
        let admin = |ip: &str, path: &str, args: &[&str]| curl(http, ip, "admin.home.lan", path, args);
        let (code, body, _) = admin("127.0.0.2", "/", &["-u", &right]);
        assert_eq!(code, "200", "{body}");
        assert!(body.starts_with("app / user=alice groups= auth=\n"), "credentials go no further: {body}");
        let (code, _, headers) = admin("127.0.0.2", "/", &[]);
        assert_eq!(code, "401");
        assert!(headers.contains("www-authenticate: basic realm=\"windows admin\""), "{headers}");
        assert_eq!(admin("127.0.0.2", "/", &["-u", "alice:wrong"]).0, "401");
        let (code, body, _) = admin("127.0.0.2", "/", &["-H", &bearer]);
        assert_eq!(
            (code.as_str(), body.starts_with("app / user=ci groups= auth=\n")),
            ("200", true),
            "{body}"
        );
        assert_eq!(admin("127.0.0.2", "/", &["-H", "Authorization: Bearer guess"]).0, "401");
        assert_eq!(admin("127.0.0.2", "/api/status", &[]).0, "200", "a bypass path");
        // A client's own Remote-User never reaches the app.
        let (_, body, _) = admin("127.0.0.2", "/api/x", &["-H", "Remote-User: root"]);
        assert!(body.contains("user= "), "{body}");
        // One host guessing: the burst of failures gets 401, then 429, even with the right password.
        let guesses: Vec<String> =
            (0..12).map(|i| admin("127.0.0.3", "/", &["-u", &format!("alice:guess{i}")]).0).collect();
        let after = admin("127.0.0.3", "/", &["-u", &right]).0;
        let other = admin("127.0.0.4", "/", &["-u", &right]).0;
        // Forward auth: the auth server's redirect as it wrote it; with the session, bob passes.
        let portal = |args: &[&str]| curl(http, "127.0.0.2", "portal.home.lan", "/reports?q=1", args);
        let (code, body, headers) = portal(&[]);
        assert_eq!(code, "302", "{body}");
        assert!(
            headers.contains("location: http://auth.home.lan/login?rd=http://portal.home.lan/reports?q=1"),
            "{headers}"
        );
        assert_eq!(body, "login first, 127.0.0.2\n");
        let (code, body, _) = portal(&["-H", "Cookie: session=good", "-H", "Remote-User: mallory"]);
        assert_eq!(code, "200", "{body}");
        assert!(body.starts_with("app /reports?q=1 user=bob groups=admins"), "{body}");
        (guesses, after, other)
    })
    .await
    .expect("clients");
    let (guesses, after, other) = results;
    println!("12 wrong passwords from one host: {guesses:?}; then the right one from it: {after}, from another host: {other}");
    assert_eq!(guesses.iter().filter(|c| *c == "401").count(), 10, "{guesses:?}");
    assert_eq!(guesses.iter().filter(|c| *c == "429").count(), 2, "{guesses:?}");
    assert_eq!((after.as_str(), other.as_str()), ("429", "200"));

    let m = relay.metrics().await;
    let refused = |s: &str, r: &str| {
        metric(&m, &format!("sallyport_refusals_total{{listener=\"{s}\",reason=\"{r}\"}}"))
    };
    assert_eq!(refused("admin", "auth_failed"), 14.0, "{m}");
    assert_eq!(refused("admin", "rate_limited"), 2.0, "the 12th guess and the right password after it: {m}");
    assert_eq!(refused("portal", "auth_failed"), 1.0, "{m}");
    let log = pki.dir().join("access.log");
    let text = tokio::task::block_in_place(|| servers::wait_for_log(&log, |t| t.lines().count() >= 23));
    let users: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("\"user\":\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    println!("access log: {} lines, users {users:?}", text.lines().count());
    assert_eq!(users.iter().filter(|u| **u == "alice").count(), 2, "{text}");
    assert_eq!(users.iter().filter(|u| **u == "ci").count(), 1, "{text}");
    assert_eq!(users.iter().filter(|u| **u == "bob").count(), 1, "{text}");
    assert_eq!(text.matches("\"result\":\"auth_failed\"").count(), 15, "{text}");
    for secret in [PASSWORD, TOKEN, "guess1", "session=good"] {
        assert!(!text.contains(secret), "{secret:?} in the access log");
    }
    // fail2ban's filter counts the failed logins and the host held back after them.
    let filter = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/fail2ban/filter.d/sallyport.conf");
    let out = Command::new("fail2ban-regex").arg(&log).arg(filter).output().expect("fail2ban-regex runs");
    let report = String::from_utf8_lossy(&out.stdout);
    let summary = report.lines().find(|l| l.starts_with("Lines:")).unwrap_or_default();
    println!("fail2ban-regex: {summary}");
    assert!(summary.contains("23 lines, 0 ignored, 17 matched"), "{report}");
    agent.stop().await;
    relay.stop().await;
}

/// Forward auth over HTTPS: the auth server's certificate is checked against the service's
/// `forward_ca`; with it, the redirect and the session pass as over HTTP; a service that trusts
/// another CA refuses every request (502) instead of asking a server it cannot verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_over_https_checks_the_auth_servers_certificate() {
    tools_or_skip!("curl", "nginx", "python3");
    sallyport_tests::init_logging();
    let upstream = servers::free_port();
    let _nginx = servers::nginx(&[(
        upstream,
        "",
        "location / { return 200 \"app $request_uri user=$http_remote_user\\n\"; }",
    )]);
    // The auth server's certificate for 127.0.0.1 from a private CA of its own (a test PKI's
    // relay certificate); the relay's PKI is another CA.
    let auth_pki = TestPki::new();
    let (ca, crt, key) =
        (auth_pki.dir().join("ca.crt"), auth_pki.dir().join("relay.crt"), auth_pki.dir().join("relay.key"));
    let auth_port = servers::free_port();
    let mut auth_server = Command::new("python3");
    auth_server.args(["-c", AUTH_SERVER, &auth_port.to_string()]).arg(&crt).arg(&key);
    let _auth_server = Spawned::start(auth_server);
    servers::wait_tcp(SocketAddr::from(([127, 0, 0, 1], auth_port)), "auth server");
    let pki = TestPki::new();
    let other_ca = pki.dir().join("ca.crt");
    let (relay, agent) = RunningRelay::with_winbox(
        &pki,
        "http_listen = \"127.0.0.1:0\"",
        &format!(
            "[services.portal]\nagent = \"winbox\"\nhosts = [\"portal.home.lan\"]\n\
             [services.portal.auth]\nforward = \"https://127.0.0.1:{auth_port}/verify\"\nforward_ca = \"{}\"\n\
             forward_headers = [\"Remote-User\"]\n\
             [services.stranger]\nagent = \"winbox\"\nhosts = [\"stranger.home.lan\"]\n\
             [services.stranger.auth]\nforward = \"https://127.0.0.1:{auth_port}/verify\"\nforward_ca = \"{}\"\n",
            ca.display(),
            other_ca.display()
        ),
        &format!(
            "[services.portal]\ntarget = \"tcp://127.0.0.1:{upstream}\"\n[services.stranger]\ntarget = \"tcp://127.0.0.1:{upstream}\"\n"
        ),
    )
    .await;
    let http = relay.http.expect("http listener");
    let (login, passed, stranger) = tokio::task::spawn_blocking(move || {
        let ask = |host: &str, args: &[&str]| curl(http, "127.0.0.2", host, "/reports", args);
        (
            ask("portal.home.lan", &[]),
            ask("portal.home.lan", &["-H", "Cookie: session=good"]),
            ask("stranger.home.lan", &["-H", "Cookie: session=good"]),
        )
    })
    .await
    .expect("clients");
    println!(
        "forward auth over HTTPS: no session {} ({}), a session {} ({}), a service trusting another CA {} ({})",
        login.0,
        login.1.trim(),
        passed.0,
        passed.1.trim(),
        stranger.0,
        stranger.1.trim()
    );
    assert_eq!(login.0, "302", "{login:?}");
    assert!(
        login.2.contains("location: http://auth.home.lan/login?rd=http://portal.home.lan/reports"),
        "{login:?}"
    );
    assert_eq!((passed.0.as_str(), passed.1.as_str()), ("200", "app /reports user=bob\n"));
    assert_eq!(stranger.0, "502", "{stranger:?}");
    // The client reads that the login is unavailable; where and why are the relay's log's.
    assert!(
        stranger.1.contains("the login service of \"stranger.home.lan\" cannot be reached"),
        "{stranger:?}"
    );
    assert!(!stranger.1.contains("127.0.0.1") && !stranger.1.contains("app "), "{stranger:?}");
    let m = relay.metrics().await;
    let unavailable =
        metric(&m, "sallyport_refusals_total{listener=\"stranger\",reason=\"auth_unavailable\"}");
    assert_eq!(unavailable, 1.0, "{m}");
    agent.stop().await;
    relay.stop().await;
}
