//! `Host` header values: the relay's reading and the `http` crate's agree whenever both take one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sallyport_relay::fuzzing::host(&String::from_utf8_lossy(data));
});
