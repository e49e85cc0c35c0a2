//! What the access rules and the access log make of one HTTP request: the client it is from (the
//! connection's source, or the address a trusted proxy named), whether the service's rules and
//! request rate admit it (403 and 429 pages otherwise), and its access log line.

use http_body_util::Either;
use hyper::{
    body::Incoming,
    header::{self, HeaderValue},
    Request, Response, StatusCode,
};
use std::net::SocketAddr;

use super::page::{page, Body};
use crate::{
    access::{log::HttpFields, rates::Counted},
    expose::{
        gate::{self, Entry},
        Exposure,
    },
};

/// The client a request is from (the connection's source, or the address a trusted proxy named)
/// and whether the service's access rules and request rate admit it; a refusal is counted.
pub(super) fn admission(
    req: &Request<Incoming>,
    peer: SocketAddr,
    service: &str,
    exposure: &Exposure,
) -> (std::net::IpAddr, Result<(), &'static str>) {
    let config = exposure.config.get();
    let forwarded = req.headers().get_all("x-forwarded-for").into_iter().filter_map(|v| v.to_str().ok());
    let who = crate::access::forwarded_client(peer.ip(), config.access.trusted_proxies(service), forwarded);
    drop(config);
    (who, gate::admit(exposure, service, Some(Counted::Requests), who))
}

/// The page for a request the rules (403) or the request rate (429) refused.
pub(super) fn refusal(reason: &str, host: &str) -> Response<Body> {
    if reason == "rate_limited" {
        let mut response =
            page(StatusCode::TOO_MANY_REQUESTS, &format!("too many requests from this address to {host:?}"));
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    } else {
        page(StatusCode::FORBIDDEN, &format!("this address may not reach {host:?}"))
    }
}

/// What the access log says of a request, taken before the request goes on.
pub(super) struct RequestFields {
    method: String,
    host: String,
    uri: String,
    user_agent: Option<String>,
    body: u64,
    /// Who passed the service's login, if it has one.
    pub(super) user: Option<String>,
}

impl RequestFields {
    pub(super) fn of(req: &Request<Incoming>, host: &str) -> Self {
        let uri = req.uri().path_and_query().map_or("/", |p| p.as_str());
        Self {
            method: req.method().as_str().to_owned(),
            host: host.to_owned(),
            // A client may send a very long URI: the log keeps its start.
            uri: uri.chars().take(2048).collect(),
            user_agent: req
                .headers()
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.chars().take(256).collect()),
            body: content_length(req.headers()),
            user: None,
        }
    }
}

fn content_length(headers: &hyper::HeaderMap) -> u64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The access log line of one request: its fields, the status, and the bodies' declared lengths.
pub(super) fn log_request(
    entry: &Entry<'_>,
    exposure: &Exposure,
    result: &'static str,
    fields: Option<&RequestFields>,
    response: &Response<Body>,
) {
    let Some(f) = fields else { return };
    let http = HttpFields {
        method: &f.method,
        host: &f.host,
        uri: &f.uri,
        status: response.status().as_u16(),
        user_agent: f.user_agent.as_deref(),
        user: f.user.as_deref(),
    };
    let down = match response.body() {
        Either::Right(page) => hyper::body::Body::size_hint(page).exact().unwrap_or(0),
        Either::Left(_) => content_length(response.headers()),
    };
    entry.log(exposure, result, f.body, down, Some(http));
}
