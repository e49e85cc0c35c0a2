//! A transfer protocol that checks both directions independently, with half-close:
//!
//! 1. the client sends `down_len: u64` and `seed: u64` (big-endian), then `up_len` bytes of its own
//!    data, then shuts down its write side;
//! 2. the server at once streams `down_len` bytes generated from `seed`, and after the client's EOF
//!    sends the SHA-256 of everything it received after the 16-byte preamble, then closes.
//!
//! The client checks the length and hash of the downstream and that the server's hash of the
//! upstream equals its own.

use std::io;

use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

const CHUNK: usize = 64 * 1024;

/// Deterministic data of any length from a seed.
#[derive(Debug)]
pub struct Generator(fastrand::Rng);

impl Generator {
    pub fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill(buf);
    }
}

/// The SHA-256 of `len` bytes generated from `seed`.
pub fn expected_hash(seed: u64, len: u64) -> [u8; 32] {
    let mut generator = Generator::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        generator.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    hash.finalize().into()
}

/// Writes `len` bytes generated from `seed`.
async fn write_generated<W: AsyncWrite + Unpin>(writer: &mut W, seed: u64, len: u64) -> io::Result<()> {
    let mut generator = Generator::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        generator.fill(&mut buf[..n]);
        writer.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// What a finished transfer measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub up: u64,
    pub down: u64,
}

/// Runs one transfer against `addr`; fails with a description of the first mismatch or error.
pub async fn run(addr: std::net::SocketAddr, up: u64, down: u64, seed: u64) -> io::Result<Report> {
    run_counted(addr, up, down, seed, &std::sync::atomic::AtomicU64::new(0)).await
}

/// [`run`], adding every downstream byte received to `progress`.
pub async fn run_counted(
    addr: std::net::SocketAddr,
    up: u64,
    down: u64,
    seed: u64,
    progress: &std::sync::atomic::AtomicU64,
) -> io::Result<Report> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    let up_seed = seed ^ 0x5a5a_5a5a_5a5a_5a5a;
    let write = async move {
        writer.write_all(&down.to_be_bytes()).await?;
        writer.write_all(&seed.to_be_bytes()).await?;
        write_generated(&mut writer, up_seed, up).await?;
        writer.shutdown().await?;
        Ok::<_, io::Error>(writer)
    };
    let read = async move {
        let down_hash = hash_exact(&mut reader, down, progress).await?;
        let mut server_hash = [0u8; 32];
        reader.read_exact(&mut server_hash).await?;
        let mut rest = [0u8; 1];
        if reader.read(&mut rest).await? != 0 {
            return Err(mismatch("bytes after the server's hash"));
        }
        Ok::<_, io::Error>((down_hash, server_hash))
    };
    let (_writer, (down_hash, server_hash)) = tokio::try_join!(write, read)?;
    if down_hash != expected_hash(seed, down) {
        return Err(mismatch("downstream SHA-256 differs"));
    }
    if server_hash != expected_hash(up_seed, up) {
        return Err(mismatch("upstream SHA-256 differs"));
    }
    Ok(Report { up, down })
}

fn mismatch(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

async fn hash_exact<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: u64,
    progress: &std::sync::atomic::AtomicU64,
) -> io::Result<[u8; 32]> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        let n = reader.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("clean EOF after {} of {len} bytes", len - left),
            ));
        }
        hash.update(&buf[..n]);
        progress.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        left -= n as u64;
    }
    Ok(hash.finalize().into())
}

/// How one transfer ended, in the terms of the failure semantics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every byte both ways, hashes equal.
    Ok,
    /// The connection was reset or refused: allowed when something failed.
    Reset,
    /// A clean EOF before all bytes arrived: never allowed.
    ShortEof(String),
    /// Bytes arrived but differ: never allowed.
    Mismatch(String),
    /// Did not finish in time: a hang, never allowed.
    Timeout,
    /// Any other error.
    Error(String),
}

impl Outcome {
    pub fn of(result: &io::Result<Report>) -> Self {
        match result {
            Ok(_) => Self::Ok,
            Err(e) => match e.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionRefused => Self::Reset,
                io::ErrorKind::UnexpectedEof => Self::ShortEof(e.to_string()),
                io::ErrorKind::InvalidData => Self::Mismatch(e.to_string()),
                io::ErrorKind::TimedOut => Self::Timeout,
                _ => Self::Error(e.to_string()),
            },
        }
    }

    /// The one-word name used in the lab tool's output.
    pub fn word(&self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Reset => "reset",
            Self::ShortEof(_) => "short-eof",
            Self::Mismatch(_) => "mismatch",
            Self::Timeout => "timeout",
            Self::Error(_) => "error",
        }
    }
}

/// The server side of one transfer.
pub async fn serve(stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    let mut preamble = [0u8; 16];
    reader.read_exact(&mut preamble).await?;
    let (down, seed) = preamble.split_at(8);
    let down = u64::from_be_bytes(down.try_into().map_err(|_| mismatch("preamble"))?);
    let seed = u64::from_be_bytes(seed.try_into().map_err(|_| mismatch("preamble"))?);
    let send = write_generated(&mut writer, seed, down);
    let receive = async {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        Ok::<_, io::Error>(<[u8; 32]>::from(hash.finalize()))
    };
    let ((), up_hash) = tokio::try_join!(send, receive)?;
    writer.write_all(&up_hash).await?;
    writer.shutdown().await
}
