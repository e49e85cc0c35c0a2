//! Enrollment with a join token: the token an operator pastes on the agent machine, and the one
//! request/response exchange that turns it into a client certificate.
//!
//! The token carries where the relay is, the SHA-256 of the relay's CA certificate, and a token id
//! and secret. The agent checks the relay's chain against that hash during the TLS handshake
//! (ALPN [`ALPN_ENROLL`], no client certificate), so the secret goes only to the right relay; then
//! it sends [`EnrollRequest`] with a CSR for a key it generated itself, and gets the certificate
//! back. The private key never leaves the agent.

use serde::{Deserialize, Serialize};

/// ALPN of an enrollment connection.
pub const ALPN_ENROLL: &[u8] = b"sallyport-enroll/1";

/// The prefix of a join token string: names the format and its version.
pub const TOKEN_PREFIX: &str = "spjoin1.";

/// Cap of an enrollment message (a CSR is well under 2 KiB).
pub const MAX_ENROLL_FRAME: usize = 16 * 1024;

/// What a join token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Relay addresses as `HOST:PORT`, tried in order.
    pub relays: Vec<String>,
    /// The name the relay's certificate carries.
    pub server_name: String,
    /// SHA-256 of the relay's CA certificate (DER).
    pub ca_sha256: [u8; 32],
    pub id: u64,
    pub secret: [u8; 32],
}

/// A string that is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a Sallyport join token (it should start with {TOKEN_PREFIX})")]
    Prefix,
    #[error("the join token is damaged (incomplete copy?): {0}")]
    Damaged(String),
}

impl JoinToken {
    /// The token as one copy-pasteable string: the prefix, then base64url of its postcard bytes.
    pub fn encode(&self) -> String {
        let bytes = postcard::to_stdvec(self).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", base64url::encode(&bytes))
    }

    /// Parses a token string, ignoring surrounding whitespace.
    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let body = text.trim().strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        let bytes = base64url::decode(body).map_err(|e| TokenError::Damaged(e.to_string()))?;
        let token: Self = postcard::from_bytes(&bytes).map_err(|e| TokenError::Damaged(e.to_string()))?;
        if token.relays.is_empty() || token.server_name.is_empty() {
            return Err(TokenError::Damaged("no relay address".into()));
        }
        Ok(token)
    }
}

/// The agent's one request on an enrollment connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token_id: u64,
    pub secret: [u8; 32],
    /// PKCS#10 request for the agent's own key, PEM. The relay takes only the public key from
    /// it; the name and usages of the certificate come from the token.
    pub csr_pem: String,
}

/// The relay's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollResponse {
    Issued {
        /// The agent name the certificate carries.
        agent: String,
        cert_pem: String,
        ca_pem: String,
        /// Seconds since the Unix epoch.
        not_after_unix: i64,
    },
    Refused {
        reason: String,
    },
}

/// Unpadded base64url (RFC 4648 §5): the token stays one word in a shell and a URL.
mod base64url {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};

    pub fn encode(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
        URL_SAFE_NO_PAD.decode(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken {
            relays: vec!["192.168.4.60:443".into()],
            server_name: "192.168.4.60".into(),
            ca_sha256: [7; 32],
            id: 0x0123_4567_89ab_cdef,
            secret: [42; 32],
        }
    }

    #[test]
    fn tokens_round_trip_as_one_url_safe_word() {
        let text = token().encode();
        assert!(text.starts_with(TOKEN_PREFIX));
        assert!(text[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(JoinToken::decode(&format!("  {text}\n")), Ok(token()));
    }

    #[test]
    fn damaged_tokens_are_named_as_such() {
        let text = token().encode();
        assert_eq!(JoinToken::decode("hello"), Err(TokenError::Prefix));
        assert!(matches!(JoinToken::decode(&text[..text.len() - 10]), Err(TokenError::Damaged(_))));
        assert!(matches!(JoinToken::decode(&format!("{text}!")), Err(TokenError::Damaged(_))));
    }

    #[test]
    fn base64url_matches_the_rfc_vectors() {
        for (plain, encoded) in
            [("", ""), ("f", "Zg"), ("fo", "Zm8"), ("foo", "Zm9v"), ("foob", "Zm9vYg"), ("fooba", "Zm9vYmE")]
        {
            assert_eq!(base64url::encode(plain.as_bytes()), encoded);
            assert_eq!(base64url::decode(encoded).as_deref(), Ok(plain.as_bytes()));
        }
        assert_eq!(base64url::encode(&[0xfb, 0xff]), "-_8");
    }
}
