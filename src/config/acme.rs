//! `listen[i].tls.acme`: automatic HTTPS ([`crate::acme`]). The rules for domains and
//! directories are the acme module's; this file names the file, line and key of each error.

use super::*;
use crate::acme::{AcmeSettings, ChallengeKind};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcme {
    #[serde(default)]
    pub(super) domains: Vec<String>,
    pub(super) email: Option<String>,
    pub(super) directory: Option<String>,
    pub(super) directory_ca: Option<String>,
    pub(super) challenge: Option<String>,
    #[serde(default, deserialize_with = "opt_scalar")]
    pub(super) renew_before: Option<String>,
    pub(super) state_dir: Option<String>,
}

fn opt_scalar<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    scalar_string(d).map(Some)
}

/// Validates `a` (at `key`.tls.acme); every problem is pushed to `errors`.
pub(super) fn acme(
    a: &RawAcme,
    key: &str,
    dir: &Path,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> Option<AcmeSettings> {
    let at = |k: &str| format!("{key}.tls.acme.{k}");
    let path = |k: &'static str| ["listen", "tls", "acme", k];
    let before = errors.len();
    let challenge = match a.challenge.as_deref() {
        None | Some("http-01") => ChallengeKind::Http01,
        Some("tls-alpn-01") => ChallengeKind::TlsAlpn01,
        Some(other) => {
            errors.push(ctx.err(
                &path("challenge"),
                None,
                at("challenge"),
                format!(
                    "`{other}` is not a challenge tqproxy answers (http-01 or tls-alpn-01; \
                     dns-01 needs a DNS provider)"
                ),
            ));
            ChallengeKind::Http01
        }
    };
    let mut domains = Vec::new();
    for d in &a.domains {
        match crate::acme::check_domain(d, challenge) {
            Ok(n) if domains.contains(&n) => errors.push(ctx.err(
                &path("domains"),
                Some(d),
                at("domains"),
                format!("`{d}` is listed twice"),
            )),
            Ok(n) => domains.push(n),
            Err(e) => errors.push(ctx.err(&path("domains"), Some(d), at("domains"), e)),
        }
    }
    if a.domains.is_empty() {
        errors.push(ctx.err(
            &["listen", "tls", "acme"],
            None,
            format!("{key}.tls.acme"),
            "needs `domains: [name, …]` (the names of the certificate)".into(),
        ));
    } else if a.domains.len() > 100 {
        errors.push(ctx.err(
            &path("domains"),
            None,
            at("domains"),
            "at most 100 names in one certificate (the CA's limit)".into(),
        ));
    }
    if let Some(e) = &a.email
        && (!e.contains('@')
            || e.starts_with('@')
            || e.ends_with('@')
            || e.contains(char::is_whitespace))
    {
        errors.push(ctx.err(
            &path("email"),
            None,
            at("email"),
            format!("`{e}` is not an email address"),
        ));
    }
    let directory = match crate::acme::directory_url(
        a.directory.as_deref().unwrap_or(crate::acme::LETSENCRYPT),
    ) {
        Ok(d) => d,
        Err(e) => {
            errors.push(ctx.err(&path("directory"), None, at("directory"), e));
            String::new()
        }
    };
    let directory_ca = a.directory_ca.as_deref().map(|p| resolve(dir, p));
    if let Some(p) = &directory_ca
        && !p.is_file()
    {
        errors.push(ctx.err(
            &path("directory_ca"),
            None,
            at("directory_ca"),
            format!("{}: no such file", p.display()),
        ));
    }
    let renew_before = match a.renew_before.as_deref().map(parse_duration) {
        None => crate::acme::DEFAULT_RENEW_BEFORE,
        Some(Ok(d)) if d >= Duration::from_secs(3600) => d,
        Some(Ok(_)) => {
            errors.push(ctx.err(
                &path("renew_before"),
                None,
                at("renew_before"),
                "at least 1h (e.g. `30d`)".into(),
            ));
            Duration::ZERO
        }
        Some(Err(e)) => {
            errors.push(ctx.err(&path("renew_before"), None, at("renew_before"), e));
            Duration::ZERO
        }
    };
    let state_dir = resolve(dir, a.state_dir.as_deref().unwrap_or("../acme"));
    // `check` (and every load) sees that the state directory can be used, without creating it.
    if let Err(e) = crate::acme::store::check_dir(&state_dir) {
        errors.push(ctx.err(
            &path("state_dir"),
            None,
            at("state_dir"),
            format!("{}: {e}", state_dir.display()),
        ));
    }
    (errors.len() == before).then_some(AcmeSettings {
        domains,
        email: a.email.clone(),
        directory,
        directory_ca,
        challenge,
        renew_before,
        state_dir,
    })
}
