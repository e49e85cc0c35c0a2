//! What relay and agent share to reload their configuration while they run: the configuration in
//! force ([`Live`]), the hash that names a file's content, SIGHUP ([`Hangups`]), and the one-line
//! form of an error for the log.

use std::sync::{Arc, RwLock};

/// The configuration in force: read where it is used, replaced whole by a reload.
#[derive(Debug)]
pub struct Live<T> {
    current: RwLock<Arc<T>>,
}

impl<T> Live<T> {
    pub fn new(config: Arc<T>) -> Arc<Self> {
        Arc::new(Self { current: RwLock::new(config) })
    }

    /// The configuration in force now.
    pub fn get(&self) -> Arc<T> {
        crate::sync::read(&self.current).clone()
    }

    pub fn set(&self, config: Arc<T>) {
        *crate::sync::write(&self.current) = config;
    }
}

/// The first 12 hex digits of the SHA-256 of `bytes`: which configuration file content is live.
pub fn hash(bytes: &[u8]) -> String {
    crate::hex::encode(&crate::tls::cert_sha256(bytes)[..6])
}

/// `text` on one line (a TOML error points at its line over several), for the log.
pub fn one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && *l != "|").collect::<Vec<_>>().join(" ")
}

/// SIGHUP, where there is such a thing.
#[derive(Debug)]
pub struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Starts listening (must run inside the async runtime).
    pub fn new() -> Self {
        Self {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// The next SIGHUP; never, where there is none.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            if signal.recv().await.is_some() {
                return;
            }
        }
        std::future::pending().await
    }
}

impl Default for Hangups {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_name_content_and_errors_fit_one_line() {
        assert_eq!(hash(b"a"), hash(b"a"));
        assert_ne!(hash(b"a"), hash(b"b"));
        assert_eq!(hash(b"").len(), 12);
        let toml =
            "TOML parse error at line 9, column 1\n  |\n9 | bogus = 1\n  | ^^^^^\nunknown field `bogus`";
        assert_eq!(
            one_line(toml),
            "TOML parse error at line 9, column 1 9 | bogus = 1 | ^^^^^ unknown field `bogus`"
        );
        let live = Live::new(Arc::new(1));
        live.set(Arc::new(2));
        assert_eq!(*live.get(), 2);
    }
}
