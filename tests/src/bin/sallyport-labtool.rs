//! Helpers the network lab runs inside its namespaces: the UDP impairment proxy, the transfer
//! server, and a batch of checked transfers.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use sallyport_tests::{
    impair::{self, Impairment},
    stalled,
    transfer::{self, Outcome},
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Tool,
}

#[derive(Subcommand)]
enum Tool {
    /// UDP proxy from --listen to --upstream with the same impairment each way.
    Impair {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
        /// One-way delay, e.g. "10ms".
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        delay: Duration,
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        jitter: Duration,
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        #[arg(long, default_value_t = 0.0)]
        reorder: f64,
        #[arg(long, default_value_t = 0.0)]
        duplicate: f64,
        /// Bits per second each way; 0 for unlimited.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// TCP proxy from --listen to --upstream delaying each direction by --delay.
    TcpDelay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Duration,
    },
    /// Reads each connection's PROXY protocol v2 header and answers with the client it names
    /// (`source A.B.C.D:PORT`, or `source unknown`), then closes.
    ProxySource {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Greets every connection with one byte, then holds it open until EOF.
    Greeter {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Touches --mib MiB of memory, then idles (for memory-limit tests in containers).
    Hog {
        #[arg(long)]
        mib: usize,
    },
    /// The transfer protocol's server on --listen.
    TransferServer {
        #[arg(long)]
        listen: SocketAddr,
        /// First write this many bytes of log lines to stderr (for tests of large container logs).
        #[arg(long, default_value_t = 0)]
        chatter: usize,
    },
    /// --count transfers at once against --to, sizes 0..=--max each way; one line per transfer.
    Transfers {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 32 * 1024 * 1024)]
        max: u64,
        #[arg(long, default_value_t = 0)]
        min: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// A transfer still running after this is a hang.
        #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Holds every connection on --listen open without ever reading it.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Opens --count connections to --to whose data is stuck (--direction down: a download never
    /// read; up: an upload to a target that never reads), and holds them.
    Stall {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, value_enum)]
        direction: stalled::Direction,
    },
    /// --count transfers of --size bytes each way against --to, one after another, each timed.
    Exchanges {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 30)]
        count: u64,
        #[arg(long, default_value_t = 20_000)]
        size: u64,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Opens --rate new connections a second against --to for --duration, each a checked
    /// transfer of --size bytes each way; one line per connection with when it started.
    Rate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 50)]
        rate: u32,
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 4096)]
        size: u64,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Tool::Impair { listen, upstream, delay, jitter, loss, reorder, duplicate, rate, seed } => {
            let imp = Impairment {
                delay,
                jitter,
                loss,
                reorder,
                duplicate,
                rate_bps: (rate > 0).then_some(rate),
                seed,
            };
            let socket = tokio::net::UdpSocket::bind(listen).await?;
            eprintln!("impair listening on {listen} -> {upstream}: {imp:?}");
            let stats = Arc::new(impair::Stats::default());
            let down = Impairment { seed: seed.wrapping_add(1), ..imp.clone() };
            tokio::select! {
                r = impair::run(socket, upstream, imp, down, stats.clone()) => r?,
                () = sallyport_runtime::shutdown_signal() => {}
            }
            eprintln!("impair stats: {}", stats.summary());
        }
        Tool::Hog { mib } => {
            let mut held = Vec::with_capacity(mib);
            for i in 0..mib {
                held.push(vec![i as u8 | 1; 1 << 20]);
            }
            eprintln!("holding {} MiB", held.len());
            std::future::pending::<()>().await;
        }
        Tool::TcpDelay { listen, upstream, delay } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            eprintln!("tcp-delay listening on {listen} -> {upstream}, {delay:?} each way");
            impair::tcp_delay(listener, upstream, delay).await?;
        }
        Tool::ProxySource { listen } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            eprintln!("proxy source listening on {listen}");
            loop {
                let (stream, _) = listener.accept().await?;
                tokio::spawn(answer_proxy_source(stream));
            }
        }
        Tool::Greeter { listen } => {
            // A deep accept queue: a burst of thousands of connects must not overflow it.
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(listen)?;
            let listener = socket.listen(4096)?;
            eprintln!("greeter listening on {listen}");
            sallyport_tests::bench::workloads::serve_greetings(listener).await;
        }
        Tool::TransferServer { listen, chatter } => {
            let line = format!("chatter {}\n", "x".repeat(191));
            let mut stderr = std::io::stderr().lock();
            for _ in 0..chatter.div_ceil(line.len()) {
                std::io::Write::write_all(&mut stderr, line.as_bytes())?;
            }
            drop(stderr);
            let listener = tokio::net::TcpListener::bind(listen).await?;
            eprintln!("transfer server listening on {listen}");
            loop {
                let (stream, _) = listener.accept().await?;
                tokio::spawn(transfer::serve(stream));
            }
        }
        Tool::Transfers { to, count, max, min, seed, timeout } => {
            transfers(to, count, min, max, seed, timeout).await
        }
        Tool::Sink { listen } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            eprintln!("sink listening on {listen}");
            stalled::serve_sink(listener).await?;
        }
        Tool::Stall { to, count, direction } => stalled::stall(to, count, direction).await?,
        Tool::Exchanges { to, count, size, timeout } => stalled::exchanges(to, count, size, timeout).await,
        Tool::Rate { to, rate, duration, size, timeout } => {
            connection_rate(to, rate, duration, size, timeout).await
        }
    }
    Ok(())
}

/// New connections at a steady rate; each line says when it started (ms after the first) and how
/// it ended, so a test can tell failures before and after an event.
async fn connection_rate(to: SocketAddr, rate: u32, duration: Duration, size: u64, timeout: Duration) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    let mut i = 0u64;
    eprintln!("rate started");
    while started.elapsed() < duration {
        tick.tick().await;
        let at = started.elapsed();
        tasks.push(tokio::spawn(async move {
            let result = match tokio::time::timeout(timeout, transfer::run(to, size, size, i)).await {
                Ok(result) => result,
                Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out")),
            };
            (i, at, Outcome::of(&result), started.elapsed() - at)
        }));
        i += 1;
    }
    let mut counts = std::collections::BTreeMap::new();
    for task in tasks {
        let Ok((i, at, outcome, took)) = task.await else { continue };
        println!("conn {i} at_ms={} result={} ms={}", at.as_millis(), outcome.word(), took.as_millis());
        *counts.entry(outcome.word()).or_insert(0u64) += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("rate: opened={i} {} seconds={:.2}", summary.join(" "), started.elapsed().as_secs_f64());
}

/// Sizes from `min` to `max`: the first two transfers take the extremes, the rest are spread
/// log-uniformly, so small and large transfers both occur.
fn size(rng: &mut fastrand::Rng, i: u64, min: u64, max: u64) -> u64 {
    match i {
        0 => min,
        1 => max,
        _ => {
            let (lo, hi) = ((min.max(1)) as f64, max.max(1) as f64);
            let v = (lo.ln() + rng.f64() * (hi.ln() - lo.ln())).exp() as u64;
            v.clamp(min, max)
        }
    }
}

async fn transfers(to: SocketAddr, count: u64, min: u64, max: u64, seed: u64, timeout: Duration) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let progress = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..count {
        let (up, down) = (size(&mut rng, i, min, max), size(&mut rng, (i + 1) % count.max(2), min, max));
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let result =
                match tokio::time::timeout(timeout, transfer::run_counted(to, up, down, seed ^ i, &progress))
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "transfer timed out")),
                };
            (i, up, down, Outcome::of(&result), t0.elapsed())
        }));
    }
    eprintln!("started {count} transfers");
    // Tell a watching test when bytes are flowing, so it can strike mid-transfer.
    let watcher = {
        let progress = progress.clone();
        tokio::spawn(async move {
            while progress.load(Ordering::Relaxed) < 1024 * 1024 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            eprintln!("flowing");
        })
    };
    let mut counts = std::collections::BTreeMap::new();
    let mut bytes = 0u64;
    for task in tasks {
        let Ok((i, up, down, outcome, took)) = task.await else {
            continue;
        };
        if outcome == Outcome::Ok {
            bytes += up + down;
        }
        let detail = match &outcome {
            Outcome::ShortEof(m) | Outcome::Mismatch(m) | Outcome::Error(m) => {
                format!(" detail={m:?}")
            }
            _ => String::new(),
        };
        println!(
            "transfer {i} up={up} down={down} result={} ms={}{detail}",
            outcome.word(),
            took.as_millis()
        );
        *counts.entry(outcome.word()).or_insert(0u64) += 1;
    }
    watcher.abort();
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "transfers: total={count} {} bytes={bytes} seconds={:.2}",
        summary.join(" "),
        started.elapsed().as_secs_f64()
    );
}

/// Answers with the source address of the connection's PROXY protocol v2 header (TCP over IPv4).
async fn answer_proxy_source(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = [0u8; 16];
    if stream.read_exact(&mut head).await.is_err() {
        return;
    }
    let mut addresses = vec![0u8; usize::from(u16::from_be_bytes([head[14], head[15]]))];
    if stream.read_exact(&mut addresses).await.is_err() {
        return;
    }
    let answer = match (head[12], head[13], addresses.as_slice()) {
        (0x21, 0x11, [a, b, c, d, _, _, _, _, p0, p1, ..]) => {
            format!("source {a}.{b}.{c}.{d}:{}\n", u16::from_be_bytes([*p0, *p1]))
        }
        _ => "source unknown\n".to_owned(),
    };
    let _ = stream.write_all(answer.as_bytes()).await;
}
