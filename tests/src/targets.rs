//! Target servers for the agent to dial. Each runs until dropped.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::transfer;

/// A server task bound to a loopback port; aborted on drop.
#[derive(Debug)]
pub struct Target {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<F, Fut>(handler: F) -> Target
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let addr = listener.local_addr().expect("target address");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handler(stream));
        }
    });
    Target { addr, task }
}

/// The transfer protocol's server side (see [`transfer`]).
pub async fn transfer_server() -> Target {
    serve(|stream| async move {
        let _ = transfer::serve(stream).await;
    })
    .await
}

/// Answers each request head with `200 OK` and `body`, then closes (`Connection: close`).
pub async fn http_ok(body: &'static str) -> Target {
    use tokio::io::AsyncReadExt;
    serve(move |mut stream| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let response =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        let _ = stream.write_all(response.as_bytes()).await;
    })
    .await
}

/// Reads a request head and its whole `Content-Length` body, then answers `200 OK` with the
/// number of body bytes it got (an upload endpoint that answers only once it has everything).
pub async fn http_upload() -> Target {
    use tokio::io::AsyncReadExt;
    serve(|mut stream| async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let (head_end, length) = loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
                    .and_then(Result::ok)
                    .unwrap_or(0);
                break (end + 4, length);
            }
        };
        while got.len() - head_end < length {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let body = format!("{length}\n");
        let response =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        let _ = stream.write_all(response.as_bytes()).await;
    })
    .await
}

/// Accepts connections and never reads from them (a stalled upstream).
pub async fn sink() -> Target {
    serve(|stream| async move {
        std::future::pending::<()>().await;
        drop(stream);
    })
    .await
}

/// Sends `greeting` as soon as a client connects, before reading anything, then echoes.
pub async fn greeter(greeting: &'static [u8]) -> Target {
    serve(move |mut stream| async move {
        if stream.write_all(greeting).await.is_err() {
            return;
        }
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// Writes `bytes` bytes and then dies with a RST (as a killed process with unread input would).
pub async fn dies_mid_transfer(bytes: usize) -> Target {
    serve(move |mut stream| async move {
        let data = vec![7u8; bytes];
        let _ = stream.write_all(&data).await;
        sallyport_runtime::reset_on_close(&stream);
        drop(stream);
    })
    .await
}

/// Reads until EOF, then answers with the number of bytes it read (as text) and closes.
pub async fn counts_then_replies() -> Target {
    serve(|mut stream| async move {
        let mut sink = Vec::new();
        if stream.read_to_end(&mut sink).await.is_ok() {
            let _ = stream.write_all(format!("read {} bytes", sink.len()).as_bytes()).await;
        }
    })
    .await
}

/// A loopback address where nothing listens.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address")
}
