//! CrowdSec reading a relay's access log with the shipped parser and scenario
//! (`deploy/crowdsec/`): Debian's CrowdSec (unpacked by `scripts/install-deps.sh` into
//! `target/crowdsec`) replays the log of a relay that refused one host eight times and served
//! another, and its local API decides to ban the refused host only.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use sallyport_tests::{servers, targets, RunningRelay, TestPki};

fn crowdsec_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/crowdsec")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crowdsec_bans_the_host_the_relay_keeps_refusing() {
    let root = crowdsec_root();
    if !root.join("usr/bin/crowdsec").exists() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CrowdSec is not unpacked: run ./scripts/install-deps.sh");
        }
        eprintln!("SKIPPED: CrowdSec is not unpacked (./scripts/install-deps.sh unpacks it)");
        return;
    }
    sallyport_tests::init_logging();
    let greeter = targets::greeter(b"hello").await;
    let pki = TestPki::new();
    let (relay, agent) = RunningRelay::with_winbox(
        &pki,
        "",
        "[services.rdp]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n\
         [access]\ndefault = [\"allow 127.0.0.2\", \"deny all\"]\nlog = \"access.log\"\n",
        &format!("[services.rdp]\ntarget = \"tcp://{}\"\n", greeter.addr),
    )
    .await;
    let rdp = relay.service("rdp");
    let (refused, served) = tokio::task::spawn_blocking(move || {
        let refused = (0..8).filter(|_| !servers::greeted_from(rdp, "127.0.0.3")).count();
        let served = (0..2).filter(|_| servers::greeted_from(rdp, "127.0.0.2")).count();
        (refused, served)
    })
    .await
    .expect("clients");
    assert_eq!((refused, served), (8, 2));
    let log = pki.dir().join("access.log");
    tokio::task::block_in_place(|| servers::wait_for_log(&log, |t| t.lines().count() >= 10));
    agent.stop().await;
    relay.stop().await;

    // A CrowdSec of its own: the shipped parser and scenario, a local API on a free port, sqlite.
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crowdsec");
    for sub in ["config/parsers/s01-parse", "config/scenarios", "data", "hub"] {
        std::fs::create_dir_all(d.join(sub)).expect("dirs");
    }
    std::fs::copy(
        deploy.join("parsers/s01-parse/sallyport-logs.yaml"),
        d.join("config/parsers/s01-parse/sallyport-logs.yaml"),
    )
    .expect("parser");
    std::fs::copy(
        deploy.join("scenarios/sallyport-refused.yaml"),
        d.join("config/scenarios/sallyport-refused.yaml"),
    )
    .expect("scenario");
    std::fs::copy(root.join("etc/crowdsec/profiles.yaml"), d.join("config/profiles.yaml")).expect("profiles");
    let copied =
        Command::new("cp").arg("-r").arg(root.join("etc/crowdsec/patterns")).arg(d.join("config/")).status();
    assert!(copied.is_ok_and(|s| s.success()));
    std::fs::write(d.join("config/simulation.yaml"), "simulation: off\n").expect("simulation");
    std::fs::write(d.join("config/acquis.yaml"), "---\n").expect("acquis");
    std::fs::write(
        d.join("hub/.index.json"),
        r#"{"parsers":{},"scenarios":{},"postoverflows":{},"collections":{}}"#,
    )
    .expect("index");
    let port = sallyport_tests::servers::free_port();
    let config = format!(
        "common:\n  daemonize: false\n  log_media: stdout\n  log_level: info\n\
         config_paths:\n  config_dir: {d}/config/\n  data_dir: {d}/data/\n  simulation_path: {d}/config/simulation.yaml\n  \
         hub_dir: {d}/hub/\n  index_path: {d}/hub/.index.json\n  notification_dir: {d}/config/notifications/\n  plugin_dir: {d}/plugins/\n\
         crowdsec_service:\n  acquisition_path: {d}/config/acquis.yaml\n  parser_routines: 1\n\
         cscli:\n  output: human\n\
         db_config:\n  type: sqlite\n  db_path: {d}/data/crowdsec.db\n  use_wal: false\n\
         api:\n  client:\n    credentials_path: {d}/config/local_api_credentials.yaml\n  server:\n    listen_uri: 127.0.0.1:{port}\n    profiles_path: {d}/config/profiles.yaml\n",
        d = d.display()
    );
    let config_path = d.join("config/config.yaml");
    std::fs::write(&config_path, config).expect("config");
    let cscli = Command::new(root.join("usr/bin/cscli"))
        .arg("-c")
        .arg(&config_path)
        .args([
            "machines",
            "add",
            "sallyport-test",
            "--password",
            "sallyport-test-password-0123",
            "--force",
            "-f",
        ])
        .arg(d.join("config/local_api_credentials.yaml"))
        .output()
        .expect("cscli runs");
    assert!(cscli.status.success(), "{}", String::from_utf8_lossy(&cscli.stderr));
    let replay = Command::new(root.join("usr/bin/crowdsec"))
        .arg("-c")
        .arg(&config_path)
        .arg("-dsn")
        .arg(format!("file://{}", log.display()))
        .args(["-type", "sallyport"])
        .output()
        .expect("crowdsec runs");
    let output =
        format!("{}{}", String::from_utf8_lossy(&replay.stdout), String::from_utf8_lossy(&replay.stderr));
    let verdicts: Vec<&str> = output.lines().filter(|l| l.contains("sallyport/refused by ip")).collect();
    println!("crowdsec over the relay's access log: {verdicts:?}");
    assert_eq!(verdicts.len(), 1, "{output}");
    assert!(verdicts[0].contains("ban on Ip 127.0.0.3"), "{output}");
    assert!(!output.contains("by ip 127.0.0.2"), "{output}");
}
