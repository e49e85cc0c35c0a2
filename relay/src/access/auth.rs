//! A gate in front of an HTTP service: who may pass, and as whom. Three ways in, tried in this
//! order, after the service's bypass paths (which pass anyone):
//!
//! 1. a token for apps and scripts, in `Authorization: Bearer TOKEN` or a header the service
//!    names; kept as its SHA-256 and compared in constant time;
//! 2. HTTP basic auth, each user's password kept as an argon2id hash (PHC string, made by
//!    `sallyport-relay hash-password`);
//! 3. forward auth: the relay asks an auth server (Authelia, authentik, oauth2-proxy) about the
//!    request (the HTTP side of it is the HTTP listener's).
//!
//! A password or token is never logged; the user's name (or the token's) is.

use std::collections::BTreeMap;

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};

/// A service's gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// The realm browsers show in their login prompt.
    pub realm: String,
    /// Users and their argon2id PHC strings.
    pub users: BTreeMap<String, String>,
    /// Token names and each token's SHA-256.
    pub tokens: BTreeMap<String, [u8; 32]>,
    /// Where tokens come (lower-case); `None`: `Authorization: Bearer`.
    pub token_header: Option<String>,
    pub forward: Option<Forward>,
    /// Path prefixes that pass without credentials.
    pub bypass: Vec<String>,
}

/// Forward auth: the URL to ask, and the headers of its answer copied to the request upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// `http://host:port/path`.
    pub url: String,
    /// Header names, lower-case.
    pub copy_headers: Vec<String>,
}

/// Why a setting of a gate is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{0:?} is not an argon2 password hash (a PHC string such as $argon2id$v=19$m=19456,t=2,p=1$…): make one with `sallyport-relay hash-password`")]
    HashFormat(String),
    #[error("a token is written \"sha256:\" and 64 hex digits (its SHA-256: printf %s TOKEN | sha256sum)")]
    TokenFormat,
    #[error(
        "{0:?} is not an http:// URL (forward auth asks the auth server over plain HTTP, inside the cluster)"
    )]
    ForwardUrl(String),
    #[error("the system gave no random numbers for a salt")]
    Random,
    #[error("cannot hash the password: {0}")]
    Hashing(argon2::password_hash::Error),
}

/// Checks a password hash: argon2 (id, i or d) in PHC form.
pub fn check_hash(phc: &str) -> Result<(), AuthError> {
    let hash = PasswordHash::new(phc).map_err(|_| AuthError::HashFormat(phc.to_owned()))?;
    match hash.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => Ok(()),
        _ => Err(AuthError::HashFormat(phc.to_owned())),
    }
}

/// Reads `sha256:HEX` into the digest.
pub fn parse_token(text: &str) -> Result<[u8; 32], AuthError> {
    let hex = text.strip_prefix("sha256:").ok_or(AuthError::TokenFormat)?;
    let bytes = sallyport_runtime::hex::decode(hex).ok_or(AuthError::TokenFormat)?;
    bytes.try_into().map_err(|_| AuthError::TokenFormat)
}

/// Checks a forward-auth URL: `http://host[:port][/path]`.
pub fn check_forward_url(url: &str) -> Result<(), AuthError> {
    let bad = || AuthError::ForwardUrl(url.to_owned());
    let uri: hyper::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
        return Err(bad());
    }
    Ok(())
}

/// An argon2id hash of `password` with a new random salt (the crate's default parameters).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| AuthError::Random)?;
    let salt = SaltString::encode_b64(&bytes).map_err(AuthError::Hashing)?;
    Ok(Argon2::default().hash_password(password.as_bytes(), &salt).map_err(AuthError::Hashing)?.to_string())
}

impl Auth {
    /// Whether `path` passes without credentials.
    pub fn bypassed(&self, path: &str) -> bool {
        self.bypass.iter().any(|prefix| path.starts_with(prefix.as_str()))
    }

    /// The name of the token `presented` is, if any (every token compared, in constant time).
    pub fn token(&self, presented: &str) -> Option<&str> {
        let digest = ring::digest::digest(&ring::digest::SHA256, presented.as_bytes());
        let mut found = None;
        for (name, sha) in &self.tokens {
            if sallyport_runtime::compare::constant_time_eq(digest.as_ref(), sha) {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// Whether `user` with `password` is a user of this gate. Slow on purpose (argon2): run it off
    /// the async threads. An unknown user costs the same as a wrong password.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let known = self.users.get(user);
        // A fixed hash for unknown users, so the time does not say which names exist.
        let phc = known.map_or(UNKNOWN_USER, String::as_str);
        let ok = PasswordHash::new(phc)
            .is_ok_and(|hash| Argon2::default().verify_password(password.as_bytes(), &hash).is_ok());
        ok && known.is_some()
    }
}

/// The hash an unknown user's password is checked against (of a random password nobody knows).
const UNKNOWN_USER: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsbHlwb3J0LXVua25vd24$5u0pEcY5bBHNh5oc1fhjoFQtfsmb93LxjczS8Ljkm0Q";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_tokens_and_their_formats() {
        let hash = hash_password("correct horse").expect("a hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        check_hash(&hash).expect("a hash it made");
        let auth = Auth {
            realm: "x".into(),
            users: BTreeMap::from([("alice".into(), hash)]),
            tokens: BTreeMap::from([(
                "ci".into(),
                parse_token("sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b")
                    .expect("token"),
            )]),
            token_header: None,
            forward: None,
            bypass: vec!["/api/".into()],
        };
        assert!(auth.verify("alice", "correct horse"));
        assert!(!auth.verify("alice", "wrong") && !auth.verify("bob", "correct horse"));
        assert_eq!(auth.token("secret"), Some("ci"), "sha256 of \"secret\"");
        assert_eq!(auth.token("secret2"), None);
        assert!(auth.bypassed("/api/v1/status") && !auth.bypassed("/admin"));
        let e = check_hash("$2b$12$abcdefghijklmnopqrstuv").expect_err("bcrypt").to_string();
        assert!(e.contains("is not an argon2 password hash"), "{e}");
        assert!(check_hash("hunter2").is_err());
        assert_eq!(parse_token("secret"), Err(AuthError::TokenFormat));
        assert_eq!(parse_token("sha256:abcd"), Err(AuthError::TokenFormat));
        check_forward_url("http://authelia.auth.svc:9091/api/verify").expect("http");
        for bad in ["https://auth.home.lan/verify", "ftp://x/", "authelia:9091", "http:///x"] {
            assert!(check_forward_url(bad).is_err(), "{bad}");
        }
        // The fixed hash for unknown users parses.
        check_hash(UNKNOWN_USER).expect("unknown user's hash");
    }
}
