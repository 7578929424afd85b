//! The control protocol's target: one line as the server reads it (a request from the CLI)
//! and as the CLI reads it (the server's response), through tqproxy's own
//! `control::{parse_request, parse_response}` and encoders.

use tqproxy::control::{
    ControlResponse, encode_request, encode_response, parse_request, parse_response,
};
use tqproxy::status::{ErrorKind, Failure};

/// A line the protocol sends: JSON, one `\n`, at its end.
fn one_line(out: &[u8]) {
    assert_eq!(out.last(), Some(&b'\n'));
    assert!(
        !out[..out.len() - 1].contains(&b'\n'),
        "a newline inside the line"
    );
}

/// The CLI's exit code for a failure of `kind` is never "done" (0) nor "cannot reach
/// tqproxy" (3).
fn a_failure(kind: ErrorKind) {
    assert!(
        !matches!(kind.exit_code(), 0 | 3),
        "{kind:?} exits {}",
        kind.exit_code()
    );
}

/// Never a panic. A request is refused as a bad request, with a message the client reads back
/// as that error, kind included; an accepted request, sent again by the CLI's encoder, is the
/// same request. A response the CLI accepts is the same after the server's encoder, and the
/// CLI can show it and exit with a failure's code for a failure.
pub fn control(data: &[u8]) {
    match parse_request(data) {
        Ok(req) => {
            let line = encode_request(&req).expect("a parsed request encodes");
            one_line(&line);
            assert_eq!(parse_request(&line), Ok(req));
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::BadRequest, "{e}");
            assert!(!e.to_string().trim().is_empty());
            let error = ControlResponse::error(&e);
            let out = encode_response(&error);
            one_line(&out);
            match parse_response(&out) {
                Ok(back) => assert_eq!(back, error),
                Err(e) => panic!("the client cannot read the refusal: {e}"),
            }
        }
    }
    match parse_response(data) {
        Ok(resp) => {
            let out = encode_response(&resp);
            one_line(&out);
            let again = parse_response(&out).expect("an encoded response parses");
            let json = |r: &ControlResponse| serde_json::to_value(r).expect("encodes");
            assert!(
                same_json(&json(&resp), &json(&again)),
                "{resp:?}\nthen\n{again:?}"
            );
            // What `tqproxy status` prints (an outcome's lines are printed as they are), and
            // what the CLI exits with.
            match &resp {
                ControlResponse::Status(st) => {
                    let _ = st.health();
                    let _ = st.render_table();
                }
                ControlResponse::Error { kind, .. } => a_failure(*kind),
                ControlResponse::Outcome(o) => {
                    for l in &o.lines {
                        if let Some(kind) = l.kind {
                            a_failure(kind);
                        }
                    }
                }
                _ => {}
            }
        }
        Err(e) => assert!(!e.to_string().trim().is_empty()),
    }
}

/// `a == b`, floats within a few ulps: serde_json without its `float_roundtrip` feature (as
/// tqproxy builds it) may read a float's shortest form back one ulp off (an uptime of
/// 9.005555555555557e71 s came back as ...555e71).
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15,
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}
