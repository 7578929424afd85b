//! Automatic HTTPS: certificates obtained and renewed by tqproxy itself over ACME (RFC 8555),
//! with `instant-acme` on the tree's rustls and ring.
//!
//! - [`AcmeSettings`]: one `tls.acme` block, validated ([`crate::config`] builds it; the domain
//!   and directory rules are here: [`check_domain`], [`directory_url`]).
//! - [`store`]: the state directory: the account, each certificate and its key, pending
//!   challenges, the lock file. Every file is written to a temporary name and renamed.
//! - [`client`]: one order, from the account to the certificate chain, and the HTTP client that
//!   trusts `directory_ca` and remembers the CA's `Retry-After`.
//! - [`renew`]: the lifecycle of one certificate: load from disk, obtain when missing, renew
//!   `renew_before` expiry, retry with backoff and jitter, swap the certificate in.
//! - [`Challenges`]: the answers to the CA's validation, read by the HTTP/1.1 engine (http-01,
//!   `/.well-known/acme-challenge/<token>` on the plain listeners) and by the TLS resolver
//!   (tls-alpn-01, the `acme-tls/1` ALPN on the TLS listener).
//!
//! Like [`crate::metrics`], the managed certificates are registered once per process
//! ([`install`]) so that the status document, `/healthz` and the control socket can report on
//! them ([`report`], [`force_renewal`]) without being handed the manager.

pub mod client;
pub mod renew;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustls::sign::CertifiedKey;

pub use renew::Managed;

/// Let's Encrypt's production directory: the default `directory`.
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (`directory: letsencrypt-staging`).
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";
/// `renew_before` when it is not set.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86400);
/// `/healthz` warns when a certificate expires within this and its renewal is failing.
pub const WARN_BEFORE_EXPIRY: Duration = Duration::from_secs(7 * 86400);
/// The ALPN protocol of tls-alpn-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// How the CA validates that we control a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// `http://<name>/.well-known/acme-challenge/<token>` on port 80 (pebble: its `httpPort`).
    Http01,
    /// A TLS handshake with ALPN `acme-tls/1` on port 443 (pebble: its `tlsPort`).
    TlsAlpn01,
}

impl ChallengeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// One `tls.acme` block: the certificate of `domains`, kept under `state_dir`.
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeSettings {
    /// `domains`: at least one, DNS names (lowercase), no wildcard; the first names the
    /// certificate's directory under `state_dir`.
    pub domains: Vec<String>,
    /// `email`: the account's contact (optional).
    pub email: Option<String>,
    /// `directory`: the CA's directory URL; default Let's Encrypt ([`LETSENCRYPT`]);
    /// `letsencrypt-staging` and `letsencrypt` are aliases.
    pub directory: String,
    /// `directory_ca`: a PEM file of the CA that signs the directory's own HTTPS certificate,
    /// trusted instead of the system's roots (test and private CAs, e.g. pebble). Default:
    /// the system's roots.
    pub directory_ca: Option<PathBuf>,
    /// `challenge`: `http-01` (default) or `tls-alpn-01`.
    pub challenge: ChallengeKind,
    /// `renew_before`: renew this long before expiry (default 30d).
    pub renew_before: Duration,
    /// `state_dir`: default `../acme` (relative to the config file), created 0700.
    pub state_dir: PathBuf,
}

/// `directory`: an `https://` URL (`http://` is refused: the account key signs over it), or an
/// alias.
pub fn directory_url(s: &str) -> Result<String, String> {
    match s {
        "letsencrypt" => return Ok(LETSENCRYPT.into()),
        "letsencrypt-staging" => return Ok(LETSENCRYPT_STAGING.into()),
        _ => {}
    }
    let Some(rest) = s.strip_prefix("https://") else {
        return Err(format!(
            "`{s}` is not a directory URL (`https://…`) nor `letsencrypt` or `letsencrypt-staging`"
        ));
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{s}` is not a directory URL: no host"));
    }
    s.parse::<http::Uri>()
        .map_err(|e| format!("`{s}` is not a directory URL: {e}"))?;
    Ok(s.to_string())
}

/// A name in `domains`: a DNS name of labels `[a-z0-9-]` (1–63 characters, no leading or
/// trailing `-`), 253 characters at most, not an IP address, no wildcard (both challenges
/// tqproxy answers validate one exact name; a wildcard needs dns-01). Returns it lowercased.
pub fn check_domain(d: &str, challenge: ChallengeKind) -> Result<String, String> {
    let name = d.trim_end_matches('.').to_ascii_lowercase();
    if name.starts_with("*.") || name.contains('*') {
        return Err(format!(
            "`{d}`: a wildcard certificate needs the dns-01 challenge, and tqproxy answers only \
             http-01 and tls-alpn-01 ({} here), which validate one exact name; list the names, \
             or bring the wildcard certificate in `certificates`",
            challenge.as_str()
        ));
    }
    if name.is_empty() || name.len() > 253 {
        return Err(format!("`{d}`: not a domain name (1 to 253 characters)"));
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "`{d}`: an IP address; ACME certificates here are for domain names"
        ));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(format!(
                "`{d}`: not a domain name (labels of a-z, 0-9 and `-`, 1 to 63 characters, \
                 not starting or ending with `-`)"
            ));
        }
    }
    Ok(name)
}

/// The validation answers this process gives, by challenge. A challenge set up by another
/// tqproxy sharing the state directory (the old or new process of an upgrade, which may hold
/// the listening sockets while the other places the order) is found on disk
/// ([`store::pending_challenge`]).
#[derive(Default)]
pub struct Challenges {
    /// http-01: token → key authorization.
    http01: Mutex<HashMap<String, String>>,
    /// tls-alpn-01: name → the challenge certificate.
    tls_alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// The state directories to look in for challenges of another process.
    dirs: Vec<PathBuf>,
}

impl Challenges {
    pub fn new(dirs: Vec<PathBuf>) -> Challenges {
        Challenges {
            dirs,
            ..Challenges::default()
        }
    }

    /// The body answering `GET /.well-known/acme-challenge/<token>`, if it is ours.
    pub fn http01(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix("/.well-known/acme-challenge/")?;
        let token = token.split(['?', '#']).next().unwrap_or("");
        if !store::is_token(token) {
            return None;
        }
        if let Some(k) = lock(&self.http01).get(token) {
            return Some(k.clone());
        }
        self.dirs
            .iter()
            .find_map(|d| store::pending_challenge(d, ChallengeKind::Http01, token))
    }

    /// The certificate answering a tls-alpn-01 handshake for `name`, if it is ours.
    pub fn tls_alpn(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let name = name?.to_ascii_lowercase();
        if let Some(k) = lock(&self.tls_alpn).get(&name) {
            return Some(k.clone());
        }
        let key_auth = self
            .dirs
            .iter()
            .find_map(|d| store::pending_challenge(d, ChallengeKind::TlsAlpn01, &name))?;
        let cert = client::tls_alpn_cert(&name, &key_auth).ok()?;
        lock(&self.tls_alpn).insert(name, cert.clone());
        Some(cert)
    }

    pub(crate) fn set_http01(&self, token: &str, key_auth: &str) {
        lock(&self.http01).insert(token.to_string(), key_auth.to_string());
    }

    pub(crate) fn set_tls_alpn(&self, name: &str, cert: Arc<CertifiedKey>) {
        lock(&self.tls_alpn).insert(name.to_string(), cert);
    }

    pub(crate) fn clear(&self, kind: ChallengeKind, id: &str) {
        match kind {
            ChallengeKind::Http01 => {
                lock(&self.http01).remove(id);
            }
            ChallengeKind::TlsAlpn01 => {
                lock(&self.tls_alpn).remove(id);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What this process manages: every ACME certificate and the shared challenge answers.
pub struct Acme {
    pub managed: Vec<Arc<Managed>>,
    pub challenges: Arc<Challenges>,
}

impl Acme {
    /// The certificate of every listener's `tls.acme` (two listeners with the same block share
    /// one), each loaded from its state directory if there ([`Managed::load`]); an error names
    /// the listener.
    pub fn load(config: &crate::config::Config) -> Result<Acme, (std::net::SocketAddr, String)> {
        let dirs = config
            .listeners
            .iter()
            .filter_map(|l| settings_of(&l.kind))
            .map(|a| a.state_dir.clone())
            .collect();
        let mut managed: Vec<Arc<Managed>> = Vec::new();
        for l in &config.listeners {
            if let Some(a) = settings_of(&l.kind)
                && !managed.iter().any(|m| m.settings == *a)
            {
                managed.push(Arc::new(Managed::load(a.clone()).map_err(|e| (l.addr, e))?));
            }
        }
        Ok(Acme {
            managed,
            challenges: Arc::new(Challenges::new(dirs)),
        })
    }

    /// The ACME certificates a listener serves.
    pub fn of_listener(&self, kind: &crate::config::ListenerKind) -> Vec<Arc<Managed>> {
        let Some(a) = settings_of(kind) else {
            return Vec::new();
        };
        self.managed
            .iter()
            .filter(|m| m.settings == *a)
            .cloned()
            .collect()
    }

    /// Waits (up to `limit`) for the orders under way, at the end of the process.
    pub fn finish_orders(&self, limit: Duration) {
        let started = std::time::Instant::now();
        let mut said = false;
        while self.managed.iter().any(|m| m.ordering()) && started.elapsed() < limit {
            if !said {
                tracing::info!(
                    "waiting for the ACME order under way (up to {})",
                    humantime::format_duration(limit)
                );
                said = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A TLS listener's `tls.acme`.
pub fn settings_of(kind: &crate::config::ListenerKind) -> Option<&AcmeSettings> {
    match kind {
        crate::config::ListenerKind::Tls { acme, .. } => acme.as_ref(),
        _ => None,
    }
}

/// The pingora background service running every certificate's renewal task
/// ([`Managed::run`]); started once the listeners accept.
pub struct AcmeService(pub Arc<Acme>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for AcmeService {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        let tasks: Vec<_> = self
            .0
            .managed
            .iter()
            .map(|m| tokio::spawn(m.clone().run(self.0.challenges.clone(), shutdown.clone())))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

static ACME: OnceLock<Arc<Acme>> = OnceLock::new();

/// Registers this process's certificates (once, at start) for [`report`] and
/// [`force_renewal`].
pub fn install(acme: Arc<Acme>) {
    let _ = ACME.set(acme);
}

/// One line of the status document per ACME certificate.
pub fn report() -> Vec<crate::status::CertificateStatus> {
    ACME.get()
        .map(|a| a.managed.iter().map(|m| m.status()).collect())
        .unwrap_or_default()
}

/// `tqproxy certs renew DOMAIN`: starts a renewal of the certificate that covers `domain` now,
/// whatever its expiry. Returns what was started, or why not.
pub fn force_renewal(domain: &str) -> Result<String, String> {
    let name = domain.trim_end_matches('.').to_ascii_lowercase();
    let Some(acme) = ACME.get() else {
        return Err("no ACME certificate is configured".into());
    };
    let m = acme
        .managed
        .iter()
        .find(|m| m.settings.domains.contains(&name))
        .ok_or_else(|| {
            let all: Vec<_> = acme
                .managed
                .iter()
                .flat_map(|m| m.settings.domains.iter().cloned())
                .collect();
            format!(
                "no ACME certificate covers `{domain}` (managed: {})",
                if all.is_empty() {
                    "none".to_string()
                } else {
                    all.join(", ")
                }
            )
        })?;
    m.force();
    Ok(format!(
        "renewal of {} started (see `tqproxy certs`)",
        m.settings.domains.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_aliases_and_urls() {
        assert_eq!(directory_url("letsencrypt").unwrap(), LETSENCRYPT);
        assert_eq!(
            directory_url("letsencrypt-staging").unwrap(),
            LETSENCRYPT_STAGING
        );
        assert_eq!(
            directory_url("https://127.0.0.1:14000/dir").unwrap(),
            "https://127.0.0.1:14000/dir"
        );
        let e = directory_url("letsencrypt-stagin").unwrap_err();
        assert!(e.contains("not a directory URL"), "{e}");
        let e = directory_url("http://ca.test/dir").unwrap_err();
        assert!(e.contains("https://"), "{e}");
        assert!(directory_url("https:///dir").is_err());
        assert!(directory_url("https://a b/dir").is_err());
    }

    #[test]
    fn domains_are_dns_names_without_wildcards() {
        let h = ChallengeKind::Http01;
        assert_eq!(
            check_domain("WWW.Example.COM.", h).unwrap(),
            "www.example.com"
        );
        assert_eq!(check_domain("a-1.b.test", h).unwrap(), "a-1.b.test");
        let e = check_domain("*.example.com", h).unwrap_err();
        assert!(e.contains("dns-01") && e.contains("http-01"), "{e}");
        let e = check_domain("*.example.com", ChallengeKind::TlsAlpn01).unwrap_err();
        assert!(e.contains("tls-alpn-01"), "{e}");
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a-.b",
            "a_b.c",
            "a/b",
            "127.0.0.1",
            "::1",
        ] {
            assert!(check_domain(bad, h).is_err(), "{bad:?}");
        }
        assert!(check_domain(&format!("{}.test", "a".repeat(64)), h).is_err());
    }

    #[test]
    fn http01_answers_only_its_tokens() {
        let d = tempfile::tempdir().unwrap();
        let c = Challenges::new(vec![d.path().to_path_buf()]);
        c.set_http01("tok_en-1", "tok_en-1.thumb");
        assert_eq!(
            c.http01("/.well-known/acme-challenge/tok_en-1").as_deref(),
            Some("tok_en-1.thumb")
        );
        assert_eq!(c.http01("/.well-known/acme-challenge/other"), None);
        assert_eq!(c.http01("/.well-known/acme-challenge/../etc"), None);
        assert_eq!(c.http01("/elsewhere/tok_en-1"), None);
        // Another process's challenge, on disk.
        store::write_challenge(d.path(), ChallengeKind::Http01, "disk", "disk.k").unwrap();
        assert_eq!(
            c.http01("/.well-known/acme-challenge/disk").as_deref(),
            Some("disk.k")
        );
        c.clear(ChallengeKind::Http01, "tok_en-1");
        assert_eq!(c.http01("/.well-known/acme-challenge/tok_en-1"), None);
    }
}
