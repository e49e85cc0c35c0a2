//! Certificate requests, as token holders and agents send them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sallyport_relay::fuzzing::csr(&String::from_utf8_lossy(data));
});
