//! Rotating the intermediate the relays sign with, by the root's key on the operator's machine.
//! Agents trust the root, so their certificates (signed by the old intermediate, which they send
//! along) stay valid, and their next renewal is signed by the new one: nobody re-enrolls.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::{
    ca::Ca,
    pki::{self, PkiError, CA_CERT, CA_KEY, RELAY_CERT, RELAY_KEY, ROOT_KEY},
};

/// What `ca rotate` did.
#[derive(Debug)]
pub struct RotateReport {
    /// Where the previous intermediate key and relay certificate and key were kept.
    pub retired: PathBuf,
    /// The root's key was `ca.key` (a state directory from before intermediates) and is now
    /// `root.key`, for the operator to move offline.
    pub root_key_moved: Option<PathBuf>,
    /// The names of the new relay certificate (the old one's).
    pub sans: Vec<String>,
    /// When the new intermediate ends, as Unix time.
    pub intermediate_not_after_unix: i64,
}

/// Makes a new intermediate with the root's key (`root_key`, or `root.key` in `dir`), a new relay
/// certificate for the same names signed by it, and writes them over `ca.key`, `relay.crt` and
/// `relay.key` in `dir` after copying those to `dir/retired-<unix time>/`. A directory from
/// before intermediates (`ca.key` is the root's key) is converted: the key moves to `root.key`.
pub fn rotate(dir: &Path, root_key: Option<&Path>) -> Result<RotateReport, PkiError> {
    let root_pem = pki::read(&dir.join(CA_CERT))?;
    let root_key_path = root_key.map_or_else(|| dir.join(ROOT_KEY), Path::to_owned);
    let (root_key_pem, moved) = if root_key_path.exists() {
        (pki::read(&root_key_path)?, false)
    } else if root_key.is_none() {
        // A state directory from before intermediates: its ca.key may be the root's.
        let ca_key = pki::read(&dir.join(CA_KEY))?;
        match Ca::from_parts(&ca_key, &root_pem, "") {
            Ok(ca) if ca.is_root() => (ca_key, true),
            _ => return Err(PkiError::NoRootKey(root_key_path)),
        }
    } else {
        return Err(PkiError::NoRootKey(root_key_path));
    };
    let root = match Ca::from_parts(&root_key_pem, &root_pem, "") {
        Ok(root) if root.is_root() => root,
        _ => return Err(PkiError::NotRootKey(root_key_path)),
    };
    let relay_pem = pki::read(&dir.join(RELAY_CERT))?;
    let relay_der = sallyport_runtime::tls::certs_from_pem(relay_pem.as_bytes(), "relay certificate")
        .map_err(|e| PkiError::Cert(format!("{}: {e}", dir.join(RELAY_CERT).display())))?;
    let sans = sallyport_runtime::tls::inspect(&relay_der[0])
        .map_err(|e| PkiError::Cert(format!("{}: {e}", dir.join(RELAY_CERT).display())))?
        .sans;

    let (intermediate, intermediate_key) = root.issue_intermediate()?;
    let relay = intermediate.issue_relay(&sans)?;
    let intermediate_der =
        sallyport_runtime::tls::certs_from_pem(intermediate.cert_pem().as_bytes(), "intermediate")
            .map_err(|e| PkiError::Cert(e.to_string()))?;
    let intermediate_not_after_unix = sallyport_runtime::tls::inspect(&intermediate_der[0])
        .map_err(|e| PkiError::Cert(e.to_string()))?
        .not_after_unix;

    let retired = dir.join(format!("retired-{}", sallyport_runtime::clock::unix_now()));
    fs::create_dir_all(&retired).map_err(|source| PkiError::Io { path: retired.clone(), source })?;
    for name in [CA_KEY, RELAY_KEY, RELAY_CERT] {
        let from = dir.join(name);
        if from.exists() {
            pki::write_private(&retired.join(name), &pki::read(&from)?)?;
        }
    }
    let root_key_moved = if moved {
        let path = dir.join(ROOT_KEY);
        pki::write_private(&path, &root_key_pem)?;
        Some(path)
    } else {
        None
    };
    pki::write_private(&dir.join(CA_KEY), &intermediate_key)?;
    pki::write_private(&dir.join(RELAY_KEY), &relay.key_pem)?;
    pki::write_public(&dir.join(RELAY_CERT), &relay.cert_pem)?;
    Ok(RotateReport { retired, root_key_moved, sans, intermediate_not_after_unix })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sallyport_runtime::tls;

    fn ders(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        tls::certs_from_pem(pem.as_bytes(), "test").expect("pem")
    }

    #[test]
    fn init_keeps_the_root_apart_and_issues_through_the_intermediate() {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init(dir.path(), &["relay.example".to_owned()]).expect("init");
        let ca = Ca::load(dir.path()).expect("load");
        assert!(!ca.is_root(), "ca.key must be the intermediate's");
        let root = ders(&pki::read(&dir.path().join(CA_CERT)).expect("ca"));
        let agent = ca.issue_agent("winbox", pki::AGENT_VALIDITY).expect("agent");
        let chain = ders(&agent.cert_pem);
        assert_eq!(chain.len(), 2, "an agent certificate carries the intermediate");
        tls::verify_chain(&chain, &root[0]).expect("chains to the root");
        assert!(tls::verify_issued_by(&chain[0], &root[0]).is_err(), "the root signs no leaf");
        // The root's key is not what the relay is given.
        let root_key = pki::read(&dir.path().join(ROOT_KEY)).expect("root key");
        assert_ne!(root_key, pki::read(&dir.path().join(CA_KEY)).expect("ca key"));
    }

    #[test]
    fn rotation_keeps_the_root_and_old_certificates_valid() {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init(dir.path(), &["relay.example".to_owned(), "10.0.0.1".to_owned()]).expect("init");
        let before = Ca::load(dir.path()).expect("load");
        let old_agent = before.issue_agent("winbox", pki::AGENT_VALIDITY).expect("agent");
        let root_pem = pki::read(&dir.path().join(CA_CERT)).expect("ca");

        let report = rotate(dir.path(), None).expect("rotate");
        assert_eq!(report.sans, vec!["relay.example".to_owned(), "10.0.0.1".to_owned()]);
        assert!(report.root_key_moved.is_none());
        assert!(report.retired.join(CA_KEY).exists() && report.retired.join(RELAY_CERT).exists());
        assert_eq!(pki::read(&dir.path().join(CA_CERT)).expect("ca"), root_pem, "the root stays");

        let after = Ca::load(dir.path()).expect("load after");
        assert_ne!(after.cert_pem(), before.cert_pem(), "a new intermediate");
        let root = ders(&root_pem);
        let new_agent = after.issue_agent("winbox", pki::AGENT_VALIDITY).expect("agent");
        tls::verify_chain(&ders(&new_agent.cert_pem), &root[0]).expect("new chains to the root");
        tls::verify_chain(&ders(&old_agent.cert_pem), &root[0]).expect("old still chains to the root");
        let relay = ders(&pki::read(&dir.path().join(RELAY_CERT)).expect("relay"));
        tls::verify_chain(&relay, &root[0]).expect("relay chains");
        assert_eq!(tls::inspect(&relay[0]).expect("inspect").sans, report.sans);
    }

    #[test]
    fn rotation_converts_a_directory_whose_ca_key_is_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, root_key) = Ca::generate("Sallyport CA").expect("root");
        let relay = root.issue_relay(&["127.0.0.1".to_owned()]).expect("relay");
        pki::write_private(&dir.path().join(CA_KEY), &root_key).expect("write");
        pki::write_private(&dir.path().join(CA_CERT), root.root_pem()).expect("write");
        pki::write_private(&dir.path().join(RELAY_CERT), &relay.cert_pem).expect("write");
        pki::write_private(&dir.path().join(RELAY_KEY), &relay.key_pem).expect("write");
        assert!(Ca::load(dir.path()).expect("load").is_root());

        let report = rotate(dir.path(), None).expect("rotate");
        assert_eq!(report.root_key_moved.as_deref(), Some(dir.path().join(ROOT_KEY).as_path()));
        assert_eq!(pki::read(&dir.path().join(ROOT_KEY)).expect("root key"), root_key);
        assert!(!Ca::load(dir.path()).expect("load").is_root());
    }

    #[test]
    fn rotation_refuses_a_key_that_is_not_the_roots() {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init(dir.path(), &["127.0.0.1".to_owned()]).expect("init");
        let other = dir.path().join("other.key");
        let (_, other_key) = Ca::generate("other").expect("other");
        pki::write_private(&other, &other_key).expect("write");
        let e = rotate(dir.path(), Some(&other)).expect_err("not the root's key");
        assert!(e.to_string().contains("not the root CA's"), "{e}");
        // The intermediate's key is no root key either.
        let e = rotate(dir.path(), Some(&dir.path().join(CA_KEY))).expect_err("intermediate key");
        assert!(e.to_string().contains("not the root CA's"), "{e}");
        fs::remove_file(dir.path().join(ROOT_KEY)).expect("rm");
        let e = rotate(dir.path(), None).expect_err("no root key");
        assert!(e.to_string().contains("--root-key"), "{e}");
        assert!(!dir
            .path()
            .read_dir()
            .expect("ls")
            .any(|e| { e.expect("entry").file_name().to_string_lossy().starts_with("retired-") }));
    }
}
