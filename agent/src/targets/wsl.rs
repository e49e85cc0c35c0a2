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

    /// Whether an address this source named may be dialed (why not, if not).
    fn vet(&self, _addr: IpAddr) -> Result<(), NotVm> {
        Ok(())
    }
}

/// The file the in-distribution helper keeps up to date. The installing user's unelevated
/// processes can write it, so what it names is dialed only if it is a VM address on the WSL
/// virtual switch: never loopback, never this machine, never another host.
#[derive(Debug)]
pub(crate) struct HelperFile {
    pub(crate) dir: PathBuf,
    /// The WSL virtual switch's subnets, read when an address is checked.
    pub(crate) switches: fn() -> Vec<Switch>,
}

/// The most a helper file may hold: one or two addresses and a newline.
const HELPER_FILE_MAX: u64 = 1024;

impl Source for HelperFile {
    fn lookup(&self, distro: &str) -> Result<Vec<u8>, WslError> {
        use std::io::Read;
        let path = self.dir.join(format!("{distro}.addr"));
        let mut bytes = Vec::new();
        let read =
            std::fs::File::open(&path).and_then(|f| f.take(HELPER_FILE_MAX + 1).read_to_end(&mut bytes));
        match read {
            Ok(n) if n as u64 > HELPER_FILE_MAX => Err(WslError::Helper {
                path,
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("longer than {HELPER_FILE_MAX} bytes: not an address file"),
                ),
            }),
            Ok(_) => Ok(bytes),
            Err(source) => Err(WslError::Helper { path, source }),
        }
    }

    fn vet(&self, addr: IpAddr) -> Result<(), NotVm> {
        vet_vm_address(addr, &(self.switches)())
    }
}

/// One subnet of the WSL virtual switch as this machine sees it: its own address there and the
/// prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Switch {
    pub(crate) host: IpAddr,
    pub(crate) prefix: u8,
}

impl Switch {
    fn contains(&self, addr: IpAddr) -> bool {
        match (self.host, addr) {
            (IpAddr::V4(host), IpAddr::V4(addr)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix.min(32))).unwrap_or(0);
                u32::from(host) & mask == u32::from(addr) & mask
            }
            (IpAddr::V6(host), IpAddr::V6(addr)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix.min(128))).unwrap_or(0);
                u128::from(host) & mask == u128::from(addr) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host, self.prefix)
    }
}

/// Why an address from the helper file is not dialed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotVm {
    #[error("{0} cannot be a WSL2 VM's address")]
    Special(IpAddr),
    #[error("{0} is not trusted: this machine has no WSL virtual switch (no adapter named \"vEthernet (WSL...)\")")]
    NoSwitch(IpAddr),
    #[error("{0} is this machine's own address on the WSL virtual switch")]
    Host(IpAddr),
    #[error("{addr} is outside the WSL virtual switch ({switches})")]
    Outside { addr: IpAddr, switches: String },
    #[error("{addr} is the broadcast address of {switch}")]
    Broadcast { addr: IpAddr, switch: Switch },
}

/// Whether `addr` (from the helper file) may be dialed as a WSL2 VM's address: inside one of the
/// virtual switch's `switches`, and not this machine's own address there, loopback, multicast or
/// a broadcast address.
pub(crate) fn vet_vm_address(addr: IpAddr, switches: &[Switch]) -> Result<(), NotVm> {
    if addr.is_loopback() || addr.is_unspecified() || addr.is_multicast() {
        return Err(NotVm::Special(addr));
    }
    if switches.is_empty() {
        return Err(NotVm::NoSwitch(addr));
    }
    if switches.iter().any(|s| s.host == addr) {
        return Err(NotVm::Host(addr));
    }
    let Some(switch) = switches.iter().find(|s| s.contains(addr)) else {
        let list: Vec<String> = switches.iter().map(Switch::to_string).collect();
        return Err(NotVm::Outside { addr, switches: list.join(", ") });
    };
    if let (IpAddr::V4(a), true) = (addr, switch.prefix < 31) {
        let host_bits = u32::MAX.checked_shr(u32::from(switch.prefix)).unwrap_or(0);
        if u32::from(a) & host_bits == host_bits {
            return Err(NotVm::Broadcast { addr, switch: *switch });
        }
    }
    Ok(())
}

/// The WSL virtual switch's subnets: this machine's adapters named "vEthernet (WSL...)" (in NAT
/// mode, one per address family). None outside Windows.
pub(crate) fn wsl_switches() -> Vec<Switch> {
    #[cfg(windows)]
    {
        let interfaces = match if_addrs::get_if_addrs() {
            Ok(interfaces) => interfaces,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list network adapters: the WSL helper file is not trusted");
                return Vec::new();
            }
        };
        interfaces
            .into_iter()
            .filter(|i| i.name.starts_with("vEthernet (WSL"))
            .map(|i| {
                let prefix = match &i.addr {
                    if_addrs::IfAddr::V4(a) => a.prefixlen,
                    if_addrs::IfAddr::V6(a) => a.prefixlen,
                };
                Switch { host: i.ip(), prefix }
            })
            .collect()
    }
    #[cfg(not(windows))]
    {
        Vec::new()
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
            vec![
                std::sync::Arc::new(HelperFile { dir: config_dir.join("wsl"), switches: wsl_switches }),
                std::sync::Arc::new(WslExe),
            ],
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
                Ok(Some(addr)) if Some(addr) != failed => match source.vet(addr) {
                    Ok(()) => {
                        info!(distro = %self.distro, %addr, "WSL2 address found");
                        *self.cached() = Some(addr);
                        return Ok(addr);
                    }
                    Err(why) => {
                        sallyport_runtime::limited!(warn, distro = %self.distro, source = ?source, %why, "address refused");
                        reasons.push(format!("{source:?} names {addr}, refused: {why}"));
                    }
                },
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
                Arc::new(HelperFile { dir: dir.path().to_owned(), switches: loopback_switch }),
                Arc::new(Script(vec!["127.0.0.4"], calls.clone())),
            ],
        );
        let tcp = resolver.connect_tcp(port, None, Duration::from_secs(2)).await.expect("dial");
        assert_eq!(tcp.peer_addr().expect("peer").ip(), "127.0.0.4".parse::<IpAddr>().unwrap());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the helper file was read first");
        // Neither source knows a working address: the error names both.
        let helper = HelperFile { dir: dir.path().to_owned(), switches: loopback_switch };
        let resolver = Resolver::with_sources("Gone", vec![Arc::new(helper)]);
        let e = resolver.address(None).await.unwrap_err().to_string();
        assert!(e.contains("Gone") && e.contains("Gone.addr"), "{e}");
    }

    /// No WSL virtual switch here (the tests above dial loopback, which the helper file may never
    /// name).
    fn loopback_switch() -> Vec<Switch> {
        Vec::new()
    }

    fn nat_switch() -> Vec<Switch> {
        vec![
            Switch { host: "172.29.0.1".parse().unwrap(), prefix: 20 },
            Switch { host: "fd00:29::1".parse().unwrap(), prefix: 64 },
        ]
    }

    #[test]
    fn the_helper_file_may_name_only_a_vm_on_the_wsl_switch() {
        let ok = |a: &str| vet_vm_address(a.parse().unwrap(), &nat_switch());
        assert_eq!(ok("172.29.5.7"), Ok(()));
        assert_eq!(ok("fd00:29::5"), Ok(()));
        for (addr, why) in [
            ("127.0.0.1", "cannot be a WSL2 VM's address"),
            ("::1", "cannot be a WSL2 VM's address"),
            ("0.0.0.0", "cannot be a WSL2 VM's address"),
            ("224.0.0.1", "cannot be a WSL2 VM's address"),
            ("172.29.0.1", "this machine's own address"),
            ("192.168.4.10", "outside the WSL virtual switch (172.29.0.1/20, fd00:29::1/64)"),
            ("172.29.16.1", "outside the WSL virtual switch"),
            ("172.29.15.255", "broadcast address of 172.29.0.1/20"),
            ("fd00:30::5", "outside the WSL virtual switch"),
        ] {
            let refused = ok(addr).expect_err(addr).to_string();
            assert!(refused.contains(why), "{addr}: {refused}");
        }
        let none = vet_vm_address("172.29.5.7".parse().unwrap(), &[]).expect_err("no switch").to_string();
        assert!(none.contains("no WSL virtual switch"), "{none}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_helper_file_naming_another_host_or_too_long_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("dir");
        let helper = || Arc::new(HelperFile { dir: dir.path().to_owned(), switches: nat_switch });
        std::fs::write(dir.path().join("Ubuntu.addr"), "192.168.4.10\n").expect("write");
        let e = Resolver::with_sources("Ubuntu", vec![helper()]).address(None).await.unwrap_err().to_string();
        assert!(
            e.contains("names 192.168.4.10, refused") && e.contains("outside the WSL virtual switch"),
            "{e}"
        );
        std::fs::write(dir.path().join("Ubuntu.addr"), "172.29.5.7 ".repeat(200)).expect("write");
        let e = Resolver::with_sources("Ubuntu", vec![helper()]).address(None).await.unwrap_err().to_string();
        assert!(e.contains("longer than 1024 bytes"), "{e}");
        std::fs::write(dir.path().join("Ubuntu.addr"), "172.29.5.7\n").expect("write");
        let found = Resolver::with_sources("Ubuntu", vec![helper()]).address(None).await.expect("accepted");
        assert_eq!(found, "172.29.5.7".parse::<IpAddr>().unwrap());
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
