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
    servers::free_port,
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

/// A relay's files in `d` (`sallyport-relay init`) and its relay.toml listening on `quic`, with
/// join tokens enabled and `services`.
fn relay_config(d: &Path, quic: SocketAddr, services: &str) -> PathBuf {
    let (ok, text) = output({
        let mut c = Command::new(binary("sallyport-relay"));
        c.args(["init", "--san", "127.0.0.1", "--dir"]).arg(d);
        c
    });
    assert!(ok, "{text}");
    std::fs::write(d.join("admin.token"), ADMIN_TOKEN).expect("admin token");
    let relay_toml = d.join("relay.toml");
    std::fs::write(
        &relay_toml,
        format!(
            "[relay]\nlisten = \"{quic}\"\nadmin = \"127.0.0.1:{}\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\n\
             key = \"relay.key\"\nca_key = \"ca.key\"\nadmin_token_file = \"admin.token\"\n\
             tokens_file = \"tokens.toml\"\nrevocations_file = \"revoked.toml\"\n{services}",
            free_port()
        ),
    )
    .expect("relay.toml");
    relay_toml
}

/// A join token for `agent` from `sallyport-relay token create`.
fn join_token(relay_toml: &Path, quic: SocketAddr, agent: &str) -> String {
    let (ok, token) = output({
        let mut c = Command::new(binary("sallyport-relay"));
        c.args(["token", "create", "--agent", agent, "--relay", &quic.to_string(), "--config"])
            .arg(relay_toml);
        c
    });
    assert!(ok, "{token}");
    token
        .lines()
        .find(|l| l.starts_with(sallyport_proto::enroll::TOKEN_PREFIX))
        .expect("a token line")
        .trim()
        .to_owned()
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
    let quic = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (tcp, udp) =
        (SocketAddr::from(([127, 0, 0, 1], free_port())), SocketAddr::from(([127, 0, 0, 1], free_port())));
    let relay_toml = relay_config(
        d,
        quic,
        &format!(
            "[services.bulk]\nagent = \"winbox\"\nlisten = \"{tcp}\"\n\
             [services.echo]\nagent = \"winbox\"\nudp = \"{udp}\"\n\
             [services.hello]\nagent = \"fresh\"\nlisten = \"127.0.0.1:0\"\n"
        ),
    );
    let mut relay_process = relay(&relay_toml);

    // The bundle `agent add` writes, pointed at a transfer server and a UDP echo server.
    let target = targets::transfer_server().await;
    // The UDP target is not there yet: the first datagrams get ICMP port-unreachable back.
    let echo = SocketAddr::from(([127, 0, 0, 1], free_port()));
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

    // The install surface. Wine keeps no owners or DACLs of its own: every file reads back as
    // owned by the wine user, an ordinary account, which is what a folder or program a standard
    // user made looks like on Windows. So the refusals run here for real.
    // `service install` from a folder a standard user can write (Downloads) is refused before
    // anything is registered.
    let (ok, text) = output(agent_exe(&bundle, &["service", "install", "--config", "agent.toml"]));
    println!("service install from a user's folder:\n{text}");
    assert!(!ok && text.contains("only administrators can replace"), "{text}");
    // `service prepare`: a new folder is created with its protected access; one someone else made
    // first is refused, and taken in hand only when asked.
    let (ok, text) = output(agent_exe(&bundle, &["service", "prepare", "--dir", "pd-new"]));
    assert!(ok && text.contains("created"), "{text}");
    std::fs::create_dir_all(bundle.join("pd-user")).expect("dir");
    std::fs::write(bundle.join("pd-user").join("agent.toml"), "# planted").expect("write");
    let (ok, text) = output(agent_exe(&bundle, &["service", "prepare", "--dir", "pd-user"]));
    println!("service prepare on a folder a user made:\n{text}");
    assert!(
        !ok && text.contains("--take-over") && text.contains("not by SYSTEM or Administrators"),
        "{text}"
    );
    let (ok, text) = output(agent_exe(&bundle, &["service", "prepare", "--dir", "pd-user", "--take-over"]));
    assert!(ok && text.contains("access reset"), "{text}");

    // `run`: the tunnel comes up through the Windows build's UDP socket, logged under its Event
    // Log ID.
    let mut agent = Spawned::start(agent_exe(&bundle, &["run", "--config", "agent.toml"]));
    let started = Instant::now();
    let up = agent.wait_line("tunnel up", WAIT);
    println!("tunnel up {:?} after the .exe started", started.elapsed());
    assert!(up.contains("event_id=1000"), "{up}");

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
    let lost = agent.wait_line("tunnel lost", WAIT);
    assert!(lost.contains("event_id=1001"), "{lost}");
    let mut relay_process = relay(&relay_toml);
    agent.wait_line("tunnel up", WAIT);
    println!("agent back {:?} after the relay was killed", killed.elapsed());
    transfer::run(tcp, MIB, MIB, 99).await.expect("transfer after the restart");

    // Where UDP does not get out: the same agent over TLS on TCP (`transport = "tcp"`), and what
    // `check --connect` tells a user about each transport.
    let (ok, text) = output(agent_exe(&bundle, &["check", "--config", "agent.toml", "--connect"]));
    println!("check --connect:\n{text}");
    assert!(
        ok && text.contains("quic ok") && text.contains("tcp ok") && text.contains("auto uses QUIC"),
        "{text}"
    );
    agent.kill();
    std::fs::write(
        bundle.join("agent-tcp.toml"),
        config.replace("[agent]\n", "[agent]\ntransport = \"tcp\"\n"),
    )
    .expect("agent-tcp.toml");
    let mut agent = Spawned::start(agent_exe(&bundle, &["run", "--config", "agent-tcp.toml"]));
    let up = agent.wait_line("tunnel up", WAIT);
    assert!(up.contains("transport=tcp"), "{up}");
    let (up, down) = bulk(tcp).await;
    println!("sallyport-agent.exe under wine over TCP: 64 MiB up at {up:.0} Mbit/s, 64 MiB down at {down:.0} Mbit/s");
    assert_eq!(echo_thousand(udp).await, 1000, "UDP over the TCP tunnel");
    agent.kill();

    // `enroll` with a join token read from a file: an identity that the relay admits.
    let token = join_token(&relay_toml, quic, "fresh");
    let fresh = d.join("fresh");
    std::fs::create_dir_all(&fresh).expect("dir");
    std::fs::write(fresh.join("join.token"), format!("{token}\n")).expect("token file");
    let (ok, text) = output(agent_exe(&fresh, &["enroll", "--token-file", "join.token", "--dir", "."]));
    println!("enroll:\n{text}");
    assert!(ok && text.contains("enrolled as agent \"fresh\""), "{text}");
    assert!(!text.contains("could not be written to the Event Log"), "{text}");
    let mut enrolled = Spawned::start(agent_exe(&fresh, &["run", "--config", "agent.toml"]));
    enrolled.wait_line("tunnel up", WAIT);
    relay_process.wait_line("agent{agent=fresh}: agent connected", WAIT);
}

/// A Unix path as the Windows build sees it under wine (drive Z: is the Unix root).
fn windows_path(path: &Path) -> String {
    format!("Z:{}", path.display()).replace('/', "\\")
}

/// `msiexec ARGS` under wine, quietly, with a verbose log; exit status and the log's text.
fn msiexec(args: &[&str], log: &Path) -> (bool, String) {
    let _ = std::fs::remove_file(log);
    let status = Command::new("/usr/lib/wine/wine64")
        .arg("msiexec")
        .args(args)
        .args(["/qn", "/l*v"])
        .arg(windows_path(log))
        .env("WINEDEBUG", "-all")
        .status()
        .expect("run msiexec");
    // The log is UTF-16 or ANSI depending on the writer: keep the ASCII of either.
    let bytes = std::fs::read(log).unwrap_or_default();
    let text: String = bytes.iter().filter(|b| **b != 0).map(|&b| b as char).collect();
    (status.success(), text)
}

/// The MSI (`scripts/msi.sh` around the Windows build) installed by wine's own msiexec: the program
/// into Program Files, `service prepare` and `enroll` from a token file as the deferred custom
/// actions, the service and the Event Log source registered; uninstalled, config and identity
/// stay; installed again over a folder that is not Administrators' only with TAKEOVER=1; removed
/// with its data when REMOVEDATA=1.
#[test]
fn the_msi_installs_enrolls_and_uninstalls_under_wine_msiexec() {
    sallyport_tests::init_logging();
    let exe = windows_agent();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let prefix = PathBuf::from(std::env::var_os("WINEPREFIX").expect("WINEPREFIX"));
    let program = prefix.join("drive_c/Program Files/Sallyport/sallyport-agent.exe");
    let data = prefix.join("drive_c/ProgramData/Sallyport");
    let msi = d.join("sallyport-agent.msi");
    let log = d.join("msi.log");
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/msi.sh"))
        .arg(&exe)
        .arg(&msi)
        .output()
        .expect("scripts/msi.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // What an earlier run may have left in the shared test prefix.
    let _ = msiexec(&["/x", &windows_path(&msi)], &log);
    let _ = std::fs::remove_dir_all(&data);

    let quic = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let relay_toml =
        relay_config(d, quic, "[services.hello]\nagent = \"msibox\"\nlisten = \"127.0.0.1:0\"\n");
    let mut relay_process = relay(&relay_toml);
    let token = join_token(&relay_toml, quic, "msibox");
    let token_file = d.join("join.token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");

    // Install with the token file: program, folder, enrollment, service, Event Log source.
    let (ok, text) =
        msiexec(&["/i", &windows_path(&msi), &format!("TOKENFILE={}", windows_path(&token_file))], &log);
    assert!(ok, "msiexec /i failed:\n{text}");
    for action in ["SallyportPrepare", "SallyportEnroll", "InstallServices", "SallyportStart"] {
        // "Action ended 8:40:56: SallyportPrepare. Return value 1." (1: succeeded).
        assert!(text.contains(&format!(": {action}. Return value 1.")), "{action} did not succeed:\n{text}");
    }
    relay_process.wait_line("agent enrolled", WAIT);
    assert!(program.is_file(), "{} is missing", program.display());
    for file in ["agent.key", "agent.crt", "ca.crt", "agent.toml"] {
        assert!(data.join(file).is_file(), "{file} is missing from ProgramData\\Sallyport");
    }
    assert!(data.join("wsl").is_dir(), "the WSL helper's folder was not made");
    let reg = |key: &str| {
        output({
            let mut c = Command::new("/usr/lib/wine/wine64");
            c.args(["reg", "query", key]).env("WINEDEBUG", "-all");
            c
        })
    };
    let (ok, service) = reg(r"HKLM\System\CurrentControlSet\Services\sallyport-agent");
    println!("the service as registered:\n{service}");
    assert!(ok && service.contains(r"service run --config") && service.contains("LocalSystem"), "{service}");
    assert!(service.contains("Start    REG_DWORD    0x2"), "automatic start: {service}");
    let (ok, source) = reg(r"HKLM\System\CurrentControlSet\Services\EventLog\Application\Sallyport Agent");
    assert!(ok && source.contains(r"Sallyport\sallyport-agent.exe"), "{source}");
    // The service was started. Wine gives every file its user as owner, so the service's check at
    // start finds its folder not private and refuses, with the event that says so: what a
    // folder a standard user owns gets on Windows.
    let logs = data.join("logs");
    let deadline = Instant::now() + WAIT;
    let refusal = loop {
        let text: String = std::fs::read_dir(&logs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect();
        if text.contains("refusing to start") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("the service's log:\n{refusal}");
    assert!(refusal.contains("refusing to start") && refusal.contains("event_id=1300"), "{refusal}");
    assert!(refusal.contains("service prepare"), "the event names the fix: {refusal}");

    // Uninstall: the service and the program go, config and identity stay.
    let (ok, text) = msiexec(&["/x", &windows_path(&msi)], &log);
    assert!(ok, "msiexec /x failed:\n{text}");
    assert!(!program.exists(), "the program stayed");
    assert!(!reg(r"HKLM\System\CurrentControlSet\Services\sallyport-agent").0, "the service stayed");
    assert!(
        data.join("agent.key").is_file() && data.join("agent.toml").is_file(),
        "identity and config stay"
    );

    // Installed again: the folder is not Administrators' (wine's owner), so the install stops
    // with the reason, and goes through with TAKEOVER=1.
    let (ok, text) = msiexec(&["/i", &windows_path(&msi)], &log);
    assert!(!ok, "installed over a folder someone else owns:\n{text}");
    assert!(!program.exists(), "a failed install leaves no program behind");
    let (ok, text) = msiexec(&["/i", &windows_path(&msi), "TAKEOVER=1"], &log);
    assert!(
        ok && text.contains(": SallyportPrepareTakeOver. Return value 1."),
        "msiexec /i TAKEOVER=1 failed:\n{text}"
    );
    assert!(data.join("agent.key").is_file(), "a take-over keeps the identity");

    // Uninstall with REMOVEDATA=1: everything goes.
    let (ok, text) = msiexec(&["/x", &windows_path(&msi), "REMOVEDATA=1"], &log);
    assert!(ok, "msiexec /x REMOVEDATA=1 failed:\n{text}");
    assert!(!data.exists() && !program.exists(), "REMOVEDATA=1 left files");
}
