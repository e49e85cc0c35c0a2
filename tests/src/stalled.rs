//! Clients that stop reading, a target that never reads, and small exchanges timed beside them:
//! what a paused browser download or a hung service does to everyone else behind one agent.

use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};

use crate::transfer;

/// Which way a stalled connection's data is stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    /// The client asks the transfer server for a long download and never reads it.
    Down,
    /// The client writes without end to a target that never reads.
    Up,
}

/// Accepts connections and holds them without ever reading.
pub async fn serve_sink(listener: TcpListener) -> io::Result<()> {
    let mut held = Vec::new();
    loop {
        let (stream, _) = listener.accept().await?;
        held.push(stream);
    }
}

/// Opens `count` stalled connections to `to`, says `stalling` once each has data stuck, then
/// every second how many are still open and how many the tunnel reset (`stall check alive=N
/// cut=M`), until killed.
pub async fn stall(to: SocketAddr, count: usize, direction: Direction) -> io::Result<()> {
    let mut held = Vec::new();
    let mut writers = Vec::new();
    for i in 0..count {
        let mut stream = TcpStream::connect(to).await?;
        match direction {
            Direction::Down => {
                // The transfer protocol's preamble: a download of 64 GiB, then nothing is read.
                stream.write_all(&(64u64 << 30).to_be_bytes()).await?;
                stream.write_all(&(i as u64).to_be_bytes()).await?;
                held.push(stream);
            }
            Direction::Up => writers.push(tokio::spawn(async move {
                let chunk = vec![0x55u8; 64 * 1024];
                while stream.write_all(&chunk).await.is_ok() {}
            })),
        }
    }
    // Long enough for every stalled connection to fill what the path lets it fill.
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("stalling {count} {direction:?}");
    let mut reset = vec![false; held.len()];
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (stream, reset) in held.iter().zip(reset.iter_mut()) {
            // A reset leaves its error on the socket (read once, so remembered here).
            *reset |= !matches!(stream.take_error(), Ok(None));
        }
        let cut = reset.iter().filter(|r| **r).count() + writers.iter().filter(|w| w.is_finished()).count();
        eprintln!("stall check alive={} cut={cut}", count - cut);
    }
}

/// Runs `count` checked transfers of `size` bytes each way against `to`, one after another, each
/// on a new connection; prints each one's time and a summary line with the median and the maximum.
pub async fn exchanges(to: SocketAddr, count: u64, size: u64, timeout: Duration) {
    let mut times = Vec::new();
    let mut failed = 0;
    for i in 0..count {
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, transfer::run(to, size, size, i)).await;
        let took = started.elapsed();
        let word = match &result {
            Ok(Ok(_)) => "ok",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        if word != "ok" {
            failed += 1;
        }
        println!("exchange {i} result={word} us={}", took.as_micros());
        times.push(took);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    times.sort();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    let max = times.last().copied().unwrap_or_default();
    println!(
        "exchanges: count={count} failed={failed} median_us={} max_us={}",
        median.as_micros(),
        max.as_micros()
    );
}
