//! The real Docker Engine on this machine, for the container tests: a test image built locally
//! (no registry: `docker import` of a tarball holding the transfer server and the libraries it
//! links), the `docker` CLI for looking from outside, and cleanup of what a test created.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use crate::process::binary;

/// Skips the test (fails it in CI) when no Docker engine answers.
#[macro_export]
macro_rules! docker_or_skip {
    () => {
        match $crate::docker::engine_available() {
            Ok(()) => {}
            Err(reason) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("Docker engine unavailable in CI: {reason}");
                }
                eprintln!("SKIPPED: {reason}");
                return;
            }
        }
    };
}

/// The port the test image's transfer server listens on.
pub const IMAGE_PORT: u16 = 9000;

pub fn engine_available() -> Result<(), String> {
    if !Path::new("/var/run/docker.sock").exists() {
        return Err("no Docker engine socket at /var/run/docker.sock".into());
    }
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .output()
        .map_err(|e| format!("cannot run the docker CLI: {e}"))?;
    if !out.status.success() {
        return Err(format!("docker version failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Runs `docker ARGS` and returns its trimmed stdout; panics with stderr on failure.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker CLI runs");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `docker inspect --format FORMAT NAME`.
pub fn inspect(name: &str, format: &str) -> String {
    docker(&["inspect", "--format", format, name])
}

/// Whether the container runs (false when it does not exist).
pub fn running(name: &str) -> bool {
    Command::new("docker")
        .args(["inspect", "--format", "{{.State.Running}}", name])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "true")
}

/// The test image: the transfer server (`sallyport-labtool transfer-server`) on port
/// [`IMAGE_PORT`], with the shared libraries it needs. Imported once per build of the tool.
pub fn test_image() -> String {
    let tool = binary("sallyport-labtool");
    let meta = std::fs::metadata(&tool).expect("labtool metadata");
    let modified =
        meta.modified().expect("mtime").duration_since(std::time::UNIX_EPOCH).expect("after epoch");
    let tag = format!("sallyport-test-server:{:x}-{:x}", meta.len(), modified.as_secs());
    let exists = Command::new("docker")
        .args(["image", "inspect", &tag])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if exists {
        return tag;
    }
    let ldd = Command::new("ldd").arg(&tool).output().expect("ldd runs");
    let libraries: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().find(|word| word.starts_with('/')).map(str::to_owned))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(&tool, dir.path().join("transfer-server")).expect("copy tool");
    // -h stores the files the links point to; paths are kept relative to / inside the image.
    let mut tar = Command::new("tar");
    tar.arg("-chf").arg("-").arg("-C").arg("/");
    for library in &libraries {
        tar.arg(library.trim_start_matches('/'));
    }
    tar.arg("-C").arg(dir.path()).arg("transfer-server");
    let tarball = tar.output().expect("tar runs");
    assert!(tarball.status.success(), "tar: {}", String::from_utf8_lossy(&tarball.stderr));
    let cmd =
        format!("CMD [\"/transfer-server\", \"transfer-server\", \"--listen\", \"0.0.0.0:{IMAGE_PORT}\"]");
    let mut import = Command::new("docker")
        .args(["import", "--change", &cmd, "-", &tag])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("docker import runs");
    std::io::Write::write_all(&mut import.stdin.take().expect("stdin"), &tarball.stdout)
        .expect("feed import");
    assert!(import.wait().expect("docker import").success(), "docker import failed");
    // Images of earlier builds of the tool are of no further use.
    if let Ok(out) = Command::new("docker")
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}", "sallyport-test-server"])
        .output()
    {
        for old in String::from_utf8_lossy(&out.stdout).lines().filter(|t| *t != tag) {
            let _ = Command::new("docker").args(["image", "rm", old]).output();
        }
    }
    tag
}

/// Removes every container labelled as owned by `agent`, now and when dropped.
#[derive(Debug)]
pub struct Cleanup {
    agent: String,
    extra: Vec<String>,
}

impl Cleanup {
    pub fn new(agent: &str) -> Self {
        let cleanup = Self { agent: agent.to_owned(), extra: Vec::new() };
        cleanup.remove();
        cleanup
    }

    /// Also removes the container named `name` (one a test created itself).
    pub fn also(&mut self, name: &str) {
        self.extra.push(name.to_owned());
        let _ = Command::new("docker").args(["rm", "-f", name]).output();
    }

    fn remove(&self) {
        let filter = format!("label=io.sallyport.agent={}", self.agent);
        if let Ok(out) = Command::new("docker").args(["ps", "-aq", "--filter", &filter]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        for name in &self.extra {
            let _ = Command::new("docker").args(["rm", "-f", name]).output();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A stand-in for an engine that goes away and comes back (Docker Desktop stops when the user
/// logs off): a Unix socket forwarding to the real engine, which can be taken down (listener gone,
/// open connections cut) and brought back at the same path.
#[derive(Debug)]
pub struct EngineProxy {
    dir: tempfile::TempDir,
    serving: Option<(tokio_util::sync::CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl EngineProxy {
    pub fn start() -> Self {
        let mut proxy = Self { dir: tempfile::tempdir().expect("tempdir"), serving: None };
        proxy.up();
        proxy
    }

    /// The endpoint to put in `agent.toml`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.path().display())
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("engine.sock")
    }

    /// Takes the engine away: no listener, every forwarded connection cut.
    pub async fn down(&mut self) {
        if let Some((stop, task)) = self.serving.take() {
            stop.cancel();
            let _ = task.await;
        }
        let _ = std::fs::remove_file(self.path());
    }

    /// Brings it back at the same path.
    pub fn up(&mut self) {
        let listener = tokio::net::UnixListener::bind(self.path()).expect("proxy socket binds");
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    () = token.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut client, _)) = accepted else { continue };
                connections.spawn(async move {
                    if let Ok(mut engine) = tokio::net::UnixStream::connect("/var/run/docker.sock").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
            connections.abort_all();
        });
        self.serving = Some((stop, task));
    }
}
