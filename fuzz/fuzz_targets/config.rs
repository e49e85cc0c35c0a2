//! relay.toml and agent.toml: any text loads or is refused with an error naming the file, never a
//! panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("/etc/sallyport/fuzz.toml");
    if let Err(e) = sallyport_relay::Config::from_toml(text, path) {
        assert!(e.to_string().starts_with("/etc/sallyport/fuzz.toml"), "{e}");
    }
    if let Err(e) = sallyport_agent::Config::from_toml(text, path) {
        assert!(e.to_string().starts_with("/etc/sallyport/fuzz.toml"), "{e}");
    }
});
