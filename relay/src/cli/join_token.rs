//! `sallyport-relay token create`: the join token string an agent redeems, built from the admin
//! API's answer and the relay's certificates.

use std::path::{Path, PathBuf};

use sallyport_runtime::{hex, tls};

use crate::config::Config;

/// Why a join token could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum JoinTokenError {
    /// The admin API answered something other than `ID SECRET_HEX`.
    #[error("unexpected answer from the admin API: {0:?}")]
    Answer(String),
    /// The CA or relay certificate file cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The CA or relay certificate file holds no usable certificate.
    #[error(transparent)]
    Pem(#[from] tls::TlsError),
    #[error(transparent)]
    Certificate(#[from] tls::CertError),
    /// Without a name in the relay certificate there is nothing for the agent to verify.
    #[error("the relay certificate has no name")]
    NoName,
}

/// Builds the join token string from the admin API's answer to `POST /tokens` (`ID SECRET_HEX`):
/// adds the relay addresses agents dial (default: the relay certificate's first name, port 443),
/// the name its certificate carries, and the SHA-256 of the CA certificate.
pub fn join_token(config: &Config, relays: &[String], created: &str) -> Result<String, JoinTokenError> {
    let answer = || JoinTokenError::Answer(created.to_owned());
    let mut words = created.split_whitespace();
    let (Some(id), Some(secret)) = (words.next(), words.next()) else { return Err(answer()) };
    let id = u64::from_str_radix(id, 16).map_err(|_| answer())?;
    let secret: [u8; 32] = hex::decode(secret).and_then(|s| s.try_into().ok()).ok_or_else(answer)?;
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| JoinTokenError::Read { path: path.to_owned(), source })
    };
    let ca = tls::certs_from_pem(&read(&config.relay.ca_cert)?, "CA file")?;
    let relay_cert = tls::certs_from_pem(&read(&config.relay.cert)?, "relay certificate")?;
    let info = tls::inspect(&relay_cert[0])?;
    let server_name = info.sans.first().cloned().ok_or(JoinTokenError::NoName)?;
    let relays = if relays.is_empty() { vec![default_relay_addr(&server_name)] } else { relays.to_vec() };
    let token = sallyport_proto::enroll::JoinToken {
        relays,
        server_name,
        ca_sha256: tls::cert_sha256(&ca[0]),
        id,
        secret,
    };
    Ok(token.encode())
}

/// `HOST:443` for a name of the relay's certificate (IPv6 addresses in brackets).
pub fn default_relay_addr(name: &str) -> String {
    if name.contains(':') {
        format!("[{name}]:443")
    } else {
        format!("{name}:443")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_addresses_default_to_port_443() {
        assert_eq!(default_relay_addr("relay.lan"), "relay.lan:443");
        assert_eq!(default_relay_addr("fd00::60"), "[fd00::60]:443");
    }
}
