//! The tunnel across a real NAT (network namespaces, iptables MASQUERADE), through loss and delay,
//! through faults, with real clients. Needs root; skips with a message elsewhere, fails in CI.

use std::time::{Duration, Instant};

use sallyport_tests::{lab::TunnelSpec, lab_or_skip};

const TRANSFER_PORT: u16 = 9000;

fn transfer_spec() -> TunnelSpec {
    TunnelSpec::new(&[("transfer", TRANSFER_PORT, TRANSFER_PORT)])
}

#[test]
fn nat_keeps_the_homelab_out_and_the_tunnel_crosses_it() {
    let mut lab = lab_or_skip!();
    lab.assert_homelab_cannot_reach_windows();
    lab.start_transfer_server(TRANSFER_PORT);
    let tunnel = lab.start_tunnel(&transfer_spec());
    let report = lab.transfers(
        TRANSFER_PORT,
        &["--count", "4", "--min", "1000", "--max", "4000000"],
    );
    println!("{}", report.summary);
    assert_eq!(report.count("ok"), 4, "{:#?}", report.lines);
    // The relay saw the agent arrive from the router's address, not the windows host's.
    let line = lab
        .process(tunnel.relay)
        .wait_line("agent connected", Duration::from_secs(5));
    assert!(
        line.contains("remote=10.4.0.1:"),
        "agent should arrive through the NAT: {line}"
    );
}

#[test]
fn hundred_parallel_transfers_through_twenty_ms_and_two_percent_loss() {
    let mut lab = lab_or_skip!();
    lab.start_transfer_server(TRANSFER_PORT);
    lab.start_tunnel(
        &transfer_spec().impaired(&["--delay", "10ms", "--loss", "0.02", "--seed", "7"]),
    );
    let started = Instant::now();
    let report = lab.transfers(
        TRANSFER_PORT,
        &[
            "--count",
            "100",
            "--max",
            "33554432",
            "--seed",
            "11",
            "--timeout",
            "600s",
        ],
    );
    println!("{}", report.summary);
    println!(
        "100 transfers through 20 ms RTT and 2% loss: {:?}, {:.1} MB/s",
        started.elapsed(),
        report.field("bytes") / report.field("seconds") / 1e6
    );
    assert!(report.violations().is_empty(), "{:#?}", report.violations());
    assert_eq!(report.count("ok"), 100, "{:#?}", report.lines);
}
