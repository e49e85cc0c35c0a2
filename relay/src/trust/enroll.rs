//! Join tokens and enrollment. An operator creates a token for an agent name (`sallyport-relay
//! token create`); the agent redeems it once over an enrollment connection and gets a client
//! certificate for a key it generated itself.
//!
//! Tokens live in the relay process (and in `relay.tokens_file` when set, so they survive a
//! restart). Only a SHA-256 of each secret is kept; redeeming compares in constant time, and the
//! check-and-mark-used step holds one lock, so of two concurrent uses exactly one wins.

use std::{collections::BTreeMap, path::PathBuf, sync::Mutex, time::Duration};

use sallyport_proto::{
    codes::close,
    enroll::{EnrollRequest, EnrollResponse, MAX_ENROLL_FRAME},
};
use sallyport_runtime::link::Connection;
use sallyport_runtime::{
    clock::unix_now as now_unix, code, hex, read_frame, sync::lock, write_frame, FrameError,
};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use sallyport_runtime::compare::constant_time_eq;

use crate::trust::{
    pki::Ca,
    state_file::{self, StateError},
};

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

/// Whether `text` reads as a tokens file (for the fuzz targets).
pub(crate) fn parses_as_token_file(text: &str) -> bool {
    toml::from_str::<TokenFile>(text).is_ok()
}

/// The relay's tokens.
#[derive(Debug)]
pub(crate) struct TokenStore {
    path: Option<PathBuf>,
    tokens: Mutex<BTreeMap<u64, TokenRecord>>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Why a join token was not redeemed (the agent is told this text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub(crate) enum RedeemError {
    /// No such token, or the wrong secret: one answer for both, so a guesser learns nothing.
    #[error("invalid join token")]
    Invalid,
    /// The token was good but its use could not be recorded: it stays used, and nothing is issued.
    #[error("the relay cannot record the token's use; ask the operator")]
    Unsaved,
    #[error("join token already used")]
    Used,
    #[error("join token revoked")]
    Revoked,
    #[error("join token expired")]
    Expired,
    /// A replica that is not the writer could not ask the writer, which alone marks tokens used.
    #[error("the relay cannot check join tokens right now (the replica that keeps them is unreachable); try again shortly")]
    WriterUnreachable,
}

/// Why an enrollment connection ended without an answer.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    /// The agent opened no stream (the connection went away).
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    /// The request frame could not be read, or the answer not written.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended before a request.
    #[error("no enrollment request")]
    NoRequest,
}

impl TokenStore {
    /// Loads `path` if it exists (a missing file is an empty store).
    pub fn open(path: Option<PathBuf>) -> Result<Self, StateError> {
        let file: TokenFile = state_file::load(path.as_deref())?;
        let tokens = file.tokens.into_iter().map(|t| (t.id, t)).collect();
        Ok(Self { path, tokens: Mutex::new(tokens) })
    }

    fn save(&self, tokens: &BTreeMap<u64, TokenRecord>) -> Result<(), StateError> {
        let Some(path) = &self.path else { return Ok(()) };
        let file = TokenFile { tokens: tokens.values().cloned().collect() };
        state_file::save(path, &file)
    }

    /// Creates a token for `agent`, valid for `ttl`; returns its id and secret.
    pub fn create(&self, agent: &str, ttl: Duration) -> Result<(u64, [u8; 32]), StateError> {
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
        let mut tokens = lock(&self.tokens);
        tokens.insert(id, record);
        if let Err(e) = self.save(&tokens) {
            // A token that could not be kept is not handed out.
            tokens.remove(&id);
            return Err(e);
        }
        Ok((id, secret))
    }

    pub fn list(&self) -> Vec<TokenRecord> {
        lock(&self.tokens).values().cloned().collect()
    }

    /// Revokes token `id`; false if there is none. Revoked in memory even if the save fails.
    pub fn revoke(&self, id: u64) -> Result<bool, StateError> {
        let mut tokens = lock(&self.tokens);
        let Some(record) = tokens.get_mut(&id) else { return Ok(false) };
        record.state = TokenState::Revoked;
        self.save(&tokens)?;
        Ok(true)
    }

    /// Checks `secret` for token `id` and marks it used; returns the agent name it was made for.
    pub fn redeem(&self, id: u64, secret: &[u8; 32], now: u64) -> Result<String, RedeemError> {
        let mut tokens = lock(&self.tokens);
        let record = tokens.get_mut(&id).ok_or(RedeemError::Invalid)?;
        let presented = sha256_hex(secret);
        if !constant_time_eq(presented.as_bytes(), record.secret_sha256.as_bytes()) {
            return Err(RedeemError::Invalid);
        }
        match record.state {
            TokenState::Used => return Err(RedeemError::Used),
            TokenState::Revoked => return Err(RedeemError::Revoked),
            TokenState::Active if record.expires_unix < now => return Err(RedeemError::Expired),
            TokenState::Active => {}
        }
        record.state = TokenState::Used;
        let agent = record.agent.clone();
        if let Err(e) = self.save(&tokens) {
            // Used stays used in memory: failing closed, nothing is issued for it.
            error!(error = %e, token = format!("{id:016x}"), "cannot record a used join token: enrollment refused");
            return Err(RedeemError::Unsaved);
        }
        Ok(agent)
    }
}

/// Serves one enrollment connection: one request, one response, then close. `redeem` checks the
/// token and marks it used (here, or at the writer replica of a cluster).
pub(crate) async fn serve(
    connection: Connection,
    enrollment: &Enrollment,
    redeem: impl AsyncFnOnce(u64, [u8; 32]) -> Result<String, RedeemError>,
) {
    let remote = connection.remote_address();
    let exchange = async {
        let (mut send, mut recv) = connection.accept_bi().await?;
        let mut buf = Vec::new();
        let request = read_frame::<EnrollRequest>(&mut recv, MAX_ENROLL_FRAME, &mut buf)
            .await?
            .ok_or(ExchangeError::NoRequest)?;
        let response = match redeem(request.token_id, request.secret).await {
            Ok(agent) => issue(&agent, &request, enrollment),
            Err(refused) => EnrollResponse::Refused { reason: refused.to_string() },
        };
        match &response {
            EnrollResponse::Issued { agent, .. } => {
                info!(%remote, %agent, token = request.token_id, "agent enrolled")
            }
            EnrollResponse::Refused { reason } => {
                warn!(%remote, token = request.token_id, %reason, "enrollment refused")
            }
        }
        write_frame(&mut send, &response, MAX_ENROLL_FRAME).await?;
        let _ = send.finish();
        // Let the response reach the agent before closing.
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        Ok::<_, ExchangeError>(())
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

/// Signs the request's key for `agent`, whose token was redeemed.
fn issue(agent: &str, request: &EnrollRequest, enrollment: &Enrollment) -> EnrollResponse {
    let agent = agent.to_owned();
    match enrollment.ca.issue_agent_for_csr(&agent, &request.csr_pem, enrollment.validity) {
        Ok(cert_pem) => {
            crate::trust::pki::log_issued(&agent, &cert_pem, "enrollment");
            EnrollResponse::Issued {
                agent,
                cert_pem,
                ca_pem: enrollment.ca.root_pem().to_owned(),
                not_after_unix: (now_unix() + enrollment.validity.as_secs()) as i64,
            }
        }
        Err(e) => EnrollResponse::Refused { reason: format!("bad certificate request: {e}") },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_redeemed_once_within_its_lifetime_and_only_with_its_secret() {
        let store = TokenStore::open(None).expect("store");
        let (id, secret) = store.create("winbox", Duration::from_secs(60)).expect("create");
        let now = now_unix();
        let mut wrong = secret;
        wrong[0] ^= 1;
        assert_eq!(store.redeem(id, &wrong, now), Err(RedeemError::Invalid));
        assert_eq!(store.redeem(id + 1, &secret, now), Err(RedeemError::Invalid));
        assert_eq!(store.redeem(id, &secret, now + 61), Err(RedeemError::Expired));
        assert_eq!(store.redeem(id, &secret, now), Ok("winbox".into()));
        assert_eq!(store.redeem(id, &secret, now), Err(RedeemError::Used));
        let (id2, secret2) = store.create("winbox", Duration::from_secs(60)).expect("create");
        assert!(store.revoke(id2).expect("revoke"));
        assert_eq!(store.redeem(id2, &secret2, now), Err(RedeemError::Revoked));
        assert_eq!(RedeemError::Invalid.to_string(), "invalid join token");
    }

    #[test]
    fn tokens_survive_a_restart_in_the_tokens_file_without_their_secrets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens.toml");
        let store = TokenStore::open(Some(path.clone())).expect("store");
        let (id, secret) = store.create("winbox", Duration::from_secs(60)).expect("create");
        let text = std::fs::read_to_string(&path).expect("saved");
        assert!(!text.contains(&hex::encode(&secret)), "the secret itself is never stored");
        let reopened = TokenStore::open(Some(path)).expect("reopen");
        assert_eq!(reopened.redeem(id, &secret, now_unix()), Ok("winbox".into()));
    }
}
