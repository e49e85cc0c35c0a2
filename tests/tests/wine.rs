//! The Windows build of the agent (`sallyport-agent.exe`, x86_64-pc-windows-gnu) run under wine
//! against the Linux relay, as a Windows user runs it: `check`, `run`, `enroll`. Run by
//! `./scripts/windows.sh e2e`, which builds the .exe, prepares the wine prefix (with the stand-ins
//! for what wine lacks, `scripts/wine/standins.c`) and sets `SALLYPORT_WINDOWS_AGENT`; the default
//! test run leaves this binary out (`.config/nextest.toml`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use sallyport_tests::{
    process::{binary, Spawned},
    servers::{free_port, free_udp_port},
    targets, transfer,
};

/// Wine starts slowly, the more so on a busy machine.
const WAIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1024 * 1024;
const ADMIN_TOKEN: &str = "wine-e2e-admin-token-0123456789abcdef";

/// The .exe and the wine that runs it.
fn windows_agent() -> PathBuf {
    let exe = std::env::var_os("SALLYPORT_WINDOWS_AGENT").map(PathBuf::from).expect(
        "SALLYPORT_WINDOWS_AGENT names sallyport-agent.exe: run these tests through ./scripts/windows.sh e2e",
    );
    assert!(exe.is_file(), "{} is missing", exe.display());
    assert!(
        std::env::var_os("WINEPREFIX").is_some(),
        "WINEPREFIX is not set: ./scripts/windows.sh e2e sets it"
    );
    exe
}

/// `sallyport-agent.exe ARGS` under wine, in `dir`.
fn agent_exe(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("/usr/lib/wine/wine64");
    c.arg(windows_agent()).args(args).current_dir(dir).env("WINEDEBUG", "-all");
    c
}

/// Runs `command` to its end: exit status and everything it printed.
fn output(mut command: Command) -> (bool, String) {
    let out = command.output().expect("run");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn relay(config: &Path) -> Spawned {
    let mut relay = Spawned::start({
        let mut c = Command::new(binary("sallyport-relay"));
        c.arg("serve").arg("--config").arg(config);
        c
    });
    relay.wait_line("relay ready", WAIT);
    relay
}

/// A UDP echo server on `addr`, for as long as the runtime runs.
async fn udp_echo(addr: SocketAddr) {
    let socket = tokio::net::UdpSocket::bind(addr).await.expect("udp bind");
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
}

/// Sends 1,000 numbered datagrams through `service` one after another, each resent until its echo
/// comes (UDP may drop one); returns how many came back intact.
async fn echo_thousand(service: SocketAddr) -> usize {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("udp bind");
    socket.connect(service).await.expect("connect");
    let mut echoed = 0;
    let mut buf = [0u8; 2048];
    for n in 0u32..1000 {
        let datagram: Vec<u8> =
            n.to_be_bytes().iter().copied().cycle().take(200 + (n as usize % 1000)).collect();
        for _attempt in 0..5 {
            socket.send(&datagram).await.expect("send");
            match tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf)).await {
                Ok(Ok(len)) if buf[..len] == datagram[..] => {
                    echoed += 1;
                    break;
                }
                _ => continue,
            }
        }
    }
    echoed
}

/// 64 MiB up and 64 MiB down through the .exe, each checked by SHA-256; returns Mbit/s each way.
async fn bulk(service: SocketAddr) -> (f64, f64) {
    let mut rates = [0.0; 2];
    for (i, (up, down)) in [(64 * MIB, 0), (0, 64 * MIB)].into_iter().enumerate() {
        let started = Instant::now();
        let report = transfer::run(service, up, down, 17 + i as u64).await.expect("transfer intact");
        assert_eq!((report.up, report.down), (up, down));
        rates[i] = (64 * MIB * 8) as f64 / started.elapsed().as_secs_f64() / 1e6;
    }
    (rates[0], rates[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_windows_agent_carries_tcp_and_udp_comes_back_after_a_relay_restart_and_enrolls() {
    sallyport_tests::init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let relay_bin = binary("sallyport-relay");
    let (ok, text) = output({
        let mut c = Command::new(&relay_bin);
        c.args(["init", "--san", "127.0.0.1", "--dir"]).arg(d);
        c
    });
    assert!(ok, "{text}");
    let quic = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let (tcp, udp) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_udp_port())),
    );
    std::fs::write(d.join("admin.token"), ADMIN_TOKEN).expect("admin token");
    let relay_toml = d.join("relay.toml");
    std::fs::write(
        &relay_toml,
        format!(
            "[relay]\nlisten = \"{quic}\"\nadmin = \"127.0.0.1:{}\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\n\
             key = \"relay.key\"\nca_key = \"ca.key\"\nadmin_token_file = \"admin.token\"\n\
             tokens_file = \"tokens.toml\"\nrevocations_file = \"revoked.toml\"\n\
             [services.bulk]\nagent = \"winbox\"\nlisten = \"{tcp}\"\n\
             [services.echo]\nagent = \"winbox\"\nudp = \"{udp}\"\n\
             [services.hello]\nagent = \"fresh\"\nlisten = \"127.0.0.1:0\"\n",
            free_port()
        ),
    )
    .expect("relay.toml");
    let mut relay_process = relay(&relay_toml);

    // The bundle `agent add` writes, pointed at a transfer server and a UDP echo server.
    let target = targets::transfer_server().await;
    // The UDP target is not there yet: the first datagrams get ICMP port-unreachable back.
    let echo = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let bundle = d.join("winbox");
    let (ok, text) = output({
        let mut c = Command::new(&relay_bin);
        c.args(["agent", "add", "winbox", "--relay", &quic.to_string(), "--dir"])
            .arg(d)
            .arg("--out")
            .arg(&bundle);
        c
    });
    assert!(ok, "{text}");
    let agent_toml = bundle.join("agent.toml");
    let starter = std::fs::read_to_string(&agent_toml).expect("agent.toml");
    let config = starter.replace(
        "[services.example]\ntarget = \"tcp://127.0.0.1:8080\"",
        &format!(
            "[services.bulk]\ntarget = \"tcp://{}\"\n[services.echo]\ntarget = \"udp://{echo}\"",
            target.addr
        ),
    );
    assert_ne!(config, starter, "the starter agent.toml changed shape:\n{starter}");
    std::fs::write(&agent_toml, &config).expect("agent.toml");

    // `check`: the good file passes; a broken one names file, key and reason.
    let (ok, text) = output(agent_exe(&bundle, &["check", "--config", "agent.toml"]));
    println!("check:\n{text}");
    assert!(ok && text.contains("agent.toml: ok"), "{text}");
    std::fs::write(bundle.join("broken.toml"), config.replace("[agent]\n", "[agent]\nlanes = 0\n"))
        .expect("broken");
    let (ok, text) = output(agent_exe(&bundle, &["check", "--config", "broken.toml"]));
    println!("check of a broken file:\n{text}");
    assert!(!ok, "check passed a broken file:\n{text}");
    assert!(
        text.contains("broken.toml")
            && text.contains("agent.lanes")
            && text.contains("out of range (1 to 64)"),
        "{text}"
    );

    // `run`: the tunnel comes up through the Windows build's UDP socket.
    let mut agent = Spawned::start(agent_exe(&bundle, &["run", "--config", "agent.toml"]));
    let started = Instant::now();
    agent.wait_line("tunnel up", WAIT);
    println!("tunnel up {:?} after the .exe started", started.elapsed());

    // Said before the tunnel came up: the buffers the Windows build asked for and was granted.
    let buffers = agent.drain().iter().find(|l| l.contains("QUIC socket buffers")).cloned();
    println!("{}", buffers.as_deref().unwrap_or("no QUIC socket buffers line"));
    assert!(
        buffers.is_some_and(|l| l.contains("wanted_bytes=4194304")),
        "the agent's log names its socket buffers"
    );

    let (up, down) = bulk(tcp).await;
    println!("sallyport-agent.exe under wine: 64 MiB up at {up:.0} Mbit/s, 64 MiB down at {down:.0} Mbit/s");
    // Datagrams to a target that is not listening: the flow's socket gets port-unreachable
    // (WSAECONNRESET on Windows), and the flow stays; when the target comes, the same flow works.
    let early = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("udp bind");
    for _ in 0..5 {
        early.send_to(b"anyone there?", udp).await.expect("send");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut buf = [0u8; 64];
    let silent = tokio::time::timeout(Duration::from_millis(300), early.recv_from(&mut buf)).await.is_err();
    assert!(silent, "an answer from a target that is not there");
    udp_echo(echo).await;
    let mut answered = false;
    for _ in 0..10 {
        early.send_to(b"now?", udp).await.expect("send");
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), early.recv_from(&mut buf)).await
        {
            answered = &buf[..n] == b"now?";
            break;
        }
    }
    let udp_log: Vec<String> =
        agent.drain().iter().filter(|l| l.contains("UDP") || l.contains("datagram")).cloned().collect();
    assert!(
        answered,
        "the flow that met port-unreachable did not carry the target's answer:\n{}",
        udp_log.join("\n")
    );
    let echoed = echo_thousand(udp).await;
    println!("UDP: {echoed} of 1000 datagrams echoed");
    assert_eq!(echoed, 1000);

    // The relay is killed and started again: the agent comes back on its own.
    relay_process.kill();
    let killed = Instant::now();
    let mut relay_process = relay(&relay_toml);
    agent.wait_line("tunnel up", WAIT);
    println!("agent back {:?} after the relay was killed", killed.elapsed());
    transfer::run(tcp, MIB, MIB, 99).await.expect("transfer after the restart");

    // `enroll` with a join token read from a file: an identity that the relay admits.
    let (ok, token) = output({
        let mut c = Command::new(&relay_bin);
        c.args(["token", "create", "--agent", "fresh", "--relay", &quic.to_string(), "--config"])
            .arg(&relay_toml);
        c
    });
    assert!(ok, "{token}");
    let token = token
        .lines()
        .find(|l| l.starts_with(sallyport_proto::enroll::TOKEN_PREFIX))
        .expect("a token line")
        .trim()
        .to_owned();
    let fresh = d.join("fresh");
    std::fs::create_dir_all(&fresh).expect("dir");
    std::fs::write(fresh.join("join.token"), format!("{token}\n")).expect("token file");
    let (ok, text) = output(agent_exe(&fresh, &["enroll", "--token-file", "join.token", "--dir", "."]));
    println!("enroll:\n{text}");
    assert!(ok && text.contains("enrolled as agent \"fresh\""), "{text}");
    let mut enrolled = Spawned::start(agent_exe(&fresh, &["run", "--config", "agent.toml"]));
    enrolled.wait_line("tunnel up", WAIT);
    relay_process.wait_line("agent{agent=fresh}: agent connected", WAIT);
}
