//! `target = "..."` of a service: what a service name means on this machine.

use std::fmt;

/// What a service connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `tcp://HOST:PORT`
    Tcp { host: String, port: u16 },
    /// `container://NAME:PORT`: a port of a container declared under `[containers.NAME]`, at the
    /// address the engine gives it (looked up after every start).
    Container { name: String, port: u16 },
    /// `udp://HOST:PORT`: the target of a UDP service.
    Udp { host: String, port: u16 },
    /// `wsl://DISTRO:PORT`: a port inside a WSL2 distribution (Windows agent only): TCP through
    /// localhost forwarding, else the VM's address; UDP through the VM's address.
    Wsl { distro: String, port: u16 },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Self::Container { name, port } => write!(f, "container://{name}:{port}"),
            Self::Udp { host, port } if host.contains(':') => write!(f, "udp://[{host}]:{port}"),
            Self::Udp { host, port } => write!(f, "udp://{host}:{port}"),
            Self::Wsl { distro, port } => write!(f, "wsl://{distro}:{port}"),
        }
    }
}

impl Target {
    /// Whether this target takes UDP flows (`udp://`, `wsl://`).
    pub fn carries_udp(&self) -> bool {
        matches!(self, Self::Udp { .. } | Self::Wsl { .. })
    }

    /// Whether this target takes TCP connections (all but `udp://`).
    pub fn carries_tcp(&self) -> bool {
        !matches!(self, Self::Udp { .. })
    }

    /// Parses `tcp://HOST:PORT`, `udp://HOST:PORT`, `container://NAME:PORT` or
    /// `wsl://DISTRO:PORT`.
    pub fn parse(text: &str) -> Result<Self, TargetError> {
        let at = |source| TargetError::Address { text: text.to_owned(), source };
        if let Some(rest) = text.strip_prefix("container://") {
            let (name, port) = host_port(rest).map_err(at)?;
            return Ok(Self::Container { name, port });
        }
        if let Some(rest) = text.strip_prefix("udp://") {
            let (host, port) = host_port(rest).map_err(at)?;
            return Ok(Self::Udp { host, port });
        }
        if let Some(rest) = text.strip_prefix("wsl://") {
            let (distro, port) = host_port(rest).map_err(at)?;
            if !is_valid_distro(&distro) {
                return Err(TargetError::Distro { text: text.to_owned(), distro });
            }
            return Ok(Self::Wsl { distro, port });
        }
        let Some(rest) = text.strip_prefix("tcp://") else {
            let scheme = text.split_once("://").map_or("", |(s, _)| s);
            return Err(if scheme.is_empty() {
                TargetError::NoScheme(text.to_owned())
            } else {
                TargetError::Scheme { scheme: scheme.to_owned(), text: text.to_owned() }
            });
        };
        let (host, port) = host_port(rest).map_err(at)?;
        Ok(Self::Tcp { host, port })
    }
}

const EXPECTED_TARGET: &str =
    "expected tcp://HOST:PORT, udp://HOST:PORT, container://NAME:PORT or wsl://DISTRO:PORT";

/// Why a `target` is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("{text:?}: {source}")]
    Address { text: String, source: AddressError },
    #[error("{text:?}: {distro:?} is not a WSL distribution name")]
    Distro { text: String, distro: String },
    #[error("{0:?} has no scheme: {EXPECTED_TARGET}")]
    NoScheme(String),
    #[error("unsupported target scheme {scheme:?} in {text:?}: {EXPECTED_TARGET}")]
    Scheme { scheme: String, text: String },
}

/// Why `HOST:PORT` is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("expected [IPV6]:PORT")]
    Bracket,
    #[error("expected HOST:PORT")]
    NoPort,
    #[error("missing or invalid host")]
    Host,
    #[error("invalid port {0:?}")]
    Port(String),
    #[error("port 0 is not a destination")]
    PortZero,
}

/// Splits `HOST:PORT` or `[V6]:PORT`.
pub(super) fn host_port(text: &str) -> Result<(String, u16), AddressError> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        rest.split_once("]:").ok_or(AddressError::Bracket)?
    } else {
        text.rsplit_once(':').ok_or(AddressError::NoPort)?
    };
    if host.is_empty() || host.contains('/') {
        return Err(AddressError::Host);
    }
    let port: u16 = port.parse().map_err(|_| AddressError::Port(port.to_owned()))?;
    if port == 0 {
        return Err(AddressError::PortZero);
    }
    Ok((host.to_owned(), port))
}

/// Whether `name` can be a WSL distribution name (and is safe on a command line).
pub(crate) fn is_valid_distro(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_strictly() {
        assert_eq!(Target::parse("tcp://[::1]:80"), Ok(Target::Tcp { host: "::1".into(), port: 80 }));
        assert_eq!(
            Target::parse("tcp://db.local:5432").map(|t| t.to_string()),
            Ok("tcp://db.local:5432".into())
        );
        for (bad, why) in [
            ("127.0.0.1:80", "no scheme"),
            ("ftp://127.0.0.1:21", "unsupported target scheme \"ftp\""),
            ("wsl://Ubuntu 24.04:80", "not a WSL distribution name"),
            ("container://mssql", "expected HOST:PORT"),
            ("tcp://127.0.0.1", "expected HOST:PORT"),
            ("tcp://127.0.0.1:0", "port 0"),
            ("tcp://:80", "invalid host"),
            ("tcp://h:99999", "invalid port"),
        ] {
            let e = Target::parse(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn distro_names_are_checked() {
        assert!(is_valid_distro("Ubuntu-24.04") && is_valid_distro("kali_linux"));
        assert!(
            !is_valid_distro("")
                && !is_valid_distro("a b")
                && !is_valid_distro("x;calc")
                && !is_valid_distro("a\"b")
        );
    }
}
