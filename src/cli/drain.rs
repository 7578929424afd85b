//! `tqproxy drain` and `tqproxy undrain`: the node in and out of its load balancer's rotation
//! ([`crate::drain`]).
//!
//! `drain` exits 0 once no request is in flight (and none started for a moment), 1 when its
//! timeout came first (the node stays drained either way), 3 when tqproxy is not running.

use std::path::Path;
use std::time::Duration;

use crate::control::{ControlRequest, ControlResponse, call};
use crate::drain::DrainReport;

/// Runs `drain` (`Some(timeout)`) or `undrain` (`None`); returns the exit code.
pub fn run(cli: &super::Cli, timeout: Option<Duration>) -> i32 {
    let (socket, rt) = match super::client_setup(cli) {
        Ok(x) => x,
        Err(code) => return code,
    };
    rt.block_on(ask(&socket, timeout, cli.json))
}

async fn ask(socket: &Path, timeout: Option<Duration>, json: bool) -> i32 {
    let req = match timeout {
        Some(t) => ControlRequest::Drain {
            timeout_ms: t.as_millis().min(u128::from(u64::MAX)) as u64,
        },
        None => ControlRequest::Undrain {},
    };
    // The server bounds the wait; the answer gets a little more.
    let wait = timeout.unwrap_or_default() + Duration::from_secs(10);
    match call(socket, &req, wait).await {
        Ok(ControlResponse::Drain(r)) => {
            let (text, code) = describe(&r);
            if json {
                let printed = super::print_json(&r);
                if printed != 0 {
                    return printed;
                }
            } else {
                println!("{text}");
            }
            if let Some(w) = &r.warning {
                eprintln!("warning: cannot record the drained state for an upgrade: {w}");
            }
            code
        }
        Ok(ControlResponse::Error { message, kind }) => {
            eprintln!("error: {message}");
            kind.exit_code()
        }
        Ok(other) => {
            eprintln!("unexpected response: {other:?}");
            1
        }
        Err(e) => {
            eprintln!("{e}");
            e.exit_code()
        }
    }
}

/// What the verb prints, and its exit code.
fn describe(r: &DrainReport) -> (String, i32) {
    if !r.drained {
        let was = if r.already {
            " (it was not drained)"
        } else {
            ""
        };
        return (format!("undrained{was}: /healthz answers 200 again"), 0);
    }
    let was = if r.already { " (already drained)" } else { "" };
    if r.quiet {
        (
            format!(
                "drained{was}: no request in flight after {} ms",
                r.waited_ms
            ),
            0,
        )
    } else {
        (
            format!(
                "drained{was}: timed out after {} ms with {} request{} still in flight",
                r.waited_ms,
                r.in_flight,
                if r.in_flight == 1 { "" } else { "s" }
            ),
            1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(drained: bool, quiet: bool, in_flight: u64) -> DrainReport {
        DrainReport {
            drained,
            already: false,
            quiet,
            in_flight,
            waited_ms: 300,
            warning: None,
        }
    }

    #[test]
    fn the_output_says_whether_requests_finished_and_the_exit_code_agrees() {
        assert_eq!(
            describe(&report(true, true, 0)),
            ("drained: no request in flight after 300 ms".into(), 0)
        );
        assert_eq!(
            describe(&report(true, false, 2)),
            (
                "drained: timed out after 300 ms with 2 requests still in flight".into(),
                1
            )
        );
        let (text, code) = describe(&report(false, true, 0));
        assert!(text.starts_with("undrained"), "{text}");
        assert_eq!(code, 0);
    }
}
