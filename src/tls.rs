//! TLS for the public listeners (rustls): certificates from PEM files, chosen by SNI, swapped
//! on `tqproxy reload` without touching established connections; session resumption; ALPN.
//!
//! Each TLS listener has one [`SniResolver`] holding an `ArcSwap` of a [`CertStore`]. A store
//! is built completely (every file read, every key matched to its certificate) before it is
//! published, so a reload with a broken certificate fails and the old certificates stay.
//!
//! Each TLS listener also has its own rustls [`ServerConfig`] ([`server_config`]), built once
//! at start: TLS 1.2 and 1.3 only, the resolver, the ALPN list from `tls.h2`, and resumption —
//! stateless tickets (rustls' ring `Ticketer`: AEAD keys rotated every 6 hours, the previous
//! key still accepted) and a session cache of `tls.session_cache` entries (TLS 1.2 session ids;
//! TLS 1.3 too when tickets are off). A reload swaps certificates only, so sessions made before
//! it keep resuming after it; a new process (`tqproxy upgrade`) has new ticket keys and an empty
//! cache, so its clients make one full handshake.
//!
//! pingora's listener builds a `ServerConfig` of its own from its `TlsSettings`, with no way to
//! set the ticketer or the cache (pingora-core 0.9.1, `listeners/tls/rustls/mod.rs`; only its
//! `Acceptor::from_server_config` takes ours). So TLS listeners are plain TCP listeners to
//! pingora, and [`TlsFront`] — the service's app, in front of the HTTP engine — runs the
//! handshake with that acceptor, then hands the TLS stream to the engine, which reads the
//! ALPN result: `h2` to the HTTP/2 server, anything else (`http/1.1`, or none) to the HTTP/1.1
//! engine.
//!
//! A listener with `tls.acme` also serves the ACME certificates ([`crate::acme::Managed`]) by
//! SNI next to its explicit ones: an explicit certificate's exact name first, then its
//! wildcards, then the ACME certificates' names; the default (no or unknown SNI) is the first
//! explicit certificate, else the first ACME certificate issued. With `challenge:
//! tls-alpn-01` it also offers the `acme-tls/1` ALPN: a handshake that offers only that gets
//! the challenge certificate ([`crate::acme::Challenges::tls_alpn`]) and is closed after it.

use std::collections::HashMap;
use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::net::SocketAddr;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::Stream;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::server::ShutdownWatch;
use rustls::ServerConfig;
use rustls::server::ServerSessionMemoryCache;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
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
    default: Option<Arc<CertifiedKey>>,
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
        wildcard.sort_by_key(|w: &(String, _)| std::cmp::Reverse(w.0.len()));
        Ok(CertStore {
            exact,
            wildcard,
            default,
            summary,
        })
    }

    /// The certificate for `server_name`, else the default (none when the store is empty:
    /// a listener with only ACME certificates).
    pub fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        server_name
            .and_then(|n| self.named(&n.to_ascii_lowercase()))
            .or_else(|| self.default.clone())
    }

    /// The certificate whose name (exact, else a wildcard) is `name` (lowercase).
    fn named(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(k) = self.exact.get(name) {
            return Some(k.clone());
        }
        // A wildcard covers exactly one label.
        self.wildcard
            .iter()
            .find(|(suffix, _)| {
                name.ends_with(suffix.as_str()) && !name[..name.len() - suffix.len()].contains('.')
            })
            .map(|(_, k)| k.clone())
    }
}

/// rustls' certificate hook for one listener; the store is replaced on reload.
pub struct SniResolver {
    store: ArcSwap<CertStore>,
    /// The listener's ACME certificates (`tls.acme`), swapped in by their renewal task.
    acme: Vec<Arc<crate::acme::Managed>>,
    /// Set when the listener answers tls-alpn-01.
    challenges: Option<Arc<crate::acme::Challenges>>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("store", &self.store)
            .field("acme", &self.acme.len())
            .finish()
    }
}

impl SniResolver {
    pub fn new(store: CertStore) -> SniResolver {
        SniResolver::with_acme(store, Vec::new(), None)
    }

    /// Explicit certificates and ACME ones; `challenges` when the listener answers
    /// tls-alpn-01.
    pub fn with_acme(
        store: CertStore,
        acme: Vec<Arc<crate::acme::Managed>>,
        challenges: Option<Arc<crate::acme::Challenges>>,
    ) -> SniResolver {
        SniResolver {
            store: ArcSwap::from_pointee(store),
            acme,
            challenges,
        }
    }

    /// The `tls.acme` blocks this listener serves.
    pub fn acme_settings(&self) -> Vec<crate::acme::AcmeSettings> {
        self.acme.iter().map(|m| m.settings.clone()).collect()
    }

    /// The certificate for a handshake with this SNI and ALPN offer.
    pub fn choose<'a>(
        &self,
        server_name: Option<&str>,
        mut alpn: impl Iterator<Item = &'a [u8]>,
    ) -> Option<Arc<CertifiedKey>> {
        if let Some(ch) = &self.challenges
            && alpn.next() == Some(crate::acme::ACME_TLS_ALPN)
            && alpn.next().is_none()
        {
            return ch.tls_alpn(server_name);
        }
        let store = self.store.load();
        let name = server_name.map(|n| n.to_ascii_lowercase());
        if let Some(name) = &name {
            if let Some(k) = store.named(name) {
                return Some(k);
            }
            if let Some(k) = self.acme.iter().find_map(|m| m.cert_for(name)) {
                return Some(k);
            }
        }
        store
            .default
            .clone()
            .or_else(|| self.acme.iter().find_map(|m| m.cert()))
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
        let alpn: Vec<&[u8]> = hello.alpn().into_iter().flatten().collect();
        self.choose(hello.server_name(), alpn.into_iter())
    }
}

/// How a TLS listener negotiates, besides its certificates (its `tls:` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiation {
    /// Offer `h2` before `http/1.1` by ALPN.
    pub h2: bool,
    /// Sessions kept for resumption by id (0: none).
    pub session_cache: usize,
    /// Stateless session tickets.
    pub tickets: bool,
    /// Offer `acme-tls/1` too (last), for the tls-alpn-01 challenge of `tls.acme`.
    pub acme_tls_alpn: bool,
}

impl Negotiation {
    /// The ALPN protocols offered, in the server's order of preference. A client that offers
    /// none of them is refused (rustls: `no_application_protocol`); one that offers no ALPN at
    /// all gets HTTP/1.1.
    pub fn alpn(&self) -> Vec<Vec<u8>> {
        let mut alpn = Vec::new();
        if self.h2 {
            alpn.push(b"h2".to_vec());
        }
        alpn.push(b"http/1.1".to_vec());
        if self.acme_tls_alpn {
            alpn.push(crate::acme::ACME_TLS_ALPN.to_vec());
        }
        alpn
    }
}

/// The rustls configuration of one TLS listener: TLS 1.2 and 1.3 with ring's default suites
/// (AEAD only, ECDHE only), certificates from `resolver`, ALPN and resumption as `how` says.
pub fn server_config(
    resolver: Arc<SniResolver>,
    how: &Negotiation,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = how.alpn();
    config.session_storage = if how.session_cache > 0 {
        ServerSessionMemoryCache::new(how.session_cache)
    } else {
        Arc::new(NoServerSessionStorage {})
    };
    if how.tickets {
        config.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| format!("session ticket keys: {e}"))?;
    }
    Ok(Arc::new(config))
}

/// The service's app in front of the HTTP engine `A`: on a connection accepted by a TLS
/// listener, the TLS handshake (with that listener's [`server_config`]), bounded by
/// `handshake_timeout`; then the engine gets the TLS stream. Connections of other listeners
/// go to the engine untouched.
pub struct TlsFront<A> {
    inner: Arc<A>,
    /// The TLS listeners' addresses (as configured: an unspecified IP matches any local IP
    /// of that port) and acceptors.
    listeners: Vec<(SocketAddr, Acceptor)>,
    handshake_timeout: Duration,
}

impl<A> TlsFront<A> {
    pub fn new(
        inner: A,
        listeners: Vec<(SocketAddr, Arc<ServerConfig>)>,
        handshake_timeout: Duration,
    ) -> TlsFront<A> {
        TlsFront {
            inner: Arc::new(inner),
            listeners: listeners
                .into_iter()
                .map(|(addr, config)| (addr, Acceptor::from_server_config(config)))
                .collect(),
            handshake_timeout,
        }
    }

    /// The acceptor of the TLS listener that accepted a connection with this local address.
    fn acceptor(&self, local: SocketAddr) -> Option<&Acceptor> {
        let exact = self.listeners.iter().find(|(a, _)| *a == local);
        exact
            .or_else(|| {
                self.listeners
                    .iter()
                    .find(|(a, _)| a.ip().is_unspecified() && a.port() == local.port())
            })
            .map(|(_, acceptor)| acceptor)
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for TlsFront<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Only a fresh TCP connection is ours to handshake: pingora hands a stream the engine
        // returned (kept alive) back here, and that one is already TLS if it ever was.
        let digest = stream.get_socket_digest();
        let local = digest
            .as_ref()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let acceptor = match local {
            Some(local) if stream.as_any().is::<L4Stream>() => self.acceptor(local),
            _ => None,
        };
        let Some(acceptor) = acceptor else {
            return self.inner.process_new(stream, shutdown).await;
        };
        let Ok(tcp) = stream.into_any().downcast::<L4Stream>() else {
            return None; // checked above
        };
        let peer = digest.and_then(|d| d.peer_addr().cloned());
        let tls = match tokio::time::timeout(self.handshake_timeout, acceptor.tls_handshake(*tcp))
            .await
        {
            Ok(Ok(tls)) => tls,
            // A client that goes away or speaks no TLS is no news: debug, not pingora's error!.
            Ok(Err(e)) => {
                tracing::debug!(peer = ?peer, error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                tracing::debug!(peer = ?peer, "TLS handshake timed out");
                return None;
            }
        };
        if let Some(pingora::protocols::ALPN::Custom(c)) =
            pingora::protocols::Ssl::selected_alpn_proto(&tls)
            && c.protocol() == crate::acme::ACME_TLS_ALPN
        {
            // A tls-alpn-01 validation: the handshake was the whole answer (RFC 8737 §3).
            return None;
        }
        self.inner.process_new(Box::new(tls), shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
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

    impl CertStore {
        fn pick_some(&self, n: Option<&str>) -> Arc<CertifiedKey> {
            self.pick(n).unwrap()
        }
    }

    #[test]
    fn picks_by_name_with_wildcards_and_default() {
        let d = tempfile::tempdir().unwrap();
        let a = write_cert(d.path(), "a", &["a.example.test"]);
        let w = write_cert(d.path(), "w", &["*.wild.test", "wild.test"]);
        let store = CertStore::load(&[a, w]).unwrap();
        let name_of = |k: Arc<CertifiedKey>| names_of(&k.cert[0]).unwrap().0;
        assert_eq!(
            name_of(store.pick_some(Some("a.example.test"))),
            vec!["a.example.test"]
        );
        assert_eq!(
            name_of(store.pick_some(Some("A.EXAMPLE.TEST"))),
            vec!["a.example.test"]
        );
        assert_eq!(
            name_of(store.pick_some(Some("x.wild.test"))),
            vec!["*.wild.test", "wild.test"]
        );
        assert_eq!(
            name_of(store.pick_some(Some("wild.test"))),
            vec!["*.wild.test", "wild.test"]
        );
        // one label only; unknown names get the first certificate
        assert_eq!(
            name_of(store.pick_some(Some("a.b.wild.test"))),
            vec!["a.example.test"]
        );
        assert_eq!(name_of(store.pick_some(None)), vec!["a.example.test"]);
    }

    #[test]
    fn acme_certificates_are_chosen_by_sni_next_to_explicit_ones() {
        let d = tempfile::tempdir().unwrap();
        let a = write_cert(d.path(), "a", &["a.test"]);
        // An ACME certificate already in its state directory (key + chain in one file).
        let state = d.path().join("acme");
        std::fs::create_dir_all(state.join("certs")).unwrap();
        let m = write_cert(d.path(), "m", &["m.test", "n.test"]);
        let pem =
            std::fs::read_to_string(&m.key).unwrap() + &std::fs::read_to_string(&m.cert).unwrap();
        std::fs::write(state.join("certs/m.test.pem"), pem).unwrap();
        let settings = crate::acme::AcmeSettings {
            domains: vec!["m.test".into(), "n.test".into()],
            email: None,
            directory: crate::acme::LETSENCRYPT_STAGING.into(),
            directory_ca: None,
            challenge: crate::acme::ChallengeKind::TlsAlpn01,
            renew_before: crate::acme::DEFAULT_RENEW_BEFORE,
            state_dir: state,
        };
        let managed = Arc::new(crate::acme::Managed::load(settings).unwrap());
        let challenges = Arc::new(crate::acme::Challenges::new(vec![]));
        let name_of = |k: Option<Arc<CertifiedKey>>| names_of(&k.unwrap().cert[0]).unwrap().0;
        let none = || std::iter::empty::<&[u8]>();
        let mixed = SniResolver::with_acme(
            CertStore::load(&[a]).unwrap(),
            vec![managed.clone()],
            Some(challenges.clone()),
        );
        assert_eq!(
            name_of(mixed.choose(Some("N.test"), none())),
            ["m.test", "n.test"]
        );
        assert_eq!(name_of(mixed.choose(Some("a.test"), none())), ["a.test"]);
        // Unknown or no name: the explicit certificate is the default.
        assert_eq!(name_of(mixed.choose(Some("zzz.test"), none())), ["a.test"]);
        assert_eq!(name_of(mixed.choose(None, none())), ["a.test"]);
        // acme-tls/1 alone: the challenge certificate or nothing, never a real one.
        let alpn = [crate::acme::ACME_TLS_ALPN];
        assert!(mixed.choose(Some("m.test"), alpn.into_iter()).is_none());
        challenges.set_tls_alpn(
            "m.test",
            crate::acme::client::tls_alpn_cert("m.test", "t.k").unwrap(),
        );
        let c = mixed.choose(Some("m.test"), alpn.into_iter()).unwrap();
        assert_ne!(c.cert[0], managed.cert().unwrap().cert[0]);
        // ... but with other protocols offered too, a normal handshake.
        let both = [b"h2".as_slice(), crate::acme::ACME_TLS_ALPN];
        assert_eq!(
            name_of(mixed.choose(Some("m.test"), both.into_iter())),
            ["m.test", "n.test"]
        );
        // Only ACME: its certificate is the default.
        let only = SniResolver::with_acme(CertStore::load(&[]).unwrap(), vec![managed], None);
        assert_eq!(name_of(only.choose(None, none())), ["m.test", "n.test"]);
    }

    #[test]
    fn the_server_config_follows_the_listener() {
        let d = tempfile::tempdir().unwrap();
        let a = write_cert(d.path(), "a", &["a.test"]);
        let resolver = Arc::new(SniResolver::new(CertStore::load(&[a]).unwrap()));
        let on = Negotiation {
            h2: true,
            session_cache: 100,
            tickets: true,
            acme_tls_alpn: false,
        };
        let c = server_config(resolver.clone(), &on).unwrap();
        assert_eq!(c.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(c.ticketer.enabled());
        assert!(c.session_storage.can_cache());
        let off = Negotiation {
            h2: false,
            session_cache: 0,
            tickets: false,
            acme_tls_alpn: false,
        };
        let c = server_config(resolver, &off).unwrap();
        assert_eq!(c.alpn_protocols, [b"http/1.1".to_vec()]);
        assert!(!c.ticketer.enabled());
        assert!(!c.session_storage.can_cache());
    }

    #[test]
    fn a_connection_gets_the_acceptor_of_its_listener() {
        let d = tempfile::tempdir().unwrap();
        let a = write_cert(d.path(), "a", &["a.test"]);
        let resolver = Arc::new(SniResolver::new(CertStore::load(&[a]).unwrap()));
        let how = Negotiation {
            h2: true,
            session_cache: 1,
            tickets: false,
            acme_tls_alpn: false,
        };
        let config = server_config(resolver, &how).unwrap();
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let front = TlsFront::new(
            (),
            vec![
                (addr("127.0.0.1:8443"), config.clone()),
                (addr("0.0.0.0:9443"), config.clone()),
                (addr("[::]:10443"), config),
            ],
            Duration::from_secs(1),
        );
        let which = |local: &str| {
            front.acceptor(addr(local)).map(|a| {
                front
                    .listeners
                    .iter()
                    .position(|(_, b)| std::ptr::eq(a, b))
                    .unwrap()
            })
        };
        assert_eq!(which("127.0.0.1:8443"), Some(0));
        assert_eq!(which("127.0.0.2:8443"), None, "another IP, same port");
        assert_eq!(which("10.1.2.3:9443"), Some(1), "an unspecified IP: any");
        assert_eq!(which("[::ffff:127.0.0.1]:10443"), Some(2));
        assert_eq!(which("127.0.0.1:8080"), None, "a plain listener");
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
