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
async fn order(files: &Certificate, acme: &Acme, challenges: &Challenges) -> Result<Loaded, String> {
    let account = account(acme).await?;
    let identifiers: Vec<Identifier> = acme.names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await.map_err(|e| chain(&e))?;
    let kind = match acme.challenge {
        Challenge::Http01 => ChallengeType::Http01,
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut answering = Answering { challenges, tokens: Vec::new(), names: Vec::new() };
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.map_err(|e| chain(&e))?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(format!("an authorization is {other:?}")),
        }
        let mut challenge = authorization
            .challenge(kind.clone())
            .ok_or_else(|| format!("the ACME server offers no {} challenge", acme.challenge.word()))?;
        let key_authorization = challenge.key_authorization();
        let name = challenge.identifier().to_string();
        match acme.challenge {
            Challenge::Http01 => {
                answering.http(challenge.token.clone(), key_authorization.as_str().to_owned())
            }
            Challenge::TlsAlpn01 => answering.tls_alpn(
                name,
                validation_certificate(
                    &challenge.identifier().to_string(),
                    key_authorization.digest().as_ref(),
                )?,
            ),
        }
        challenge.set_ready().await.map_err(|e| chain(&e))?;
    }
    let waiting = RetryPolicy::new().timeout(ORDER_WAIT);
    let status = order.poll_ready(&waiting).await.map_err(|e| chain(&e))?;
    if status != OrderStatus::Ready {
        let problem = order.state().error.as_ref().map(ToString::to_string);
        return Err(format!(
            "the order is {status:?}: {}",
            problem.unwrap_or_else(|| "no problem document".into())
        ));
    }
    let key_pem = order.finalize().await.map_err(|e| chain(&e))?;
    let chain_pem = order.poll_certificate(&waiting).await.map_err(|e| chain(&e))?;
    drop(answering);
    write_pair(files, &chain_pem, &key_pem)
        .map_err(|e| format!("cannot write {}: {e}", files.cert.display()))?;
    files.load()
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
async fn account(acme: &Acme) -> Result<Account, String> {
    let builder = || match &acme.ca {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    let digest = sallyport_runtime::tls::cert_sha256(acme.directory.as_bytes());
    let file = acme.store.join(format!("account-{}.json", sallyport_runtime::hex::encode(&digest[..6])));
    if let Ok(text) = std::fs::read_to_string(&file) {
        let credentials: AccountCredentials =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        return builder().map_err(|e| chain(&e))?.from_credentials(credentials).await.map_err(|e| chain(&e));
    }
    let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
    let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
    let (account, credentials) = builder()
        .map_err(|e| chain(&e))?
        .create(&new, acme.directory.clone(), None)
        .await
        .map_err(|e| chain(&e))?;
    let json = serde_json::to_vec(&credentials).map_err(|e| chain(&e))?;
    durable::replace_private(&file, &json).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    info!(directory = %acme.directory, id = account.id(), "ACME account created");
    Ok(account)
}

/// The self-signed certificate a `tls-alpn-01` validation expects for `name`: the name, and the
/// key authorization's digest in the acmeIdentifier extension (RFC 8737).
fn validation_certificate(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| chain(&e))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| chain(&e))?;
    let cert = params.self_signed(&key).map_err(|e| chain(&e))?;
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(str::to_owned)?;
    let signer =
        sallyport_runtime::tls::provider().key_provider.load_private_key(der).map_err(|e| chain(&e))?;
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer)))
}

/// Writes the key, then the chain, each whole before it replaces the old one.
fn write_pair(files: &Certificate, chain_pem: &str, key_pem: &str) -> std::io::Result<()> {
    durable::replace_private(&files.key, key_pem.as_bytes())?;
    durable::replace_private(&files.cert, chain_pem.as_bytes())
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
