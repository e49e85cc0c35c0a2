//! Bandwidth caps end to end on loopback: a TCP service capped at 2 MiB/s holds its cap within
//! 10 % over 10 s while an uncapped service of the same agent goes on at full speed beside it,
//! and an agent's cap holds across its services.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use sallyport_tests::{targets, transfer, RunningRelay, TestPki};

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
