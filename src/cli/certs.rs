//! `tqproxy certs` (the ACME certificates of the status document) and `tqproxy certs renew
//! DOMAIN` (a renewal now, whatever the expiry).

use std::time::Duration;

use clap::Subcommand;

use crate::control::ControlRequest;
use crate::status::{StatusReport, fmt_secs};

#[derive(Debug, Subcommand)]
pub enum CertsAction {
    /// Renew the ACME certificate that covers DOMAIN now (the answer comes at once; see
    /// `tqproxy certs` for the result).
    Renew {
        /// A domain of a `tls.acme` block (any of its names).
        domain: String,
    },
}

pub fn request(action: Option<&CertsAction>) -> (ControlRequest, Duration) {
    match action {
        None => (ControlRequest::Status {}, Duration::from_secs(10)),
        Some(CertsAction::Renew { domain }) => (
            ControlRequest::RenewCertificate {
                domain: domain.clone(),
            },
            Duration::from_secs(10),
        ),
    }
}

pub fn print(st: &StatusReport, json: bool) -> i32 {
    if json {
        return match serde_json::to_string_pretty(&st.certificates) {
            Ok(s) => {
                println!("{s}");
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        };
    }
    print!("{}", render(st));
    0
}

/// One block per certificate.
pub fn render(st: &StatusReport) -> String {
    if st.certificates.is_empty() {
        return "no ACME certificate configured (tls.acme)\n".into();
    }
    let mut out = String::new();
    for c in &st.certificates {
        out.push_str(&format!("{}\n", c.domains.join(", ")));
        out.push_str(&format!(
            "  issuer:       {}\n",
            c.issuer.as_deref().unwrap_or("- (not issued yet)")
        ));
        if let Some(s) = &c.serial {
            out.push_str(&format!("  serial:       {s}\n"));
        }
        match (&c.not_after, c.expires_in_secs) {
            (Some(t), Some(s)) => {
                out.push_str(&format!("  expires:      {t} (in {})\n", fmt_secs(s)))
            }
            _ => out.push_str("  expires:      -\n"),
        }
        let next = match (&c.next_renewal, c.next_renewal_in_secs) {
            _ if c.renewing => "now (under way)".to_string(),
            (Some(t), Some(s)) if s > 0 => format!("{t} (in {})", fmt_secs(s)),
            (Some(_), Some(_)) => "now".to_string(),
            _ => "-".to_string(),
        };
        out.push_str(&format!("  next renewal: {next}\n"));
        out.push_str(&format!(
            "  challenge:    {} via {}\n",
            c.challenge, c.directory
        ));
        out.push_str(&format!("  state_dir:    {}\n", c.state_dir));
        if let Some(e) = c.last_error.as_deref().filter(|_| c.failures > 0) {
            out.push_str(&format!(
                "  last error:   {e} ({} failed in a row)\n",
                c.failures
            ));
        }
    }
    out
}
