//! What the HTTP listener reads and rewrites in requests and responses: the host a request is
//! for, hop-by-hop headers, forwarding headers, upgrades.

use std::net::{IpAddr, SocketAddr};

use hyper::{
    header::{self, HeaderMap, HeaderName, HeaderValue},
    Request, Uri,
};

/// The host a request is for: its `Host` header, lower-cased, without port or trailing dot. An
/// absolute-form target must name the same host.
pub(super) fn request_host<B>(req: &Request<B>) -> Result<String, HostError> {
    // HTTP/2 names the host in the `:authority` pseudo-header (the URI's authority) and most
    // clients send no Host header beside it.
    if req.version() == hyper::Version::HTTP_2 && !req.headers().contains_key(header::HOST) {
        let authority = req.uri().authority().ok_or(HostError::Missing)?;
        return host_only(authority.as_str()).ok_or(HostError::NotAName);
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let (Some(value), None) = (hosts.next(), hosts.next()) else {
        return Err(if req.headers().contains_key(header::HOST) {
            HostError::Several
        } else {
            HostError::Missing
        });
    };
    let host = value.to_str().ok().and_then(host_only).ok_or(HostError::NotAName)?;
    if let Some(authority) = req.uri().authority() {
        let target = host_only(authority.as_str()).unwrap_or_default();
        if target != host {
            return Err(HostError::Mismatch { target, host });
        }
    }
    Ok(host)
}

/// Why a request names no single host (the client gets this text in a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum HostError {
    #[error("the request has no Host header")]
    Missing,
    #[error("the request has more than one Host header")]
    Several,
    #[error("the Host header is not a host name")]
    NotAName,
    #[error("the request target names {target:?} but the Host header names {host:?}")]
    Mismatch { target: String, host: String },
}

/// `name`, `name:port`, `[v6]` or `[v6]:port` to the lower-case name (brackets dropped).
pub(crate) fn host_only(text: &str) -> Option<String> {
    let name = if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if !(after.is_empty()
            || after.strip_prefix(':').is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())))
        {
            return None;
        }
        v6
    } else {
        let name = match text.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return None,
            None => text,
        };
        // Outside brackets a name holds no colon and no bracket (`:f0[0:1]:443` is no host).
        if name.bytes().any(|b| matches!(b, b':' | b'[' | b']')) {
            return None;
        }
        name
    };
    let name = name.trim_end_matches('.');
    if name.is_empty() || name.contains('@') || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// Whether the request asks to switch to WebSocket, the one protocol the relay carries as an
/// upgrade (any other `Upgrade`, h2c included, is dropped and the request goes as a plain one).
pub(super) fn is_upgrade(headers: &HeaderMap) -> bool {
    let websocket = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("websocket"));
    websocket
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Drops hop-by-hop headers (those `Connection` lists, and the fixed set), keeping `Upgrade` and
/// `Connection: upgrade` on an upgrade.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        // A client cannot make the relay drop end-to-end headers it relies on by listing them.
        let kept =
            name == header::HOST || name == header::CONTENT_LENGTH || (upgrade && name == header::UPGRADE);
        if !kept {
            headers.remove(name);
        }
    }
    for name in [header::TE, header::TRAILER, header::TRANSFER_ENCODING, header::PROXY_AUTHORIZATION] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers.remove(header::CONNECTION);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Makes a client's request fit to send on: hop-by-hop headers out, forwarding headers in, and
/// the target in origin form.
pub(super) fn prepare<B>(req: &mut Request<B>, peer: SocketAddr, host: &str, (upgrade, tls): (bool, bool)) {
    // A request that came over HTTP/2 goes to the target as HTTP/1.1, its authority as Host.
    if req.version() == hyper::Version::HTTP_2 {
        *req.version_mut() = hyper::Version::HTTP_11;
        if !req.headers().contains_key(header::HOST) {
            if let Some(value) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                req.headers_mut().insert(header::HOST, value);
            }
        }
    }
    let proto = if tls { "https" } else { "http" };
    let original_host = req.headers().get(header::HOST).cloned();
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    // Some targets take these for the client's address: only the relay says who the client is.
    for name in ["x-real-ip", "true-client-ip", "x-client-ip", "x-forwarded-port"] {
        headers.remove(name);
    }
    let ip = peer.ip().to_canonical();
    append(headers, HeaderName::from_static("x-forwarded-for"), &ip.to_string());
    headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static(proto));
    if let Some(value) = original_host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), value);
    }
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    append(headers, header::FORWARDED, &format!("for={node};host=\"{host}\";proto={proto}"));
    if req.uri().authority().is_some() {
        let origin = req.uri().path_and_query().map_or("/", |p| p.as_str());
        if let Ok(uri) = origin.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
}

/// Appends `value` to the comma-separated list in header `name` (joining repeated headers).
fn append(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let mut joined: Vec<&str> = headers.get_all(&name).iter().filter_map(|v| v.to_str().ok()).collect();
    joined.push(value);
    if let Ok(value) = HeaderValue::from_str(&joined.join(", ")) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::builder().uri(target);
        for h in hosts {
            builder = builder.header(header::HOST, *h);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn host_is_exact_case_insensitive_and_port_free() {
        assert_eq!(request_host(&request("/", &["App.Home.LAN:8080"])), Ok("app.home.lan".into()));
        assert_eq!(request_host(&request("/", &["app.home.lan."])), Ok("app.home.lan".into()));
        assert_eq!(request_host(&request("/", &["[fd00::1]:80"])), Ok("fd00::1".into()));
        assert_eq!(
            request_host(&request("http://APP.home.lan:80/x", &["app.home.lan"])),
            Ok("app.home.lan".into())
        );
    }

    #[test]
    fn missing_repeated_or_conflicting_hosts_are_bad_requests() {
        assert!(request_host(&request("/", &[])).unwrap_err().to_string().contains("no Host header"));
        assert!(request_host(&request("/", &["a", "b"])).unwrap_err().to_string().contains("more than one"));
        let e = request_host(&request("http://other.lan/x", &["app.home.lan"])).unwrap_err().to_string();
        assert!(e.contains("\"other.lan\"") && e.contains("\"app.home.lan\""), "{e}");
        assert!(request_host(&request("/", &["a:b:c"])).is_err());
        assert!(request_host(&request("/", &["user@host"])).is_err());
    }

    #[test]
    fn forwarding_headers_are_added_and_hop_by_hop_removed() {
        let mut req = Request::builder()
            .uri("http://app.lan/path?q=1")
            .header(header::HOST, "app.lan")
            .header(header::CONNECTION, "keep-alive, x-secret")
            .header("x-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("x-forwarded-for", "203.0.113.7")
            .body(())
            .expect("request");
        prepare(&mut req, "[2001:db8::9]:4000".parse().unwrap(), "app.lan", (false, false));
        let h = req.headers();
        assert_eq!(req.uri(), "/path?q=1");
        assert!(
            h.get("x-secret").is_none()
                && h.get("keep-alive").is_none()
                && h.get(header::CONNECTION).is_none()
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 2001:db8::9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.lan");
        assert_eq!(h[header::FORWARDED], "for=\"[2001:db8::9]\";host=\"app.lan\";proto=http");
        assert_eq!(h[header::HOST], "app.lan");
    }

    #[test]
    fn connection_cannot_name_host_or_content_length_away() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("app.home.lan"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("host, content-length, x-secret"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.get(header::HOST).map(|v| v.as_bytes()), Some(&b"app.home.lan"[..]));
        assert!(headers.contains_key(header::CONTENT_LENGTH));
        assert!(!headers.contains_key("x-secret") && !headers.contains_key(header::CONNECTION));
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut req = Request::builder()
            .uri("/ws")
            .header(header::HOST, "app.lan")
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .expect("request");
        assert!(is_upgrade(req.headers()));
        prepare(&mut req, "10.0.0.2:5000".parse().unwrap(), "app.lan", (true, false));
        assert_eq!(req.headers()[header::UPGRADE], "websocket");
        assert_eq!(req.headers()[header::CONNECTION], "upgrade");
        assert_eq!(req.headers()[header::FORWARDED], "for=10.0.0.2;host=\"app.lan\";proto=http");
    }

    /// Only a WebSocket upgrade is carried as one: `Upgrade: h2c` (or any other protocol) is a
    /// plain request whose `Upgrade` header is dropped, so the target never switches protocols
    /// behind the relay's back.
    #[test]
    fn only_websocket_upgrades_are_upgrades() {
        let upgrade = |protocol: &str| {
            Request::builder()
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, protocol)
                .body(())
                .expect("request")
        };
        assert!(is_upgrade(upgrade("websocket").headers()));
        assert!(is_upgrade(upgrade("WebSocket").headers()));
        for other in ["h2c", "TLS/1.2", "foo, websocket-ish"] {
            let mut req = upgrade(other);
            assert!(!is_upgrade(req.headers()), "{other}");
            let upgraded = is_upgrade(req.headers());
            prepare(&mut req, "10.0.0.9:4000".parse().unwrap(), "app.lan", (upgraded, false));
            assert!(req.headers().get(header::UPGRADE).is_none(), "{other}");
        }
    }

    /// Headers some targets read as the client's address never come from the client.
    #[test]
    fn client_address_headers_a_client_writes_do_not_reach_the_target() {
        let mut req = Request::builder()
            .header(header::HOST, "app.lan")
            .header("x-real-ip", "127.0.0.1")
            .header("true-client-ip", "127.0.0.1")
            .header("x-forwarded-port", "443")
            .header("x-client-ip", "127.0.0.1")
            .body(())
            .expect("request");
        prepare(&mut req, "10.0.0.9:4000".parse().unwrap(), "app.lan", (false, false));
        for name in ["x-real-ip", "true-client-ip", "x-forwarded-port", "x-client-ip"] {
            assert!(req.headers().get(name).is_none(), "{name}");
        }
    }
}
