//! Socket addresses: the one place that says "any address of this family", and what one host's
//! addresses are counted as.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The address a host is counted by in per-address caps and rates: an IPv4 address itself (also
/// when written as IPv4-mapped IPv6), an IPv6 address's /64, since one host holds a whole /64
/// (privacy addresses) and could otherwise count as thousands.
pub fn host_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// The unspecified address of `like`'s family, port 0: what a socket that talks to `like` binds.
pub fn unspecified_like(like: SocketAddr) -> SocketAddr {
    if like.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_its_ipv4_address_or_its_ipv6_slash_64() {
        let key = |s: &str| host_key(s.parse().unwrap()).to_string();
        assert_eq!(key("10.0.0.7"), "10.0.0.7");
        assert_eq!(key("::ffff:10.0.0.7"), "10.0.0.7");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[test]
    fn the_family_is_kept() {
        assert_eq!(unspecified_like("10.0.0.1:5".parse().unwrap()), "0.0.0.0:0".parse().unwrap());
        assert_eq!(unspecified_like("[fd00::1]:5".parse().unwrap()), "[::]:0".parse().unwrap());
    }
}
