//! The ClientHello parser of the HTTPS listener, which reads as bytes arrive: never a panic, a
//! prefix cut anywhere is either incomplete or already gives the whole input's verdict, and the
//! incremental reader, fed the bytes in pieces as a socket delivers them, ends with that verdict.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sallyport_proto::client_hello::{parse, Hello, HelloReader};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    for cut in 0..data.len() {
        let part = parse(&data[..cut]);
        assert!(part == Hello::Incomplete || part == whole, "cut at {cut}: {part:?}, whole: {whole:?}");
    }
    // Pieces of 1, 2, 3, ... bytes: every cut point is the end of some piece for some input.
    let (mut reader, mut end, mut step) = (HelloReader::default(), 0, 1);
    let mut verdict = Hello::Incomplete;
    while end < data.len() && verdict == Hello::Incomplete {
        end = (end + step).min(data.len());
        step += 1;
        verdict = reader.advance(&data[..end]);
    }
    if verdict == Hello::Incomplete {
        verdict = reader.advance(data);
    }
    assert_eq!(verdict, whole, "fed in pieces");
});
