//! `sallyport-relay check`: validate a configuration and its TLS files without binding anything.

use std::fmt;

use sallyport_proto::net::tls;

use crate::{config::Config, StartError};

/// What a valid configuration amounts to.
#[derive(Debug)]
pub struct CheckReport {
    pub relay_names: Vec<String>,
    pub relay_cert_days_left: i64,
    pub services: Vec<(String, String, String)>,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "relay certificate: valid for {} more days, names {}",
            self.relay_cert_days_left,
            self.relay_names.join(", ")
        )?;
        for (name, agent, listen) in &self.services {
            writeln!(f, "service {name}: agent {agent}, listens on {listen}")?;
        }
        Ok(())
    }
}

/// Reads the CA and the relay's certificate and key, and checks that they belong together.
pub fn check(config: &Config) -> Result<CheckReport, StartError> {
    let files = &config.tls;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| StartError::Read {
            path: p.to_owned(),
            source,
        })
    };
    let tls_err = |p: &std::path::Path, source| StartError::Tls {
        path: p.to_owned(),
        source,
    };
    let ca = tls::certs_from_pem(&read(&files.ca_cert)?, "CA file")
        .map_err(|e| tls_err(&files.ca_cert, e))?;
    let identity = tls::Identity::from_pem(&read(&files.cert)?, &read(&files.key)?)
        .map_err(|e| tls_err(&files.cert, e))?;
    let leaf = identity.chain.first().ok_or_else(|| {
        tls_err(
            &files.cert,
            tls::TlsError::NoCertificate {
                what: "certificate file",
            },
        )
    })?;
    let invalid = |path: &std::path::Path, reason: String| StartError::Invalid {
        path: path.to_owned(),
        reason,
    };
    tls::verify_issued_by(leaf, &ca[0])
        .map_err(|e| invalid(&files.cert, format!("{e} (CA {})", files.ca_cert.display())))?;
    let info = tls::inspect(leaf).map_err(|e| invalid(&files.cert, e.to_string()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let days_left = (info.not_after_unix - now) / 86_400;
    if days_left < 0 {
        return Err(invalid(&files.cert, "certificate has expired".into()));
    }
    // The key must match the certificate: building the server config checks that.
    let roots =
        tls::roots_from_pem(&read(&files.ca_cert)?).map_err(|e| tls_err(&files.ca_cert, e))?;
    tls::server_crypto(roots, identity, &[sallyport_proto::ALPN_TUNNEL])
        .map_err(|e| tls_err(&files.key, e))?;
    Ok(CheckReport {
        relay_names: info.sans,
        relay_cert_days_left: days_left,
        services: config
            .services
            .values()
            .map(|s| {
                let crate::config::Listen::Tcp(addr) = s.listen;
                (s.name.clone(), s.agent.clone(), format!("tcp {addr}"))
            })
            .collect(),
    })
}
