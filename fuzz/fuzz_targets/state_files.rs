//! State files as they may be found on disk (revocations, join tokens): taken or refused, and
//! revocations taken survive a save and a reload unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sallyport_relay::fuzzing::state_files(&String::from_utf8_lossy(data));
});
