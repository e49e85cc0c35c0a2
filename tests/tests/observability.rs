//! The relay's admin port as an operator sees it: Prometheus metrics that parse and move with
//! traffic, the status page and its text twin showing the connected agent and its service.

use sallyport_tests::{targets, transfer, RunningAgent, RunningRelay, TestPki};

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
