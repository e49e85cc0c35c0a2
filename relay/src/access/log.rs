//! The access log: one JSON line per client connection (TCP, HTTPS), per request (HTTP) and per
//! refusal by the rules, written by a thread of its own so no connection ever waits on a disk.
//!
//! Lines go through a bounded queue ([`QUEUE`] lines); when the writer falls that far behind, a
//! line is dropped and counted (`sallyport_access_log_dropped_total`) rather than held in memory
//! or made to wait. A file is rotated by size: `access.log` becomes `access.log.1`, which becomes
//! `access.log.2`, up to `keep` old files.
//!
//! Each line starts with `{"time":"…Z","client_ip":"…"` so that fail2ban and CrowdSec can find the
//! time and the address without a JSON parser (see `deploy/fail2ban/`).

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::mpsc::{self, Receiver, SyncSender, TrySendError},
    time::{Duration, SystemTime},
};

use serde::Serialize;

/// Lines waiting for the writer, at most.
pub const QUEUE: usize = 16_384;

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The relay's standard output (its own log goes to standard error): `kubectl logs`.
    Stdout,
    /// A file, rotated when it would grow past `max_bytes`, keeping `keep` old files.
    File { path: PathBuf, max_bytes: u64, keep: u32 },
}

/// The access log, or none (`[access] log` unset).
#[derive(Debug)]
pub struct AccessLog {
    lines: Option<SyncSender<String>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// What one line says.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// When it ended (or was refused), RFC 3339 in UTC with milliseconds.
    pub time: String,
    /// The client's address: the connection's source, or for an HTTP service behind a trusted
    /// proxy the address that proxy named.
    pub client_ip: IpAddr,
    pub client_port: u16,
    /// The proxy the client came through (its connection's source), when `client_ip` is the one
    /// it named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<IpAddr>,
    pub service: &'a str,
    /// The agent that carries the service.
    pub agent: &'a str,
    /// The transport of the agent's tunnel when the line was written (`quic`, `tcp`), if it was
    /// connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<&'static str>,
    /// The server name an HTTPS client asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<&'a str>,
    /// `tcp`, `udp`, `http` or `https`.
    pub kind: &'static str,
    /// `denied` (the service's rules), `rate_limited`, or how the connection or request ended:
    /// `completed`, `reset`, `no_agent`, `stream_failed`, `idle`, `stalled`.
    pub result: &'static str,
    pub duration_ms: u64,
    /// Bytes from the client (for HTTP: the request body) and to it (for HTTP: the response
    /// body), as far as the relay carried them.
    pub bytes_up: u64,
    pub bytes_down: u64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpFields<'a>>,
}

/// What an HTTP request adds.
#[derive(Debug, Serialize)]
pub struct HttpFields<'a> {
    pub method: &'a str,
    pub host: &'a str,
    /// The path and query as the client sent them.
    pub uri: &'a str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<&'a str>,
    /// Who passed the service's login (a basic auth user, a token's name, the auth server's
    /// `Remote-User`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
}

impl Record<'_> {
    /// A line for `client` of `service`, ended now after `duration`.
    pub fn now<'s>(
        (service, agent): (&'s str, &'s str),
        kind: &'static str,
        client: SocketAddr,
        result: &'static str,
        duration: Duration,
    ) -> Record<'s> {
        Record {
            time: rfc3339(SystemTime::now()),
            client_ip: client.ip().to_canonical(),
            client_port: client.port(),
            via: None,
            service,
            agent,
            transport: None,
            server_name: None,
            kind,
            result,
            duration_ms: duration.as_millis().try_into().unwrap_or(u64::MAX),
            bytes_up: 0,
            bytes_down: 0,
            http: None,
        }
    }
}

impl AccessLog {
    /// No access log.
    pub fn none() -> Self {
        Self { lines: None, writer: None }
    }

    /// Opens `destination` (a file is created if missing and appended to) and starts its writer.
    pub fn open(destination: &Destination) -> io::Result<Self> {
        let sink = match destination {
            Destination::Stdout => Sink::Stdout(io::stdout()),
            Destination::File { path, max_bytes, keep } => {
                let file = open_file(path)?;
                let size = file.metadata()?.len();
                Sink::File {
                    out: BufWriter::new(file),
                    path: path.clone(),
                    size,
                    max_bytes: *max_bytes,
                    keep: *keep,
                }
            }
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let writer =
            std::thread::Builder::new().name("access-log".into()).spawn(move || write_lines(rx, sink))?;
        Ok(Self { lines: Some(tx), writer: Some(writer) })
    }

    /// Whether lines are written at all.
    pub fn is_on(&self) -> bool {
        self.lines.is_some()
    }

    /// Queues `record`; false when the queue was full and the line was dropped.
    pub fn write(&self, record: &Record<'_>) -> bool {
        let Some(lines) = &self.lines else { return true };
        let Ok(line) = serde_json::to_string(record) else { return false };
        match lines.try_send(line) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => false,
            // The writer stopped on an error it already reported.
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Dropping the log (when the relay stops) waits until the writer has written and flushed the
/// lines queued, so the last connections' lines are not lost.
impl Drop for AccessLog {
    fn drop(&mut self) {
        self.lines = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

enum Sink {
    Stdout(io::Stdout),
    File { out: BufWriter<File>, path: PathBuf, size: u64, max_bytes: u64, keep: u32 },
}

fn open_file(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
    options.open(path)
}

/// Writes lines as they come, flushing whenever the queue is empty, until every sender is gone.
fn write_lines(rx: Receiver<String>, mut sink: Sink) {
    let mut pending = false;
    loop {
        let line = if pending {
            match rx.try_recv() {
                Ok(line) => line,
                Err(mpsc::TryRecvError::Empty) => {
                    if let Err(e) = sink.flush() {
                        tracing::error!(error = %e, "cannot write the access log");
                    }
                    pending = false;
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(line) => line,
                Err(_) => break,
            }
        };
        if let Err(e) = sink.line(&line) {
            sallyport_runtime::limited!(error, error = %e, "cannot write the access log");
        }
        pending = true;
    }
    let _ = sink.flush();
}

impl Sink {
    fn line(&mut self, line: &str) -> io::Result<()> {
        match self {
            Self::Stdout(out) => {
                let mut out = out.lock();
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")
            }
            Self::File { out, path, size, max_bytes, keep } => {
                let len = line.len() as u64 + 1;
                if *size > 0 && *size + len > *max_bytes {
                    out.flush()?;
                    rotate(path, *keep)?;
                    *out = BufWriter::new(open_file(path)?);
                    *size = 0;
                }
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")?;
                *size += len;
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Stdout(out) => out.flush(),
            Self::File { out, .. } => out.flush(),
        }
    }
}

/// `path.N-1` becomes `path.N` … `path` becomes `path.1`; the oldest beyond `keep` is gone.
fn rotate(path: &Path, keep: u32) -> io::Result<()> {
    let numbered = |n: u32| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    for n in (1..keep).rev() {
        match std::fs::rename(numbered(n), numbered(n + 1)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::rename(path, numbered(1))
}

/// `time` as `2026-12-07T14:03:09.120Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let t = time::OffsetDateTime::from(time);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_652_189_120);
        assert_eq!(rfc3339(t), "2026-12-07T14:03:09.120Z");
    }

    #[test]
    fn lines_start_with_time_and_address_and_files_rotate() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("access.log");
        let log = AccessLog::open(&Destination::File { path: path.clone(), max_bytes: 1000, keep: 2 })
            .expect("open");
        let client: SocketAddr = "[::ffff:192.0.2.9]:5000".parse().expect("addr");
        for _ in 0..30 {
            let mut r = Record::now(("rdp", "winbox"), "tcp", client, "denied", Duration::from_millis(3));
            r.bytes_up = 7;
            assert!(log.write(&r));
        }
        drop(log);
        let current = std::fs::read_to_string(&path).expect("current");
        let first = current.lines().next().expect("a line");
        assert!(first.starts_with("{\"time\":\"20"), "{first}");
        assert!(
            first.contains(r#""client_ip":"192.0.2.9","client_port":5000,"service":"rdp","agent":"winbox","kind":"tcp","result":"denied","duration_ms":3,"bytes_up":7"#),
            "{first}"
        );
        assert!(current.len() <= 1000);
        assert!(path.with_extension("log.1").exists() && path.with_extension("log.2").exists());
        assert!(!path.with_extension("log.3").exists(), "only 2 old files are kept");
        let line_len = first.len() + 1;
        let total: usize = ["log", "log.1", "log.2"]
            .iter()
            .map(|e| std::fs::read_to_string(path.with_extension(e)).expect("file").len())
            .sum();
        assert!(total.is_multiple_of(line_len) && total < 30 * line_len, "whole lines, the oldest gone");
    }
}
