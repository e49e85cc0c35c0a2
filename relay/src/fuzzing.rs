//! Entry points for the fuzz targets (`fuzz/`): the parsers that take bytes from the network or
//! from disk, reached from outside the crate without making their modules public. Each checks
//! the properties its target asserts and panics when one breaks.

use crate::{
    cluster::{RedeemAnswer, RedeemRequest, SyncAnswer, SyncRequest},
    trust::revocations::{RevocationFile, Revocations},
};

/// A `Host` header value: when both the relay and the `http` crate take it, they name the same
/// host (the relay routes by what it reads; the target reads what `http` reads).
pub fn host(text: &str) {
    let Some(ours) = crate::expose::http::host_only(text) else { return };
    assert!(
        !ours.is_empty() && !ours.contains('@') && ours.bytes().all(|b| b.is_ascii_graphic()),
        "{ours:?}"
    );
    if let Ok(authority) = text.parse::<hyper::http::uri::Authority>() {
        let theirs = authority.host().trim_start_matches('[').trim_end_matches(']').trim_end_matches('.');
        assert_eq!(ours, theirs.to_ascii_lowercase(), "{text:?}");
    }
}

/// A state file (revocations, join tokens) as it may be found on disk: taken or refused; taken
/// revocations survive a save and a reload unchanged, and merging them changes nothing twice.
pub fn state_files(text: &str) {
    let _ = crate::trust::enroll::parses_as_token_file(text);
    let Ok(file) = toml::from_str::<RevocationFile>(text) else { return };
    let revocations = Revocations::open(None).expect("in memory");
    let _ = revocations.absorb(file.clone());
    let once = revocations.snapshot();
    let again = toml::from_str::<RevocationFile>(&toml::to_string(&once).expect("encode")).expect("decode");
    assert_eq!(once, again);
    let absorbed = revocations.absorb(file).expect("in memory");
    assert_eq!(absorbed.added, 0, "absorbing the same list twice adds nothing");
}

/// The bodies replicas send each other: taken or refused, and what is taken encodes again.
pub fn cluster_bodies(text: &str) {
    if let Ok(request) = toml::from_str::<SyncRequest>(text) {
        let _ = toml::to_string(&request);
    }
    if let Ok(answer) = toml::from_str::<SyncAnswer>(text) {
        let _ = toml::to_string(&answer);
    }
    let _ = toml::from_str::<RedeemRequest>(text);
    let _ = toml::from_str::<RedeemAnswer>(text);
}

/// A certificate request from a token holder or an agent: its key is read, or it is refused.
pub fn csr(text: &str) {
    let _ = crate::trust::pki::csr_key_sha256(text);
}
