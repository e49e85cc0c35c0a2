//! More homelab hosts in a cluster lab: each a namespace of its own on a network of its own
//! behind the node, so that clients which cannot choose their source address (redis-cli, psql)
//! still reach the relay from an address other than the client network's.

use std::net::Ipv4Addr;

use super::{cluster::attach, Lab, Netns};

/// Homelab host `i`'s address (its network is 10.44.i.0/24, the node at .1).
pub fn lan_host_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 44, u8::try_from(i).expect("a few hosts"), 2)
}

impl Lab {
    /// Adds homelab host [`Role::Host`](super::Role::Host)`(i)` at [`lan_host_ip`]`(i)`, routed
    /// through the node as the client network is; returns `i`. Needs [`Lab::add_cluster`] first.
    pub fn add_lan_host(&mut self) -> usize {
        let i = self.hosts.len();
        let id = &self.home.name[..self.home.name.len() - 1];
        let host = Netns { name: format!("{id}l{i}") };
        let gw = Ipv4Addr::new(10, 44, u8::try_from(i).expect("a few hosts"), 1);
        attach(&self.home, &host, &format!("lan{i}"), lan_host_ip(i), gw);
        self.hosts.push(host);
        i
    }
}
