//! TLS for the public listeners (rustls): certificates from PEM files, chosen by SNI, swapped
//! on `tqproxy reload` without touching established connections.
//!
//! Each TLS listener has one [`SniResolver`] holding an `ArcSwap` of a [`CertStore`]. A store
//! is built completely (every file read, every key matched to its certificate) before it is
//! published, so a reload with a broken certificate fails and the old certificates stay.

use std::collections::HashMap;
use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// One certificate (chain) and its private key, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A loaded certificate with the names it serves.
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub names: Vec<String>,
    pub not_after: String,
}

/// Reads a chain and key, checks they belong together, and extracts the DNS names (SAN, else
/// the CN). Errors name the file.
pub fn load_cert(files: &CertFiles) -> Result<LoadedCert, String> {
    rustls_crypto_provider();
    let open = |p: &Path| {
        std::fs::File::open(p)
            .map(BufReader::new)
            .map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls_pemfile::certs(&mut open(&files.cert)?)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: not a PEM certificate file: {e}", files.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate found (expected PEM \"BEGIN CERTIFICATE\")",
            files.cert.display()
        ));
    }
    let key = rustls_pemfile::private_key(&mut open(&files.key)?)
        .map_err(|e| format!("{}: not a PEM key file: {e}", files.key.display()))?
        .ok_or_else(|| {
            format!(
                "{}: no private key found (expected PEM \"BEGIN PRIVATE KEY\")",
                files.key.display()
            )
        })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("{}: unsupported private key: {e}", files.key.display()))?;
    let certified = CertifiedKey::new(chain, signer);
    if let Err(e) = certified.keys_match() {
        return Err(format!(
            "{} does not belong to {}: {e}",
            files.key.display(),
            files.cert.display()
        ));
    }
    let (names, not_after) = names_of(&certified.cert[0]).map_err(|e| {
        format!(
            "{}: cannot parse the certificate: {e}",
            files.cert.display()
        )
    })?;
    Ok(LoadedCert {
        key: Arc::new(certified),
        names,
        not_after,
    })
}

fn names_of(der: &[u8]) -> Result<(Vec<String>, String), String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    Ok((names, cert.validity().not_after.to_string()))
}

fn rustls_crypto_provider() {
    let _ =
        rustls::crypto::CryptoProvider::install_default(rustls::crypto::ring::default_provider());
}

/// The certificates of one listener, indexed by name. The first configured certificate is the
/// default for clients that send no (or an unknown) server name.
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `.example.com`.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
    /// One line per certificate, for logs and reload output.
    pub summary: Vec<String>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("certificates", &self.summary)
            .finish()
    }
}

impl CertStore {
    pub fn load(files: &[CertFiles]) -> Result<CertStore, String> {
        let mut exact = HashMap::new();
        let mut wildcard = Vec::new();
        let mut default = None;
        let mut summary = Vec::new();
        for f in files {
            let c = load_cert(f)?;
            summary.push(format!(
                "{} ({}; expires {})",
                f.cert.display(),
                c.names.join(", "),
                c.not_after
            ));
            for n in &c.names {
                if let Some(suffix) = n.strip_prefix('*') {
                    wildcard.push((suffix.to_string(), c.key.clone()));
                } else {
                    exact.entry(n.clone()).or_insert_with(|| c.key.clone());
                }
            }
            default.get_or_insert(c.key);
        }
        let default = default.ok_or("no certificate configured")?;
        wildcard.sort_by_key(|w: &(String, _)| std::cmp::Reverse(w.0.len()));
        Ok(CertStore {
            exact,
            wildcard,
            default,
            summary,
        })
    }

    pub fn pick(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        if let Some(name) = server_name {
            let name = name.to_ascii_lowercase();
            if let Some(k) = self.exact.get(&name) {
                return k.clone();
            }
            // A wildcard covers exactly one label.
            if let Some((_, k)) = self.wildcard.iter().find(|(suffix, _)| {
                name.ends_with(suffix.as_str()) && !name[..name.len() - suffix.len()].contains('.')
            }) {
                return k.clone();
            }
        }
        self.default.clone()
    }
}

/// rustls' certificate hook for one listener; the store is replaced on reload.
#[derive(Debug)]
pub struct SniResolver {
    store: ArcSwap<CertStore>,
}

impl SniResolver {
    pub fn new(store: CertStore) -> SniResolver {
        SniResolver {
            store: ArcSwap::from_pointee(store),
        }
    }

    pub fn replace(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }

    pub fn summary(&self) -> Vec<String> {
        self.store.load().summary.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.store.load().pick(hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cert(dir: &Path, name: &str, sans: &[&str]) -> CertFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        let files = CertFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn picks_by_name_with_wildcards_and_default() {
        let d = tempfile::tempdir().unwrap();
        let a = write_cert(d.path(), "a", &["a.example.test"]);
        let w = write_cert(d.path(), "w", &["*.wild.test", "wild.test"]);
        let store = CertStore::load(&[a, w]).unwrap();
        let name_of = |k: Arc<CertifiedKey>| names_of(&k.cert[0]).unwrap().0;
        assert_eq!(
            name_of(store.pick(Some("a.example.test"))),
            vec!["a.example.test"]
        );
        assert_eq!(
            name_of(store.pick(Some("A.EXAMPLE.TEST"))),
            vec!["a.example.test"]
        );
        assert_eq!(
            name_of(store.pick(Some("x.wild.test"))),
            vec!["*.wild.test", "wild.test"]
        );
        assert_eq!(
            name_of(store.pick(Some("wild.test"))),
            vec!["*.wild.test", "wild.test"]
        );
        // one label only; unknown names get the first certificate
        assert_eq!(
            name_of(store.pick(Some("a.b.wild.test"))),
            vec!["a.example.test"]
        );
        assert_eq!(name_of(store.pick(None)), vec!["a.example.test"]);
    }

    #[test]
    fn broken_files_are_errors_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let a = write_cert(d.path(), "a", &["a.test"]);
        let b = write_cert(d.path(), "b", &["b.test"]);
        let missing = CertFiles {
            cert: d.path().join("nope.pem"),
            key: a.key.clone(),
        };
        assert!(load_cert(&missing).err().unwrap().contains("cannot read"));
        let mismatched = CertFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let e = load_cert(&mismatched).err().unwrap();
        assert!(e.contains("does not belong to"), "{e}");
        std::fs::write(d.path().join("garbage.pem"), "hello").unwrap();
        let garbage = CertFiles {
            cert: d.path().join("garbage.pem"),
            key: a.key.clone(),
        };
        assert!(
            load_cert(&garbage)
                .err()
                .unwrap()
                .contains("no certificate found")
        );
        let nokey = CertFiles {
            cert: a.cert.clone(),
            key: a.cert.clone(),
        };
        assert!(
            load_cert(&nokey)
                .err()
                .unwrap()
                .contains("no private key found")
        );
    }
}
