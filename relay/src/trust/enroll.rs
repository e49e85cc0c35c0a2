//! Join tokens and enrollment. An operator creates a token for an agent name (`sallyport-relay
//! token create`); the agent redeems it once over an enrollment connection and gets a client
//! certificate for a key it generated itself.
//!
//! Tokens live in the relay process (and in `relay.tokens_file` when set, so they survive a
//! restart). Only a SHA-256 of each secret is kept; redeeming compares in constant time, and the
//! check-and-mark-used step holds one lock, so of two concurrent uses exactly one wins.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use quinn::Connection;
use sallyport_proto::{
    codes::close,
    enroll::{EnrollRequest, EnrollResponse, MAX_ENROLL_FRAME},
};
use sallyport_runtime::{code, read_frame, write_frame};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::trust::pki::Ca;

/// What the relay needs to issue certificates to enrolling agents.
pub(crate) struct Enrollment {
    pub ca: Ca,
    pub tokens: TokenStore,
    /// Validity of the certificates it issues.
    pub validity: Duration,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment").field("validity", &self.validity).finish_non_exhaustive()
    }
}

/// How long an enrolling agent has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One token as the relay keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: u64,
    pub agent: String,
    /// SHA-256 of the secret, hex.
    secret_sha256: String,
    pub created_unix: u64,
    pub expires_unix: u64,
    pub state: TokenState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenState {
    Active,
    Used,
    Revoked,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    #[serde(default)]
    tokens: Vec<TokenRecord>,
}

/// The relay's tokens.
#[derive(Debug)]
pub(crate) struct TokenStore {
    path: Option<PathBuf>,
    tokens: Mutex<BTreeMap<u64, TokenRecord>>,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl TokenStore {
    /// Loads `path` if it exists (a missing file is an empty store).
    pub fn open(path: Option<PathBuf>) -> Result<Self, String> {
        let file: TokenFile = crate::trust::state_file::load(path.as_deref())?;
        let tokens = file.tokens.into_iter().map(|t| (t.id, t)).collect();
        Ok(Self { path, tokens: Mutex::new(tokens) })
    }

    fn save(&self, tokens: &BTreeMap<u64, TokenRecord>) {
        let Some(path) = &self.path else { return };
        let file = TokenFile { tokens: tokens.values().cloned().collect() };
        if let Err(e) = crate::trust::state_file::save(path, &file) {
            warn!(error = %e, "cannot save the token store");
        }
    }

    /// Creates a token for `agent`, valid for `ttl`; returns its id and secret.
    pub fn create(&self, agent: &str, ttl: Duration) -> (u64, [u8; 32]) {
        let rng = ring::rand::SystemRandom::new();
        let mut secret = [0u8; 32];
        let mut id = [0u8; 8];
        // The system's random source failing is not something to carry on from.
        ring::rand::SecureRandom::fill(&rng, &mut secret).expect("system randomness");
        ring::rand::SecureRandom::fill(&rng, &mut id).expect("system randomness");
        let id = u64::from_be_bytes(id) >> 1;
        let now = now_unix();
        let record = TokenRecord {
            id,
            agent: agent.to_owned(),
            secret_sha256: sha256_hex(&secret),
            created_unix: now,
            expires_unix: now + ttl.as_secs(),
            state: TokenState::Active,
        };
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(id, record);
            self.save(&tokens);
        }
        (id, secret)
    }

    pub fn list(&self) -> Vec<TokenRecord> {
        self.tokens.lock().map(|t| t.values().cloned().collect()).unwrap_or_default()
    }

    /// Revokes token `id`; false if there is none.
    pub fn revoke(&self, id: u64) -> bool {
        let Ok(mut tokens) = self.tokens.lock() else { return false };
        let Some(record) = tokens.get_mut(&id) else { return false };
        record.state = TokenState::Revoked;
        self.save(&tokens);
        true
    }

    /// Checks `secret` for token `id` and marks it used; returns the agent name it was made for.
    pub fn redeem(&self, id: u64, secret: &[u8; 32], now: u64) -> Result<String, String> {
        let Ok(mut tokens) = self.tokens.lock() else { return Err("internal error".into()) };
        // One answer for "no such token" and "wrong secret": a guesser learns nothing.
        let invalid = || "invalid join token".to_owned();
        let record = tokens.get_mut(&id).ok_or_else(invalid)?;
        let presented = sha256_hex(secret);
        if !crate::relay::constant_time_eq(presented.as_bytes(), record.secret_sha256.as_bytes()) {
            return Err(invalid());
        }
        match record.state {
            TokenState::Used => return Err("join token already used".into()),
            TokenState::Revoked => return Err("join token revoked".into()),
            TokenState::Active if record.expires_unix < now => return Err("join token expired".into()),
            TokenState::Active => {}
        }
        record.state = TokenState::Used;
        let agent = record.agent.clone();
        self.save(&tokens);
        Ok(agent)
    }
}

/// Serves one enrollment connection: one request, one response, then close.
pub(crate) async fn serve(connection: Connection, enrollment: &Enrollment) {
    let remote = connection.remote_address();
    let exchange = async {
        let (mut send, mut recv) = connection.accept_bi().await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let request = read_frame::<EnrollRequest>(&mut recv, MAX_ENROLL_FRAME, &mut buf)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no enrollment request")?;
        let response = respond(&request, enrollment);
        match &response {
            EnrollResponse::Issued { agent, .. } => {
                info!(%remote, %agent, token = request.token_id, "agent enrolled")
            }
            EnrollResponse::Refused { reason } => {
                warn!(%remote, token = request.token_id, %reason, "enrollment refused")
            }
        }
        write_frame(&mut send, &response, MAX_ENROLL_FRAME).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        // Let the response reach the agent before closing.
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(())) => connection.close(code(close::NORMAL), b"enrollment done"),
        Ok(Err(e)) => {
            warn!(%remote, error = %e, "enrollment connection failed");
            connection.close(code(close::PROTOCOL_ERROR), b"enrollment failed");
        }
        Err(_) => connection.close(code(close::PROTOCOL_ERROR), b"enrollment timed out"),
    }
}

fn respond(request: &EnrollRequest, enrollment: &Enrollment) -> EnrollResponse {
    let agent = match enrollment.tokens.redeem(request.token_id, &request.secret, now_unix()) {
        Ok(agent) => agent,
        Err(reason) => return EnrollResponse::Refused { reason },
    };
    match enrollment.ca.issue_agent_for_csr(&agent, &request.csr_pem, enrollment.validity) {
        Ok(cert_pem) => EnrollResponse::Issued {
            agent,
            cert_pem,
            ca_pem: enrollment.ca.cert_pem().to_owned(),
            not_after_unix: (now_unix() + enrollment.validity.as_secs()) as i64,
        },
        Err(e) => EnrollResponse::Refused { reason: format!("bad certificate request: {e}") },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_redeemed_once_within_its_lifetime_and_only_with_its_secret() {
        let store = TokenStore::open(None).expect("store");
        let (id, secret) = store.create("winbox", Duration::from_secs(60));
        let now = now_unix();
        let mut wrong = secret;
        wrong[0] ^= 1;
        assert_eq!(store.redeem(id, &wrong, now), Err("invalid join token".into()));
        assert_eq!(store.redeem(id + 1, &secret, now), Err("invalid join token".into()));
        assert_eq!(store.redeem(id, &secret, now + 61), Err("join token expired".into()));
        assert_eq!(store.redeem(id, &secret, now), Ok("winbox".into()));
        assert_eq!(store.redeem(id, &secret, now), Err("join token already used".into()));
        let (id2, secret2) = store.create("winbox", Duration::from_secs(60));
        assert!(store.revoke(id2));
        assert_eq!(store.redeem(id2, &secret2, now), Err("join token revoked".into()));
    }

    #[test]
    fn tokens_survive_a_restart_in_the_tokens_file_without_their_secrets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens.toml");
        let store = TokenStore::open(Some(path.clone())).expect("store");
        let (id, secret) = store.create("winbox", Duration::from_secs(60));
        let text = std::fs::read_to_string(&path).expect("saved");
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&hex), "the secret itself is never stored");
        let reopened = TokenStore::open(Some(path)).expect("reopen");
        assert_eq!(reopened.redeem(id, &secret, now_unix()), Ok("winbox".into()));
    }
}
