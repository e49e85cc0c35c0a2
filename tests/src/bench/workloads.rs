//! The workloads, each run against a [`Tunnel`]'s entry. Every function returns the figures it
//! measured and fails only when the workload itself did not work (a correctness check).

use std::{
    net::SocketAddr,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use super::systems::{Ground, Tunnel};
use crate::{process::Spawned, servers::free_port};

/// A target that greets every connection with one byte and then holds it open until EOF, in its
/// own process (so its sockets do not count against the load generator's descriptor limit).
pub fn greeter(ground: &Ground, labtool: &std::path::Path) -> anyhow::Result<(Spawned, SocketAddr)> {
    let addr = SocketAddr::new(ground.target_ip(), free_port());
    let mut command = ground.agent_side(labtool);
    command.args(["greeter", "--listen", &addr.to_string()]);
    let mut server = Spawned::start(command);
    server.wait_line("greeter listening", Duration::from_secs(10));
    Ok((server, addr))
}

/// Serves greetings on `listener` until it fails.
pub async fn serve_greetings(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            if stream.write_all(b"g").await.is_ok() {
                let mut sink = [0u8; 64];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            }
        });
    }
}

/// A connection not greeted within this long has stalled (e.g. lost in an overflowing backlog).
const STALL: Duration = Duration::from_secs(15);

/// Connects and waits for the greeting; returns the time to first byte.
async fn greeted(entry: SocketAddr) -> anyhow::Result<(TcpStream, Duration)> {
    let started = Instant::now();
    let attempt = async {
        let mut stream = TcpStream::connect(entry).await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.context("no greeting through the tunnel")?;
        anyhow::ensure!(&byte == b"g", "wrong greeting byte");
        Ok::<_, anyhow::Error>(stream)
    };
    let stream = tokio::time::timeout(STALL, attempt)
        .await
        .map_err(|_| anyhow::anyhow!("connection stalled for {STALL:?}"))??;
    Ok((stream, started.elapsed()))
}

/// An iperf3 server for the whole run.
pub fn iperf3_server(ground: &Ground) -> anyhow::Result<(Spawned, SocketAddr)> {
    let port = free_port();
    let mut command = ground.agent_side("iperf3");
    command.args(["-s", "-B", &ground.target_ip().to_string(), "-p", &port.to_string(), "--forceflush"]);
    let mut server = Spawned::start(command);
    server.wait_line("Server listening", Duration::from_secs(10));
    Ok((server, SocketAddr::new(ground.target_ip(), port)))
}

/// Bulk throughput: iperf3 for `seconds` with `streams` parallel connections, from the homelab
/// toward the target (`down` false) or from the target toward the homelab (`down` true, iperf3
/// -R). Returns (Gbit/s received, tunnel CPU seconds per Gbit transferred).
pub fn bulk(tunnel: &Tunnel, seconds: u64, streams: u32, down: bool) -> anyhow::Result<(f64, f64)> {
    let cpu_before = tunnel.cpu_seconds();
    let mut command = Command::new("iperf3");
    command.args(["-c", &tunnel.entry.ip().to_string(), "-p", &tunnel.entry.port().to_string()]).args([
        "-t",
        &seconds.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ]);
    if down {
        command.arg("-R");
    }
    let out = command.output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(error) = json.get("error") {
        bail!("iperf3 through {}: {error}", tunnel.kind.name());
    }
    let bps = json["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 bits_per_second")?;
    let bytes = json["end"]["sum_received"]["bytes"].as_f64().context("iperf3 bytes")?;
    anyhow::ensure!(bytes > 0.0, "iperf3 moved nothing through {}", tunnel.kind.name());
    let cpu = tunnel.cpu_seconds() - cpu_before;
    Ok((bps / 1e9, cpu / (bytes * 8.0 / 1e9)))
}

/// nginx serving a small file, for the whole run.
pub fn nginx(ground: &Ground, dir: &std::path::Path) -> anyhow::Result<(Spawned, SocketAddr)> {
    let port = free_port();
    let ip = ground.target_ip();
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("small.txt"), "x".repeat(512))?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nuser root;\npid {0}/nginx.pid;\nerror_log stderr;\nevents {{ worker_connections 4096; }}\n\
             http {{ access_log off; client_body_temp_path {0}; proxy_temp_path {0}; fastcgi_temp_path {0}; uwsgi_temp_path {0}; scgi_temp_path {0};\n\
             server {{ listen {ip}:{port}; root {1}; keepalive_requests 1000000; }} }}\n",
            dir.display(),
            www.display()
        ),
    )?;
    let mut command = ground.agent_side("nginx");
    command.args(["-c", &conf.display().to_string(), "-e", "stderr"]);
    let server = Spawned::start(command);
    let addr = SocketAddr::new(ip, port);
    wait_listening(ground, addr, "nginx")?;
    Ok((server, addr))
}

/// Waits until something accepts TCP connections on `addr` on the agent's side.
fn wait_listening(ground: &Ground, addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let probe =
        format!("import socket; socket.create_connection(('{}', {}), timeout=1)", addr.ip(), addr.port());
    while !ground.agent_side("python3").args(["-c", &probe]).output()?.status.success() {
        anyhow::ensure!(Instant::now() < deadline, "{what} did not start on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Redis on the agent's side, no persistence.
pub fn redis(ground: &Ground) -> anyhow::Result<(Spawned, SocketAddr)> {
    let addr = SocketAddr::new(ground.target_ip(), free_port());
    let mut command = ground.agent_side("redis-server");
    command.args(["--bind", &addr.ip().to_string(), "--port", &addr.port().to_string()]);
    command.args(["--save", "", "--appendonly", "no", "--protected-mode", "no"]);
    let mut server = Spawned::start(command);
    server.wait_line("Ready to accept connections", Duration::from_secs(30));
    Ok((server, addr))
}

/// PostgreSQL on the agent's side with trust authentication and pgbench's tables (scale 1), data
/// under `dir`.
pub fn postgres(ground: &Ground, dir: &std::path::Path) -> anyhow::Result<(Spawned, SocketAddr)> {
    let (bin, data) = crate::lab::postgres_data(dir, "0.0.0.0/0");
    let bin = std::path::PathBuf::from(bin);
    let addr = SocketAddr::new(ground.target_ip(), free_port());
    // setpriv runs the server in its own process (runuser would stay as its parent, and the
    // server would outlive the benchmark when runuser is killed).
    let mut command = ground.agent_side("setpriv");
    command.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"]);
    command.arg(bin.join("postgres")).arg("-D").arg(&data);
    command.args(["-p", &addr.port().to_string(), "-k"]).arg(&data);
    command.args([
        "-c",
        &format!("listen_addresses={}", addr.ip()),
        "-c",
        "fsync=off",
        "-c",
        "max_connections=200",
    ]);
    let mut server = Spawned::start(command);
    server.wait_line("ready to accept connections", Duration::from_secs(60));
    let pg =
        ["-h", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-U", "postgres"].map(str::to_owned);
    let out = ground.agent_side("pgbench").args(&pg).args(["-i", "-q", "postgres"]).output()?;
    anyhow::ensure!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    Ok((server, addr))
}

/// redis-benchmark GET with `clients` connections and `requests` requests through the tunnel.
/// Returns (requests/s, tunnel CPU microseconds per request).
pub fn redis_get(tunnel: &Tunnel, clients: u32, requests: u64) -> anyhow::Result<(f64, f64)> {
    let cpu_before = tunnel.cpu_seconds();
    let out = Command::new("redis-benchmark")
        .args(["-h", &tunnel.entry.ip().to_string(), "-p", &tunnel.entry.port().to_string()])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string(), "-t", "get", "-q"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    anyhow::ensure!(out.status.success(), "redis-benchmark through {}: {text}", tunnel.kind.name());
    let rps = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("GET:"))
        .find_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .with_context(|| format!("redis-benchmark GET rate in {text:?}"))?;
    let cpu = tunnel.cpu_seconds() - cpu_before;
    Ok((rps, cpu * 1e6 / requests as f64))
}

/// pgbench select-only with `clients` connections for `seconds` through the tunnel.
/// Returns (transactions/s, tunnel CPU microseconds per transaction).
pub fn pgbench_select(tunnel: &Tunnel, clients: u32, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let cpu_before = tunnel.cpu_seconds();
    let out = Command::new("pgbench")
        .args([
            "-h",
            &tunnel.entry.ip().to_string(),
            "-p",
            &tunnel.entry.port().to_string(),
            "-U",
            "postgres",
        ])
        .args(["-S", "-c", &clients.to_string(), "-j", "2", "-T", &seconds.to_string(), "postgres"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "pgbench through {}: {text}{}",
        tunnel.kind.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    let tps = text
        .lines()
        .filter_map(|l| l.strip_prefix("tps = "))
        .find_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .with_context(|| format!("pgbench tps in {text:?}"))?;
    let done = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse::<f64>().ok())
        .unwrap_or(tps * seconds as f64);
    let cpu = tunnel.cpu_seconds() - cpu_before;
    Ok((tps, cpu * 1e6 / done.max(1.0)))
}

/// HTTP through the tunnel: wrk with `connections` for `seconds`. Returns (requests/s, p50 ms,
/// p99 ms, tunnel CPU microseconds per request).
pub fn http(tunnel: &Tunnel, seconds: u64, connections: u32) -> anyhow::Result<(f64, f64, f64, f64)> {
    let threads = connections.min(2);
    let cpu_before = tunnel.cpu_seconds();
    let out = Command::new("wrk")
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
        ])
        .arg(format!("http://{}/small.txt", tunnel.entry))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.contains("Socket errors") || text.contains("Non-2xx") {
        bail!("wrk through {} saw errors:\n{text}", tunnel.kind.name());
    }
    let rps = field(&text, "Requests/sec:").context("wrk Requests/sec")?;
    let p50 = latency(&text, "50%").context("wrk p50")?;
    let p99 = latency(&text, "99%").context("wrk p99")?;
    let cpu = tunnel.cpu_seconds() - cpu_before;
    Ok((rps, p50, p99, cpu * 1e6 / (rps * seconds as f64).max(1.0)))
}

fn field(text: &str, key: &str) -> Option<f64> {
    text.lines().find_map(|l| l.trim().strip_prefix(key)).and_then(|v| v.trim().parse().ok())
}

/// A latency percentile line of `wrk --latency`, in milliseconds.
fn latency(text: &str, pct: &str) -> Option<f64> {
    let value = text.lines().map(str::trim).find_map(|l| l.strip_prefix(pct))?.trim();
    let (number, unit): (String, String) = value.chars().partition(|c| c.is_ascii_digit() || *c == '.');
    let n: f64 = number.parse().ok()?;
    Some(match unit.as_str() {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => return None,
    })
}

/// Time to first byte of new connections: `count` sequential ones, or `burst` at once.
/// Returns the samples in milliseconds.
pub async fn ttfb(entry: SocketAddr, count: usize, burst: usize) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    if burst <= 1 {
        for _ in 0..count {
            let (stream, took) = greeted(entry).await?;
            drop(stream);
            samples.push(took.as_secs_f64() * 1000.0);
        }
    } else {
        for _ in 0..count.div_ceil(burst) {
            let tasks: Vec<_> = (0..burst).map(|_| tokio::spawn(greeted(entry))).collect();
            for t in tasks {
                let (stream, took) = t.await??;
                drop(stream);
                samples.push(took.as_secs_f64() * 1000.0);
            }
        }
    }
    Ok(samples)
}

/// Idle connections: opens `n` at once through the tunnel (each greeted end to end) and holds them.
/// Returns (seconds to open all, KiB per connection on the server half, on the client half, and
/// the halves' resident MiB while holding them).
pub async fn idle_memory(tunnel: &Tunnel, n: usize) -> anyhow::Result<(f64, f64, f64, f64, f64)> {
    let before = tunnel.rss_kib();
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(2048));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let limit = limit.clone();
            let entry = tunnel.entry;
            tokio::spawn(async move {
                let _permit = limit.acquire_owned().await;
                greeted(entry).await
            })
        })
        .collect();
    let mut held = Vec::with_capacity(n);
    for t in tasks {
        held.push(t.await??.0);
    }
    let opened = started.elapsed().as_secs_f64();
    // Let the tunnel settle into its idle state before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = tunnel.rss_kib();
    drop(held);
    let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / n as f64;
    let mib = |k: u64| k as f64 / 1024.0;
    Ok((opened, per(before.0, after.0), per(before.1, after.1), mib(after.0), mib(after.1)))
}

/// Short connections: `parallel` loops of connect, first byte, close, for `seconds`.
/// Returns connections per second.
pub async fn connections_per_second(entry: SocketAddr, seconds: u64, parallel: usize) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..parallel)
        .map(|_| {
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let (stream, _) = greeted(entry).await?;
                    drop(stream);
                    done += 1;
                }
                Ok::<_, anyhow::Error>(done)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / seconds as f64)
}
