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

use std::{collections::BTreeMap, path::Path, sync::Arc};

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use rustls::pki_types::CertificateDer;

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
    /// `http://host:port/path` or `https://…`.
    pub url: String,
    /// Header names, lower-case.
    pub copy_headers: Vec<String>,
    /// For an `https://` URL: the CAs the auth server's certificate must chain to.
    pub tls: Option<ForwardTls>,
}

/// How the relay checks an HTTPS auth server: its certificate must chain to `forward_ca`'s CAs,
/// or to the system's when the service names none, for the URL's host name (TLS 1.2 or 1.3, no
/// early data, no client certificate).
#[derive(Clone)]
pub struct ForwardTls {
    /// Where the CAs came from (a file, or the system's store).
    pub roots_from: String,
    roots: Vec<CertificateDer<'static>>,
    pub config: Arc<rustls::ClientConfig>,
}

impl PartialEq for ForwardTls {
    fn eq(&self, other: &Self) -> bool {
        self.roots_from == other.roots_from && self.roots == other.roots
    }
}

impl Eq for ForwardTls {}

impl std::fmt::Debug for ForwardTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardTls")
            .field("roots_from", &self.roots_from)
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl ForwardTls {
    /// Trusts the CAs in the PEM file `ca`, or the system's (`SSL_CERT_FILE`, `SSL_CERT_DIR`,
    /// `/etc/ssl/certs`) when `None`.
    pub fn new(ca: Option<&Path>) -> Result<Self, AuthError> {
        let (roots_from, certs) = match ca {
            Some(path) => {
                let from = path.display().to_string();
                let pem = std::fs::read(path)
                    .map_err(|e| AuthError::ForwardCa(format!("cannot read {from}: {e}")))?;
                let certs = sallyport_runtime::tls::certs_from_pem(&pem, "forward_ca")
                    .map_err(|e| AuthError::ForwardCa(format!("{from}: {e}")))?;
                (from, certs)
            }
            None => ("the system's trusted CAs".to_owned(), rustls_native_certs::load_native_certs().certs),
        };
        let mut store = rustls::RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(certs.iter().cloned());
        if added == 0 {
            return Err(AuthError::ForwardCa(match ca {
                Some(_) => format!("no CA certificate in {roots_from}"),
                None => "this system has no trusted CAs (SSL_CERT_FILE, SSL_CERT_DIR, /etc/ssl/certs; the relay's image has none): set forward_ca to a PEM file of the CAs to trust".to_owned(),
            }));
        }
        let mut config = rustls::ClientConfig::builder_with_provider(sallyport_runtime::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| AuthError::ForwardCa(e.to_string()))?
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.enable_early_data = false;
        Ok(Self { roots_from, roots: certs, config: Arc::new(config) })
    }
}

/// Why a setting of a gate is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{0:?} is not an argon2 password hash (a PHC string such as $argon2id$v=19$m=19456,t=2,p=1$…): make one with `sallyport-relay hash-password`")]
    HashFormat(String),
    #[error("a token is written \"sha256:\" and 64 hex digits (its SHA-256: printf %s TOKEN | sha256sum)")]
    TokenFormat,
    #[error("{0:?} is not an http:// or https:// URL with a host")]
    ForwardUrl(String),
    #[error("{0}")]
    ForwardCa(String),
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

/// Checks a forward-auth URL: `http://host[:port][/path]` or `https://…`; whether it is HTTPS.
pub fn check_forward_url(url: &str) -> Result<bool, AuthError> {
    let bad = || AuthError::ForwardUrl(url.to_owned());
    let uri: hyper::Uri = url.parse().map_err(|_| bad())?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad()),
    };
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad());
    }
    Ok(https)
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
        assert_eq!(check_forward_url("http://authelia.auth.svc:9091/api/verify"), Ok(false));
        assert_eq!(check_forward_url("https://auth.home.lan/api/verify"), Ok(true));
        for bad in ["ftp://x/", "authelia:9091", "http:///x", "https:///x"] {
            assert!(check_forward_url(bad).is_err(), "{bad}");
        }
        // The fixed hash for unknown users parses.
        check_hash(UNKNOWN_USER).expect("unknown user's hash");
    }
}
