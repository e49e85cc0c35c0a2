//! The agent as a Windows service: what `sallyport-agent service install|uninstall|start|stop|status`
//! sets up, and the service's own entry point. The plan (names, paths, arguments, recovery actions,
//! the ACL) is plain data built here on every platform, so it is unit-tested on Linux; the calls to
//! the Service Control Manager are in [`windows`] and compiled for Windows only.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

/// The service's key name (`sc query sallyport-agent`).
pub const SERVICE_NAME: &str = "sallyport-agent";
pub const DISPLAY_NAME: &str = "Sallyport agent";
pub const DESCRIPTION: &str =
    "Keeps an outbound QUIC tunnel to the Sallyport relay so the homelab can reach this machine's services and containers.";
/// The Event Log source warnings and errors are written under.
pub const EVENT_SOURCE: &str = "Sallyport Agent";

/// Where the service keeps its config, identity and logs: `%ProgramData%\Sallyport`.
pub fn data_dir(program_data: Option<OsString>) -> PathBuf {
    let base = program_data.map_or_else(|| PathBuf::from(r"C:\ProgramData"), PathBuf::from);
    base.join("Sallyport")
}

/// The config the service runs with, inside [`data_dir`].
pub fn config_path(data_dir: &Path) -> PathBuf {
    data_dir.join("agent.toml")
}

/// The directory of the rotating log files, inside [`data_dir`].
pub fn log_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("logs")
}

/// What `sallyport-agent service reload` runs `sc.exe` with: the parameter-change control, which
/// the running service answers by reloading agent.toml.
pub fn reload_arguments() -> [&'static str; 3] {
    ["control", SERVICE_NAME, "paramchange"]
}

/// The command line the Service Control Manager starts the executable with.
pub fn launch_arguments(config: &Path) -> Vec<OsString> {
    vec!["service".into(), "run".into(), "--config".into(), config.as_os_str().to_owned()]
}

/// What the Service Control Manager does when the service fails: restart after 5 s, 30 s, then
/// every 60 s; the failure count resets after a day without failures.
pub const RESTART_DELAYS: [Duration; 3] =
    [Duration::from_secs(5), Duration::from_secs(30), Duration::from_secs(60)];
pub const FAILURE_RESET: Duration = Duration::from_secs(24 * 3600);

/// Copies `bundle`'s agent.toml, certificate, key and CA into `data_dir` (which then holds the
/// only copy the service reads). Returns the files copied.
pub fn stage_bundle(bundle_config: &Path, data_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let source = bundle_config.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(data_dir)?;
    let mut copied = Vec::new();
    let target = config_path(data_dir);
    if bundle_config != target {
        std::fs::copy(bundle_config, &target)?;
        copied.push(target);
    }
    for file in ["ca.crt", "agent.crt", "agent.key"] {
        let from = source.join(file);
        let to = data_dir.join(file);
        if from.exists() && from != to {
            std::fs::copy(&from, &to)?;
            copied.push(to);
        }
    }
    Ok(copied)
}

#[cfg(windows)]
pub mod eventlog;
#[cfg(windows)]
pub mod windows;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_is_the_parameter_change_control() {
        assert_eq!(reload_arguments(), ["control", "sallyport-agent", "paramchange"]);
    }

    #[test]
    fn paths_follow_program_data() {
        let dir = data_dir(Some(r"D:\PD".into()));
        assert_eq!(dir, Path::new(r"D:\PD").join("Sallyport"));
        assert_eq!(data_dir(None), Path::new(r"C:\ProgramData").join("Sallyport"));
        assert_eq!(config_path(&dir), dir.join("agent.toml"));
        assert_eq!(log_dir(&dir), dir.join("logs"));
    }

    #[test]
    fn the_service_runs_the_agent_with_its_config() {
        let args = launch_arguments(Path::new(r"C:\ProgramData\Sallyport\agent.toml"));
        assert_eq!(args, ["service", "run", "--config", r"C:\ProgramData\Sallyport\agent.toml"]);
    }

    #[test]
    fn event_ids_are_unique_and_the_message_table_holds_each() {
        use crate::events::{message_id, message_table, Severity, EVENTS};
        let mut ids: Vec<u16> = EVENTS.iter().map(|e| e.0).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), EVENTS.len(), "an ID names one event");
        assert_eq!(message_id(1000, Severity::Information), 0x4000_03E8);
        assert_eq!(message_id(1, Severity::Error), 0xC000_0001, "the message compiler's layout");
        // Read the table back as FormatMessage does: blocks of IDs, each pointing at its entries.
        let table = message_table();
        let u32_at = |at: usize| u32::from_le_bytes(table[at..at + 4].try_into().expect("4 bytes"));
        let blocks = u32_at(0) as usize;
        assert_eq!(blocks, EVENTS.len());
        let mut found = Vec::new();
        for b in 0..blocks {
            let (low, high, offset) = (u32_at(4 + 12 * b), u32_at(8 + 12 * b), u32_at(12 + 12 * b) as usize);
            assert_eq!(low, high);
            let length = u16::from_le_bytes([table[offset], table[offset + 1]]) as usize;
            assert_eq!(length % 4, 0, "entries are 4-byte aligned");
            assert_eq!(u16::from_le_bytes([table[offset + 2], table[offset + 3]]), 1, "UTF-16");
            let text: Vec<u16> = table[offset + 4..offset + length]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            assert_eq!(String::from_utf16_lossy(&text), "%1\r\n");
            found.push(low);
        }
        for (id, severity, _) in EVENTS {
            assert!(found.contains(&message_id(id, severity)), "event {id} in the table");
        }
    }

    #[test]
    fn recovery_restarts_with_growing_delays() {
        assert!(RESTART_DELAYS.windows(2).all(|w| w[0] < w[1]));
        assert!(FAILURE_RESET >= Duration::from_secs(3600));
    }

    #[test]
    fn a_bundle_is_staged_into_the_data_dir() {
        let bundle = tempfile::tempdir().expect("tempdir");
        for f in ["agent.toml", "ca.crt", "agent.crt", "agent.key"] {
            std::fs::write(bundle.path().join(f), f).expect("write");
        }
        let data = tempfile::tempdir().expect("tempdir");
        let dir = data.path().join("Sallyport");
        let copied = stage_bundle(&bundle.path().join("agent.toml"), &dir).expect("staged");
        assert_eq!(copied.len(), 4);
        assert_eq!(std::fs::read_to_string(dir.join("agent.key")).expect("key"), "agent.key");
    }
}
