//! `sallyport-agent drain` and `undrain` on the agent's host (a script before a reboot): a file
//! `draining` beside agent.toml asks every relay to send this agent no new connections, while
//! those it carries go on. The running agent looks for it every second and says so on each
//! tunnel (protocol 6 on); the file outlives restarts, so a drained host stays drained through
//! its reboot until `undrain`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The file's name, beside agent.toml.
pub const FILE: &str = "draining";

/// How often the running agent looks for it.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Where the drain file of the agent configured by `config` is.
pub fn path(config: &Path) -> PathBuf {
    config.parent().unwrap_or(Path::new(".")).join(FILE)
}

/// Whether the agent configured by `config` is drained.
pub fn is_on(config: &Path) -> bool {
    path(config).exists()
}

/// Drains (`on`) or undrains the agent configured by `config`; says whether that changed anything.
pub fn set(config: &Path, on: bool) -> std::io::Result<bool> {
    let file = path(config);
    match (on, file.exists()) {
        (true, false) => {
            let text =
                "this agent asks its relays for no new connections (sallyport-agent undrain ends it)\n";
            sallyport_runtime::durable::write_file(
                &file,
                text.as_bytes(),
                sallyport_runtime::durable::Access::Public,
                None,
            )?;
            Ok(true)
        }
        (false, true) => {
            std::fs::remove_file(&file)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Keeps `draining` in step with the file until `stop`.
pub(crate) async fn watch(config: PathBuf, draining: watch::Sender<bool>, stop: CancellationToken) {
    loop {
        let on = is_on(&config);
        draining.send_if_modified(|now| {
            let changed = *now != on;
            if changed {
                tracing::info!(
                    draining = on,
                    "drain file {}",
                    if on {
                        "found: asking the relays for no new connections"
                    } else {
                        "gone: taking new connections again"
                    }
                );
            }
            *now = on;
            changed
        });
        tokio::select! {
            () = tokio::time::sleep(LOOK_EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_and_undrain_write_and_remove_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("agent.toml");
        assert!(!is_on(&config));
        assert!(set(&config, true).expect("drain"));
        assert!(is_on(&config) && dir.path().join(FILE).exists());
        assert!(!set(&config, true).expect("again"), "already drained");
        assert!(set(&config, false).expect("undrain"));
        assert!(!is_on(&config));
        assert!(!set(&config, false).expect("again"), "not drained");
    }
}
