//! A raw agent: a QUIC client with an agent's certificate that speaks the control protocol by hand,
//! for tests that play a misbehaving or compromised agent.

use std::{net::SocketAddr, path::Path};

use sallyport_proto::{frame, AgentMessage, Hello, RelayMessage, ServiceOffer, ALPN_TUNNEL};
use sallyport_runtime::tls;

use crate::TestPki;

/// A connected raw agent: its connection, its control stream, and the relay's first answer.
#[derive(Debug)]
pub struct RawAgent {
    pub connection: quinn::Connection,
    pub control: quinn::SendStream,
    pub control_recv: sallyport_runtime::link::RecvStream,
    pub answer: RelayMessage,
}

/// Why a raw agent got no answer to its `Hello`: the connection's close reason, as text.
pub type Refused = String;

impl RawAgent {
    /// Connects with a fresh bundle of agent `name` from `identity_pki`, trusting the CA of `trust`,
    /// offers `services`, and waits for the relay's answer (the server checks the client
    /// certificate after the client considers the handshake done).
    pub async fn connect(
        identity_pki: &TestPki,
        name: &str,
        trust: &TestPki,
        relay: SocketAddr,
        services: &[&str],
    ) -> Result<Self, Refused> {
        let bundle = identity_pki.agent_bundle(name);
        Self::connect_with(&bundle.join("agent.crt"), &bundle.join("agent.key"), trust, relay, services).await
    }

    /// Like [`connect`](Self::connect), speaking the current protocol version: after `Welcome`
    /// comes `Replicas`, then what the relay sends at any time (commands, lanes, pings).
    pub async fn connect_current(
        identity_pki: &TestPki,
        name: &str,
        trust: &TestPki,
        relay: SocketAddr,
        services: &[&str],
    ) -> Result<Self, Refused> {
        let bundle = identity_pki.agent_bundle(name);
        let hello = hello(sallyport_proto::PROTOCOL_VERSION, services);
        Self::open(&bundle.join("agent.crt"), &bundle.join("agent.key"), trust, relay, &hello).await
    }

    /// Connects with the certificate and key in these files.
    pub async fn connect_with(
        cert: &Path,
        key: &Path,
        trust: &TestPki,
        relay: SocketAddr,
        services: &[&str],
    ) -> Result<Self, Refused> {
        Self::open(cert, key, trust, relay, &hello(1, services)).await
    }

    /// [`connect_with`](Self::connect_with) from the address `source` (another loopback address:
    /// another host, as the relay sees it).
    pub async fn connect_from(
        (cert, key): (&Path, &Path),
        trust: &TestPki,
        relay: SocketAddr,
        services: &[&str],
        source: std::net::IpAddr,
    ) -> Result<Self, Refused> {
        Self::open_from(cert, key, trust, relay, &hello(1, services), SocketAddr::new(source, 0)).await
    }

    /// Connects with a fresh bundle of agent `name` and asks to join session `session` as a lane;
    /// returns the relay's answer.
    pub async fn lane(
        identity_pki: &TestPki,
        name: &str,
        trust: &TestPki,
        relay: SocketAddr,
        session: u64,
    ) -> Result<Self, Refused> {
        let bundle = identity_pki.agent_bundle(name);
        let lane = AgentMessage::Lane { session };
        Self::open(&bundle.join("agent.crt"), &bundle.join("agent.key"), trust, relay, &lane).await
    }

    /// Connects with the certificate and key in these files, sends `first` on a new control
    /// stream, and waits for the relay's answer.
    async fn open(
        cert: &Path,
        key: &Path,
        trust: &TestPki,
        relay: SocketAddr,
        first: &AgentMessage,
    ) -> Result<Self, Refused> {
        Self::open_from(cert, key, trust, relay, first, "127.0.0.1:0".parse().expect("addr")).await
    }

    async fn open_from(
        cert: &Path,
        key: &Path,
        trust: &TestPki,
        relay: SocketAddr,
        first: &AgentMessage,
        source: SocketAddr,
    ) -> Result<Self, Refused> {
        let read = |f: &Path| std::fs::read(f).expect("identity file");
        let identity = tls::Identity::from_pem(&read(cert), &read(key)).expect("identity");
        let roots =
            tls::roots_from_pem(&std::fs::read(trust.dir().join("ca.crt")).expect("ca")).expect("roots");
        let crypto = tls::client_crypto(roots, identity, &[ALPN_TUNNEL]).expect("crypto");
        let mut endpoint = quinn::Endpoint::client(source).expect("endpoint");
        endpoint.set_default_client_config(quinn::ClientConfig::new(crypto));
        let connection =
            endpoint.connect(relay, "127.0.0.1").expect("connect").await.map_err(|e| e.to_string())?;
        let closed =
            |c: &quinn::Connection| c.close_reason().map_or("stream failed".to_owned(), |r| r.to_string());
        let (mut control, control_recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        let mut control_recv = sallyport_runtime::link::RecvStream::from(control_recv);
        let bytes = frame::encode_to_vec(first, 1024).expect("encode");
        control.write_all(&bytes).await.map_err(|_| closed(&connection))?;
        let mut buf = Vec::new();
        let answer = sallyport_runtime::read_frame::<RelayMessage>(&mut control_recv, 64 * 1024, &mut buf)
            .await
            .map_err(|_| closed(&connection))?
            .ok_or("control stream ended")?;
        Ok(Self { connection, control, control_recv, answer })
    }

    /// Sends one control message.
    pub async fn send(&mut self, message: &AgentMessage) {
        self.try_send(message).await.expect("control write");
    }

    /// Sends one control message; the error when the connection is gone (a relay may close it).
    pub async fn try_send(&mut self, message: &AgentMessage) -> Result<(), quinn::WriteError> {
        let bytes = frame::encode_to_vec(message, 64 * 1024).expect("encode");
        self.control.write_all(&bytes).await
    }

    /// Sends `Renew` with `csr_pem` and waits up to 5 s for the relay's answer (skipping
    /// other messages).
    pub async fn renew(&mut self, csr_pem: &str) -> Result<String, String> {
        self.send(&AgentMessage::Renew { csr_pem: csr_pem.to_owned() }).await;
        loop {
            let next = tokio::time::timeout(std::time::Duration::from_secs(5), self.next()).await;
            match next.expect("an answer in time") {
                Some(RelayMessage::Renewed(result)) => return result,
                Some(_) => continue,
                None => panic!("control stream ended"),
            }
        }
    }

    /// Reads the next control message (`None` when the stream ends or fails).
    pub async fn next(&mut self) -> Option<RelayMessage> {
        let mut buf = Vec::new();
        sallyport_runtime::read_frame::<RelayMessage>(&mut self.control_recv, 64 * 1024, &mut buf)
            .await
            .ok()
            .flatten()
    }
}

/// A fresh key (PEM) and a certificate request for it (PEM), as an agent renewing makes them.
pub fn key_and_csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|c| c.pem())
        .expect("csr");
    (key.serialize_pem(), csr)
}

/// A raw agent's `Hello`: protocol versions 1 to `max_version`, offering `services`.
fn hello(max_version: u16, services: &[&str]) -> AgentMessage {
    AgentMessage::Hello(Hello {
        min_version: 1,
        max_version,
        software: "raw".into(),
        services: services.iter().map(|s| ServiceOffer { name: (*s).to_owned() }).collect(),
    })
}
