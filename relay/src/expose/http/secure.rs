//! What the HTTP handling adds for HTTPS: the redirect of plain HTTP to a terminated service,
//! its HSTS header, and the answers to ACME `http-01` challenges on the plain listener.

use hyper::{
    body::Incoming,
    header::{self, HeaderValue},
    Request, Response, StatusCode,
};
use tracing::debug;

use super::page::{page, Body};
use crate::{certs::challenges::Challenges, config::Service, expose::LiveRoutes};

/// The answer to an ACME `http-01` challenge the relay has in progress
/// (`GET /.well-known/acme-challenge/TOKEN`, whatever the host).
pub(super) fn acme_answer(req: &Request<Incoming>, challenges: &Challenges) -> Option<Response<Body>> {
    let token = req.uri().path().strip_prefix("/.well-known/acme-challenge/")?;
    if req.method() != hyper::Method::GET {
        return None;
    }
    let answer = challenges.http_answer(token)?;
    debug!(token, "ACME http-01 challenge answered");
    let body = http_body_util::Full::new(bytes::Bytes::from(answer));
    let mut response = Response::new(http_body_util::Either::Right(body));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Some(response)
}

/// A request on the plain listener for a terminated HTTPS service that redirects plain HTTP
/// (`redirects`: the HTTPS listener's names): `308` to the same URI over HTTPS on `port` (the
/// method and body are kept).
pub(super) fn redirect(
    req: &Request<Incoming>,
    host: &str,
    redirects: &LiveRoutes,
    port: usize,
) -> Option<Response<Body>> {
    let served = sallyport_runtime::sync::read(redirects).get(host).cloned()?;
    if !served.service.terminate.as_ref().is_some_and(|t| t.redirect_http) {
        return None;
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = match port {
        443 => format!("https://{host}{path}"),
        port => format!("https://{host}:{port}{path}"),
    };
    let mut response = page(StatusCode::PERMANENT_REDIRECT, &format!("moved to {location}"));
    response.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&location).ok()?);
    Some(response)
}

/// `Strict-Transport-Security` on a response of a terminated service that asks for it.
pub(super) fn with_hsts(mut response: Response<Body>, service: &Service) -> Response<Body> {
    if let Some(max_age) = service.terminate.as_ref().and_then(|t| t.hsts) {
        if let Ok(value) = HeaderValue::from_str(&format!("max-age={}", max_age.as_secs())) {
            response.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, value);
        }
    }
    response
}
