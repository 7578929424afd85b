//! The lifecycle of one ACME certificate ([`Managed`]):
//!
//! 1. At start ([`Managed::load`], before anything listens): the state directory is created
//!    (0700) and checked; a certificate on disk for these domains is served at once, without
//!    contacting the CA.
//! 2. [`Managed::run`] (a background task, once the listeners are up) sleeps until the next
//!    deadline ([`next_renewal`]): at once when there is no certificate, else `renew_before`
//!    its expiry — but no sooner than an hour after the last issuance, so a `renew_before`
//!    longer than the certificate's life renews once, not in a loop. `tqproxy certs renew`
//!    wakes it early.
//! 3. An attempt takes the state directory's lock (another tqproxy — the other side of
//!    `tqproxy upgrade` — may hold it: we wait, then read what it wrote). Holding it, a
//!    certificate on disk newer than ours that is not due is adopted instead of ordering.
//!    Otherwise one order ([`super::client::obtain`]); the new certificate is swapped in for
//!    the next handshakes (connections already open keep theirs).
//! 4. A failure keeps the old certificate serving, is logged, counted
//!    (`tqproxy_acme_renewals_total{result="failed"}`), shown in `status`, `/status` and
//!    `tqproxy certs`, and makes `/healthz` warn when the certificate expires within 7 days.
//!    The next attempt comes after an exponential backoff with jitter ([`retry_delay`]), or
//!    after the CA's `Retry-After` when it is later.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;

use super::client::{self, AcmeHttp, OrderError};
use super::{AcmeSettings, Challenges, store};
use crate::metrics::METRICS;
use crate::status::CertificateStatus;

/// Renewals of one certificate are at least this far apart (see the module docs).
pub const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(3600);
/// The first retry after a failure; it doubles with each failure in a row, up to
/// [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(30);
pub const MAX_RETRY: Duration = Duration::from_secs(6 * 3600);
/// One whole attempt (lock wait included) is given up after this.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);

/// The certificate being served.
pub struct Served {
    pub key: Arc<CertifiedKey>,
    pub not_after: SystemTime,
    pub issuer: String,
    pub serial: String,
}

impl Served {
    fn from_loaded(c: crate::tls::LoadedCert) -> Result<Served, String> {
        use x509_parser::prelude::*;
        let (_, x) = X509Certificate::from_der(&c.key.cert[0]).map_err(|e| e.to_string())?;
        let secs = x.validity().not_after.timestamp();
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
        Ok(Served {
            key: c.key.clone(),
            not_after,
            issuer: x.issuer().to_string(),
            serial: x.raw_serial_as_string(),
        })
    }
}

#[derive(Default)]
struct State {
    next: Option<SystemTime>,
    /// Failed attempts in a row.
    failures: u32,
    last_error: Option<String>,
    last_issued: Option<SystemTime>,
    renewing: bool,
}

/// One `tls.acme` block's certificate.
pub struct Managed {
    pub settings: AcmeSettings,
    cert: ArcSwapOption<Served>,
    state: Mutex<State>,
    force: Notify,
    ordering: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The certificate of `settings` on disk, if there is one for exactly these domains.
fn from_disk(settings: &AcmeSettings) -> Option<Result<Served, String>> {
    let path = store::cert_path(&settings.state_dir, &settings.domains[0]);
    if !path.exists() {
        return None;
    }
    let loaded = match crate::tls::load_cert(&crate::tls::CertFiles {
        cert: path.clone(),
        key: path.clone(),
    }) {
        Ok(l) => l,
        Err(e) => return Some(Err(e)),
    };
    let mut have = loaded.names.clone();
    let mut want = settings.domains.clone();
    have.sort();
    want.sort();
    if have != want {
        return Some(Err(format!(
            "{} is for {} and the configuration asks for {}: a new order replaces it",
            path.display(),
            have.join(", "),
            want.join(", ")
        )));
    }
    Some(Served::from_loaded(loaded))
}

/// When to renew: at once without a certificate; else `renew_before` its expiry, but not
/// before [`MIN_RENEW_INTERVAL`] after the last issuance (when it is known).
pub fn next_renewal(
    not_after: Option<SystemTime>,
    renew_before: Duration,
    last_issued: Option<SystemTime>,
    now: SystemTime,
) -> SystemTime {
    let Some(not_after) = not_after else {
        return now;
    };
    let due = not_after
        .checked_sub(renew_before)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    match last_issued {
        Some(t) => due.max(t + MIN_RENEW_INTERVAL),
        None => due,
    }
}

/// The wait after `failures` failed attempts in a row (≥ 1): [`FIRST_RETRY`] doubled per
/// failure up to [`MAX_RETRY`], times a jitter factor in [0.75, 1.25) (`jitter` in [0, 1)),
/// so that many processes that failed together do not retry together.
pub fn retry_delay(failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let base = FIRST_RETRY
        .saturating_mul(1u32 << exp.min(16))
        .min(MAX_RETRY);
    base.mul_f64(0.75 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// A number in [0, 1) that differs per process and per call (std's random hasher keys).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn secs_from_now(t: SystemTime, now: SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

impl Managed {
    /// Prepares the state directory and serves the certificate found there, if any (no CA
    /// contacted). An unusable directory is an error: the process does not start.
    pub fn load(settings: AcmeSettings) -> Result<Managed, String> {
        store::prepare_dir(&settings.state_dir)?;
        let m = Managed {
            cert: ArcSwapOption::empty(),
            state: Mutex::new(State::default()),
            force: Notify::new(),
            ordering: Default::default(),
            settings,
        };
        match from_disk(&m.settings) {
            Some(Ok(s)) => {
                tracing::info!(
                    domains = %m.settings.domains.join(","),
                    serial = %s.serial,
                    not_after = %fmt_time(s.not_after),
                    "ACME certificate loaded from the state directory"
                );
                m.publish(s);
            }
            Some(Err(e)) => tracing::warn!(error = %e, "ACME certificate on disk not used"),
            None => {}
        }
        m.schedule(SystemTime::now());
        Ok(m)
    }

    /// The certificate for `name` (one of `domains`), once there is one.
    pub fn cert_for(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        if !self.settings.domains.iter().any(|d| d == name) {
            return None;
        }
        self.cert()
    }

    pub fn cert(&self) -> Option<Arc<CertifiedKey>> {
        self.cert.load().as_ref().map(|s| s.key.clone())
    }

    /// The serial of the certificate served now.
    pub fn serial(&self) -> Option<String> {
        self.cert.load().as_ref().map(|s| s.serial.clone())
    }

    /// This process holds the lock and places an order.
    pub fn ordering(&self) -> bool {
        self.ordering.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Asks the task for a renewal now (`tqproxy certs renew`).
    pub fn force(&self) {
        self.force.notify_one();
    }

    fn publish(&self, s: Served) {
        let secs = s
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        METRICS
            .certificate_expiry
            .with_label_values(&[&self.settings.domains[0]])
            .set(secs);
        self.cert.store(Some(Arc::new(s)));
    }

    fn schedule(&self, now: SystemTime) {
        let not_after = self.cert.load().as_ref().map(|s| s.not_after);
        let mut st = lock(&self.state);
        st.next = Some(next_renewal(
            not_after,
            self.settings.renew_before,
            st.last_issued,
            now,
        ));
    }

    pub fn status(&self) -> CertificateStatus {
        let now = SystemTime::now();
        let served = self.cert.load();
        let st = lock(&self.state);
        CertificateStatus {
            domains: self.settings.domains.clone(),
            challenge: self.settings.challenge.as_str().into(),
            directory: self.settings.directory.clone(),
            state_dir: self.settings.state_dir.display().to_string(),
            issuer: served.as_ref().map(|s| s.issuer.clone()),
            serial: served.as_ref().map(|s| s.serial.clone()),
            not_after: served.as_ref().map(|s| fmt_time(s.not_after)),
            expires_in_secs: served.as_ref().map(|s| secs_from_now(s.not_after, now)),
            next_renewal: st.next.map(fmt_time),
            next_renewal_in_secs: st.next.map(|t| secs_from_now(t, now)),
            renewing: st.renewing,
            failures: st.failures,
            last_error: st.last_error.clone(),
        }
    }

    /// The renewal loop, until `shutdown` turns true.
    pub async fn run(
        self: Arc<Self>,
        challenges: Arc<Challenges>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let next = lock(&self.state).next.unwrap_or_else(SystemTime::now);
            let wait = next
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(Duration::from_secs(86400));
            let forced = tokio::select! {
                _ = tokio::time::sleep(wait) => false,
                _ = self.force.notified() => true,
                _ = shutdown.changed() => return,
            };
            if *shutdown.borrow() {
                return;
            }
            if !forced && SystemTime::now() < next {
                continue; // the day-long nap ended, not the wait
            }
            lock(&self.state).renewing = true;
            let r = tokio::time::timeout(ATTEMPT_TIMEOUT, self.attempt(&challenges, forced)).await;
            let r = r.unwrap_or_else(|_| {
                Err(OrderError::Local(format!(
                    "gave up after {}",
                    humantime::format_duration(ATTEMPT_TIMEOUT)
                )))
            });
            let now = SystemTime::now();
            lock(&self.state).renewing = false;
            match r {
                Ok(()) => self.schedule(now),
                Err(e) => self.failed(e, now),
            }
        }
    }

    fn failed(&self, e: OrderError, now: SystemTime) {
        METRICS.acme_renewals.with_label_values(&["failed"]).inc();
        let mut st = lock(&self.state);
        st.failures += 1;
        let mut wait = retry_delay(st.failures, jitter());
        if let Some(at) = e.retry_after() {
            wait = wait.max(at.duration_since(now).unwrap_or_default());
        } else if e.rate_limited() {
            wait = wait.max(MAX_RETRY);
        }
        st.next = Some(now + wait);
        st.last_error = Some(e.to_string());
        let serving = self.cert.load().is_some();
        tracing::error!(
            domains = %self.settings.domains.join(","),
            directory = %self.settings.directory,
            failures = st.failures,
            retry_in = %humantime::format_duration(Duration::from_secs(wait.as_secs())),
            serving_old_certificate = serving,
            error = %e,
            "ACME certificate renewal failed"
        );
    }

    /// One attempt: the lock, then what another process wrote, then (if still needed) an
    /// order.
    async fn attempt(&self, challenges: &Challenges, forced: bool) -> Result<(), OrderError> {
        let dir = &self.settings.state_dir;
        let mut waited = false;
        let _lock = loop {
            match store::try_lock(dir).map_err(OrderError::Local)? {
                Some(l) => break l,
                None => {
                    if !waited {
                        tracing::info!(state_dir = %dir.display(), "another tqproxy holds the ACME lock; waiting for it");
                        waited = true;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        // What the other process (or an earlier run) left: adopt it unless it is due too.
        if let Some(Ok(disk)) = from_disk(&self.settings) {
            let ours = self.serial();
            let now = SystemTime::now();
            let due = next_renewal(Some(disk.not_after), self.settings.renew_before, None, now);
            if ours.as_deref() != Some(&disk.serial) && (due > now || (waited && !forced)) {
                tracing::info!(
                    domains = %self.settings.domains.join(","),
                    serial = %disk.serial,
                    "ACME certificate renewed by another tqproxy: adopted"
                );
                self.publish(disk);
                let mut st = lock(&self.state);
                st.failures = 0;
                st.last_error = None;
                st.last_issued = Some(now);
                return Ok(());
            }
        }
        let http =
            AcmeHttp::new(self.settings.directory_ca.as_deref()).map_err(OrderError::Local)?;
        let _ordering = Ordering::new(&self.ordering);
        let issued = client::obtain(&self.settings, challenges, &http).await?;
        let s = Served::from_loaded(issued.cert).map_err(OrderError::Local)?;
        tracing::info!(
            domains = %self.settings.domains.join(","),
            serial = %s.serial,
            issuer = %s.issuer,
            not_after = %fmt_time(s.not_after),
            "ACME certificate issued"
        );
        self.publish(s);
        METRICS.acme_renewals.with_label_values(&["ok"]).inc();
        let mut st = lock(&self.state);
        st.failures = 0;
        st.last_error = None;
        st.last_issued = Some(SystemTime::now());
        Ok(())
    }
}

/// Marks an order under way for as long as it lives.
struct Ordering<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> Ordering<'a> {
    fn new(flag: &'a std::sync::atomic::AtomicBool) -> Ordering<'a> {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        Ordering(flag)
    }
}

impl Drop for Ordering<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn renewal_comes_renew_before_expiry_and_never_in_a_loop() {
        let now = SystemTime::UNIX_EPOCH + DAY * 1000;
        assert_eq!(next_renewal(None, DAY * 30, None, now), now);
        assert_eq!(
            next_renewal(Some(now + DAY * 90), DAY * 30, None, now),
            now + DAY * 60
        );
        // renew_before longer than the life: due now (in the past) ...
        assert!(next_renewal(Some(now + DAY * 90), DAY * 365, None, now) <= now);
        // ... but not again within the hour after an issuance.
        assert_eq!(
            next_renewal(Some(now + DAY * 90), DAY * 365, Some(now), now),
            now + MIN_RENEW_INTERVAL
        );
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter() {
        assert_eq!(retry_delay(1, 0.5), FIRST_RETRY);
        assert_eq!(retry_delay(2, 0.5), FIRST_RETRY * 2);
        assert_eq!(retry_delay(3, 0.5), FIRST_RETRY * 4);
        assert_eq!(retry_delay(100, 0.5), MAX_RETRY);
        assert_eq!(retry_delay(1, 0.0), FIRST_RETRY.mul_f64(0.75));
        assert!(retry_delay(1, 0.999) < FIRST_RETRY.mul_f64(1.25));
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }
}
