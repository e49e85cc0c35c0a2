//! The CLI's side of the admin API: one HTTP/1.1 request over a fresh connection.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// How long the CLI waits for the admin server (a container start may take a while).
const TIMEOUT: Duration = Duration::from_secs(120);

/// Why an admin API call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminCallError {
    #[error("cannot reach the admin server at {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("admin server at {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("malformed response from the admin server")]
    Malformed,
    #[error("the admin server did not answer within {} s", TIMEOUT.as_secs())]
    Timeout,
}

/// Sends `METHOD path` to the admin server at `addr` with an optional bearer token; returns the
/// status code and body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), AdminCallError> {
    let io = |source| AdminCallError::Io { addr, source };
    let exchange = async {
        let mut stream =
            TcpStream::connect(addr).await.map_err(|source| AdminCallError::Connect { addr, source })?;
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(io)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").ok_or(AdminCallError::Malformed)?;
        let status =
            head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(AdminCallError::Malformed)?;
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(TIMEOUT, exchange).await.map_err(|_| AdminCallError::Timeout)?
}
