//! Allow and deny lists by client address: `"allow 192.168.4.0/24"`, `"deny 192.168.4.66"`,
//! `"allow fd00::/8"`, `"deny all"`. The first rule that matches decides; an address no rule
//! matches is refused, so a list fails closed.

use std::net::IpAddr;

use ipnet::IpNet;

/// One rule: whether it admits, and the addresses it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    /// `None`: every address (`all`).
    pub net: Option<IpNet>,
}

/// Why a rule is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{0:?} is not a rule: write \"allow CIDR\" or \"deny CIDR\" (an address, a network such as 192.168.4.0/24 or fd00::/8, or all)")]
    Form(String),
    #[error("{0:?}: {1:?} is neither an address nor a network (192.168.4.0/24, fd00::/8)")]
    Address(String, String),
    #[error("an empty list refuses every client: write [\"deny all\"] to mean that, or leave the key out")]
    Empty,
}

/// A list of rules, first match wins, no match refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules(Vec<Rule>);

impl Rules {
    /// Parses each line of `lines` as a rule.
    pub fn parse<S: AsRef<str>>(lines: &[S]) -> Result<Self, RuleError> {
        if lines.is_empty() {
            return Err(RuleError::Empty);
        }
        lines.iter().map(|l| parse_rule(l.as_ref())).collect::<Result<_, _>>().map(Self)
    }

    /// Addresses and networks only, all admitted (the trusted proxies of a service).
    pub fn networks<S: AsRef<str>>(lines: &[S]) -> Result<Self, RuleError> {
        if lines.is_empty() {
            return Err(RuleError::Empty);
        }
        lines
            .iter()
            .map(|l| net(l.as_ref(), l.as_ref()).map(|net| Rule { allow: true, net: Some(net) }))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether `ip` is admitted: the first rule that matches it decides; none matching refuses. An
    /// IPv4 address written as IPv6 (`::ffff:a.b.c.d`, as a dual-stack socket reports it) is the
    /// IPv4 address, so IPv4 rules match it.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().find(|r| r.net.is_none_or(|net| net.contains(&ip))).is_some_and(|r| r.allow)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn parse_rule(line: &str) -> Result<Rule, RuleError> {
    let mut words = line.split_whitespace();
    let (Some(verb), Some(what), None) = (words.next(), words.next(), words.next()) else {
        return Err(RuleError::Form(line.to_owned()));
    };
    let allow = match verb.to_ascii_lowercase().as_str() {
        "allow" => true,
        "deny" => false,
        _ => return Err(RuleError::Form(line.to_owned())),
    };
    let net = if what.eq_ignore_ascii_case("all") { None } else { Some(net(line, what)?) };
    Ok(Rule { allow, net })
}

fn net(line: &str, what: &str) -> Result<IpNet, RuleError> {
    let bad = || RuleError::Address(line.to_owned(), what.to_owned());
    let net = match what.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => IpNet::from(what.parse::<IpAddr>().map_err(|_| bad())?),
    };
    // A mapped IPv4 network is the IPv4 one, as addresses are compared.
    Ok(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map_err(|_| bad())?,
            None => net,
        },
        _ => net,
    }
    .trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn first_match_wins_and_no_match_refuses() {
        let rules =
            Rules::parse(&["deny 192.168.4.66", "allow 192.168.4.0/24", "allow fd00::/8"]).expect("rules");
        assert!(rules.admits(ip("192.168.4.10")));
        assert!(!rules.admits(ip("192.168.4.66")), "the deny before the allow");
        assert!(!rules.admits(ip("10.0.0.1")), "no rule matches: refused");
        assert!(rules.admits(ip("fd12::1")));
        assert!(!rules.admits(ip("2001:db8::1")));
        assert!(rules.admits(ip("::ffff:192.168.4.10")), "a mapped IPv4 address is the IPv4 one");
        assert!(!rules.admits(ip("::ffff:192.168.4.66")));
        let open = Rules::parse(&["deny 10.0.0.0/8", "allow all"]).expect("rules");
        assert!(
            open.admits(ip("192.0.2.1")) && open.admits(ip("2001:db8::1")) && !open.admits(ip("10.1.2.3"))
        );
        assert!(!Rules::parse(&["DENY ALL"]).expect("rules").admits(ip("127.0.0.1")));
        let mapped = Rules::parse(&["allow ::ffff:10.0.0.0/104"]).expect("rules");
        assert!(mapped.admits(ip("10.1.2.3")), "a mapped network is the IPv4 one");
        let host_bits = Rules::parse(&["allow 192.168.4.7/24"]).expect("rules");
        assert!(host_bits.admits(ip("192.168.4.200")), "host bits of a network are ignored");
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        let e = Rules::parse(&["allow"]).expect_err("no address").to_string();
        assert!(e.contains("\"allow\" is not a rule"), "{e}");
        let e = Rules::parse(&["permit 10.0.0.0/8"]).expect_err("verb").to_string();
        assert!(e.contains("\"permit 10.0.0.0/8\" is not a rule"), "{e}");
        let e = Rules::parse(&["allow 10.0.0.0/33"]).expect_err("prefix").to_string();
        assert!(e.contains("\"10.0.0.0/33\" is neither an address nor a network"), "{e}");
        let e = Rules::parse(&["allow 10.0.0.1 10.0.0.2"]).expect_err("two").to_string();
        assert!(e.contains("is not a rule"), "{e}");
        let e = Rules::parse::<&str>(&[]).expect_err("empty").to_string();
        assert!(e.contains("empty list refuses every client"), "{e}");
        let e = Rules::networks(&["10.42.0.0/16", "proxy"]).expect_err("name").to_string();
        assert!(e.contains("\"proxy\" is neither"), "{e}");
        assert!(Rules::networks(&["10.42.0.0/16", "::1"]).expect("networks").admits(ip("::1")));
    }
}
