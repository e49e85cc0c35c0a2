//! The ClientHello parser of the HTTPS listener, which reads as bytes arrive: never a panic, and a
//! prefix cut anywhere is either incomplete or already gives the whole input's verdict.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sallyport_proto::client_hello::{parse, Hello};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    for cut in 0..data.len() {
        let part = parse(&data[..cut]);
        assert!(part == Hello::Incomplete || part == whole, "cut at {cut}: {part:?}, whole: {whole:?}");
    }
});
