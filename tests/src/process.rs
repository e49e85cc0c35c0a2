//! The project's binaries run as a user would: real processes with real config files.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, SystemTime},
};

/// The path of a workspace binary built next to the running test (`target/<profile>/NAME`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target directory");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (./scripts/test.sh does)",
        path.display()
    );
    // A binary older than the sources it is built from would test yesterday's code.
    let crate_dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name.trim_start_matches("sallyport-"));
    let built = modified(&path);
    for source in [crate_dir.join("src"), crate_dir.join("../proto/src"), crate_dir.join("../runtime/src")] {
        if let Some(newest) = newest_file(&source) {
            assert!(
                built >= newest,
                "{} is older than {}: rebuild with cargo build --workspace --bins (./scripts/test.sh does)",
                path.display(),
                source.display()
            );
        }
    }
    path
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH)
}

fn newest_file(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let time = if path.is_dir() { newest_file(&path) } else { Some(modified(&path)) };
        newest = newest.max(time);
    }
    newest
}

/// A child process whose stderr is watched line by line; killed on drop.
#[derive(Debug)]
pub struct Spawned {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl Spawned {
    /// Starts `command`, reading its stdout and stderr lines (in arrival order per stream).
    pub fn start(mut command: Command) -> Self {
        command.stdout(Stdio::piped()).stderr(Stdio::piped()).env("RUST_LOG", "info").env("NO_COLOR", "1");
        let mut child = command.spawn().expect("spawn");
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            forward(stdout, tx.clone());
        }
        if let Some(stderr) = child.stderr.take() {
            forward(stderr, tx);
        }
        Self { child, lines, log: Vec::new() }
    }

    /// Starts `sallyport-relay serve --config config` (the built binary).
    pub fn relay(config: &std::path::Path) -> Self {
        let mut command = Command::new(binary("sallyport-relay"));
        command.arg("serve").arg("--config").arg(config);
        Self::start(command)
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with {needle:?} within {timeout:?}; log so far:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Every line received so far, in [`Spawned::log`].
    pub fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        &self.log
    }

    /// Sends SIGKILL (no cleanup, as a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

fn forward(stream: impl std::io::Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

/// Extracts `key=ADDR` from a log line.
pub fn addr_field(line: &str, key: &str) -> SocketAddr {
    let start =
        line.find(&format!("{key}=")).unwrap_or_else(|| panic!("no {key}= in {line:?}")) + key.len() + 1;
    let value: String = line[start..].chars().take_while(|c| !c.is_whitespace()).collect();
    value.parse().unwrap_or_else(|_| panic!("{key}={value} is not an address"))
}
