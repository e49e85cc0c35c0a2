//! The bodies relay replicas send each other (reports, the writer's answers, token checks).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sallyport_relay::fuzzing::cluster_bodies(&String::from_utf8_lossy(data));
});
