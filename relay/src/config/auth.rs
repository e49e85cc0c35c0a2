//! `[services.NAME.auth]`: a gate in front of an HTTP service (basic auth users, tokens, forward
//! auth, bypass paths), checked here with the file, the key and the reason.

use std::{collections::BTreeMap, path::Path};

use sallyport_runtime::config::ConfigError;
use serde::Deserialize;

use crate::access::auth::{self, Auth, Forward, ForwardTls};

/// The gate as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuth {
    realm: Option<String>,
    #[serde(default)]
    users: BTreeMap<String, String>,
    #[serde(default)]
    tokens: BTreeMap<String, String>,
    token_header: Option<String>,
    forward: Option<String>,
    #[serde(default)]
    forward_headers: Vec<String>,
    forward_ca: Option<std::path::PathBuf>,
    #[serde(default)]
    bypass: Vec<String>,
}

impl RawAuth {
    /// The gate of service `name` (an HTTP service: `is_http`).
    pub(crate) fn parse(self, path: &Path, name: &str, is_http: bool) -> Result<Auth, ConfigError> {
        let key = |k: &str| format!("services.{name}.auth{}{k}", if k.is_empty() { "" } else { "." });
        if !is_http {
            return Err(ConfigError::invalid(
                path,
                key(""),
                "a login goes in front of HTTP services (hosts) only: the relay reads no credentials on TCP, UDP or passed-through TLS",
            ));
        }
        if self.users.is_empty() && self.tokens.is_empty() && self.forward.is_none() {
            return Err(ConfigError::invalid(path, key(""), "set users, tokens or forward: a gate with no way in refuses everyone (use access = [\"deny all\"] for that)"));
        }
        for (user, phc) in &self.users {
            if user.is_empty() || user.contains(':') {
                return Err(ConfigError::invalid(
                    path,
                    key("users"),
                    format!("{user:?} is not a user name (not empty, no ':')"),
                ));
            }
            auth::check_hash(phc)
                .map_err(|e| ConfigError::invalid(path, format!("{}.{user}", key("users")), e.to_string()))?;
        }
        let mut tokens = BTreeMap::new();
        for (token, text) in &self.tokens {
            let sha = auth::parse_token(text).map_err(|e| {
                ConfigError::invalid(path, format!("{}.{token}", key("tokens")), e.to_string())
            })?;
            tokens.insert(token.clone(), sha);
        }
        let token_header = match self.token_header {
            None => None,
            Some(h) => {
                let lower = h.to_ascii_lowercase();
                if hyper::header::HeaderName::from_bytes(lower.as_bytes()).is_err()
                    || lower == "authorization"
                {
                    return Err(ConfigError::invalid(
                        path,
                        key("token_header"),
                        format!(
                            "{h:?} is not a header name for tokens (leave it out for Authorization: Bearer)"
                        ),
                    ));
                }
                Some(lower)
            }
        };
        let forward = match self.forward {
            None if self.forward_ca.is_some() => {
                return Err(ConfigError::invalid(
                    path,
                    key("forward_ca"),
                    "the CAs check a forward auth server: set forward",
                ))
            }
            None if !self.forward_headers.is_empty() => {
                return Err(ConfigError::invalid(
                    path,
                    key("forward_headers"),
                    "headers are copied from a forward auth answer: set forward",
                ))
            }
            None => None,
            Some(url) => {
                let https = auth::check_forward_url(&url)
                    .map_err(|e| ConfigError::invalid(path, key("forward"), e.to_string()))?;
                let tls =
                    match (https, &self.forward_ca) {
                        (false, None) => None,
                        (false, Some(_)) => return Err(ConfigError::invalid(
                            path,
                            key("forward_ca"),
                            "the CAs are for checking an https:// forward URL's server; this one is http://",
                        )),
                        (true, ca) => {
                            let ca = ca.as_deref().map(|ca| sallyport_runtime::config::resolve(path, ca));
                            let which = if ca.is_some() { "forward_ca" } else { "forward" };
                            Some(
                                ForwardTls::new(ca.as_deref())
                                    .map_err(|e| ConfigError::invalid(path, key(which), e.to_string()))?,
                            )
                        }
                    };
                let mut copy_headers = Vec::new();
                for h in &self.forward_headers {
                    let lower = h.to_ascii_lowercase();
                    if hyper::header::HeaderName::from_bytes(lower.as_bytes()).is_err() {
                        return Err(ConfigError::invalid(
                            path,
                            key("forward_headers"),
                            format!("{h:?} is not a header name"),
                        ));
                    }
                    copy_headers.push(lower);
                }
                Some(Forward { url, copy_headers, tls })
            }
        };
        for prefix in &self.bypass {
            if !prefix.starts_with('/') {
                return Err(ConfigError::invalid(
                    path,
                    key("bypass"),
                    format!("{prefix:?} is not a path: start it with /"),
                ));
            }
        }
        Ok(Auth {
            realm: self.realm.unwrap_or_else(|| name.to_owned()),
            users: self.users,
            tokens,
            token_header,
            forward,
            bypass: self.bypass,
        })
    }
}
