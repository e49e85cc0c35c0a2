//! Runs the benchmark workloads through direct connections, Sallyport, rathole and bore,
//! interleaved over rounds, and writes a results table (Markdown) and the raw figures (JSON).
//! Use `scripts/bench.sh`, which builds everything in release mode and installs the peers.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use clap::Parser;
use sallyport_tests::bench::{
    median, percentile,
    systems::{self, Kind, Tools, Tunnel},
    workloads,
};

#[derive(Parser)]
struct Cli {
    /// One short round: keeps the harness from rotting; figures are indicative only.
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where rathole and bore are installed (bin/rathole, bin/bore).
    #[arg(long, default_value = "target/bench-tools")]
    tools: PathBuf,
    #[arg(long, default_value = "bench/results.md")]
    out: PathBuf,
    #[arg(long, default_value = "bench/results.json")]
    json: PathBuf,
    /// Run only these workloads (bulk, http, ttfb, idle, cps); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run only these systems (direct, sallyport, rathole, bore); all by default.
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
        println!("  {:<10} {name}: FAILED: {reason}", kind.name());
        *self.failures.entry((name.to_owned(), kind)).or_default() += 1;
    }

    fn add(&mut self, name: &str, kind: Kind, value: f64) {
        println!("  {:<10} {name}: {value:.3}", kind.name());
        self.samples.entry(name.to_owned()).or_default().entry(kind).or_default().push(value);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rounds = if cli.quick { 1 } else { cli.rounds };
    let secs = if cli.quick { 2 } else { 8 };
    let tools = Tools::new(cli.tools.clone())?;
    let (_iperf, iperf_target) = workloads::iperf3_server()?;
    let (_nginx, http_target) = workloads::nginx(tools.dir.path())?;
    let (_greeter, greeter) = workloads::greeter(&tools.labtool)?;
    let idle_sizes: &[usize] = if cli.quick { &[1000] } else { &[1000, 10_000] };
    let mut r = Results::default();

    for round in 0..rounds {
        let mut order: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| cli.systems.is_empty() || cli.systems.iter().any(|s| s == k.name()))
            .collect();
        let len = order.len().max(1);
        order.rotate_left(round % len);
        println!(
            "round {} of {rounds}, order {:?}",
            round + 1,
            order.iter().map(|k| k.name()).collect::<Vec<_>>()
        );

        let run = |w: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == w);
        for streams in [1u32, 4].into_iter().filter(|_| run("bulk")) {
            let (tput, cpu) = (
                format!("bulk, {streams} connection(s), Gbit/s"),
                format!("bulk, {streams} connection(s), tunnel CPU s per Gbit"),
            );
            r.metric(&tput, &format!("iperf3 -t {secs} -P {streams}"), true);
            r.metric(&cpu, &format!("/proc/PID/stat of both halves during iperf3 -P {streams}"), false);
            for &kind in &order {
                let tunnel = systems::start(kind, iperf_target, None, &tools)?;
                let idle = tunnel.rss_kib();
                let (gbps, cpu_per_gbit) = workloads::bulk(&tunnel, secs, streams)?;
                r.add(&tput, kind, gbps);
                if kind != Kind::Direct {
                    r.add(&cpu, kind, cpu_per_gbit);
                }
                if streams == 4 && kind != Kind::Direct {
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
            let command = format!(
                "wrk -t{} -c{connections} -d{secs}s --latency (nginx, 512 B file)",
                connections.min(2)
            );
            r.metric(&rps, &command, true);
            r.metric(&p50, &command, false);
            r.metric(&p99, &command, false);
            for &kind in &order {
                let tunnel = systems::start(kind, http_target, None, &tools)?;
                let (a, b, c) = workloads::http(&tunnel, secs, connections)?;
                r.add(&rps, kind, a);
                r.add(&p50, kind, b);
                r.add(&p99, kind, c);
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
                let tunnel = systems::start(kind, greeter, Some(DELAY), &tools)?;
                // One connection first, so a lazily built pool or path is warm for every system.
                workloads::ttfb(tunnel.entry, 1, 1).await?;
                let samples = workloads::ttfb(tunnel.entry, ttfb_count.max(burst), burst).await?;
                r.add(&name, kind, percentile(&samples, pct) / RTT_MS);
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
            r.metric(&open, &command, false);
            for name in [&ks, &kc, &ms, &mc] {
                r.metric(name, &command, false);
            }
            for &kind in &order {
                let tunnel: Tunnel = systems::start(kind, greeter, None, &tools)?;
                match workloads::idle_memory(&tunnel, n).await {
                    Ok((secs_open, per_server, per_client, mib_server, mib_client)) => {
                        r.add(&open, kind, secs_open);
                        if kind != Kind::Direct {
                            r.add(&ks, kind, per_server);
                            r.add(&kc, kind, per_client);
                            r.add(&ms, kind, mib_server);
                            r.add(&mc, kind, mib_client);
                        }
                    }
                    // Sallyport and direct must hold them; a peer that cannot is a finding, not a crash.
                    Err(e) if matches!(kind, Kind::Rathole | Kind::Bore) => {
                        r.fail(&open, kind, &format!("{e:#}"));
                    }
                    Err(e) => return Err(e.context(format!("{n} idle connections through {}", kind.name()))),
                }
            }
        }

        let name = "short connections per second (8 in parallel)";
        if !run("cps") {
            continue;
        }
        r.metric(name, &format!("connect, read first byte, close; 8 loops for {secs} s"), true);
        for &kind in &order {
            let tunnel = systems::start(kind, greeter, None, &tools)?;
            match workloads::connections_per_second(tunnel.entry, secs, 8).await {
                Ok(cps) => r.add(name, kind, cps),
                Err(e) if matches!(kind, Kind::Rathole | Kind::Bore) => {
                    r.fail(name, kind, &format!("{e:#}"));
                }
                Err(e) => return Err(e.context(format!("short connections through {}", kind.name()))),
            }
        }
    }

    let table = render(&r, rounds, cli.quick);
    println!("\n{table}");
    if let Some(dir) = cli.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cli.out, &table)?;
    let raw: BTreeMap<&String, BTreeMap<&str, &Vec<f64>>> =
        r.samples.iter().map(|(m, by)| (m, by.iter().map(|(k, v)| (k.name(), v)).collect())).collect();
    std::fs::write(&cli.json, serde_json::to_string_pretty(&raw)?)?;
    println!("written: {} and {}", cli.out.display(), cli.json.display());
    Ok(())
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

fn render(r: &Results, rounds: usize, quick: bool) -> String {
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
    let ratio = |r: &Results, metric: &str, peer: Kind, higher: bool| {
        let Some(by) = r.samples.get(metric) else { return "–".to_owned() };
        match (by.get(&Kind::Sallyport), by.get(&peer)) {
            (Some(s), Some(p)) if median(p) > 0.0 && median(s) > 0.0 => {
                let x = median(s) / median(p);
                format!("{x:.2}× {}", if (x >= 1.0) == higher { "✓" } else { "" })
            }
            _ => "–".to_owned(),
        }
    };
    let mut out = format!(
        "Machine: {}. {} round(s){}, medians (min–max), systems interleaved per round. \
         Ratio = Sallyport ÷ peer; ✓ marks Sallyport ahead.\n\n\
         | metric | direct | sallyport | rathole | bore | vs rathole | vs bore | command |\n|---|---|---|---|---|---|---|---|\n",
        machine(),
        rounds,
        if quick { " (quick mode: short runs, indicative only)" } else { "" }
    );
    for (metric, command, higher) in &r.order {
        if !r.samples.contains_key(metric) {
            continue;
        }
        out.push_str(&format!(
            "| {metric} | {} | {} | {} | {} | {} | {} | `{command}` |\n",
            cell(metric, Kind::Direct),
            cell(metric, Kind::Sallyport),
            cell(metric, Kind::Rathole),
            cell(metric, Kind::Bore),
            ratio(r, metric, Kind::Rathole, *higher),
            ratio(r, metric, Kind::Bore, *higher),
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
        let table = render(&r, 3, false);
        let row = table.lines().find(|l| l.starts_with(&format!("| {name} |"))).expect("the metric's row");
        let cells: Vec<&str> = row.split(" | ").collect();
        assert_eq!(cells[2], "11.000 (10.000–12.000)", "{row}");
        assert_eq!(cells[3], "8.000 (8.000–9.000); failed in 1 round(s)", "{row}");
        assert_eq!(cells[4], "failed", "{row}");
        assert_eq!(cells[5], "1.38× ✓", "{row}");
    }
}
