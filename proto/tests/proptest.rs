//! Round trips and hostile input for every decoder.

use proptest::prelude::*;
use sallyport_proto::{
    frame, AgentMessage, Command, ContainerAction, ContainerReport, DecodeError, Hello, RelayMessage,
    Replica, Replicas, ServiceOffer, ServiceVerdict, StreamHeader, Welcome, MAX_CONTROL_FRAME,
    MAX_STREAM_HEADER,
};

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9-]{1,63}"
}

fn agent_message() -> impl Strategy<Value = AgentMessage> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), ".{0,40}", prop::collection::vec(name(), 0..20)).prop_map(
            |(min_version, max_version, software, names)| AgentMessage::Hello(Hello {
                min_version,
                max_version,
                software,
                services: names.into_iter().map(|name| ServiceOffer { name }).collect(),
            })
        ),
        any::<u64>().prop_map(|nonce| AgentMessage::Pong { nonce }),
        ".{0,300}".prop_map(|csr_pem| AgentMessage::Renew { csr_pem }),
        any::<u64>().prop_map(|session| AgentMessage::Lane { session }),
        prop::collection::vec(name(), 0..5).prop_map(|held| AgentMessage::Seek { held }),
        prop::collection::vec((name(), any::<u64>()), 0..5).prop_map(AgentMessage::StartFailures),
        (name(), ".{0,40}").prop_map(|(transport, why)| AgentMessage::Transport { transport, why }),
        (any::<u64>(), any::<bool>(), ".{0,200}").prop_map(|(id, ok, text)| AgentMessage::CommandResult {
            id,
            result: if ok { Ok(text) } else { Err(text) },
        }),
        prop::collection::vec((name(), ".{0,30}", proptest::option::of(any::<u64>())), 0..10).prop_map(
            |reports| AgentMessage::Containers(
                reports
                    .into_iter()
                    .map(|(name, state, cold_start_ms)| ContainerReport { name, state, cold_start_ms })
                    .collect()
            )
        ),
    ]
}

fn relay_message() -> impl Strategy<Value = RelayMessage> {
    prop_oneof![
        (any::<u16>(), ".{0,40}", prop::collection::vec((name(), proptest::option::of(".{0,60}")), 0..20))
            .prop_map(|(version, software, verdicts)| RelayMessage::Welcome(Welcome {
                version,
                software,
                services: verdicts
                    .into_iter()
                    .map(|(name, refused)| ServiceVerdict { name, refused })
                    .collect(),
            })),
        ".{0,200}".prop_map(|reason| RelayMessage::Refused { reason }),
        any::<u64>().prop_map(|nonce| RelayMessage::Ping { nonce }),
        (any::<u64>(), any::<u16>()).prop_map(|(session, max)| RelayMessage::Lanes { session, max }),
        Just(RelayMessage::LaneAccepted),
        name().prop_map(|replica| RelayMessage::Held { replica }),
        (name(), prop::collection::vec((name(), any::<u64>()), 0..5)).prop_map(|(this, serving)| {
            RelayMessage::Replicas(Replicas {
                this,
                serving: serving.into_iter().map(|(name, boot)| Replica { name, boot }).collect(),
            })
        }),
        (any::<bool>(), ".{0,300}").prop_map(|(ok, text)| RelayMessage::Renewed(if ok {
            Ok(text)
        } else {
            Err(text)
        })),
        (any::<u64>(), any::<u64>(), name(), 0u8..5, any::<u32>()).prop_map(
            |(id, expires_unix, container, action, tail)| RelayMessage::Command(Command {
                id,
                expires_unix,
                container,
                action: match action {
                    0 => ContainerAction::Start,
                    1 => ContainerAction::Stop,
                    2 => ContainerAction::Restart,
                    3 => ContainerAction::Status,
                    _ => ContainerAction::Logs { tail },
                },
            })
        ),
    ]
}

fn header() -> impl Strategy<Value = StreamHeader> {
    // The wire carries address and port only: an IPv6 flow label or scope id is not sent.
    (name(), any::<std::net::IpAddr>(), any::<u16>()).prop_map(|(service, ip, port)| StreamHeader {
        service,
        client_addr: std::net::SocketAddr::new(ip, port),
    })
}

proptest! {
    #[test]
    fn agent_messages_round_trip(msg in agent_message(), tail in prop::collection::vec(any::<u8>(), 0..16)) {
        let mut buf = frame::encode_to_vec(&msg, MAX_CONTROL_FRAME).expect("round trip");
        let len = buf.len();
        buf.extend_from_slice(&tail);
        let (back, used) = frame::decode::<AgentMessage>(&buf, MAX_CONTROL_FRAME).expect("round trip");
        prop_assert_eq!(back, msg);
        prop_assert_eq!(used, len);
    }

    #[test]
    fn relay_messages_round_trip(msg in relay_message()) {
        let buf = frame::encode_to_vec(&msg, MAX_CONTROL_FRAME).expect("round trip");
        let (back, used) = frame::decode::<RelayMessage>(&buf, MAX_CONTROL_FRAME).expect("round trip");
        prop_assert_eq!(back, msg);
        prop_assert_eq!(used, buf.len());
    }

    #[test]
    fn stream_headers_round_trip(h in header()) {
        let buf = frame::encode_to_vec(&h, MAX_STREAM_HEADER).expect("round trip");
        let (back, _) = frame::decode::<StreamHeader>(&buf, MAX_STREAM_HEADER).expect("round trip");
        prop_assert_eq!(back, h);
    }

    /// Arbitrary bytes never panic any decoder, and "incomplete" only ever asks for bytes that
    /// could complete a frame within the cap.
    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for max in [16usize, MAX_STREAM_HEADER, MAX_CONTROL_FRAME] {
            check_garbage::<AgentMessage>(&bytes, max)?;
            check_garbage::<RelayMessage>(&bytes, max)?;
            check_garbage::<StreamHeader>(&bytes, max)?;
        }
    }
}

fn check_garbage<T: serde::de::DeserializeOwned>(bytes: &[u8], max: usize) -> Result<(), TestCaseError> {
    match frame::decode::<T>(bytes, max) {
        Ok((_, used)) => prop_assert!(used <= bytes.len() && used <= max + 4),
        Err(DecodeError::Incomplete { needed }) => prop_assert!(bytes.len() + needed <= max + 4),
        Err(DecodeError::Invalid(_)) => {}
    }
    Ok(())
}
