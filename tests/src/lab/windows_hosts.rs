//! More Windows hosts behind the lab's router, each with a WSL2-style network behind it, for
//! services that several Windows hosts carry (service groups):
//!
//! ```text
//!  router 172.30.i.1 (NAT) ── windows host i 172.30.i.10 | 172.31.i.1 (NAT) ── wsl 172.31.i.10
//! ```
//!
//! Like the first one ([`Lab::double_nat`]): the router masquerades each host and lets only replies
//! back in, and each host masquerades its WSL2 side the way Windows does in NAT mode.

use std::net::Ipv4Addr;

use super::{sh, Lab, Netns};

/// Windows host `i`'s address (the router's side of its network is .1).
pub fn windows_host_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, u8::try_from(i).expect("a few hosts"), 10)
}

/// The WSL2 side of Windows host `i`.
pub fn wsl_of_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, u8::try_from(i).expect("a few hosts"), 10)
}

impl Lab {
    /// Adds Windows host [`Role::WinHost`](super::Role::WinHost)`(i)` behind the router, with its
    /// WSL2 side [`Role::WslOf`](super::Role::WslOf)`(i)`; returns `i`.
    pub fn add_windows_host(&mut self) -> usize {
        let i = self.windows.len();
        let id = &self.home.name[..self.home.name.len() - 1];
        let (win, wsl) = (Netns { name: format!("{id}v{i}") }, Netns { name: format!("{id}u{i}") });
        let n = u8::try_from(i).expect("a few hosts");
        for ns in [&win, &wsl] {
            sh(&format!("ip netns add {}", ns.name));
            ns.run("ip", &["link", "set", "lo", "up"]);
        }
        let (link, inner) = (format!("winh{i}"), format!("wslh{i}"));
        sh(&format!(
            "ip link add eth0 netns {} type veth peer name {link} netns {}",
            win.name, self.router.name
        ));
        sh(&format!("ip link add eth0 netns {} type veth peer name {inner} netns {}", wsl.name, win.name));
        let router_side = Ipv4Addr::new(172, 30, n, 1);
        let win_wsl_side = Ipv4Addr::new(172, 31, n, 1);
        self.router.run("ip", &["addr", "add", &format!("{router_side}/24"), "dev", &link]);
        self.router.run("ip", &["link", "set", &link, "up"]);
        win.run("ip", &["addr", "add", &format!("{}/24", windows_host_ip(i)), "dev", "eth0"]);
        win.run("ip", &["link", "set", "eth0", "up"]);
        win.run("ip", &["route", "add", "default", "via", &router_side.to_string()]);
        win.run("ip", &["addr", "add", &format!("{win_wsl_side}/24"), "dev", &inner]);
        win.run("ip", &["link", "set", &inner, "up"]);
        win.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
        wsl.run("ip", &["addr", "add", &format!("{}/24", wsl_of_ip(i)), "dev", "eth0"]);
        wsl.run("ip", &["link", "set", "eth0", "up"]);
        wsl.run("ip", &["route", "add", "default", "via", &win_wsl_side.to_string()]);
        let router_rules = [
            format!("-A FORWARD -i {link} -o home0 -j ACCEPT"),
            format!("-A FORWARD -i home0 -o {link} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
        ];
        for rule in &router_rules {
            self.router.run("iptables", &rule.split_whitespace().collect::<Vec<_>>());
        }
        let win_rules = [
            "-t nat -A POSTROUTING -o eth0 -j MASQUERADE".to_owned(),
            "-P FORWARD DROP".to_owned(),
            format!("-A FORWARD -i {inner} -o eth0 -j ACCEPT"),
            format!("-A FORWARD -i eth0 -o {inner} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
        ];
        for rule in &win_rules {
            win.run("iptables", &rule.split_whitespace().collect::<Vec<_>>());
        }
        self.windows.push((win, wsl));
        i
    }
}
