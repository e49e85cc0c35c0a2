//! The tunnel over TCP as the relay sees it: the relay is the HTTP/2 client and the agent's end
//! (a peer that may not have proven anything yet) the server, so any bytes may come back. After a
//! valid server preface, the fuzzer's bytes are what the peer sends: the relay's end must end
//! cleanly or keep going, never panic or grow without bound, whatever they are.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sallyport_runtime::{link, tcp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(256 * 1024);
        let bytes = data.to_vec();
        let peer = async move {
            // An empty SETTINGS frame: the server preface.
            let _ = theirs.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
            let _ = theirs.write_all(&bytes).await;
            let mut sink = vec![0u8; 16 * 1024];
            while let Ok(n) = theirs.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let relay = async {
            let who = tcp::Peer { remote: "127.0.0.1:1".parse().expect("addr"), certificates: None, alpn: None };
            let settings = tcp::tcp_relay(Duration::from_secs(1), Duration::from_secs(5), false);
            if let Ok(connection) = tcp::client(ours, who, settings).await {
                let connection = link::Connection::from(connection);
                connection.accept_datagrams();
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while connection.read_datagram().await.is_ok() {}
                })
                .await;
                if let Ok(Ok((_send, mut recv))) =
                    tokio::time::timeout(Duration::from_secs(1), connection.accept_bi()).await
                {
                    let _ = tokio::time::timeout(Duration::from_secs(1), recv.read_chunk()).await;
                }
                connection.close(link::code(0), b"");
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(peer, relay) }).await;
    });
});
