//! The admin token: read from `relay.admin_token_file`, presented as `Authorization: Bearer`.

use std::path::PathBuf;

use hyper::{Request, StatusCode};

use sallyport_runtime::compare::constant_time_eq;

use crate::config::Config;

/// The bearer token operator calls need. Its `Debug` does not show it.
#[derive(Clone)]
pub struct AdminToken(String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

impl AdminToken {
    /// Whether `presented` is this token (compared in constant time).
    pub(crate) fn matches(&self, presented: &str) -> bool {
        constant_time_eq(presented.as_bytes(), self.0.as_bytes())
    }

    /// The token itself, for a replica's calls to the writer and the CLI's calls to the relay.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

/// Why `relay.admin_token_file` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error("{}: token: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: token: must hold one token of at least 16 characters, no spaces", path.display())]
    Malformed { path: PathBuf },
    #[error("{}: the read-only token is the admin token: give it its own", path.display())]
    SameAsAdmin { path: PathBuf },
}

/// Reads `relay.admin_token_file`: a token of at least 16 characters, or an error naming the file.
pub fn load_admin_token(config: &Config) -> Result<Option<AdminToken>, AdminTokenError> {
    load_token(config.relay.admin_token_file.as_ref())
}

/// Reads `relay.read_token_file`, as [`load_admin_token`] reads the admin token.
pub fn load_read_token(config: &Config) -> Result<Option<AdminToken>, AdminTokenError> {
    load_token(config.relay.read_token_file.as_ref())
}

fn load_token(path: Option<&PathBuf>) -> Result<Option<AdminToken>, AdminTokenError> {
    let Some(path) = path else { return Ok(None) };
    let token = std::fs::read_to_string(path)
        .map_err(|source| AdminTokenError::Read { path: path.clone(), source })?;
    let token = token.trim();
    if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(AdminTokenError::Malformed { path: path.clone() });
    }
    Ok(Some(AdminToken(token.to_owned())))
}

/// Operator calls need `Authorization: Bearer <relay.admin_token_file>`; without a configured token
/// they are off. The read-only token is refused here with its own answer.
pub(crate) fn authorize<B>(req: &Request<B>, token: Option<&AdminToken>) -> Result<(), (StatusCode, String)> {
    authorize_with(req, token, None)
}

/// [`authorize`], telling the read-only token (`read`) apart: it gets a 403 that says so.
pub(crate) fn authorize_with<B>(
    req: &Request<B>,
    token: Option<&AdminToken>,
    read: Option<&AdminToken>,
) -> Result<(), (StatusCode, String)> {
    let Some(expected) = token else {
        return Err((
            StatusCode::FORBIDDEN,
            "operator commands are off: set relay.admin_token_file\n".into(),
        ));
    };
    let presented = presented(req);
    if expected.matches(presented) {
        return Ok(());
    }
    if read.is_some_and(|read| read.matches(presented)) {
        return Err((
            StatusCode::FORBIDDEN,
            "the read-only token only reads: this call needs the admin token\n".into(),
        ));
    }
    Err((StatusCode::UNAUTHORIZED, "missing or wrong admin token\n".into()))
}

/// Reads about agents: the admin token or the read-only one.
pub(crate) fn authorize_read<B>(
    req: &Request<B>,
    token: Option<&AdminToken>,
    read: Option<&AdminToken>,
) -> Result<(), (StatusCode, String)> {
    if read.is_some_and(|read| read.matches(presented(req))) {
        return Ok(());
    }
    authorize(req, token)
}

fn presented<B>(req: &Request<B>) -> &str {
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}
