//! One ACME order, start to finish ([`obtain`]), over instant-acme: the account (created once,
//! kept in the state directory), the order, one challenge per name (answered through
//! [`Challenges`] and recorded on disk for a process that may hold the listeners meanwhile),
//! a fresh ECDSA P-256 key and its CSR, the chain, and the key + chain file written atomically.
//!
//! The HTTP client is hyper-rustls on ring ([`AcmeHttp`]): the system's roots, or only
//! `directory_ca` when set. It notes the CA's `Retry-After` on a 429 or 503 answer, which
//! instant-acme does not hand back with the error: the renewal loop waits at least that long.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;

use super::{AcmeSettings, ChallengeKind, Challenges, store};

/// Why an order failed.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// The CA answered with a problem (or could not be reached); `retry_after` is the CA's
    /// `Retry-After`, when it sent one.
    #[error("{what}: {cause}")]
    Ca {
        what: &'static str,
        cause: String,
        rate_limited: bool,
        retry_after: Option<SystemTime>,
    },
    /// The state directory, a key, a certificate: ours to fix, not the CA's.
    #[error("{0}")]
    Local(String),
}

impl OrderError {
    pub fn retry_after(&self) -> Option<SystemTime> {
        match self {
            OrderError::Ca { retry_after, .. } => *retry_after,
            OrderError::Local(_) => None,
        }
    }

    pub fn rate_limited(&self) -> bool {
        matches!(
            self,
            OrderError::Ca {
                rate_limited: true,
                ..
            }
        )
    }
}

/// A certificate just issued.
pub struct Issued {
    pub cert: crate::tls::LoadedCert,
}

/// hyper-rustls (ring) for the CA's directory, remembering the last `Retry-After`.
#[derive(Clone)]
pub struct AcmeHttp {
    inner: HyperClient<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        BodyWrapper<Bytes>,
    >,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl AcmeHttp {
    /// Trusts the system's roots, or only the CA certificates of the PEM file `ca`.
    pub fn new(ca: Option<&Path>) -> Result<AcmeHttp, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?;
        let config = match ca {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("directory_ca {}: {e}", path.display()))?;
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_pemfile::certs(&mut &pem[..]) {
                    let c = c.map_err(|e| format!("directory_ca {}: {e}", path.display()))?;
                    roots
                        .add(c)
                        .map_err(|e| format!("directory_ca {}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!(
                        "directory_ca {}: no PEM certificate in it",
                        path.display()
                    ));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => {
                let mut roots = rustls::RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        Ok(AcmeHttp {
            inner: HyperClient::builder(TokioExecutor::new()).build(connector),
            retry_after: Arc::new(Mutex::new(None)),
        })
    }

    /// The `Retry-After` of the last 429/503 answer since the last call.
    pub fn take_retry_after(&self) -> Option<SystemTime> {
        self.retry_after
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// `Retry-After`: seconds or an HTTP date.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<SystemTime> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return now.checked_add(Duration::from_secs(secs.min(7 * 86400)));
    }
    httpdate::parse_http_date(v).ok()
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = self.inner.request(req);
        let slot = self.retry_after.clone();
        Box::pin(async move {
            let rsp = fut
                .await
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            let status = rsp.status().as_u16();
            if (status == 429 || status == 503)
                && let Some(at) = rsp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()))
            {
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
            }
            Ok(BytesResponse::from(rsp))
        })
    }
}

fn ca<'a>(
    http: &'a AcmeHttp,
    what: &'static str,
) -> impl Fn(instant_acme::Error) -> OrderError + 'a {
    move |e| {
        let rate_limited = matches!(
            &e,
            instant_acme::Error::Api(p) if p.r#type.as_deref().is_some_and(|t| t.ends_with(":rateLimited"))
        );
        OrderError::Ca {
            what,
            cause: error_chain(&e),
            rate_limited,
            retry_after: http.take_retry_after(),
        }
    }
}

/// An error with its sources, on one line ("connection refused" is a source of hyper's).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut at = e.source();
    while let Some(cause) = at {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        at = cause.source();
    }
    s
}

/// The account for `settings.directory`: from the state directory, else created there.
async fn account(settings: &AcmeSettings, http: &AcmeHttp) -> Result<Account, OrderError> {
    let path = store::account_path(&settings.state_dir, &settings.directory);
    if let Ok(bytes) = std::fs::read(&path) {
        let creds: AccountCredentials = serde_json::from_slice(&bytes)
            .map_err(|e| OrderError::Local(format!("{}: {e}", path.display())))?;
        return Account::builder_with_http(Box::new(http.clone()))
            .from_credentials(creds)
            .await
            .map_err(ca(http, "account"));
    }
    let contact = settings.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(|s| s.as_str()).collect();
    let (account, creds) = Account::builder_with_http(Box::new(http.clone()))
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            settings.directory.clone(),
            None,
        )
        .await
        .map_err(ca(http, "new account"))?;
    let json = serde_json::to_vec_pretty(&creds)
        .map_err(|e| OrderError::Local(format!("account credentials: {e}")))?;
    store::write_atomic(&path, &json, 0o600).map_err(OrderError::Local)?;
    tracing::info!(directory = %settings.directory, file = %path.display(), "ACME account created");
    Ok(account)
}

/// The self-signed certificate of a tls-alpn-01 answer (RFC 8737): `name` as its only SAN and
/// the SHA-256 of the key authorization in the critical `acmeIdentifier` extension.
pub fn tls_alpn_cert(name: &str, key_auth: &str) -> Result<Arc<CertifiedKey>, String> {
    super::check_domain(name, ChallengeKind::TlsAlpn01)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, key_auth.as_bytes());
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
        .map_err(|e| format!("tls-alpn-01 certificate for {name}: {e}"))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest.as_ref())];
    let key = rcgen::KeyPair::generate().map_err(|e| format!("tls-alpn-01 key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("tls-alpn-01 certificate for {name}: {e}"))?;
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| format!("tls-alpn-01 key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

/// Places one order for `settings.domains` and returns the certificate, written to the state
/// directory. The caller holds the state directory's lock.
pub async fn obtain(
    settings: &AcmeSettings,
    challenges: &Challenges,
    http: &AcmeHttp,
) -> Result<Issued, OrderError> {
    let account = account(settings, http).await?;
    let ids: Vec<Identifier> = settings
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(ca(http, "new order"))?;
    tracing::info!(domains = %settings.domains.join(","), order = %order.url(), "ACME order placed");
    let dir = &settings.state_dir;
    let kind = settings.challenge;
    let mut set_up: Vec<String> = Vec::new();
    let result = async {
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a.map_err(ca(http, "authorization"))?;
            match a.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(OrderError::Ca {
                        what: "authorization",
                        cause: format!("{} is {other:?}", a.identifier()),
                        rate_limited: false,
                        retry_after: None,
                    });
                }
            }
            let ty = match kind {
                ChallengeKind::Http01 => ChallengeType::Http01,
                ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
            };
            let mut ch = a.challenge(ty).ok_or_else(|| OrderError::Ca {
                what: "authorization",
                cause: format!("the CA offers no {} challenge", kind.as_str()),
                rate_limited: false,
                retry_after: None,
            })?;
            let key_auth = ch.key_authorization();
            let name = ch.identifier().to_string();
            let id = match kind {
                ChallengeKind::Http01 => {
                    challenges.set_http01(&ch.token, key_auth.as_str());
                    ch.token.clone()
                }
                ChallengeKind::TlsAlpn01 => {
                    let cert = tls_alpn_cert(&name, key_auth.as_str()).map_err(OrderError::Local)?;
                    challenges.set_tls_alpn(&name, cert);
                    name.clone()
                }
            };
            set_up.push(id.clone());
            if let Err(e) = store::write_challenge(dir, kind, &id, key_auth.as_str()) {
                tracing::warn!(error = %e, "challenge not recorded on disk (only this process answers it)");
            }
            ch.set_ready().await.map_err(ca(http, "challenge"))?;
        }
        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(Duration::from_secs(90));
        let status = order
            .poll_ready(&retries)
            .await
            .map_err(ca(http, "validation"))?;
        if status != OrderStatus::Ready {
            let why = order
                .state()
                .error
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_else(|| format!("order {status:?}"));
            return Err(OrderError::Ca {
                what: "validation",
                cause: why,
                rate_limited: false,
                retry_after: None,
            });
        }
        let key = rcgen::KeyPair::generate().map_err(|e| OrderError::Local(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(settings.domains.clone())
            .map_err(|e| OrderError::Local(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| OrderError::Local(format!("CSR: {e}")))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(ca(http, "finalize"))?;
        let chain = order
            .poll_certificate(&retries)
            .await
            .map_err(ca(http, "certificate"))?;
        Ok((key.serialize_pem(), chain))
    }
    .await;
    for id in &set_up {
        challenges.clear(kind, id);
        store::remove_challenge(dir, kind, id);
    }
    let (key_pem, chain) = result?;
    let path = store::cert_path(dir, &settings.domains[0]);
    store::write_atomic(&path, format!("{key_pem}{chain}").as_bytes(), 0o600)
        .map_err(OrderError::Local)?;
    let cert = crate::tls::load_cert(&crate::tls::CertFiles {
        cert: path.clone(),
        key: path,
    })
    .map_err(OrderError::Local)?;
    Ok(Issued { cert })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(now + Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(784111777))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        // A week at most: a CA's typo does not stop renewals for a year.
        assert_eq!(
            parse_retry_after("99999999", now),
            Some(now + Duration::from_secs(7 * 86400))
        );
    }

    #[test]
    fn the_tls_alpn_certificate_carries_the_digest() {
        let c = tls_alpn_cert("a.test", "tok.thumb").unwrap();
        use x509_parser::prelude::*;
        let (_, x) = X509Certificate::from_der(&c.cert[0]).unwrap();
        let ext = x
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(ext.critical);
        let digest = ring::digest::digest(&ring::digest::SHA256, b"tok.thumb");
        // An OCTET STRING of the 32-byte digest.
        assert_eq!(&ext.value[2..], digest.as_ref());
        assert!(tls_alpn_cert("bad name!", "k").is_err());
    }
}
