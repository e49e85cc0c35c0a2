//! Who may reach what, end to end on loopback addresses: a relay whose default rules admit
//! 127.0.0.2 and refuse 127.0.0.3, on every kind of service (TCP with a greeter, UDP with dnsmasq
//! and dig, HTTP by Host, HTTPS by SNI with openssl s_server and curl), X-Forwarded-For believed
//! only from a trusted proxy, a reload that changes the rules under an open connection, the
//! metrics, the access log's lines, and fail2ban's filter reading them.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use sallyport_tests::{metric, servers, targets, tools_or_skip, RunningAgent, RunningRelay, TestPki};

const ADMIN_TOKEN: &str = "access-test-admin-token-0123456789";
const ALLOWED: &str = "127.0.0.2";
const REFUSED: &str = "127.0.0.3";
const PROXY: &str = "127.0.0.4";

fn from(ip: &str) -> IpAddr {
    ip.parse().expect("address")
}

/// A TCP connection to `addr` from `ip`.
fn connect_from(addr: SocketAddr, ip: &str) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::new(from(ip), 0).into()).expect("bind");
    socket.connect(&addr.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    stream
}

/// What the greeter says to a client from `ip`: its greeting, or the error the client got.
fn greeting_from(addr: SocketAddr, ip: &str) -> Result<String, String> {
    let mut stream = connect_from(addr, ip);
    let mut buf = [0u8; 5];
    match stream.read_exact(&mut buf) {
        Ok(()) => Ok(String::from_utf8_lossy(&buf).into_owned()),
        Err(e) => Err(format!("{:?}", e.kind())),
    }
}

/// curl from `ip` with `args`: its status code (000 when it got no answer) and body.
fn curl_from(ip: &str, args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--interface", ip, "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or_default();
    (code.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_admit_and_refuse_every_kind_of_service_and_the_access_log_says_so() {
    tools_or_skip!("curl", "openssl", "dnsmasq", "dig", "fail2ban-regex");
    sallyport_tests::init_logging();
    let dir = tempfile::tempdir().expect("dir");
    let dns = servers::dnsmasq("nas.home.lan", "10.9.8.7");
    let (tls, tls_crt) = servers::tls_server(dir.path(), "nas.home.lan");
    let greeter = targets::greeter(b"hello").await;
    let web = targets::http_ok("web ok").await;
    let pki = TestPki::new();
    std::fs::write(pki.dir().join("admin.token"), ADMIN_TOKEN).expect("token");
    let log = pki.dir().join("access.log");
    let relay_extra =
        "http_listen = \"127.0.0.1:0\"\nhttps_listen = \"127.0.0.1:0\"\nadmin_token_file = \"admin.token\"\nrevocations_file = \"revoked.toml\"";
    let services = format!(
        "[services.echo]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n\
         [services.dns]\nagent = \"winbox\"\nudp = \"127.0.0.1:0\"\n\
         [services.web]\nagent = \"winbox\"\nhosts = [\"web.home.lan\"]\ntrusted_proxies = [\"{PROXY}\"]\n\
         [services.nas]\nagent = \"winbox\"\nsni = [\"nas.home.lan\"]\n"
    );
    let access = |default: &str| format!("[access]\ndefault = {default}\nlog = \"access.log\"\n");
    let first = access(&format!("[\"allow {ALLOWED}\", \"allow {PROXY}\", \"deny all\"]"));
    let mut relay =
        RunningRelay::start(pki.relay_config_file(relay_extra, &format!("{services}{first}"))).await;
    let agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!(
            "[services.echo]\ntarget = \"tcp://{}\"\n[services.dns]\ntarget = \"udp://{}\"\n\
             [services.web]\ntarget = \"tcp://{}\"\n[services.nas]\ntarget = \"tcp://{}\"\n",
            greeter.addr, dns.addr, web.addr, tls.addr
        ),
    ));
    relay.wait_agent("winbox").await;
    let (echo, udp) = (relay.service("echo"), relay.service("dns"));
    let (http, https) = (relay.http.expect("http"), relay.https.expect("https"));

    let checks = tokio::task::spawn_blocking(move || {
        // TCP: the allowed address is greeted, the refused one reset before any byte.
        assert_eq!(greeting_from(echo, ALLOWED), Ok("hello".into()));
        let refused = greeting_from(echo, REFUSED);
        assert!(
            refused.as_ref().is_err_and(|e| e == "ConnectionReset" || e == "UnexpectedEof"),
            "{refused:?}"
        );
        // UDP: dig from each address; the refused one's datagrams are dropped.
        let ask = |ip: &str| servers::dns_once(from(ip), udp, "nas.home.lan", Duration::from_millis(700));
        assert_eq!(ask(ALLOWED), Some(Ipv4Addr::new(10, 9, 8, 7)));
        assert_eq!(ask(REFUSED), None, "a refused datagram is dropped");
        // HTTP: 403 with a short page; X-Forwarded-For counts from the trusted proxy only.
        let url = format!("http://web.home.lan:{}/page?x=1", http.port());
        let resolve = format!("web.home.lan:{}:127.0.0.1", http.port());
        let get = |ip: &str, xff: Option<&str>| {
            let header = xff.map(|x| format!("X-Forwarded-For: {x}"));
            let mut args = vec!["--resolve", &resolve, "-A", "access-test"];
            if let Some(h) = &header {
                args.extend(["-H", h]);
            }
            args.push(&url);
            curl_from(ip, &args)
        };
        assert_eq!(get(ALLOWED, None), ("200".into(), "web ok".into()));
        let (code, page) = get(REFUSED, None);
        assert_eq!(code, "403", "{page}");
        assert!(
            page.contains("403 Forbidden") && page.contains("this address may not reach \"web.home.lan\""),
            "{page}"
        );
        assert_eq!(get(REFUSED, Some(ALLOWED)).0, "403", "a client's own X-Forwarded-For is not believed");
        assert_eq!(
            get(PROXY, Some(&format!("{REFUSED}, {ALLOWED}"))).0,
            "200",
            "the proxy's right-most entry"
        );
        assert_eq!(get(PROXY, Some(&format!("{ALLOWED}, {REFUSED}"))).0, "403", "what the proxy saw counts");
        // HTTPS by SNI: the refused client is reset after its ClientHello; TLS is the target's.
        let nas = |ip: &str| {
            curl_from(
                ip,
                &[
                    "--cacert",
                    &tls_crt.display().to_string(),
                    "--resolve",
                    &format!("nas.home.lan:{}:127.0.0.1", https.port()),
                    &format!("https://nas.home.lan:{}/", https.port()),
                ],
            )
        };
        assert_eq!(nas(ALLOWED).0, "200");
        assert_eq!(nas(REFUSED).0, "000", "no TLS handshake for a refused client");
    });
    checks.await.expect("checks from each address");

    // A reload that refuses the allowed address too: its open connection goes on, new ones are
    // refused; rules are not part of the service, so nothing is retired.
    let mut open = connect_from(echo, ALLOWED);
    let mut hello = [0u8; 5];
    open.read_exact(&mut hello).expect("greeted");
    let closed = access("[\"deny all\"]");
    std::fs::write(
        pki.dir().join("relay.toml"),
        TestPki::relay_text(relay_extra, &format!("{services}{closed}")),
    )
    .expect("write");
    let (status, body) =
        sallyport_relay::cli::admin_client::request(relay.admin, "POST", "/reload", Some(ADMIN_TOKEN))
            .await
            .expect("reload");
    assert_eq!(status, 200, "{body}");
    let after = tokio::task::spawn_blocking(move || {
        open.write_all(b"still").expect("write");
        let mut echoed = [0u8; 5];
        open.read_exact(&mut echoed).expect("the open connection goes on");
        assert_eq!(&echoed, b"still");
        let refused = greeting_from(echo, ALLOWED);
        assert!(refused.is_err(), "new connections follow the new rules: {refused:?}");
        drop(open);
    });
    after.await.expect("after the reload");

    // The status page says who may reach each service: the default's one rule now.
    let (status, text) = sallyport_relay::cli::admin_client::request(relay.admin, "GET", "/status.txt", None)
        .await
        .expect("status");
    assert_eq!(status, 200, "{text}");
    let echo_line = text.lines().find(|l| l.starts_with("echo ")).expect("the echo service's line");
    assert_eq!(echo_line.split_whitespace().last(), Some("default:1"), "{text}");

    let m = relay.metrics().await;
    let denied = |listener: &str| {
        metric(&m, &format!("sallyport_refusals_total{{listener=\"{listener}\",reason=\"denied\"}}"))
    };
    assert_eq!((denied("echo"), denied("web"), denied("nas")), (2.0, 3.0, 1.0), "{m}");
    assert!(denied("dns") >= 1.0, "{m}");
    assert_eq!(metric(&m, "sallyport_access_log_dropped_total"), 0.0, "{m}");

    // The access log: one line per connection or request, refusals included (UDP's are only
    // counted: their source is free to forge).
    let text = tokio::task::block_in_place(|| servers::wait_for_log(&log, |t| t.lines().count() >= 11));
    let lines: Vec<&str> = text.lines().collect();
    let records: Vec<serde_json::Value> =
        lines.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let field = |r: &serde_json::Value, k: &str| r[k].as_str().unwrap_or_default().to_owned();
    let denials: Vec<_> = records.iter().filter(|r| field(r, "result") == "denied").collect();
    let who: Vec<(String, String, String)> =
        denials.iter().map(|r| (field(r, "kind"), field(r, "service"), field(r, "client_ip"))).collect();
    println!("access log: {} lines, {} denials", lines.len(), denials.len());
    for line in &lines {
        println!("  {line}");
    }
    assert_eq!(
        who,
        [
            ("tcp", "echo", REFUSED),
            ("http", "web", REFUSED),
            ("http", "web", REFUSED),
            ("http", "web", REFUSED),
            ("https", "nas", REFUSED),
            ("tcp", "echo", ALLOWED),
        ]
        .map(|(k, s, c)| (k.to_owned(), s.to_owned(), c.to_owned())),
    );
    let via: Vec<_> = records
        .iter()
        .filter(|r| r["via"].is_string())
        .map(|r| (field(r, "client_ip"), field(r, "result")))
        .collect();
    assert_eq!(
        via,
        [(ALLOWED.to_owned(), "completed".to_owned()), (REFUSED.to_owned(), "denied".to_owned())]
    );
    let served = records
        .iter()
        .find(|r| field(r, "kind") == "http" && field(r, "result") == "completed")
        .expect("a served request");
    assert_eq!(
        (field(served, "method"), field(served, "uri"), served["status"].as_u64()),
        ("GET".into(), "/page?x=1".into(), Some(200))
    );
    assert_eq!((field(served, "user_agent"), served["bytes_down"].as_u64()), ("access-test".into(), Some(6)));
    let kept = records
        .iter()
        .find(|r| field(r, "kind") == "tcp" && field(r, "result") == "completed" && r["bytes_up"] == 5)
        .expect("the kept connection");
    assert_eq!(kept["bytes_down"].as_u64(), Some(10), "hello + still");
    assert_eq!(
        records.iter().filter(|r| field(r, "kind") == "https" && field(r, "result") == "completed").count(),
        1
    );

    // fail2ban's filter finds exactly the refusals, with their addresses.
    let filter = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/fail2ban/filter.d/sallyport.conf");
    let out = Command::new("fail2ban-regex").arg(&log).arg(filter).output().expect("fail2ban-regex runs");
    let report = String::from_utf8_lossy(&out.stdout);
    let summary = report.lines().find(|l| l.starts_with("Lines:")).unwrap_or_default();
    println!("fail2ban-regex: {summary}");
    assert!(
        summary.contains(&format!("{} lines, 0 ignored, {} matched", lines.len(), denials.len())),
        "{report}"
    );
    agent.stop().await;
    relay.stop().await;
}
