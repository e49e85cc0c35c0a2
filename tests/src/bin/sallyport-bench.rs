//! Runs the benchmark workloads through direct connections, Sallyport, rathole (plain TCP and
//! noise) and bore, interleaved over rounds, on two grounds (one loopback; the network lab's double
//! NAT at Ethernet MTU), and writes a results table per ground (Markdown) and the raw figures (JSON).
//! Use `scripts/bench.sh`, which builds everything in release mode and installs the peers.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use clap::Parser;
use sallyport_tests::{
    bench::{
        median, percentile,
        systems::{self, Ground, Kind, Tools, Tunnel},
        workloads,
    },
    lab::Lab,
};

#[derive(Parser)]
struct Cli {
    /// One short round on the NAT ground: keeps the harness from rotting; figures are indicative.
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds each timed workload runs (2 in quick mode).
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// The grounds to run on (loopback, nat); both by default, nat only in quick mode.
    #[arg(long, value_delimiter = ',')]
    grounds: Vec<String>,
    /// Where rathole and bore are installed (bin/rathole, bin/bore).
    #[arg(long, default_value = "target/bench-tools")]
    tools: PathBuf,
    #[arg(long, default_value = "bench/results.md")]
    out: PathBuf,
    #[arg(long, default_value = "bench/results.json")]
    json: PathBuf,
    /// Run only these workloads (bulk, http, redis, pgbench, ttfb, idle, cps); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run only these systems (direct, sallyport, sallyport-2-threads, sallyport-tcp,
    /// sallyport-gated, sallyport-group, sallyport-group-1-up, rathole, rathole-noise, bore); all by
    /// default.
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
}

/// One-way delay of the path between the tunnel halves in the time-to-first-byte workload.
const DELAY: Duration = Duration::from_millis(10);
const RTT_MS: f64 = 20.0;

/// Samples per metric and system.
#[derive(Default)]
struct Results {
    samples: BTreeMap<String, BTreeMap<Kind, Vec<f64>>>,
    order: Vec<(String, String, bool)>,
    /// Rounds in which a peer failed a workload (the reason is printed when it happens).
    failures: BTreeMap<(String, Kind), usize>,
}

impl Results {
    /// Registers a metric: its name, the command behind it, and whether higher is better.
    fn metric(&mut self, name: &str, command: &str, higher_is_better: bool) {
        if !self.order.iter().any(|(n, _, _)| n == name) {
            self.order.push((name.to_owned(), command.to_owned(), higher_is_better));
        }
    }

    fn fail(&mut self, name: &str, kind: Kind, reason: &str) {
        println!("  {:<13} {name}: FAILED: {reason}", kind.name());
        *self.failures.entry((name.to_owned(), kind)).or_default() += 1;
    }

    fn add(&mut self, name: &str, kind: Kind, value: f64) {
        println!("  {:<13} {name}: {value:.3}", kind.name());
        self.samples.entry(name.to_owned()).or_default().entry(kind).or_default().push(value);
    }

    /// Records a workload's outcome: figures, a peer's failure, or the end of the run when
    /// Sallyport or direct fail (those must work).
    fn record(
        &mut self,
        names: &[&str],
        kind: Kind,
        outcome: anyhow::Result<Vec<f64>>,
    ) -> anyhow::Result<()> {
        match outcome {
            Ok(values) => {
                for (name, value) in names.iter().zip(values) {
                    if value.is_finite() {
                        self.add(name, kind, value);
                    }
                }
                Ok(())
            }
            Err(e) if kind.is_peer() => {
                self.fail(names[0], kind, &format!("{e:#}"));
                Ok(())
            }
            Err(e) => Err(e.context(format!("{} through {}", names[0], kind.name()))),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let grounds: Vec<String> = match (&cli.grounds[..], cli.quick) {
        ([], true) => vec!["nat".into()],
        ([], false) => vec!["nat".into(), "loopback".into()],
        (g, _) => g.to_vec(),
    };
    for g in &grounds {
        anyhow::ensure!(g == "nat" || g == "loopback", "--grounds: unknown ground {g:?} (loopback, nat)");
    }
    // The NAT ground's lab is built first and this process moves into its homelab namespace
    // before any runtime thread exists, so every socket it opens is on the homelab side.
    let lab = if grounds.iter().any(|g| g == "nat") {
        let lab =
            Lab::double_nat().map_err(|e| anyhow::anyhow!("the NAT ground needs the network lab: {e}"))?;
        // Tens of thousands of short connections a minute from the tunnel clients to the targets
        // leave as many local ports in TIME_WAIT on the WSL2 side; without reuse (Linux reuses them
        // only toward loopback by default) the port range runs dry within a round.
        if let Some(wsl) = &lab.wsl {
            wsl.run("sysctl", &["-q", "-w", "net.ipv4.tcp_tw_reuse=1"]);
        }
        lab.home.enter().map_err(|e| anyhow::anyhow!("entering the lab's homelab namespace: {e}"))?;
        Some(lab)
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(cli, grounds, lab))
}

async fn run(cli: Cli, grounds: Vec<String>, mut lab: Option<Lab>) -> anyhow::Result<()> {
    let rounds = if cli.quick { 1 } else { cli.rounds };
    let secs = if cli.quick { 2 } else { cli.seconds };
    let tools = Tools::new(cli.tools.clone())?;
    let mut tables = String::new();
    let mut raw = BTreeMap::new();
    for name in &grounds {
        let ground = match name.as_str() {
            "nat" => Ground::nat(lab.take().expect("the lab was built")),
            _ => Ground::Loopback,
        };
        println!("== ground: {} ==", ground.name());
        let r = run_ground(&cli, &ground, &tools, rounds, secs).await?;
        tables.push_str(&render(&r, ground.name(), rounds, cli.quick));
        tables.push('\n');
        let samples: BTreeMap<String, BTreeMap<&str, Vec<f64>>> = r
            .samples
            .iter()
            .map(|(m, by)| (m.clone(), by.iter().map(|(k, v)| (k.name(), v.clone())).collect()))
            .collect();
        raw.insert(ground.name(), samples);
    }
    println!("\n{tables}");
    if let Some(dir) = cli.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cli.out, &tables)?;
    std::fs::write(&cli.json, serde_json::to_string_pretty(&raw)?)?;
    println!("written: {} and {}", cli.out.display(), cli.json.display());
    Ok(())
}

async fn run_ground(
    cli: &Cli,
    ground: &Ground,
    tools: &Tools,
    rounds: usize,
    secs: u64,
) -> anyhow::Result<Results> {
    let dir = tempfile::tempdir()?;
    let run = |w: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == w);
    let (_iperf, iperf_target) = workloads::iperf3_server(ground)?;
    let (_nginx, http_target) = workloads::nginx(ground, dir.path())?;
    let (_greeter, greeter) = workloads::greeter(ground, &tools.labtool)?;
    let redis = if run("redis") { Some(workloads::redis(ground)?) } else { None };
    let postgres = if run("pgbench") { Some(workloads::postgres(ground, dir.path())?) } else { None };
    let idle_sizes: &[usize] = if cli.quick { &[1000] } else { &[1000, 10_000] };
    let mut r = Results::default();

    for round in 0..rounds {
        // The quick round keeps the harness working; the two-thread comparison is for full runs.
        let mut order: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| match &cli.systems[..] {
                [] => {
                    !(cli.quick
                        && matches!(
                            *k,
                            Kind::SallyportTwoThreads
                                | Kind::SallyportGated
                                | Kind::SallyportGroup
                                | Kind::SallyportGroupOneUp
                        ))
                }
                named => named.iter().any(|s| s == k.name()),
            })
            .collect();
        let len = order.len().max(1);
        order.rotate_left(round % len);
        println!(
            "round {} of {rounds} on {}, order {:?}",
            round + 1,
            ground.name(),
            order.iter().map(|k| k.name()).collect::<Vec<_>>()
        );

        for (streams, down) in
            [(1u32, false), (4, false), (1, true), (4, true)].into_iter().filter(|_| run("bulk"))
        {
            let way = if down { "down" } else { "up" };
            let (tput, cpu) = (
                format!("bulk {way}, {streams} connection(s), Gbit/s"),
                format!("bulk {way}, {streams} connection(s), tunnel CPU s per Gbit"),
            );
            let flag = if down { " -R" } else { "" };
            r.metric(&tput, &format!("iperf3 -t {secs} -P {streams}{flag}"), true);
            r.metric(&cpu, &format!("/proc/PID/stat of both halves during iperf3 -P {streams}{flag}"), false);
            for &kind in &order {
                let tunnel = systems::start(kind, ground, iperf_target, None, tools)?;
                let idle = tunnel.rss_kib();
                let outcome = workloads::bulk(&tunnel, secs, streams, down)
                    .map(|(gbps, cpu)| vec![gbps, if kind == Kind::Direct { f64::NAN } else { cpu }]);
                r.record(&[&tput, &cpu], kind, outcome)?;
                if streams == 4 && !down && kind != Kind::Direct {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let after = tunnel.rss_kib();
                    let name = "RSS after bulk / RSS idle (worse half)";
                    r.metric(name, "VmRSS 1 s after iperf3 -P 4 ended, over VmRSS at start", false);
                    let ratio =
                        (after.0 as f64 / idle.0.max(1) as f64).max(after.1 as f64 / idle.1.max(1) as f64);
                    r.add(name, kind, ratio);
                }
            }
        }

        for connections in [50u32, 1].into_iter().filter(|_| run("http")) {
            let rps = format!("HTTP wrk -c{connections}, requests/s");
            let p50 = format!("HTTP wrk -c{connections}, p50 ms");
            let p99 = format!("HTTP wrk -c{connections}, p99 ms");
            let cpu = format!("HTTP wrk -c{connections}, tunnel CPU µs per request");
            let command = format!(
                "wrk -t{} -c{connections} -d{secs}s --latency (nginx, 512 B file)",
                connections.min(2)
            );
            for name in [&rps, &p50, &p99, &cpu] {
                r.metric(name, &command, name == &rps);
            }
            for &kind in &order {
                let tunnel = systems::start(kind, ground, http_target, None, tools)?;
                let outcome = workloads::http(&tunnel, secs, connections)
                    .map(|(a, b, c, d)| vec![a, b, c, if kind == Kind::Direct { f64::NAN } else { d }]);
                r.record(&[&rps, &p50, &p99, &cpu], kind, outcome)?;
            }
        }

        if let Some((_, target)) = &redis {
            let (rps, cpu) = (
                "redis-benchmark GET -c50, requests/s",
                "redis-benchmark GET -c50, tunnel CPU µs per request",
            );
            let requests: u64 = if cli.quick { 20_000 } else { 100_000 };
            let command = format!("redis-benchmark -c 50 -n {requests} -t get");
            r.metric(rps, &command, true);
            r.metric(cpu, &command, false);
            for &kind in &order {
                let tunnel = systems::start(kind, ground, *target, None, tools)?;
                let outcome = workloads::redis_get(&tunnel, 50, requests)
                    .map(|(a, b)| vec![a, if kind == Kind::Direct { f64::NAN } else { b }]);
                r.record(&[rps, cpu], kind, outcome)?;
            }
        }

        if let Some((_, target)) = &postgres {
            let (tps, cpu) = (
                "pgbench select-only -c8, transactions/s",
                "pgbench select-only -c8, tunnel CPU µs per transaction",
            );
            let command = format!("pgbench -S -c 8 -j 2 -T {secs}");
            r.metric(tps, &command, true);
            r.metric(cpu, &command, false);
            for &kind in &order {
                let tunnel = systems::start(kind, ground, *target, None, tools)?;
                let outcome = workloads::pgbench_select(&tunnel, 8, secs)
                    .map(|(a, b)| vec![a, if kind == Kind::Direct { f64::NAN } else { b }]);
                r.record(&[tps, cpu], kind, outcome)?;
            }
        }

        let ttfb_count = if cli.quick { 16 } else { 64 };
        for (burst, pct) in [(1usize, 50.0), (16, 90.0), (64, 90.0)].into_iter().filter(|_| run("ttfb")) {
            let name = if burst == 1 {
                "time to first byte, sequential, p50, in RTTs (20 ms path)".to_owned()
            } else {
                format!("time to first byte, bursts of {burst}, p90, in RTTs (20 ms path)")
            };
            r.metric(
                &name,
                &format!("{} new connections to a greeting server, {burst} at a time", ttfb_count.max(burst)),
                false,
            );
            for &kind in &order {
                let tunnel = systems::start(kind, ground, greeter, Some(DELAY), tools)?;
                // One connection first, so a lazily built pool or path is warm for every system.
                let outcome = async {
                    workloads::ttfb(tunnel.entry, 1, 1).await?;
                    let samples = workloads::ttfb(tunnel.entry, ttfb_count.max(burst), burst).await?;
                    Ok(vec![percentile(&samples, pct) / RTT_MS])
                }
                .await;
                r.record(&[&name], kind, outcome)?;
            }
        }

        for &n in idle_sizes.iter().filter(|_| run("idle")) {
            let open = format!("{n} idle connections: seconds to open");
            let (ks, kc) = (
                format!("{n} idle connections: KiB per connection, server half"),
                format!("{n} idle connections: KiB per connection, client half"),
            );
            let (ms, mc) = (
                format!("{n} idle connections: RSS MiB, server half"),
                format!("{n} idle connections: RSS MiB, client half"),
            );
            let command = format!("{n} connections opened at once, greeted end to end, held; VmRSS");
            for name in [&open, &ks, &kc, &ms, &mc] {
                r.metric(name, &command, false);
            }
            for &kind in &order {
                let tunnel: Tunnel = systems::start(kind, ground, greeter, None, tools)?;
                let outcome = workloads::idle_memory(&tunnel, n).await.map(|(a, b, c, d, e)| {
                    if kind == Kind::Direct {
                        vec![a]
                    } else {
                        vec![a, b, c, d, e]
                    }
                });
                r.record(&[&open, &ks, &kc, &ms, &mc], kind, outcome)?;
            }
        }

        let name = "short connections per second (8 in parallel)";
        if !run("cps") {
            continue;
        }
        r.metric(name, &format!("connect, read first byte, close; 8 loops for {secs} s"), true);
        for &kind in &order {
            let tunnel = systems::start(kind, ground, greeter, None, tools)?;
            let outcome = workloads::connections_per_second(tunnel.entry, secs, 8).await.map(|v| vec![v]);
            r.record(&[name], kind, outcome)?;
        }
    }

    // How each system's bulk grows with parallel connections, from the medians.
    for way in ["up", "down"] {
        let (one, four) =
            (format!("bulk {way}, 1 connection(s), Gbit/s"), format!("bulk {way}, 4 connection(s), Gbit/s"));
        let name = format!("bulk {way}, 4 connections ÷ 1 connection");
        let scaled: Vec<(Kind, f64)> = Kind::ALL
            .into_iter()
            .filter_map(|k| {
                let a = median(r.samples.get(&one)?.get(&k)?);
                let b = median(r.samples.get(&four)?.get(&k)?);
                (a > 0.0).then_some((k, b / a))
            })
            .collect();
        if !scaled.is_empty() {
            r.metric(&name, "median of the 4-connection figure over median of the 1-connection figure", true);
            for (k, v) in scaled {
                r.add(&name, k, v);
            }
        }
    }
    Ok(r)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

fn render(r: &Results, ground: &str, rounds: usize, quick: bool) -> String {
    // A system that failed some rounds shows the figures of the others and how often it failed;
    // its ratio comes from the rounds it completed.
    let cell = |metric: &str, kind: Kind| {
        let failed = r.failures.get(&(metric.to_owned(), kind)).copied().unwrap_or(0);
        let figures = match r.samples.get(metric).and_then(|by| by.get(&kind)) {
            Some(v) if v.len() > 1 => {
                let (lo, hi) = (percentile(v, 0.0), percentile(v, 100.0));
                format!("{:.3} ({lo:.3}–{hi:.3})", median(v))
            }
            Some(v) if !v.is_empty() => format!("{:.3}", median(v)),
            _ if failed > 0 => return "failed".to_owned(),
            _ => return "–".to_owned(),
        };
        match failed {
            0 => figures,
            n => format!("{figures}; failed in {n} round(s)"),
        }
    };
    let ratio = |r: &Results, metric: &str, ours: Kind, peer: Kind, higher: bool| {
        let Some(by) = r.samples.get(metric) else { return "–".to_owned() };
        match (by.get(&ours), by.get(&peer)) {
            (Some(s), Some(p)) if median(p) > 0.0 && median(s) > 0.0 => {
                let x = median(s) / median(p);
                format!("{x:.2}× {}", if (x >= 1.0) == higher { "✓" } else { "" })
            }
            _ => "–".to_owned(),
        }
    };
    let ground_text = match ground {
        "NAT" => {
            "across the network lab's double NAT at Ethernet MTU (1,500 bytes): tunnel servers and \
                  clients on the homelab side, tunnel clients and targets behind two masquerading routers; \
                  direct = port forwarding through both NATs"
        }
        _ => "on one loopback interface",
    };
    let mut out = format!(
        "### Ground: {ground}\n\nMachine: {}. {} round(s){}, medians (min–max), systems interleaved per round, {ground_text}. \
         Ratio = Sallyport ÷ peer; ✓ marks Sallyport ahead.\n\n\
         `sallyport` runs the defaults; `sallyport, 2 threads` runs the relay on two threads and the \
         agent with a lane beside its tunnel (`relay.threads = 2`, `agent.lanes = 2`).\n\n\
         `sallyport over TCP` runs the defaults with `agent.transport = \"tcp\"` (TLS over TCP, HTTP/2 streams: \
         where UDP does not get out); its ratio is to plain rathole, the other TCP tunnel.\n\n\
         `sallyport, rules + log` runs the defaults with a 100-rule access list whose last rule admits \
         the client and the access log written to a file; its ratio is to `sallyport`.\n\n\
         `sallyport, group of 2` runs the service on a round-robin group of two agents (two agent \
         processes with the defaults); `group, 1 up` is that group with only its first agent running \
         (the relay's group work on every connection, no second agent process on the machine); their \
         ratios are to `sallyport`.\n\n\
         | metric | direct | sallyport | sallyport, 2 threads | sallyport over TCP | rathole | rathole noise | bore | vs rathole | vs rathole noise | vs bore | TCP vs rathole | sallyport, rules + log | rules + log vs sallyport | sallyport, group of 2 | group vs sallyport | group, 1 up | 1 up vs sallyport | command |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        machine(),
        rounds,
        match (quick, cfg!(debug_assertions)) {
            (_, true) => " (dev build: Sallyport's own code unoptimized, so its figures say nothing of its speed; \
                          the run checks that every workload works through every system)",
            (true, false) => " (quick mode: short runs, indicative only)",
            (false, false) => "",
        }
    );
    for (metric, command, higher) in &r.order {
        if !r.samples.contains_key(metric) && !r.failures.keys().any(|(m, _)| m == metric) {
            continue;
        }
        out.push_str(&format!(
            "| {metric} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | `{command}` |\n",
            cell(metric, Kind::Direct),
            cell(metric, Kind::Sallyport),
            cell(metric, Kind::SallyportTwoThreads),
            cell(metric, Kind::SallyportTcp),
            cell(metric, Kind::Rathole),
            cell(metric, Kind::RatholeNoise),
            cell(metric, Kind::Bore),
            ratio(r, metric, Kind::Sallyport, Kind::Rathole, *higher),
            ratio(r, metric, Kind::Sallyport, Kind::RatholeNoise, *higher),
            ratio(r, metric, Kind::Sallyport, Kind::Bore, *higher),
            ratio(r, metric, Kind::SallyportTcp, Kind::Rathole, *higher),
            cell(metric, Kind::SallyportGated),
            ratio(r, metric, Kind::SallyportGated, Kind::Sallyport, *higher),
            cell(metric, Kind::SallyportGroup),
            ratio(r, metric, Kind::SallyportGroup, Kind::Sallyport, *higher),
            cell(metric, Kind::SallyportGroupOneUp),
            ratio(r, metric, Kind::SallyportGroupOneUp, Kind::Sallyport, *higher),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_that_failed_some_rounds_keeps_the_figures_of_the_others() {
        let mut r = Results::default();
        let name = "short connections per second (8 in parallel)";
        r.metric(name, "connect, read first byte, close", true);
        for v in [10.0, 11.0, 12.0] {
            r.add(name, Kind::Sallyport, v);
        }
        r.add(name, Kind::Rathole, 8.0);
        r.add(name, Kind::Rathole, 9.0);
        r.fail(name, Kind::Rathole, "Connection refused");
        r.fail(name, Kind::Bore, "early eof");
        r.add(name, Kind::SallyportTcp, 9.5);
        let table = render(&r, "loopback", 3, false);
        let row = table.lines().find(|l| l.starts_with(&format!("| {name} |"))).expect("the metric's row");
        let cells: Vec<&str> = row.split(" | ").collect();
        // metric, direct, sallyport, sallyport 2 threads, sallyport over TCP, rathole, rathole
        // noise, bore, ratios (rathole, noise, bore, TCP vs rathole)...
        assert_eq!(cells[2], "11.000 (10.000–12.000)", "{row}");
        assert_eq!(cells[3], "–", "{row}");
        assert_eq!(cells[4], "9.500", "{row}");
        assert_eq!(cells[5], "8.000 (8.000–9.000); failed in 1 round(s)", "{row}");
        assert_eq!(cells[7], "failed", "{row}");
        assert_eq!(cells[8], "1.38× ✓", "{row}");
        assert_eq!(cells[11], "1.19× ✓", "{row}");
    }
}
