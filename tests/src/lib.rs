//! Test support for Sallyport's end-to-end tests: a throwaway PKI, relay and agent running in this
//! process, target servers, and a transfer client that checks every byte by length and SHA-256.

pub mod bench;
pub mod docker;
pub mod impair;
pub mod lab;
pub mod ntlm;
pub mod pki;
pub mod process;
pub mod raw;
pub mod running;
pub mod servers;
pub mod stalled;
pub mod targets;
pub mod transfer;

pub use pki::TestPki;
pub use running::{RunningAgent, RunningRelay};

/// Logs to the test's output when `RUST_LOG` is set; harmless to call more than once.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// The sum of the samples in Prometheus text `text` whose line starts with `prefix` (a metric name
/// with some of its labels): 0 when there is none.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0
}
