//! The relay's admin port as an operator sees it: Prometheus metrics that parse and move with
//! traffic, the status page and its text twin showing the connected agent and its service.

use std::time::Duration;

use sallyport_tests::{targets, transfer, RunningAgent, RunningRelay, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(relay: &RunningRelay, path: &str) -> String {
    let (status, body) = sallyport_relay::cli::admin_client::request(relay.admin, "GET", path, None)
        .await
        .expect("admin answers");
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// Parses OpenMetrics text: `# HELP|TYPE|UNIT` comments, samples `name{labels} value`, and a
/// final `# EOF`. Returns the samples.
fn parse(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    let mut eof = false;
    for line in text.lines() {
        assert!(!eof, "text after # EOF: {line}");
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split_whitespace().next().unwrap_or("");
            assert!(["HELP", "TYPE", "UNIT"].contains(&kind), "bad comment line: {line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            name.starts_with("sallyport_") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels in {line}");
        }
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line}"));
        samples.push((series.to_owned(), value));
    }
    assert!(eof, "no # EOF at the end");
    samples
}

/// The status page in headless Chromium (Debian's `chromium`): the DOM it rendered shows the agent
/// and the service, and the screenshot is a real PNG. Skips where Chromium is missing, outside CI.
async fn render_in_chromium(url: &str) {
    if std::process::Command::new("chromium").arg("--version").output().is_err() {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "chromium missing in CI");
        eprintln!("SKIPPED: chromium is not installed (apt-get install chromium)");
        return;
    }
    let url = url.to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let shot = dir.path().join("status.png");
    let shot_arg = format!("--screenshot={}", shot.display());
    let profile = format!("--user-data-dir={}", dir.path().join("profile").display());
    let (dom, screenshot) = tokio::task::spawn_blocking(move || {
        let chromium = |extra: &[&str]| {
            let out = std::process::Command::new("chromium")
                .args(["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,800", &profile])
                .args(extra)
                .arg(&url)
                .output()
                .expect("chromium runs");
            assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        (chromium(&["--dump-dom"]), {
            chromium(&[&shot_arg]);
            let png = std::fs::read(&shot).expect("screenshot written");
            if let Some(keep) = std::env::var_os("SALLYPORT_KEEP_SCREENSHOT") {
                let _ = std::fs::write(keep, &png);
            }
            png
        })
    })
    .await
    .expect("chromium task");
    assert!(dom.contains("<table id=\"agents\">") && dom.contains("<td>winbox</td>"), "{dom}");
    assert!(dom.contains("<td>svc</td>") && dom.contains("class=\"up\">up<"), "{dom}");
    assert!(screenshot.starts_with(b"\x89PNG") && screenshot.len() > 5_000, "{} bytes", screenshot.len());
    println!(
        "status page rendered by Chromium: agent and service rows present, screenshot {} bytes",
        screenshot.len()
    );
}

/// The failed starts of the engine-less container of the operator's kit scenario.
const BOX_FAILURES: &str = "sallyport_container_start_failures_total{agent=\"winbox\",container=\"box\"}";

fn value(samples: &[(String, f64)], series: &str) -> f64 {
    samples.iter().find(|(s, _)| s == series).map_or(0.0, |(_, v)| *v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_traffic_and_the_status_page_shows_the_agent() {
    sallyport_tests::init_logging();
    let pki = TestPki::new();
    let target = targets::transfer_server().await;
    let mut relay = RunningRelay::start(pki.relay_config(&[("svc", "winbox")], "")).await;
    let agent = RunningAgent::start(pki.agent_config("winbox", &[relay.quic], &[("svc", target.addr)], ""));
    relay.wait_agent("winbox").await;

    let before = parse(&get(&relay, "/metrics").await);
    assert_eq!(value(&before, "sallyport_agents_connected"), 1.0);
    assert_eq!(value(&before, "sallyport_build_info{version=\"0.1.0\"}"), 1.0);
    assert!(before.iter().any(|(s, _)| s.starts_with("sallyport_quic_rtt_seconds{agent=\"winbox\"}")));

    let (mut up, mut down) = (0u64, 0u64);
    for i in 0..3u64 {
        let report =
            transfer::run(relay.service("svc"), 10_000 * (i + 1), 20_000 * (i + 1), i).await.expect("intact");
        up += report.up;
        down += report.down;
    }
    let after = parse(&get(&relay, "/metrics").await);
    let completed = "sallyport_connections_total{service=\"svc\",result=\"completed\"}";
    assert_eq!(value(&after, completed) - value(&before, completed), 3.0, "{after:?}");
    // The transfer protocol adds a small header each way; the counters see every byte.
    let bytes_up = value(&after, "sallyport_bytes_total{service=\"svc\",direction=\"up\"}");
    let bytes_down = value(&after, "sallyport_bytes_total{service=\"svc\",direction=\"down\"}");
    assert!(bytes_up >= up as f64 && bytes_up < up as f64 + 1024.0, "up {bytes_up} vs {up}");
    assert!(bytes_down >= down as f64 && bytes_down < down as f64 + 1024.0, "down {bytes_down} vs {down}");
    assert_eq!(value(&after, "sallyport_connections_active{service=\"svc\"}"), 0.0);
    println!("metrics after 3 transfers: {completed} 3, bytes up {bytes_up}, down {bytes_down}");

    let page = get(&relay, "/").await;
    assert!(page.starts_with("<!doctype html>"));
    assert!(page.contains("<td>winbox</td>") && page.contains("<td>svc</td>"), "{page}");
    let text = get(&relay, "/status.txt").await;
    println!("{text}");
    let svc_line = text.lines().find(|l| l.starts_with("svc ")).expect("service row");
    assert!(svc_line.contains(" up ") && svc_line.split_whitespace().nth(6) == Some("3"), "{svc_line}");

    render_in_chromium(&format!("http://{}/", relay.admin)).await;

    // An agent away: the page and the gauges say so.
    agent.stop().await;
    relay.wait_agent_gone("winbox").await;
    let gone = parse(&get(&relay, "/metrics").await);
    assert_eq!(value(&gone, "sallyport_agents_connected"), 0.0);
    assert!(get(&relay, "/status.txt").await.contains("agent away"));
    relay.stop().await;
}

/// The sample names a live exposition offers, from its `# TYPE` lines (a family's samples exist
/// even before they have a value): counters as `_total`, histograms as `_bucket`, `_sum`, `_count`.
fn exposed_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else { continue };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            "info" => {
                names.insert(format!("{name}_info"));
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// Every `sallyport_…` name in `text`.
fn referenced_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("sallyport_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The operator's kit (`deploy/k8s/components/monitoring`): every metric its alerts and its Grafana
/// dashboard query is one a live relay exports, and the metrics the alerts stand on say what they
/// should: an agent a service names is 0 while away and 1 with a tunnel, certificates carry their
/// end of validity, the relay says it is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_kit_queries_only_metrics_the_relay_exports() {
    sallyport_tests::init_logging();
    let kit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/components/monitoring");
    let rules = std::fs::read_to_string(kit.join("prometheusrule.yaml")).expect("prometheusrule.yaml");
    let dashboard = std::fs::read_to_string(kit.join("sallyport-relay.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    let in_rules = referenced_names(&rules);
    let in_dashboard = referenced_names(&exprs.join("\n"));
    assert!(in_rules.len() >= 4 && in_dashboard.len() >= 12, "{in_rules:?} {in_dashboard:?}");

    // A relay and an agent with one service of each kind, an agent the config names that never
    // comes, a service group of both, and a declared container whose engine is not there: what the
    // kit's queries look at.
    let pki = TestPki::new();
    let target = targets::transfer_server().await;
    let web = targets::http_ok("hello").await;
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("udp bind");
    let echo_addr = echo.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let mut relay = RunningRelay::start(pki.relay_config_toml(
        "http_listen = \"127.0.0.1:0\"",
        "[services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n\
         [services.web]\nagent = \"winbox\"\nhosts = [\"web.home.lan\"]\n\
         [services.echo]\nagent = \"winbox\"\nudp = \"127.0.0.1:0\"\n\
         [services.other]\nagent = \"ghost\"\nlisten = \"127.0.0.1:0\"\n\
         [services.boxed]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n\
         [services.pair]\nagents = [\"winbox\", \"ghost\"]\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    let agent = RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[relay.quic],
        "",
        &format!(
            "[services.svc]\ntarget = \"tcp://{}\"\n[services.web]\ntarget = \"tcp://{}\"\n\
             [services.echo]\ntarget = \"udp://{echo_addr}\"\n\
             [services.boxed]\ntarget = \"container://box:80\"\n\
             [docker]\nendpoint = \"unix:///nonexistent/docker.sock\"\n[containers.box]\nimage = \"anything\"\n",
            target.addr, web.addr
        ),
    ));
    relay.wait_agent("winbox").await;
    transfer::run(relay.service("svc"), 1000, 1000, 1).await.expect("intact");
    let mut http = tokio::net::TcpStream::connect(relay.http.expect("http listener")).await.expect("connect");
    http.write_all(b"GET / HTTP/1.1\r\nHost: web.home.lan\r\nConnection: close\r\n\r\n").await.expect("send");
    let mut answer = String::new();
    http.read_to_string(&mut answer).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("udp bind");
    let mut buf = [0u8; 64];
    let mut echoed = false;
    for _ in 0..20 {
        client.send_to(b"ping", relay.service("echo")).await.expect("send");
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(250), client.recv_from(&mut buf)).await
        {
            echoed = &buf[..n] == b"ping";
            break;
        }
    }
    assert!(echoed, "no echo through the UDP service");
    // A client of the container's service makes the agent start it, which fails (no engine).
    // The relay resets the client once the agent says why: that may land before the connect is
    // seen through, and either way nothing is served.
    if let Ok(mut boxed) = tokio::net::TcpStream::connect(relay.service("boxed")).await {
        let mut nothing = Vec::new();
        assert!(
            boxed.read_to_end(&mut nothing).await.is_err() || nothing.is_empty(),
            "a container that does not start serves nothing"
        );
    }
    // A copy of the agent's identity connecting from another address is refused.
    let bundle = pki.agent_bundle("winbox");
    let copy = sallyport_tests::raw::RawAgent::connect_from(
        (&bundle.join("agent.crt"), &bundle.join("agent.key")),
        &pki,
        relay.quic,
        &["svc"],
        "127.0.0.2".parse().expect("address"),
    )
    .await;
    assert!(copy.map(|c| matches!(c.answer, sallyport_proto::RelayMessage::Refused { .. })).unwrap_or(true));
    // A request for a name no service has is refused; an agent with another CA's certificate
    // fails its handshake.
    let mut unknown =
        tokio::net::TcpStream::connect(relay.http.expect("http listener")).await.expect("connect");
    unknown
        .write_all(b"GET / HTTP/1.1\r\nHost: nobody.home.lan\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut refused = String::new();
    let _ = unknown.read_to_string(&mut refused).await;
    assert!(refused.starts_with("HTTP/1.1 4"), "{refused}");
    let stranger_pki = TestPki::new();
    let stranger = RunningAgent::start(stranger_pki.agent_config("winbox", &[relay.quic], &[], ""));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = get(&relay, "/metrics").await;
        let ready = [
            "sallyport_handshake_failures_total",
            "sallyport_refusals_total",
            "sallyport_container_state{",
            "sallyport_identity_conflicts_total",
        ]
        .iter()
        .all(|n| text.contains(n))
            // The agent reports its count within half a second of the failed start.
            && value(&parse(&text), BOX_FAILURES) >= 1.0;
        if ready {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the scenario's metrics did not all appear:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stranger.stop().await;
    let text = get(&relay, "/metrics").await;
    let samples = parse(&text);
    let exposed = exposed_names(&text);
    let missing: Vec<&String> = in_rules.union(&in_dashboard).filter(|n| !exposed.contains(*n)).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}\nexported: {exposed:?}");
    println!(
        "the kit queries {} metrics, all exported: {:?}",
        in_rules.union(&in_dashboard).count(),
        in_dashboard
    );

    assert_eq!(value(&samples, "sallyport_agent_up{agent=\"winbox\"}"), 1.0);
    assert_eq!(value(&samples, "sallyport_agent_up{agent=\"ghost\"}"), 0.0, "{text}");
    assert_eq!(value(&samples, "sallyport_ready"), 1.0);
    assert!(value(&samples, BOX_FAILURES) >= 1.0, "{text}");
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    let relay_cert = value(&samples, "sallyport_certificate_expiry_timestamp_seconds{certificate=\"relay\"}");
    let agent_cert = value(
        &samples,
        "sallyport_certificate_expiry_timestamp_seconds{certificate=\"agent\",agent=\"winbox\"}",
    );
    assert!(relay_cert > now + 86_400.0 && agent_cert > now + 86_400.0, "{relay_cert} {agent_cert} at {now}");

    agent.stop().await;
    relay.wait_agent_gone("winbox").await;
    let gone = parse(&get(&relay, "/metrics").await);
    assert_eq!(value(&gone, "sallyport_agent_up{agent=\"winbox\"}"), 0.0);
    assert!(
        !gone.iter().any(|(s, _)| s.contains("certificate=\"agent\"")),
        "an agent away has no certificate line"
    );
    relay.stop().await;
}
