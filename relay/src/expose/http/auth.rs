//! The login in front of an HTTP service (`[services.NAME.auth]`, checked by
//! [`crate::access::auth`]): bypass paths, tokens, basic auth, then forward auth. A request that
//! passes goes upstream without the credentials the relay consumed, with the user in
//! `Remote-User` (a client's own `Remote-User` never goes upstream); one that does not gets 401
//! (with a basic auth challenge when the service has users), or the auth server's own answer.
//!
//! Password checks are argon2 (slow on purpose): they run on blocking threads, two at a time, and
//! a password that passed is remembered by a SHA-256 of it for [`REMEMBER`], so a browser sending
//! it with every request costs one check. A client host that fails [`FAILURES_BURST`] times, then
//! more than one every [`FAILURE_PERIOD`], is answered 429 for [`BLOCKED_FOR`] without any check.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::{
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;

use super::page::{page, Body};
use crate::access::auth::{Auth, Forward};

/// How long a password that passed is remembered.
pub(super) const REMEMBER: Duration = Duration::from_secs(600);
/// Failed logins a client host may make at once, per service.
pub(super) const FAILURES_BURST: u32 = 10;
/// After the burst, one more failure per this long.
pub(super) const FAILURE_PERIOD: Duration = Duration::from_secs(6);
/// How long a host over its failures is answered 429.
pub(super) const BLOCKED_FOR: Duration = Duration::from_secs(60);
/// Passwords remembered at most (the oldest go first).
const REMEMBERED: usize = 1024;
/// How long the auth server has to answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest auth server answer passed back to a client.
const FORWARD_BODY: usize = 64 << 10;

/// What the gate decided.
pub(super) enum Verdict {
    /// Upstream it goes, as this user (a basic auth user, a token's name, the auth server's
    /// `Remote-User`), if any.
    Pass(Option<String>),
    /// This answer goes back; the access log's word for why.
    Refused(Response<Body>, &'static str),
}

/// The listener's memory of logins: passwords that passed, and hosts that failed too often.
#[derive(Debug)]
pub(super) struct Logins {
    remembered: Mutex<HashMap<[u8; 32], Instant>>,
    failures: governor::DefaultKeyedRateLimiter<(String, IpAddr)>,
    blocked: Mutex<HashMap<(String, IpAddr), Instant>>,
    checks: tokio::sync::Semaphore,
}

impl Default for Logins {
    fn default() -> Self {
        // Constants: a period that is not zero and a burst that is not zero.
        let quota = governor::Quota::with_period(FAILURE_PERIOD)
            .expect("a period")
            .allow_burst(NonZeroU32::new(FAILURES_BURST).expect("a burst"));
        Self {
            remembered: Mutex::default(),
            failures: governor::RateLimiter::keyed(quota),
            blocked: Mutex::default(),
            checks: tokio::sync::Semaphore::new(2),
        }
    }
}

/// Decides on `req` for `service` behind `auth`, from client host `client`.
pub(super) async fn gate(
    req: &mut Request<Incoming>,
    (service, auth): (&str, &Arc<Auth>),
    client: IpAddr,
    host: &str,
    (logins, tasks): (&Logins, &tokio_util::task::TaskTracker),
) -> Verdict {
    // Who the user is, is the relay's (or the auth server's) to say, never the client's.
    req.headers_mut().remove(REMOTE_USER);
    if let Some(forward) = &auth.forward {
        for name in &forward.copy_headers {
            req.headers_mut().remove(name.as_str());
        }
    }
    if auth.bypassed(req.uri().path()) {
        return Verdict::Pass(None);
    }
    let host_key = (service.to_owned(), sallyport_runtime::addr::host_key(client));
    if logins.is_blocked(&host_key) {
        return Verdict::Refused(too_many(), "rate_limited");
    }
    if let Some(name) = token(req, auth) {
        return pass_as(req, name);
    }
    if let Some((user, password)) = basic(req) {
        if logins.check(service, auth, &user, &password).await {
            req.headers_mut().remove(header::AUTHORIZATION);
            return pass_as(req, user);
        }
    } else if let Some(forward) = &auth.forward {
        return match ask(forward, req, (client, host), tasks).await {
            Ok(Asked::Passed(user, headers)) => {
                for (name, value) in headers {
                    req.headers_mut().append(name, value);
                }
                Verdict::Pass(user)
            }
            Ok(Asked::Refused(answer)) => {
                logins.failed(host_key);
                Verdict::Refused(answer, "auth_failed")
            }
            // The auth server's trouble is not the client's failure (fail2ban does not count it),
            // and its address and reason are the operator's to read, in the relay's log.
            Err(e) => {
                sallyport_runtime::limited!(warn, service, error = %e, "forward auth: no answer from the auth server");
                let text = format!("the login service of {host:?} cannot be reached");
                Verdict::Refused(page(StatusCode::BAD_GATEWAY, &text), "auth_unavailable")
            }
        };
    }
    let blocked = logins.failed(host_key);
    if blocked {
        return Verdict::Refused(too_many(), "auth_failed");
    }
    let mut response = page(StatusCode::UNAUTHORIZED, &format!("{host:?} needs a login"));
    if !auth.users.is_empty() {
        let realm = auth.realm.replace(['"', '\\'], "");
        if let Ok(value) = HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\"")) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
        }
    }
    Verdict::Refused(response, "auth_failed")
}

/// The header that names the user upstream (as Authelia and authentik name it).
const REMOTE_USER: &str = "remote-user";

/// Passes `req` upstream as `user`, named in `Remote-User`.
fn pass_as(req: &mut Request<Incoming>, user: String) -> Verdict {
    if let Ok(value) = HeaderValue::from_str(&user) {
        req.headers_mut().insert(REMOTE_USER, value);
    }
    Verdict::Pass(Some(user))
}

fn too_many() -> Response<Body> {
    let mut response =
        page(StatusCode::TOO_MANY_REQUESTS, "too many failed logins from this address: try again later");
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(BLOCKED_FOR.as_secs()));
    response
}

/// The token's name, when the request carries one of the service's tokens (which is then removed
/// from the request).
fn token(req: &mut Request<Incoming>, auth: &Auth) -> Option<String> {
    let name = match &auth.token_header {
        Some(h) => {
            let presented = req.headers().get(h.as_str())?.to_str().ok()?;
            let name = auth.token(presented)?.to_owned();
            req.headers_mut().remove(h.as_str());
            name
        }
        None => {
            let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
            let (scheme, presented) = value.split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return None;
            }
            let name = auth.token(presented.trim())?.to_owned();
            req.headers_mut().remove(header::AUTHORIZATION);
            name
        }
    };
    Some(name)
}

/// The user and password of `Authorization: Basic`.
fn basic(req: &Request<Incoming>) -> Option<(String, String)> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

impl Logins {
    fn is_blocked(&self, key: &(String, IpAddr)) -> bool {
        let blocked = sallyport_runtime::sync::lock(&self.blocked);
        blocked.get(key).is_some_and(|until| Instant::now() < *until)
    }

    /// Counts a failed login of `key`; true when that takes the host over its failures (it is
    /// blocked from now on).
    fn failed(&self, key: (String, IpAddr)) -> bool {
        if self.failures.check_key(&key).is_ok() {
            return false;
        }
        let mut blocked = sallyport_runtime::sync::lock(&self.blocked);
        let now = Instant::now();
        if blocked.len() >= 4096 {
            blocked.retain(|_, until| *until > now);
            self.failures.retain_recent();
        }
        blocked.insert(key, now + BLOCKED_FOR);
        true
    }

    /// Whether `user` and `password` pass `auth` of `service`: remembered, or checked off the
    /// async threads.
    async fn check(&self, service: &str, auth: &Arc<Auth>, user: &str, password: &str) -> bool {
        let mut material = Vec::with_capacity(service.len() + user.len() + password.len() + 2);
        for part in [service, user, password] {
            material.extend_from_slice(part.as_bytes());
            material.push(0);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &material);
        // A SHA-256 is 32 bytes.
        let key: [u8; 32] = digest.as_ref().try_into().expect("a SHA-256");
        let now = Instant::now();
        if sallyport_runtime::sync::lock(&self.remembered)
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < REMEMBER)
            && auth.users.contains_key(user)
        {
            return true;
        }
        let Ok(_turn) = self.checks.acquire().await else { return false };
        let (auth, user_owned, password) = (auth.clone(), user.to_owned(), password.to_owned());
        let ok =
            tokio::task::spawn_blocking(move || auth.verify(&user_owned, &password)).await.unwrap_or(false);
        if ok {
            let mut remembered = sallyport_runtime::sync::lock(&self.remembered);
            if remembered.len() >= REMEMBERED {
                if let Some(oldest) = remembered.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k) {
                    remembered.remove(&oldest);
                }
            }
            remembered.insert(key, now);
        }
        ok
    }
}

/// What the auth server said of a request.
enum Asked {
    /// 2xx: the user it names (`Remote-User`) and the headers to copy upstream.
    Passed(Option<String>, Vec<(HeaderName, HeaderValue)>),
    /// Anything else: its answer, for the client.
    Refused(Response<Body>),
}

/// Why the auth server gave no answer.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("the forward auth URL does not parse")]
    Url,
    #[error("cannot ask the auth server: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("the auth server {addr} cannot be reached: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("the auth server {addr}: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error(
        "the auth server {addr} failed its TLS handshake (its certificate checked against {roots}): {source}"
    )]
    Tls { addr: String, roots: String, source: std::io::Error },
    #[error("the auth server's answer: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    #[error("the auth server {0} did not answer within {FORWARD_TIMEOUT:?}")]
    Timeout(String),
}

/// One request on a new HTTP/1.1 connection over `io`, whose driver runs on `tasks`.
async fn exchange<T>(
    io: T,
    ask: Request<Full<Bytes>>,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<Response<Incoming>, hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tasks.spawn(conn);
    sender.send_request(ask).await
}

/// Asks the auth server about `req`.
async fn ask(
    forward: &Forward,
    req: &Request<Incoming>,
    (client, host): (IpAddr, &str),
    tasks: &tokio_util::task::TaskTracker,
) -> Result<Asked, ForwardError> {
    let uri: hyper::Uri = forward.url.parse().map_err(|_| ForwardError::Url)?;
    let authority = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
    let default_port = if forward.tls.is_some() { 443 } else { 80 };
    let addr = if uri.port().is_some() { authority.clone() } else { format!("{authority}:{default_port}") };
    let mut ask = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, authority.as_str())
        .header("x-forwarded-method", req.method().as_str())
        .header("x-forwarded-proto", "http")
        .header("x-forwarded-host", host)
        .header("x-forwarded-uri", req.uri().path_and_query().map_or("/", |p| p.as_str()))
        .header("x-forwarded-for", client.to_string());
    for name in [header::COOKIE, header::AUTHORIZATION, header::ACCEPT, header::USER_AGENT] {
        for value in req.headers().get_all(&name) {
            ask = ask.header(name.clone(), value.clone());
        }
    }
    let ask = ask.body(Full::new(Bytes::new()))?;
    let answer = tokio::time::timeout(FORWARD_TIMEOUT, async {
        let http = |source| ForwardError::Http { addr: addr.clone(), source };
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|source| ForwardError::Connect { addr: addr.clone(), source })?;
        let response = match &forward.tls {
            None => exchange(TokioIo::new(stream), ask, tasks).await.map_err(http)?,
            Some(tls) => {
                // The URL's host is the name the certificate must carry (an IP address too).
                let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|_| ForwardError::Url)?;
                let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|source| ForwardError::Tls {
                        addr: addr.clone(),
                        roots: tls.roots_from.clone(),
                        source,
                    })?;
                exchange(TokioIo::new(stream), ask, tasks).await.map_err(http)?
            }
        };
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, FORWARD_BODY).collect().await.map_err(ForwardError::Body)?;
        Ok::<_, ForwardError>((parts, body.to_bytes()))
    })
    .await
    .map_err(|_| ForwardError::Timeout(addr.clone()))??;
    let (parts, body) = answer;
    if parts.status.is_success() {
        let copied: Vec<(HeaderName, HeaderValue)> = forward
            .copy_headers
            .iter()
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .flat_map(|name| {
                parts
                    .headers
                    .get_all(&name)
                    .iter()
                    .map(move |v| (name.clone(), v.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let user = parts.headers.get(REMOTE_USER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        return Ok(Asked::Passed(user, copied));
    }
    // Anything else goes back as the auth server wrote it (a redirect to its login page, 401, 403).
    let mut response = Response::new(Either::Right(Full::new(body)));
    *response.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !matches!(
            name.as_str(),
            "connection" | "keep-alive" | "transfer-encoding" | "content-length" | "upgrade"
        ) {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    Ok(Asked::Refused(response))
}
