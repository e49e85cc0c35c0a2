//! A private CA in a temporary directory, with the relay's certificate and agent bundles, and
//! configurations that bind port 0 everywhere.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use sallyport_relay::trust::pki::{self, Ca};

/// A CA, a relay identity for `127.0.0.1`/`localhost`, and agent bundles on demand.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    pub fn new() -> Self {
        Self::with_names(&["127.0.0.1", "localhost"])
    }

    /// A PKI whose relay certificate carries `names` (IP addresses or DNS names).
    pub fn with_names(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        pki::init(dir.path(), &names).expect("relay init");
        let ca = Ca::load(dir.path()).expect("load CA");
        Self { dir, ca }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Writes a bundle for agent `name` (CA, certificate, key) and returns its directory.
    pub fn agent_bundle(&self, name: &str) -> PathBuf {
        let out = self.dir.path().join(format!("agent-{name}"));
        pki::add_agent(self.dir.path(), name, &out, "127.0.0.1:1", pki::AGENT_VALIDITY)
            .expect("agent bundle");
        out
    }

    /// A relay configuration: QUIC, admin and every service on `127.0.0.1:0`. `services` pairs a
    /// service name with the agent allowed to carry it; `extra` goes into the `[relay]` table.
    pub fn relay_config(&self, services: &[(&str, &str)], extra: &str) -> sallyport_relay::Config {
        let mut text = format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\nkey = \"relay.key\"\n{extra}\n"
        );
        for (service, agent) in services {
            text.push_str(&format!("[services.{service}]\nagent = \"{agent}\"\nlisten = \"127.0.0.1:0\"\n"));
        }
        sallyport_relay::Config::from_toml(&text, &self.dir.path().join("relay.toml")).expect("relay config")
    }

    /// A relay configuration like [`relay_config`](Self::relay_config), with the `[services]`
    /// tables given as TOML.
    pub fn relay_config_toml(&self, extra: &str, services: &str) -> sallyport_relay::Config {
        let text = Self::relay_text(extra, services);
        sallyport_relay::Config::from_toml(&text, &self.dir.path().join("relay.toml")).expect("relay config")
    }

    /// [`relay_config_toml`](Self::relay_config_toml), also written to `relay.toml` in the PKI's
    /// folder (where a reload reads it).
    pub fn relay_config_file(&self, extra: &str, services: &str) -> sallyport_relay::Config {
        let text = Self::relay_text(extra, services);
        let path = self.dir.path().join("relay.toml");
        std::fs::write(&path, &text).expect("write relay.toml");
        sallyport_relay::Config::from_toml(&text, &path).expect("relay config")
    }

    /// The text of a relay.toml with the PKI's files, `extra` in `[relay]`, then `services`.
    pub fn relay_text(extra: &str, services: &str) -> String {
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\nkey = \"relay.key\"\n{extra}\n{services}"
        )
    }

    /// An agent configuration like [`agent_config`](Self::agent_config), with the `[services]`
    /// tables given as TOML.
    pub fn agent_config_toml(
        &self,
        name: &str,
        relays: &[SocketAddr],
        extra: &str,
        services: &str,
    ) -> sallyport_agent::Config {
        let bundle = self.agent_bundle(name);
        let relays: Vec<String> = relays.iter().map(|r| format!("\"{r}\"")).collect();
        let text = format!(
            "[agent]\nrelays = [{}]\nca_cert = \"ca.crt\"\ncert = \"agent.crt\"\nkey = \"agent.key\"\n\
             reconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n{extra}\n{services}",
            relays.join(", ")
        );
        sallyport_agent::Config::from_toml(&text, &bundle.join("agent.toml")).expect("agent config")
    }

    /// An agent configuration for `name` pointing at `relay`, with one `tcp://` target per service.
    /// `extra` goes into the `[agent]` table.
    pub fn agent_config(
        &self,
        name: &str,
        relays: &[SocketAddr],
        services: &[(&str, SocketAddr)],
        extra: &str,
    ) -> sallyport_agent::Config {
        let bundle = self.agent_bundle(name);
        let relays: Vec<String> = relays.iter().map(|r| format!("\"{r}\"")).collect();
        let mut text = format!(
            "[agent]\nrelays = [{}]\nca_cert = \"ca.crt\"\ncert = \"agent.crt\"\nkey = \"agent.key\"\n\
             reconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n{extra}\n",
            relays.join(", ")
        );
        for (service, target) in services {
            text.push_str(&format!("[services.{service}]\ntarget = \"tcp://{target}\"\n"));
        }
        sallyport_agent::Config::from_toml(&text, &bundle.join("agent.toml")).expect("agent config")
    }
}
