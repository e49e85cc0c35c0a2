//! Socket addresses: the one place that says "any address of this family".

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

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
    fn the_family_is_kept() {
        assert_eq!(unspecified_like("10.0.0.1:5".parse().unwrap()), "0.0.0.0:0".parse().unwrap());
        assert_eq!(unspecified_like("[fd00::1]:5".parse().unwrap()), "[::]:0".parse().unwrap());
    }
}
