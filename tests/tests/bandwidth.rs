//! Bandwidth caps end to end on loopback: a TCP service capped at 2 MiB/s holds its cap within
//! 10 % over 10 s while an uncapped service of the same agent goes on at full speed beside it,
//! an agent's cap holds across its services, and HTTP and UDP services hold theirs each way.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use sallyport_tests::{servers, targets, tools_or_skip, transfer, RunningRelay, TestPki};

const CAP: f64 = 2.0 * 1024.0 * 1024.0;

/// Downloads `bytes` from `addr`, adding what arrives to `progress`, and says how long it took.
async fn download(addr: std::net::SocketAddr, bytes: u64, seed: u64, progress: Arc<AtomicU64>) -> Duration {
    let started = Instant::now();
    let report = transfer::run_counted(addr, 0, bytes, seed, &progress).await.expect("a checked transfer");
    assert_eq!(report.down, bytes);
    started.elapsed()
}

/// A relay with TCP services `one` and `two` (each with its own keys from `keys`) and `more` after
/// them, and the agent carrying both to a transfer server; the services' addresses.
async fn two_services(
    keys: [&str; 2],
    more: &str,
) -> (RunningRelay, sallyport_tests::RunningAgent, sallyport_tests::targets::Target, [std::net::SocketAddr; 2])
{
    sallyport_tests::init_logging();
    let target = targets::transfer_server().await;
    let pki = TestPki::new();
    let (relay, agent) = RunningRelay::with_winbox(
        &pki,
        "",
        &format!(
            "[services.one]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n{}\n\
             [services.two]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n{}\n{more}",
            keys[0], keys[1]
        ),
        &format!(
            "[services.one]\ntarget = \"tcp://{0}\"\n[services.two]\ntarget = \"tcp://{0}\"\n",
            target.addr
        ),
    )
    .await;
    let addrs = [relay.service("one"), relay.service("two")];
    (relay, agent, target, addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_service_holds_its_cap_and_an_uncapped_one_is_not_slowed() {
    let (relay, agent, _target, [capped, free]) = two_services(["bandwidth = \"2MiB\"", ""], "").await;

    // The uncapped service alone, then beside 10 s of the capped one.
    let alone = download(free, 64 << 20, 1, Arc::default()).await;
    let capped_progress = Arc::new(AtomicU64::new(0));
    let capped_run = tokio::spawn(download(capped, 20 << 20, 2, capped_progress.clone()));
    // The capped download is under way (its first bytes arrived) before the uncapped one starts.
    while capped_progress.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let beside = download(free, 64 << 20, 3, Arc::default()).await;
    let capped_took = capped_run.await.expect("capped download");
    let capped_rate = (20u64 << 20) as f64 / capped_took.as_secs_f64();
    println!(
        "capped at 2 MiB/s: 20 MiB in {capped_took:?} ({:.2} MiB/s); uncapped 64 MiB alone in {alone:?}, beside the capped one in {beside:?}",
        capped_rate / CAP * 2.0
    );
    assert!((CAP * 0.9..=CAP * 1.1).contains(&capped_rate), "{:.0} B/s against a cap of {CAP}", capped_rate);
    assert!(
        beside.as_secs_f64() <= alone.as_secs_f64() * 1.5 + 0.2,
        "the uncapped service was slowed: {alone:?} alone, {beside:?} beside"
    );
    agent.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_cap_holds_across_its_services() {
    let (relay, agent, _target, [one, two]) =
        two_services(["", ""], "[access]\nagent_bandwidth = { winbox = \"2MiB\" }\n").await;
    let started = Instant::now();
    let first = tokio::spawn(download(one, 8 << 20, 4, Arc::default()));
    let second = tokio::spawn(download(two, 8 << 20, 5, Arc::default()));
    first.await.expect("one");
    second.await.expect("two");
    let took = started.elapsed();
    let rate = (16u64 << 20) as f64 / took.as_secs_f64();
    println!(
        "agent capped at 2 MiB/s: 16 MiB over two services in {took:?} ({:.2} MiB/s)",
        rate / (1 << 20) as f64
    );
    assert!(
        (CAP * 0.9..=CAP * 1.1).contains(&rate),
        "{rate:.0} B/s across the agent's services against {CAP}"
    );
    agent.stop().await;
    relay.stop().await;
}

/// curl through the relay's HTTP listener at `http` for `host`: `extra` arguments, the URL's path;
/// the bytes it moved each way and how long it took.
fn curl(http: std::net::SocketAddr, host: &str, extra: &[&str], path: &str) -> (u64, u64, Duration) {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_upload} %{size_download} %{time_total}",
            "-H",
        ])
        .arg(format!("Host: {host}"))
        .args(extra)
        .arg(format!("http://{http}{path}"))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(
        fields.first(),
        Some(&"200"),
        "curl {host}{path}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let number = |i: usize| fields[i].parse::<f64>().expect("a figure");
    (number(1) as u64, number(2) as u64, Duration::from_secs_f64(number(3)))
}

/// A UDP target that answers each datagram with two copies of it; the bytes it got.
async fn doubling_echo() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    let got = Arc::new(AtomicU64::new(0));
    let counted = got.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            counted.fetch_add(n as u64, Ordering::Relaxed);
            for _ in 0..2 {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        }
    });
    (addr, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_udp_services_hold_their_caps_each_way() {
    tools_or_skip!("curl", "nginx");
    sallyport_tests::init_logging();
    let files = tempfile::tempdir().expect("dir");
    std::fs::write(files.path().join("big"), vec![b'x'; 20 << 20]).expect("file");
    let upload = files.path().join("upload");
    std::fs::write(&upload, vec![b'u'; 12 << 20]).expect("file");
    let port = servers::free_port();
    let nginx = servers::nginx(&[(port, "", &format!("root {};", files.path().display()))]);
    let uploads = targets::http_upload().await;
    let (echo, echo_got) = doubling_echo().await;
    let pki = TestPki::new();
    let (relay, agent) = RunningRelay::with_winbox(
        &pki,
        "http_listen = \"127.0.0.1:0\"",
        "[services.files]\nagent = \"winbox\"\nhosts = [\"files.home.lan\"]\nbandwidth = \"2MiB\"\n\
         [services.free]\nagent = \"winbox\"\nhosts = [\"free.home.lan\"]\n\
         [services.uploads]\nagent = \"winbox\"\nhosts = [\"up.home.lan\"]\nbandwidth = \"2MiB\"\n\
         [services.feed]\nagent = \"winbox\"\nudp = \"127.0.0.1:0\"\nbandwidth = \"1MiB\"\n",
        &format!(
            "[services.files]\ntarget = \"tcp://{0}\"\n[services.free]\ntarget = \"tcp://{0}\"\n\
             [services.uploads]\ntarget = \"tcp://{1}\"\n[services.feed]\ntarget = \"udp://{2}\"\n",
            nginx.addr, uploads.addr, echo
        ),
    )
    .await;
    let (http, feed) = (relay.http.expect("http"), relay.service("feed"));

    // UDP: 1,000-byte datagrams offered at about 4 MiB/s for 5 s; the target answers each twice.
    let udp = tokio::spawn(async move {
        let client = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let back = Arc::new(AtomicU64::new(0));
        let (reader, counted) = (client.clone(), back.clone());
        let receiving = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok(n) = reader.recv(&mut buf).await {
                counted.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        client.connect(feed).await.expect("connect");
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < Duration::from_secs(5) {
            for _ in 0..4 {
                sent += client.send(&[0x5a; 1000]).await.expect("send") as u64;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = started.elapsed();
        // What is still on its way (the tunnel, the target's answers) arrives: until nothing more
        // came for 200 ms.
        let mut last = back.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = back.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        receiving.abort();
        (sent, back.load(Ordering::Relaxed), took)
    });
    let (capped, up, free) = tokio::task::spawn_blocking(move || {
        let uploading = std::thread::spawn(move || {
            let file = upload.display().to_string();
            curl(http, "up.home.lan", &["-H", "Expect:", "-T", &file], "/upload")
        });
        let free = std::thread::spawn(move || curl(http, "free.home.lan", &[], "/big"));
        let capped = curl(http, "files.home.lan", &[], "/big");
        (capped, uploading.join().expect("upload"), free.join().expect("free"))
    })
    .await
    .expect("curl");
    let (sent, back, udp_took) = udp.await.expect("udp");
    let rate = |bytes: u64, took: Duration| bytes as f64 / took.as_secs_f64();
    let mib = |bytes: f64| bytes / (1 << 20) as f64;
    let (down_rate, up_rate, free_rate) = (rate(capped.1, capped.2), rate(up.0, up.2), rate(free.1, free.2));
    let (udp_up, udp_down) = (rate(echo_got.load(Ordering::Relaxed), udp_took), rate(back, udp_took));
    let metrics = relay.metrics().await;
    let dropped =
        sallyport_tests::metric(&metrics, "sallyport_refusals_total{listener=\"feed\",reason=\"bandwidth\"}");
    println!(
        "HTTP capped at 2 MiB/s: 20 MiB down in {:?} ({:.2} MiB/s), 12 MiB up in {:?} ({:.2} MiB/s); uncapped beside: \
         20 MiB in {:?} ({:.2} MiB/s); UDP capped at 1 MiB/s: {:.2} MiB offered in {udp_took:?}, {:.2} MiB/s reached \
         the target, {:.2} MiB/s of its doubled answers came back, {dropped} datagrams dropped",
        capped.2,
        mib(down_rate),
        up.2,
        mib(up_rate),
        free.2,
        mib(free_rate),
        mib(sent as f64),
        mib(udp_up),
        mib(udp_down),
    );
    assert_eq!((capped.1, up.0, free.1), (20 << 20, 12 << 20, 20 << 20));
    assert!((CAP * 0.9..=CAP * 1.1).contains(&down_rate), "HTTP down at {down_rate:.0} B/s against {CAP}");
    assert!((CAP * 0.9..=CAP * 1.1).contains(&up_rate), "HTTP up at {up_rate:.0} B/s against {CAP}");
    assert!(free_rate > CAP * 3.0, "the uncapped host was held back: {free_rate:.0} B/s");
    let udp_cap = CAP / 2.0;
    assert!((udp_cap * 0.9..=udp_cap * 1.1).contains(&udp_up), "UDP up at {udp_up:.0} B/s against {udp_cap}");
    assert!(
        (udp_cap * 0.9..=udp_cap * 1.1).contains(&udp_down),
        "UDP down at {udp_down:.0} B/s against {udp_cap}"
    );
    assert!(dropped > 0.0, "no datagram counted as over the cap");
    agent.stop().await;
    relay.stop().await;
}
