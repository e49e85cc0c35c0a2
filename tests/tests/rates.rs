//! Rates per client address, end to end on loopback addresses: one host over a TCP service's
//! connection rate is reset while another host's connections go through; one host over an HTTP
//! service's request rate gets 429 while another gets 200; a host opening UDP flows faster than
//! the rate has the excess dropped; the agent's tunnel is untouched; each refusal is counted and
//! logged as `rate_limited`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use sallyport_tests::{metric, servers, targets, tools_or_skip, RunningRelay, TestPki};

const BUSY: &str = "127.0.0.5";
const OTHER: &str = "127.0.0.6";

/// The status codes of `n` requests on one keep-alive connection from `ip` (curl with `n` URLs).
fn statuses(ip: &str, http: SocketAddr, n: usize) -> Vec<String> {
    let url = format!("http://web.home.lan:{}/", http.port());
    let resolve = format!("web.home.lan:{}:127.0.0.1", http.port());
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--interface", ip, "--resolve", &resolve, "-w", "%{http_code}\n"])
        .args((0..n).flat_map(|_| ["-o", "/dev/null", url.as_str()]))
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_over_its_rate_is_refused_while_others_go_through() {
    tools_or_skip!("curl", "dnsmasq");
    sallyport_tests::init_logging();
    let dns = servers::dnsmasq("nas.home.lan", "10.9.8.7");
    let greeter = targets::greeter(b"hello").await;
    let web = targets::http_ok("web ok").await;
    let pki = TestPki::new();
    let (relay, agent) = RunningRelay::with_winbox(
        &pki,
        "http_listen = \"127.0.0.1:0\"",
        "[services.echo]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\nconnections_per_second = 2\nconnection_burst = 5\n\
         [services.dns]\nagent = \"winbox\"\nudp = \"127.0.0.1:0\"\nconnections_per_second = 2\nconnection_burst = 5\n\
         [services.web]\nagent = \"winbox\"\nhosts = [\"web.home.lan\"]\nrequests_per_second = 2\nrequest_burst = 5\n\
         [access]\nlog = \"access.log\"\n",
        &format!(
            "[services.echo]\ntarget = \"tcp://{}\"\n[services.dns]\ntarget = \"udp://{}\"\n[services.web]\ntarget = \"tcp://{}\"\n",
            greeter.addr, dns.addr, web.addr
        ),
    )
    .await;
    let (echo, udp, http) = (relay.service("echo"), relay.service("dns"), relay.http.expect("http"));
    let (tcp, other_tcp, codes, other_codes, flows) = tokio::task::spawn_blocking(move || {
        let tcp = (0..20).filter(|_| servers::greeted_from(echo, BUSY)).count();
        let other_tcp = (0..3).filter(|_| servers::greeted_from(echo, OTHER)).count();
        let codes = statuses(BUSY, http, 20);
        let other_codes = statuses(OTHER, http, 3);
        // Each query from a new port is a new flow.
        let from = IpAddr::V4(BUSY.parse::<Ipv4Addr>().expect("ip"));
        let flows = (0..20)
            .filter(|_| servers::dns_once(from, udp, "nas.home.lan", Duration::from_millis(300)).is_some())
            .count();
        (tcp, other_tcp, codes, other_codes, flows)
    })
    .await
    .expect("clients");
    let count = |codes: &[String], code: &str| codes.iter().filter(|c| *c == code).count();
    println!(
        "rate 2/s, burst 5: TCP {tcp} of 20 connections from one host, {other_tcp} of 3 from another; HTTP {} x 200 and {} x 429 \
         of 20 from one host, {} x 200 of 3 from another; UDP {flows} of 20 new flows answered",
        count(&codes, "200"),
        count(&codes, "429"),
        count(&other_codes, "200")
    );
    // The burst, and what the rate refilled while the clients ran (at most a few seconds).
    assert!((5..=9).contains(&tcp), "{tcp}");
    assert_eq!(other_tcp, 3, "another host has its own rate");
    assert!(
        (5..=9).contains(&count(&codes, "200")) && count(&codes, "200") + count(&codes, "429") == 20,
        "{codes:?}"
    );
    assert_eq!(count(&other_codes, "200"), 3, "{other_codes:?}");
    assert!((5..=12).contains(&flows), "{flows}");
    assert!(relay.connected().contains(&"winbox".to_owned()), "the agent's tunnel is untouched");

    let m = relay.metrics().await;
    let limited = |s: &str| {
        metric(&m, &format!("sallyport_refusals_total{{listener=\"{s}\",reason=\"rate_limited\"}}"))
    };
    assert_eq!(limited("echo"), (20 - tcp) as f64, "{m}");
    assert_eq!(limited("web"), count(&codes, "429") as f64, "{m}");
    assert!(limited("dns") >= (20 - flows) as f64, "{m}");
    let log = pki.dir().join("access.log");
    let limited_lines = 20 - tcp + count(&codes, "429");
    let text = tokio::task::block_in_place(|| {
        servers::wait_for_log(&log, |t| t.matches("\"rate_limited\"").count() >= limited_lines)
    });
    let logged = text.lines().filter(|l| l.contains("\"result\":\"rate_limited\"")).count();
    assert_eq!(logged, 20 - tcp + count(&codes, "429"), "{text}");
    agent.stop().await;
    relay.stop().await;
}
