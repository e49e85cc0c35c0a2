//! `wsl://DISTRO:PORT` targets: ports inside a WSL2 distribution, seen from the agent on Windows.
//!
//! TCP first tries `127.0.0.1:PORT`, which WSL2's localhost forwarding maps to listeners inside the
//! VM. When that is refused (forwarding off, or a listener bound to the VM address only), and for
//! UDP, the agent uses the VM's own address. That address changes on every WSL restart, so it is
//! looked up when first needed, kept, and looked up again when a dial to it fails. Sources, in
//! order:
//! 1. the helper file `<agent config dir>/wsl/DISTRO.addr`, written by
//!    `deploy/windows/sallyport-wsl-helper.sh` inside the distribution at every WSL start (the way
//!    for the agent running as a service, which cannot see a user's distributions);
//! 2. `wsl.exe -d DISTRO -- hostname -I`, which works when the agent runs as the user owning the
//!    distribution (and starts the distribution if it is stopped).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use tokio::net::TcpStream;
use tracing::{debug, info};

/// How long a `wsl.exe` lookup may take (it may boot the distribution).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(20);

/// The VM address in `hostname -I` output (which lists no loopback address): the first IPv4
/// address, else the first IPv6 one that is not link-local. `wsl.exe` writes its own messages as UTF-16LE, the command's as UTF-8:
/// both are read.
pub(crate) fn parse_addresses(output: &[u8]) -> Option<IpAddr> {
    let text = if output.len() >= 2 && output.iter().skip(1).step_by(2).all(|&b| b == 0) {
        let units: Vec<u16> = output.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        String::from_utf16_lossy(&units)
    } else {
        String::from_utf8_lossy(output).into_owned()
    };
    let addrs: Vec<IpAddr> =
        text.split_whitespace().filter_map(|w| w.trim_start_matches('\u{feff}').parse().ok()).collect();
    addrs
        .iter()
        .find(|a| matches!(a, IpAddr::V4(v4) if !v4.is_unspecified()))
        .or_else(|| {
            addrs.iter().find(|a| {
                matches!(a, IpAddr::V6(v6) if !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80)
            })
        })
        .copied()
}

/// Why a distribution's address could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WslError {
    /// The helper file is missing or unreadable.
    #[error("{}: {source}", path.display())]
    Helper { path: PathBuf, source: io::Error },
    #[error("cannot run wsl.exe: {0}")]
    Spawn(io::Error),
    #[error("wsl.exe -d {distro} failed ({status}): {why}")]
    Failed { distro: String, status: std::process::ExitStatus, why: String },
    #[error("lookup failed: {0}")]
    Lookup(#[from] tokio::task::JoinError),
    #[error("lookup took longer than {LOOKUP_TIMEOUT:?}")]
    Slow,
    /// Every source failed; why each did.
    #[error("no address for WSL distribution {distro:?}: {reasons}")]
    NoAddress { distro: String, reasons: String },
}

/// Where a distribution's address can be read.
pub(crate) trait Source: Send + Sync + std::fmt::Debug {
    /// The raw output naming the distribution's addresses.
    fn lookup(&self, distro: &str) -> Result<Vec<u8>, WslError>;
}

/// The file the in-distribution helper keeps up to date.
#[derive(Debug)]
pub(crate) struct HelperFile(pub(crate) PathBuf);

impl Source for HelperFile {
    fn lookup(&self, distro: &str) -> Result<Vec<u8>, WslError> {
        let path = self.0.join(format!("{distro}.addr"));
        std::fs::read(&path).map_err(|source| WslError::Helper { path, source })
    }
}

/// `wsl.exe -d DISTRO -- hostname -I`.
#[derive(Debug)]
pub(crate) struct WslExe;

impl Source for WslExe {
    fn lookup(&self, distro: &str) -> Result<Vec<u8>, WslError> {
        let out = std::process::Command::new("wsl.exe")
            .args(["-d", distro, "--", "hostname", "-I"])
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(WslError::Spawn)?;
        if !out.status.success() {
            let why = parse_message(&out.stderr).or_else(|| parse_message(&out.stdout)).unwrap_or_default();
            return Err(WslError::Failed { distro: distro.to_owned(), status: out.status, why });
        }
        Ok(out.stdout)
    }
}

/// A readable message from `wsl.exe` output in either encoding.
fn parse_message(bytes: &[u8]) -> Option<String> {
    let text = if bytes.len() >= 2 && bytes.iter().skip(1).step_by(2).all(|&b| b == 0) {
        let units: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        String::from_utf16_lossy(&units)
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    };
    let text = text.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// The address of one distribution's VM, looked up when needed and again after a failure.
#[derive(Debug)]
pub(crate) struct Resolver {
    distro: String,
    sources: Vec<std::sync::Arc<dyn Source>>,
    cached: Mutex<Option<IpAddr>>,
}

impl Resolver {
    /// The resolver the agent uses: the helper file under `config_dir`, then `wsl.exe`.
    pub(crate) fn new(distro: &str, config_dir: &Path) -> Self {
        Self::with_sources(
            distro,
            vec![std::sync::Arc::new(HelperFile(config_dir.join("wsl"))), std::sync::Arc::new(WslExe)],
        )
    }

    pub(crate) fn with_sources(distro: &str, sources: Vec<std::sync::Arc<dyn Source>>) -> Self {
        Self { distro: distro.to_owned(), sources, cached: Mutex::new(None) }
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, Option<IpAddr>> {
        sallyport_runtime::sync::lock(&self.cached)
    }

    /// The VM address: the kept one, or a new lookup that skips `failed` (an address that just
    /// failed, which a stale helper file may still name).
    pub(crate) async fn address(&self, failed: Option<IpAddr>) -> Result<IpAddr, WslError> {
        if let Some(addr) = *self.cached() {
            if Some(addr) != failed {
                return Ok(addr);
            }
        }
        let mut reasons = Vec::new();
        for source in &self.sources {
            let output = lookup(source.clone(), &self.distro).await;
            match output.map(|o| parse_addresses(&o)) {
                Ok(Some(addr)) if Some(addr) != failed => {
                    info!(distro = %self.distro, %addr, "WSL2 address found");
                    *self.cached() = Some(addr);
                    return Ok(addr);
                }
                Ok(Some(addr)) => reasons.push(format!("{source:?} still names {addr}, which failed")),
                Ok(None) => reasons.push(format!("{source:?} names no address")),
                Err(e) => reasons.push(e.to_string()),
            }
        }
        Err(WslError::NoAddress { distro: self.distro.clone(), reasons: reasons.join("; ") })
    }

    /// Forgets `addr` if it is the kept address (a dial to it failed).
    pub(crate) fn failed(&self, addr: IpAddr) {
        let mut cached = self.cached();
        if *cached == Some(addr) {
            debug!(distro = %self.distro, %addr, "forgetting the WSL2 address");
            *cached = None;
        }
    }

    /// Connects to `port` inside the distribution: localhost forwarding first (when `localhost`
    /// is set), then the VM address, looked up again once if the kept one fails.
    pub(crate) async fn connect_tcp(
        &self,
        port: u16,
        localhost: Option<IpAddr>,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        if let Some(local) = localhost {
            match tokio::time::timeout(timeout, TcpStream::connect((local, port))).await {
                Ok(Ok(tcp)) => return Ok(tcp),
                Ok(Err(e)) => {
                    debug!(port, error = %e, "localhost forwarding did not connect: trying the VM address")
                }
                Err(_) => debug!(port, "localhost forwarding timed out: trying the VM address"),
            }
        }
        let mut failed = None;
        let mut last_error = None;
        for _ in 0..2 {
            let addr = self.address(failed).await.map_err(|e| {
                last_error.take().unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, e))
            })?;
            match tokio::time::timeout(timeout, TcpStream::connect(SocketAddr::new(addr, port))).await {
                Ok(Ok(tcp)) => return Ok(tcp),
                Ok(Err(e)) => last_error = Some(e),
                Err(_) => last_error = Some(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            }
            self.failed(addr);
            failed = Some(addr);
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("no address")))
    }
}

/// Runs a lookup off the async threads (`wsl.exe` may take seconds to boot a distribution).
async fn lookup(source: std::sync::Arc<dyn Source>, distro: &str) -> Result<Vec<u8>, WslError> {
    let distro = distro.to_owned();
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::task::spawn_blocking(move || source.lookup(&distro)))
        .await
    {
        Ok(result) => result?,
        Err(_) => Err(WslError::Slow),
    }
}

/// The loopback address localhost forwarding listens on.
pub(crate) const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    use super::*;

    #[test]
    fn hostname_output_is_parsed() {
        assert_eq!(parse_addresses(b"172.22.80.5 172.17.0.1 \n"), Some("172.22.80.5".parse().unwrap()));
        assert_eq!(parse_addresses(b"fe80::1 fd00::5\n"), Some("fd00::5".parse().unwrap()));
        assert_eq!(parse_addresses(b"\n"), None);
        assert_eq!(parse_addresses(b"garbage"), None);
        // UTF-16LE, as wsl.exe writes when the command output passes through its own encoding.
        let utf16: Vec<u8> = "172.29.1.2 \r\n".encode_utf16().flat_map(u16::to_le_bytes).collect();
        assert_eq!(parse_addresses(&utf16), Some("172.29.1.2".parse().unwrap()));
        let msg: Vec<u8> = "There is no distribution with the supplied name.\r\n"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(parse_message(&msg).as_deref(), Some("There is no distribution with the supplied name."));
    }

    /// Answers from a script, counting calls: what a restarted WSL looks like.
    #[derive(Debug)]
    struct Script(Vec<&'static str>, Arc<AtomicUsize>);

    impl Source for Script {
        fn lookup(&self, _: &str) -> Result<Vec<u8>, WslError> {
            let i = self.1.fetch_add(1, Ordering::SeqCst);
            self.0
                .get(i)
                .map(|s| s.as_bytes().to_vec())
                .ok_or_else(|| WslError::Spawn(std::io::Error::other("no more answers")))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn address_is_kept_and_looked_up_again_after_a_failed_dial() {
        // The "VM" listens on 127.0.0.3; the kept address 127.0.0.2 is from before a restart.
        let listener = tokio::net::TcpListener::bind("127.0.0.3:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let calls = Arc::new(AtomicUsize::new(0));
        let resolver = Resolver::with_sources(
            "Ubuntu",
            vec![Arc::new(Script(vec!["127.0.0.2\n", "127.0.0.3 172.17.0.1\n"], calls.clone()))],
        );
        assert_eq!(resolver.address(None).await.ok(), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(resolver.address(None).await.ok(), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "kept, not looked up again");
        let tcp = resolver.connect_tcp(port, None, Duration::from_secs(2)).await.expect("re-resolved dial");
        assert_eq!(tcp.peer_addr().expect("peer").ip(), "127.0.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(resolver.address(None).await.ok(), Some("127.0.0.3".parse().unwrap()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stale_helper_file_falls_through_to_the_next_source() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("Ubuntu.addr"), "127.0.0.2\n").expect("write");
        let listener = tokio::net::TcpListener::bind("127.0.0.4:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let calls = Arc::new(AtomicUsize::new(0));
        let resolver = Resolver::with_sources(
            "Ubuntu",
            vec![
                Arc::new(HelperFile(dir.path().to_owned())),
                Arc::new(Script(vec!["127.0.0.4"], calls.clone())),
            ],
        );
        let tcp = resolver.connect_tcp(port, None, Duration::from_secs(2)).await.expect("dial");
        assert_eq!(tcp.peer_addr().expect("peer").ip(), "127.0.0.4".parse::<IpAddr>().unwrap());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the helper file was read first");
        // Neither source knows a working address: the error names both.
        let resolver = Resolver::with_sources("Gone", vec![Arc::new(HelperFile(dir.path().to_owned()))]);
        let e = resolver.address(None).await.unwrap_err().to_string();
        assert!(e.contains("Gone") && e.contains("Gone.addr"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn localhost_forwarding_is_tried_first() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let calls = Arc::new(AtomicUsize::new(0));
        let resolver = Resolver::with_sources("Ubuntu", vec![Arc::new(Script(vec![], calls.clone()))]);
        resolver.connect_tcp(port, Some(LOCALHOST), Duration::from_secs(2)).await.expect("forwarded");
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no lookup needed");
    }
}
