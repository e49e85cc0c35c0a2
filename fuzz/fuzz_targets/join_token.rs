//! Join tokens as a user pastes them: any text decodes or is refused, and a decoded token encodes
//! to text that decodes to the same token.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sallyport_proto::enroll::JoinToken;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(token) = JoinToken::decode(&text) {
        assert_eq!(JoinToken::decode(&token.encode()).ok(), Some(token));
    }
});
