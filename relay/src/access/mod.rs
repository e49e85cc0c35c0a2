//! Who may reach what: allow and deny lists by client address ([`rules`]), the client's address
//! behind a trusted proxy ([`forwarded_client`]), rates per client ([`rates`]), and the access
//! log ([`log`]). A leaf: the
//! configuration parses rules with it, the listeners ask it and write to its log.

pub mod auth;
pub mod bandwidth;
pub mod log;
pub mod rates;
pub mod rules;

use std::net::IpAddr;

pub use rules::{Rule, RuleError, Rules};

/// The client of a request that came from `peer`: when `peer` is one of the service's trusted
/// proxies, the right-most address of `X-Forwarded-For` that is not a trusted proxy itself (the
/// entries to its left were written by whoever the client is, so they are never believed);
/// otherwise, or when the header names no address, `peer` itself.
pub fn forwarded_client<'a>(
    peer: IpAddr,
    trusted: Option<&Rules>,
    forwarded_for: impl Iterator<Item = &'a str>,
) -> IpAddr {
    let Some(trusted) = trusted.filter(|t| t.admits(peer)) else { return peer };
    let entries: Vec<&str> = forwarded_for.flat_map(|v| v.split(',')).map(str::trim).collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = parse_entry(entry) else { return client };
        client = ip.to_canonical();
        if !trusted.admits(client) {
            return client;
        }
    }
    client
}

/// An address of `X-Forwarded-For`: bare, with a port, or IPv6 in brackets.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Ok(addr) = entry.parse::<std::net::SocketAddr>() {
        return Some(addr.ip());
    }
    entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')).and_then(|e| e.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let proxies = Rules::networks(&["10.42.0.0/16"]).expect("proxies");
        let xff = ["203.0.113.9, 192.168.4.23"];
        assert_eq!(
            forwarded_client(ip("192.168.4.5"), Some(&proxies), xff.into_iter()),
            ip("192.168.4.5"),
            "not a proxy"
        );
        assert_eq!(
            forwarded_client(ip("10.42.1.1"), None, xff.into_iter()),
            ip("10.42.1.1"),
            "no proxy trusted"
        );
        assert_eq!(
            forwarded_client(ip("10.42.1.1"), Some(&proxies), xff.into_iter()),
            ip("192.168.4.23"),
            "the right-most"
        );
        let chain = ["192.168.4.23", "10.42.3.3"];
        assert_eq!(
            forwarded_client(ip("10.42.1.1"), Some(&proxies), chain.into_iter()),
            ip("192.168.4.23"),
            "past proxies"
        );
        let junk = ["192.168.4.23, not-an-address"];
        assert_eq!(
            forwarded_client(ip("10.42.1.1"), Some(&proxies), junk.into_iter()),
            ip("10.42.1.1"),
            "junk: the peer"
        );
        let forms = ["[2001:db8::7]:443"];
        assert_eq!(forwarded_client(ip("10.42.1.1"), Some(&proxies), forms.into_iter()), ip("2001:db8::7"));
        assert_eq!(forwarded_client(ip("10.42.1.1"), Some(&proxies), std::iter::empty()), ip("10.42.1.1"));
    }
}
