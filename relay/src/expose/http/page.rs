//! The relay's own answers to HTTP requests: short plain-text pages, and the body type every
//! response of the HTTP listener has (the target's, or a page).

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{
    body::Incoming,
    header::{self, HeaderValue},
    Response, StatusCode,
};

/// A response body: the target's, or one of the relay's pages.
pub(super) type Body = Either<Incoming, Full<Bytes>>;

/// A short plain-text page for a request the relay answers itself.
pub(super) fn page(status: StatusCode, reason: &str) -> Response<Body> {
    let body = format!("{} {}\n{reason}\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The reason may echo what the client sent: never read as anything but text.
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page the relay writes may echo what the client sent (a host name, a reason): browsers
    /// must read it as plain text.
    #[test]
    fn the_relays_own_pages_are_never_sniffed() {
        let response = page(StatusCode::BAD_GATEWAY, "<script>alert(1)</script>");
        assert_eq!(response.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain; charset=utf-8");
    }
}
