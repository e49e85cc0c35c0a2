//! Length-prefixed frames of every message type: `check` and `decode` agree, every strict prefix of
//! a frame is incomplete, and what decodes re-encodes to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sallyport_proto::{
    enroll::{EnrollRequest, EnrollResponse, MAX_ENROLL_FRAME},
    frame::{self, DecodeError},
    AgentMessage, RelayMessage, StreamHeader, MAX_CONTROL_FRAME, MAX_STREAM_HEADER,
};
use serde::{de::DeserializeOwned, Serialize};

fn exercise<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(data: &[u8], max: usize) {
    let checked = frame::check(data, max);
    match frame::decode::<T>(data, max) {
        Ok((message, used)) => {
            assert_eq!(checked.ok(), Some(used), "check and decode agree on the frame's length");
            for cut in 0..used {
                assert!(
                    matches!(frame::check(&data[..cut], max), Err(DecodeError::Incomplete { .. })),
                    "a strict prefix of a frame is incomplete"
                );
            }
            let again =
                frame::encode_to_vec(&message, max).expect("a decoded message re-encodes within the cap");
            let (round, _) = frame::decode::<T>(&again, max).expect("and decodes again");
            assert_eq!(round, message);
        }
        Err(DecodeError::Incomplete { .. }) => {
            assert!(matches!(checked, Err(DecodeError::Incomplete { .. })), "{checked:?}");
        }
        Err(DecodeError::Invalid(_)) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    match kind % 5 {
        0 => exercise::<AgentMessage>(rest, MAX_CONTROL_FRAME),
        1 => exercise::<RelayMessage>(rest, MAX_CONTROL_FRAME),
        2 => exercise::<StreamHeader>(rest, MAX_STREAM_HEADER),
        3 => exercise::<EnrollRequest>(rest, MAX_ENROLL_FRAME),
        _ => exercise::<EnrollResponse>(rest, MAX_ENROLL_FRAME),
    }
});
