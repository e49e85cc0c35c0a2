//! Attacks on the tunnel's TCP transport by peers without a certificate: what they can make the
//! relay hold, while a real agent over TCP gets in and carries traffic.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use sallyport_proto::{enroll::ALPN_ENROLL, link::LinkFrame};
use sallyport_runtime::tls;
use sallyport_tests::{
    lab::rss_kib,
    process::{addr_field, Spawned},
    TestPki,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ATTACKERS: u32 = 64;
const MIB: u64 = 1 << 20;

/// An HTTP/2 frame: type, flags, stream and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const CONTINUATION: u8 = 9;
const END_HEADERS: u8 = 4;

/// One peer: TLS with the enrollment ALPN and no certificate, then the agent's end of HTTP/2
/// written by hand: it answers the relay's link stream and fills its window with link datagrams,
/// then answers the relay's next stream with a 16 MiB header block (HEADERS and CONTINUATION
/// frames, which flow control does not hold back). Returns how many bytes of header block the
/// relay took before it ended the connection (0 if the peer never got that far).
async fn flood(relay: SocketAddr, source: SocketAddr, config: Arc<rustls::ClientConfig>) -> u64 {
    let Ok(socket) = tokio::net::TcpSocket::new_v4() else { return 0 };
    if socket.bind(source).is_err() {
        return 0;
    }
    let Ok(tcp) = socket.connect(relay).await else { return 0 };
    let name = tls::server_name("localhost").expect("name");
    let connector = tokio_rustls::TlsConnector::from(config);
    let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await else {
        return 0;
    };
    let mut sent = 0u64;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let attack = async {
        writer.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
        writer.write_all(&frame(SETTINGS, 1, 0, &[])).await?;
        // The client's preface, then frames until the relay opens its second stream (3).
        let mut preface = [0u8; 24];
        reader.read_exact(&mut preface).await?;
        loop {
            let mut head = [0u8; 9];
            reader.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            reader.read_exact(&mut payload).await?;
            if head[3] == HEADERS && stream == 1 {
                // The link stream: a 200, then datagrams up to its window.
                writer.write_all(&frame(HEADERS, END_HEADERS, 1, &[0x88])).await?;
                let mut datagram = BytesMut::new();
                LinkFrame::Datagram(Bytes::from(vec![0xee; 60_000])).encode(&mut datagram);
                writer.write_all(&frame(DATA, 0, 1, &datagram)).await?;
            }
            if head[3] == HEADERS && stream == 3 {
                break;
            }
        }
        // A literal header without indexing: name "x-flood", a 16 MiB value in 64 KiB frames.
        let value_len = 16 * MIB as usize;
        let mut block = vec![0x00, 7];
        block.extend_from_slice(b"x-flood");
        block.push(0x7f);
        let mut rest = value_len - 127;
        while rest >= 128 {
            block.push((rest % 128) as u8 | 0x80);
            rest /= 128;
        }
        block.push(rest as u8);
        writer.write_all(&frame(HEADERS, 0, 3, &block)).await?;
        sent += block.len() as u64;
        let chunk = vec![b'a'; 64 * 1024];
        let frames = value_len / chunk.len();
        for i in 0..frames {
            let flags = if i + 1 == frames { END_HEADERS } else { 0 };
            writer.write_all(&frame(CONTINUATION, flags, 3, &chunk)).await?;
            writer.flush().await?;
            sent += chunk.len() as u64;
        }
        // Hold the connection until the relay ends it.
        let mut sink = vec![0u8; 64 * 1024];
        while reader.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(15), attack).await;
    sent
}

/// 64 certificate-less TCP peers from 8 addresses, each flooding link datagrams and a 16 MiB header
/// block: the relay holds no more than 64 QUIC peers may make it hold, and an agent over TCP gets
/// in within 2 s and carries traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificateless_tcp_peers_flooding_datagrams_and_headers_hold_little() {
    let pki = TestPki::new();
    let relay_toml = pki.dir().join("flood-relay.toml");
    std::fs::write(pki.dir().join("admin.token"), "tcp-attacks-test-admin-token").expect("token file");
    std::fs::write(
        &relay_toml,
        "[relay]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\n\
         key = \"relay.key\"\nca_key = \"ca.key\"\ntokens_file = \"tokens.toml\"\nadmin_token_file = \"admin.token\"\n\
         revocations_file = \"revoked.toml\"\n\
         [services.svc]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("relay.toml");
    let mut relay = Spawned::relay(&relay_toml);
    let service = addr_field(&relay.wait_line("service listening", Duration::from_secs(10)), "addr");
    let ready = relay.wait_line("relay ready", Duration::from_secs(10));
    let tcp = addr_field(&ready, "quic");
    let pid = relay.child.id();
    let idle_kib = rss_kib(pid);

    let ca = tls::certs_from_pem(&std::fs::read(pki.dir().join("ca.crt")).expect("ca"), "ca").expect("pem");
    let config =
        Arc::new(tls::pinned_client_rustls(tls::cert_sha256(&ca[0]), &[ALPN_ENROLL]).expect("config").0);
    let mut attackers = tokio::task::JoinSet::new();
    for i in 0..ATTACKERS {
        let source: SocketAddr = format!("127.0.4.{}:0", 1 + i / 8).parse().expect("addr");
        attackers.spawn(flood(tcp, source, config.clone()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = std::time::Instant::now();
    let target = sallyport_tests::targets::transfer_server().await;
    let agent = sallyport_tests::RunningAgent::start(pki.agent_config_toml(
        "winbox",
        &[tcp],
        "transport = \"tcp\"",
        &format!("[services.svc]\ntarget = \"tcp://{}\"\n", target.addr),
    ));
    let mut status = agent.status.clone();
    let connected = tokio::time::timeout(
        Duration::from_secs(2),
        status.wait_for(|s| s.values().any(|t| matches!(t, sallyport_agent::TunnelStatus::Connected { .. }))),
    )
    .await;
    let agent_in = started.elapsed();
    assert!(connected.is_ok(), "the agent did not get in within 2 s of the flood's start");
    let mut peak_kib = rss_kib(pid);
    let report =
        sallyport_tests::transfer::run(service, MIB, MIB, 3).await.expect("traffic during the flood");
    assert_eq!(report.down, MIB);
    let (mut reached, mut header_bytes) = (0, 0);
    while let Some(done) = attackers.join_next().await {
        peak_kib = peak_kib.max(rss_kib(pid));
        let sent = done.unwrap_or(0);
        reached += u32::from(sent > 0);
        header_bytes += sent;
    }
    let grown = peak_kib.saturating_sub(idle_kib);
    assert!(reached > 0, "no peer got as far as the header block");
    println!(
        "{ATTACKERS} certificate-less TCP peers, each filling its link window with datagrams, {reached} of \
         them then sending a 16 MiB header block ({} KiB written in all before the relay ended them): relay \
         RSS {idle_kib} KiB idle, {peak_kib} KiB at most (+{grown} KiB); the agent over TCP was in after \
         {agent_in:?}",
        header_bytes / 1024
    );
    // What 64 QUIC peers may make the relay hold: each a 64 KiB window, 256 KiB of datagrams and
    // its handshake state (the memory budget's reserve); a tenth more for the allocator.
    let quic_peers = u64::from(ATTACKERS) * (64 + 256 + 32);
    assert!(grown < quic_peers * 11 / 10, "relay grew by {grown} KiB (64 QUIC peers: {quic_peers} KiB)");
    agent.stop().await;
}
