//! Certificates the relay orders itself by ACME (`[certificates.NAME.acme]`, instant-acme): the
//! account and each certificate kept in the store folder (a state volume), an order when none is
//! there and again at two thirds of its lifetime, failures retried with a doubling backoff and
//! logged with the server's problem document. The challenges are answered on the relay's own
//! listeners: `http-01` by the HTTP listener, `tls-alpn-01` by the HTTPS listener.
//!
//! With several replicas (`[cluster]`), only the writer orders.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder,
    OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use sallyport_runtime::{durable, sync::lock};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{challenges::Challenges, store::Store};
use crate::config::{
    acme::{Acme, Challenge},
    Certificate, Live, Loaded,
};

/// How often the certificates are looked at for an order that is due.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// The first retry after a failed order, doubled after each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// How long an order may take to become ready, and its certificate to be issued.
const ORDER_WAIT: Duration = Duration::from_secs(90);

/// Why an order failed (the certificate in service stays).
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcmeError {
    /// What the ACME server or the way to it said, with its causes (a problem document's
    /// detail and type, or why the connection failed).
    #[error("{}", chain(.0))]
    Server(#[from] instant_acme::Error),
    #[error("an authorization is {0}")]
    Authorization(String),
    #[error("the ACME server offers no {0} challenge")]
    NoChallenge(&'static str),
    #[error("the order is {status}: {problem}")]
    NotReady { status: String, problem: String },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: std::path::PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Account { path: std::path::PathBuf, source: serde_json::Error },
    #[error("the account's credentials cannot be kept: {0}")]
    Credentials(serde_json::Error),
    #[error("the tls-alpn-01 validation certificate: {0}")]
    Validation(#[from] rcgen::Error),
    #[error("the tls-alpn-01 validation key: {0}")]
    ValidationKey(#[from] rustls::Error),
    #[error(transparent)]
    Load(#[from] crate::config::CertificateError),
}

/// Orders what is due until `stop`.
pub(crate) async fn run(live: Arc<Live>, store: Arc<Store>, stop: CancellationToken) {
    let mut retry: HashMap<String, (Instant, Duration)> = HashMap::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECK_EVERY) => {}
            () = stop.cancelled() => return,
        }
        let config = live.get();
        if config.cluster.as_ref().is_some_and(|c| c.replica != c.writer) {
            continue;
        }
        for (name, (files, _)) in &config.certificates {
            let Some(acme) = &files.acme else { continue };
            if retry.get(name).is_some_and(|(at, _)| Instant::now() < *at) {
                continue;
            }
            let held = store.get(name).and_then(|h| h.loaded);
            if !held.as_ref().is_none_or(renewal_due) {
                continue;
            }
            info!(certificate = %name, names = ?acme.names, renewal = held.is_some(), "ordering a certificate by ACME");
            let ordered = tokio::select! {
                ordered = order(files, acme, &store.challenges) => ordered,
                () = stop.cancelled() => return,
            };
            match ordered {
                Ok(loaded) => {
                    info!(certificate = %name, not_after = loaded.not_after_unix, issuer = %loaded.issuer, "ACME certificate issued: serving it");
                    store.install(name, loaded);
                    retry.remove(name);
                }
                Err(reason) => {
                    let backoff = retry.get(name).map_or(FIRST_BACKOFF, |(_, b)| (*b * 2).min(MAX_BACKOFF));
                    warn!(certificate = %name, %reason, retry_in = ?backoff, "ACME order failed");
                    store.failed(name, format!("ACME order failed: {reason}"));
                    retry.insert(name.clone(), (Instant::now() + backoff, backoff));
                }
            }
        }
    }
}

/// Whether `loaded` is past two thirds of its lifetime.
fn renewal_due(loaded: &Loaded) -> bool {
    let life = loaded.not_after_unix - loaded.not_before_unix;
    let due = loaded.not_before_unix + life * 2 / 3;
    sallyport_runtime::clock::unix_now() as i64 >= due
}

/// One order: the challenges answered, the certificate written to the store, then read back.
async fn order(files: &Certificate, acme: &Acme, challenges: &Challenges) -> Result<Loaded, AcmeError> {
    let account = account(acme).await?;
    let identifiers: Vec<Identifier> = acme.names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let kind = match acme.challenge {
        Challenge::Http01 => ChallengeType::Http01,
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut answering = Answering { challenges, tokens: Vec::new(), names: Vec::new() };
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(AcmeError::Authorization(format!("{other:?}"))),
        }
        let mut challenge =
            authorization.challenge(kind.clone()).ok_or(AcmeError::NoChallenge(acme.challenge.word()))?;
        let key_authorization = challenge.key_authorization();
        match acme.challenge {
            Challenge::Http01 => {
                answering.http(challenge.token.clone(), key_authorization.as_str().to_owned())
            }
            Challenge::TlsAlpn01 => {
                let name = challenge.identifier().to_string();
                let certificate = validation_certificate(&name, key_authorization.digest().as_ref())?;
                answering.tls_alpn(name, certificate)
            }
        }
        challenge.set_ready().await?;
    }
    let waiting = RetryPolicy::new().timeout(ORDER_WAIT);
    let status = order.poll_ready(&waiting).await?;
    if status != OrderStatus::Ready {
        let problem = order.state().error.as_ref().map(ToString::to_string);
        return Err(AcmeError::NotReady {
            status: format!("{status:?}"),
            problem: problem.unwrap_or_else(|| "no problem document".into()),
        });
    }
    let key_pem = order.finalize().await?;
    let chain_pem = order.poll_certificate(&waiting).await?;
    drop(answering);
    write_pair(files, &chain_pem, &key_pem)?;
    Ok(files.load()?)
}

/// Challenges answered while an order runs; taken back when it ends.
struct Answering<'a> {
    challenges: &'a Challenges,
    tokens: Vec<String>,
    names: Vec<String>,
}

impl Answering<'_> {
    fn http(&mut self, token: String, answer: String) {
        lock(&self.challenges.http).insert(token.clone(), answer);
        self.tokens.push(token);
    }

    fn tls_alpn(&mut self, name: String, certificate: Arc<CertifiedKey>) {
        lock(&self.challenges.tls_alpn).insert(name.clone(), certificate);
        self.names.push(name);
    }
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        let mut http = lock(&self.challenges.http);
        for token in &self.tokens {
            http.remove(token);
        }
        drop(http);
        let mut tls_alpn = lock(&self.challenges.tls_alpn);
        for name in &self.names {
            tls_alpn.remove(name);
        }
    }
}

/// The account for `acme.directory`, kept in the store (created on first use).
async fn account(acme: &Acme) -> Result<Account, AcmeError> {
    let builder = || match &acme.ca {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    let digest = sallyport_runtime::tls::cert_sha256(acme.directory.as_bytes());
    let file = acme.store.join(format!("account-{}.json", sallyport_runtime::hex::encode(&digest[..6])));
    if let Ok(text) = std::fs::read_to_string(&file) {
        let credentials: AccountCredentials = serde_json::from_str(&text)
            .map_err(|source| AcmeError::Account { path: file.clone(), source })?;
        return Ok(builder()?.from_credentials(credentials).await?);
    }
    let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
    let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
    let (account, credentials) = builder()?.create(&new, acme.directory.clone(), None).await?;
    let json = serde_json::to_vec(&credentials).map_err(AcmeError::Credentials)?;
    durable::replace_private(&file, &json)
        .map_err(|source| AcmeError::Write { path: file.clone(), source })?;
    info!(directory = %acme.directory, id = account.id(), "ACME account created");
    Ok(account)
}

/// The self-signed certificate a `tls-alpn-01` validation expects for `name`: the name, and the
/// key authorization's digest in the acmeIdentifier extension (RFC 8737).
fn validation_certificate(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    // rcgen serializes a key it generated as PKCS#8.
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into();
    let signer = sallyport_runtime::tls::provider().key_provider.load_private_key(der)?;
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer)))
}

/// Writes the key, then the chain, each whole before it replaces the old one.
fn write_pair(files: &Certificate, chain_pem: &str, key_pem: &str) -> Result<(), AcmeError> {
    for (path, pem) in [(&files.key, key_pem), (&files.cert, chain_pem)] {
        durable::replace_private(path, pem.as_bytes())
            .map_err(|source| AcmeError::Write { path: path.clone(), source })?;
    }
    Ok(())
}

/// An error with its causes (an HTTP client's "client error (Connect)" says why only in them).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
