//! The WSL helper's address file (a standard user writes it) and `wsl.exe` output.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sallyport_agent::fuzzing::wsl_helper_file(data);
});
