//! The example configurations in `deploy/examples/` load as they are shipped.

use std::path::{Path, PathBuf};

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_config_loads() {
    let files = examples();
    let (mut relays, mut agents) = (0, 0);
    for path in &files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("relay") {
            let config = sallyport_relay::Config::load(path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!config.services.is_empty());
            relays += 1;
        } else if name.starts_with("agent") {
            let config = sallyport_agent::Config::load(path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!config.services.is_empty());
            agents += 1;
        } else {
            panic!("{}: example is neither relay*.toml nor agent*.toml", path.display());
        }
    }
    assert!(relays >= 1 && agents >= 1, "expected relay and agent examples, found {files:?}");
}

#[test]
fn example_services_match_between_relay_and_agent() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let relay = sallyport_relay::Config::load(&dir.join("relay.toml")).expect("relay example");
    let agent = sallyport_agent::Config::load(&dir.join("agent.toml")).expect("agent example");
    let published: Vec<_> = relay.services.keys().collect();
    let offered: Vec<_> = agent.services.keys().collect();
    assert_eq!(published, offered, "the examples must describe one consistent setup");
}

/// The systemd unit keeps the system read-only but lets the agent write its own identity (renewal
/// replaces agent.key and agent.crt in place, beside agent.toml).
#[test]
fn the_systemd_unit_lets_the_agent_renew_its_certificate() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/linux/sallyport-agent.service"),
    )
    .expect("unit file");
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .flat_map(|v| v.split_whitespace().map(str::to_owned))
            .collect()
    };
    let config = values("ExecStart").into_iter().skip_while(|a| a != "--config").nth(1).expect("--config");
    let identity_dir = Path::new(&config).parent().expect("config folder").to_owned();
    assert_eq!(values("ProtectSystem"), ["strict"]);
    assert!(
        values("ReadWritePaths").iter().any(|p| identity_dir.starts_with(p)),
        "{} is not writable for renewals",
        identity_dir.display()
    );
    assert!(
        !values("ReadOnlyPaths").iter().any(|p| identity_dir.starts_with(p)),
        "{} is read-only",
        identity_dir.display()
    );
}
