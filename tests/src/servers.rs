//! Real servers as targets, started as child processes on loopback: nginx (HTTP, PROXY v2),
//! dnsmasq (DNS over UDP), `openssl s_server` (TLS by name) and a Python `websockets` echo.
//! `scripts/install-deps.sh` installs them all.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::process::Spawned;

/// Returns from the test (or fails in CI, where `.ci/run` installs them) when a tool is missing.
#[macro_export]
macro_rules! tools_or_skip {
    ($($tool:expr),+) => {
        if let Some(missing) = [$($tool),+].into_iter().find(|t| !$crate::servers::have(t)) {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{missing} is not installed: run ./scripts/install-deps.sh");
            }
            eprintln!("SKIPPED: {missing} is not installed (./scripts/install-deps.sh installs it)");
            return;
        }
    };
}

/// Whether `tool` runs here (found on PATH or in the sbin directories).
pub fn have(tool: &str) -> bool {
    if tool == "websockets" {
        return Command::new("python3")
            .args(["-c", "import websockets.sync.server"])
            .output()
            .is_ok_and(|o| o.status.success());
    }
    which(tool).is_some()
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file());
    found
}

/// A port free for TCP and UDP on 127.0.0.1 right now (a relay listening there takes the same
/// port for its tunnel over TCP). See [`free_port_on`].
pub fn free_port() -> u16 {
    free_port_on(Ipv4Addr::LOCALHOST.into())
}

/// A port free right now for TCP and UDP on `ip` (an address of this namespace) and on loopback,
/// taken below the system's ephemeral range. The kernel never gives such a port to an outgoing
/// connection, so it stays free until something binds it: a server started later on it, or a
/// relay restarted on the same addresses, finds it free however many connections other tests
/// open meanwhile (a port of the ephemeral range can be taken by any of them, and then held in
/// TIME_WAIT for a minute).
pub fn free_port_on(ip: IpAddr) -> u16 {
    let (low, high) = below_ephemeral_range();
    for _ in 0..10_000 {
        let port = fastrand::u16(low..high);
        let free = |ip: IpAddr| TcpListener::bind((ip, port)).is_ok() && UdpSocket::bind((ip, port)).is_ok();
        if free(ip) && free(Ipv4Addr::LOCALHOST.into()) {
            return port;
        }
    }
    panic!("no port in {low}..{high} is free for TCP and UDP on {ip} and loopback");
}

/// Ports below the ephemeral range (`net.ipv4.ip_local_port_range`, 32768 by default), above the
/// privileged ones: at most 12,000 of them.
fn below_ephemeral_range() -> (u16, u16) {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = start.max(2048);
    (high.saturating_sub(12_000).max(1024), high)
}

/// Waits until something accepts on `addr`.
pub fn wait_tcp(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server process with its working directory.
#[derive(Debug)]
pub struct Server {
    pub process: Spawned,
    pub addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// A server process at `addr` whose files live in `dir` (removed when it is dropped).
    pub fn with_dir(process: Spawned, addr: SocketAddr, dir: tempfile::TempDir) -> Self {
        Self { process, addr, _dir: Some(dir) }
    }
}

/// nginx with one `server` block per entry: `(port, listen options, body of the block)`.
pub fn nginx(servers: &[(u16, &str, &str)]) -> Server {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    let mut conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log stderr warn;\npid {d}/nginx.pid;\n\
         events {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         default_type text/plain;\n"
    );
    for (port, options, body) in servers {
        conf.push_str(&format!("  server {{\n    listen 127.0.0.1:{port} {options};\n    {body}\n  }}\n"));
    }
    conf.push_str("}\n");
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    let mut command = Command::new(which("nginx").expect("nginx"));
    command.args(["-e", "stderr", "-p"]).arg(dir.path()).arg("-c").arg(&path);
    let process = Spawned::start(command);
    for (port, ..) in servers {
        wait_tcp(SocketAddr::from(([127, 0, 0, 1], *port)), "nginx");
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], servers[0].0));
    Server { process, addr, _dir: Some(dir) }
}

/// dnsmasq's arguments to answer `name` with `answer` on `listen` (UDP), in the foreground, and
/// nothing else.
pub fn dnsmasq_args(listen: SocketAddr, name: &str, answer: &str) -> Vec<String> {
    let fixed = [
        "--keep-in-foreground",
        "--log-facility=-",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--pid-file=",
    ];
    let mut args: Vec<String> = fixed.iter().map(|a| (*a).to_owned()).collect();
    args.push(format!("--listen-address={}", listen.ip()));
    args.push(format!("--port={}", listen.port()));
    args.push(format!("--address=/{name}/{answer}"));
    args
}

/// dnsmasq answering `name` with `answer` on UDP `127.0.0.1:port`, and nothing else.
pub fn dnsmasq(name: &str, answer: &str) -> Server {
    let port = free_port();
    let mut command = Command::new(which("dnsmasq").expect("dnsmasq"));
    command.args(dnsmasq_args(SocketAddr::from(([127, 0, 0, 1], port)), name, answer));
    let process = Spawned::start(command);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(15);
    while dig(addr, name).as_deref() != Some(answer) {
        assert!(Instant::now() < deadline, "dnsmasq did not answer on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { process, addr, _dir: None }
}

/// `dig @ADDR NAME +short` (three tries a second apart, as a resolver retries): the first answer
/// line, if any (lines starting with `;` report retries).
pub fn dig(server: SocketAddr, name: &str) -> Option<String> {
    let out = Command::new("dig")
        .args([
            &format!("@{}", server.ip()),
            "-p",
            &server.port().to_string(),
            name,
            "+short",
            "+tries=3",
            "+time=1",
        ])
        .output()
        .expect("dig runs");
    let answer =
        String::from_utf8_lossy(&out.stdout).lines().find(|l| !l.starts_with(';')).map(str::to_owned);
    if answer.is_none() {
        eprintln!(
            "dig @{server} {name}: no answer:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    answer
}

/// Whether a TCP connection from loopback address `ip` to `addr` gets its first 5 bytes (a
/// greeter's greeting) within 5 s. A connection the relay resets is not greeted, even when the
/// reset lands before `connect` returns (on loopback the relay may accept and reset it before
/// the client's thread runs again).
pub fn greeted_from(addr: SocketAddr, ip: &str) -> bool {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::new(ip.parse().expect("ip"), 0).into()).expect("bind");
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return false,
        Err(e) => panic!("connect to {addr}: {e}"),
    }
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    let mut buf = [0u8; 5];
    std::io::Read::read_exact(&mut stream, &mut buf).is_ok()
}

/// The text of `log` once `enough` says so of it (the relay writes access log lines from a thread
/// of its own, a moment after the connection ends); panics after 10 s with what it held.
pub fn wait_for_log(log: &std::path::Path, enough: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if enough(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never had what was awaited:\n{text}",
            log.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A DNS query for `name` (type A, id 0x1234), as dig would send it.
pub fn dns_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// One query for `name` to `server` from a new socket on `from`, tried once: the address in the
/// answer, or `None` after `wait` (a stub resolver's query from a random port).
pub fn dns_once(
    from: std::net::IpAddr,
    server: SocketAddr,
    name: &str,
    wait: std::time::Duration,
) -> Option<std::net::Ipv4Addr> {
    let socket = std::net::UdpSocket::bind((from, 0)).expect("bind a DNS client");
    socket.set_read_timeout(Some(wait)).expect("timeout");
    let query = dns_query(name);
    socket.send_to(&query, server).expect("send a DNS query");
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).ok()?;
    (n >= 16 && buf[..2] == query[..2] && buf[3] & 0x0f == 0)
        .then(|| std::net::Ipv4Addr::new(buf[n - 4], buf[n - 3], buf[n - 2], buf[n - 1]))
}

/// A self-signed certificate for `name` (`NAME.crt`, `NAME.key` in `dir`).
pub fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    certificate(dir, name, name, &[name])
}

/// A self-signed certificate with subject `cn` for the DNS names `names`, as `STEM.crt` and
/// `STEM.key` in `dir`, the key private (0600, as the relay wants a key it serves).
pub fn certificate(dir: &Path, stem: &str, cn: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("certificate dir");
    let (crt, key) = (dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key")));
    let sans: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args(["-subj", &format!("/CN={cn}"), "-addext", &format!("subjectAltName={}", sans.join(","))])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl runs");
    assert!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
    set_mode(&key, 0o600);
    (crt, key)
}

/// Sets a file's permission bits.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `curl -sS --max-time 10 ARGS`: whether it succeeded, its stdout and its stderr.
pub fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("curl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// curl's `--resolve` argument pointing `host` at `addr`.
pub fn resolve(host: &str, addr: SocketAddr) -> String {
    format!("{host}:{}:{}", addr.port(), addr.ip())
}

/// An argon2id hash of `password` from `sallyport-relay hash-password` (the built binary).
pub fn hash_password(password: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(crate::process::binary("sallyport-relay"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("hash-password runs");
    child.stdin.take().expect("stdin").write_all(password.as_bytes()).expect("password");
    let out = child.wait_with_output().expect("hash-password");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `openssl s_server -www` with a self-signed certificate for `name` (it answers `GET /` with a
/// status page). Returns the server and the certificate (to trust).
pub fn tls_server(dir: &Path, name: &str) -> (Server, PathBuf) {
    let (crt, key) = self_signed(dir, name);
    let port = free_port();
    let mut command = Command::new("openssl");
    command
        .args(["s_server", "-quiet", "-www", "-accept", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(&crt)
        .arg("-key")
        .arg(&key);
    let process = Spawned::start(command);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_tcp(addr, "openssl s_server");
    (Server { process, addr, _dir: None }, crt)
}

/// A WebSocket echo server (Python `websockets`) on 127.0.0.1.
pub fn websocket_echo() -> Server {
    let port = free_port();
    let script = format!(
        "from websockets.sync.server import serve\n\
         def echo(ws):\n    for message in ws:\n        ws.send(message)\n\
         with serve(echo, '127.0.0.1', {port}, max_size=None) as server:\n    server.serve_forever()\n"
    );
    let mut command = Command::new("python3");
    command.args(["-c", &script]);
    let process = Spawned::start(command);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_tcp(addr, "websocket echo");
    Server { process, addr, _dir: None }
}

/// A WebSocket client (Python `websockets`) connected to `relay` with `Host: host`: sends each
/// message (one per line, through its stdin) and returns the echoes.
pub fn websocket_exchange(relay: SocketAddr, host: &str, messages: &[&str]) -> Result<Vec<String>, String> {
    use std::io::Write as _;
    let script = format!(
        "import socket, sys\nfrom websockets.sync.client import connect\n\
         sock = socket.create_connection(('{ip}', {port}))\n\
         with connect('ws://{host}/echo', sock=sock, open_timeout=5, max_size=None) as ws:\n    \
         for m in sys.stdin.read().splitlines():\n        ws.send(m)\n        print(ws.recv(timeout=5))\n",
        ip = relay.ip(),
        port = relay.port(),
    );
    let mut child = Command::new("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(messages.join("\n").as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
}
