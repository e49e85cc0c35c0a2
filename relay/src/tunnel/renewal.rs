//! Certificate renewal over the control stream. The relay signs a new certificate for the key in
//! the agent's request only when the certificate the tunnel runs on is due (a third of its lifetime
//! left), at most once a minute for that certificate, and never for one that is revoked. Each
//! certificate issued is logged with its serial.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use sallyport_runtime::{clock, sync::lock};

use crate::{
    cluster::Cluster,
    metrics::Metrics,
    trust::{
        pki::{self, PkiError},
        Trust,
    },
    tunnel::identity::AgentCert,
};

/// How long after one renewal of a certificate another is refused (the agent asks again after a
/// minute when an answer was lost with its tunnel).
const RENEWAL_INTERVAL: Duration = Duration::from_secs(60);

/// Why a renewal was refused (the agent is told this text).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RenewRefused {
    #[error("certificate renewal is off on this relay (no relay.ca_key)")]
    Off,
    #[error("certificate revoked")]
    Revoked,
    /// No service names the agent any more (a reload removed it): it is not admitted.
    #[error("no service of this relay names this agent")]
    UnknownAgent,
    /// The certificate has more than a third of its lifetime left.
    #[error("certificate not due for renewal before {due_unix} (unix time)")]
    NotDue { due_unix: i64 },
    #[error("this certificate was renewed less than {}s ago", RENEWAL_INTERVAL.as_secs())]
    TooSoon,
    /// The certificate was renewed already, for another key.
    #[error("this certificate was renewed already, for another key")]
    RenewedForAnotherKey,
    #[error("bad certificate request: {0}")]
    Request(#[from] PkiError),
    /// A replica that is not the writer renews only with the writer's revocations of this moment.
    #[error(
        "the writer replica cannot be reached for its latest revocations; the agent asks again later: {0}"
    )]
    WriterUnreachable(String),
}

impl RenewRefused {
    fn metric(&self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Revoked => "revoked",
            Self::UnknownAgent => "unknown_agent",
            Self::NotDue { .. } => "not_due",
            Self::TooSoon => "too_soon",
            Self::RenewedForAnotherKey => "renewed_already",
            Self::Request(_) => "bad_request",
            Self::WriterUnreachable(_) => "writer_unreachable",
        }
    }
}

/// When each certificate was last renewed, by serial, and for which key.
#[derive(Debug, Default)]
pub(crate) struct Renewals {
    last: Mutex<HashMap<String, Instant>>,
    /// Each certificate renewed so far (by serial, until it ends), with the SHA-256 of the public
    /// key it was renewed for: it renews again only for that key (an answer lost with its tunnel).
    keys: Mutex<HashMap<String, ([u8; 32], i64)>>,
}

/// When a certificate valid from `not_before` to `not_after` becomes due: a third of its lifetime
/// before it ends (the agent asks by the same rule).
pub(crate) fn due_at(not_before: i64, not_after: i64) -> i64 {
    not_after - (not_after - not_before).max(0) / 3
}

impl Renewals {
    /// Signs a certificate for the key of `csr_pem` for the agent of `cert`, or says why not. A
    /// replica that is not the writer first takes the writer's revocations of this moment, so a
    /// revocation made there a moment ago holds here too (`local`: the agents it holds).
    pub(crate) async fn renew(
        &self,
        (trust, cluster, named): (&Trust, Option<&Cluster>, bool),
        cert: &AgentCert,
        csr_pem: &str,
        (metrics, local): (&Metrics, Vec<String>),
    ) -> Result<String, RenewRefused> {
        if !named {
            metrics.renewal(RenewRefused::UnknownAgent.metric());
            return Err(RenewRefused::UnknownAgent);
        }
        let fresh = match cluster {
            Some(cluster) if !cluster.is_writer() => cluster
                .refresh_revocations(local, &trust.revocations)
                .await
                .map_err(|e| RenewRefused::WriterUnreachable(e.to_string())),
            _ => Ok(()),
        };
        let result = fresh.and_then(|()| self.check_and_issue(trust, cert, csr_pem));
        metrics.renewal(result.as_ref().map_or_else(RenewRefused::metric, |_| "issued"));
        result
    }

    fn check_and_issue(
        &self,
        trust: &Trust,
        cert: &AgentCert,
        csr_pem: &str,
    ) -> Result<String, RenewRefused> {
        let enrollment = trust.enrollment.as_ref().ok_or(RenewRefused::Off)?;
        if trust.revocations.refuses(&cert.id) {
            return Err(RenewRefused::Revoked);
        }
        let due_unix = due_at(cert.id.issued_unix, cert.not_after_unix);
        if (clock::unix_now() as i64) < due_unix {
            return Err(RenewRefused::NotDue { due_unix });
        }
        let key = pki::csr_key_sha256(csr_pem)?;
        {
            let mut keys = lock(&self.keys);
            let now = clock::unix_now() as i64;
            keys.retain(|_, (_, not_after)| *not_after > now);
            if keys.get(&cert.id.serial).is_some_and(|(renewed_for, _)| *renewed_for != key) {
                return Err(RenewRefused::RenewedForAnotherKey);
            }
            let mut last = lock(&self.last);
            last.retain(|_, at| at.elapsed() < RENEWAL_INTERVAL);
            if last.contains_key(&cert.id.serial) {
                return Err(RenewRefused::TooSoon);
            }
            last.insert(cert.id.serial.clone(), Instant::now());
            keys.insert(cert.id.serial.clone(), (key, cert.not_after_unix));
        }
        let pem = enrollment.ca.issue_agent_for_csr(&cert.id.agent, csr_pem, enrollment.validity)?;
        pki::log_issued(&cert.id.agent, &pem, "renewal");
        Ok(pem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_with_a_third_of_the_lifetime_left() {
        assert_eq!(due_at(1_000, 1_000 + 90), 1_060);
        assert_eq!(due_at(0, 12), 8);
        assert_eq!(due_at(50, 40), 40, "a certificate that ended is due");
    }
}
