//! `tqproxy check --json`: the verdict of `check` as one JSON document, for CI pipelines and
//! deploy scripts that gate on it.
//!
//! ```json
//! {"ok": false, "file": "/etc/tqproxy/tqproxy.yaml",
//!  "errors": [{"file": "…/workers/api/worker.yaml", "line": 4, "key": "resources.memory",
//!              "message": "…"}],
//!  "warnings": ["…"], "workers": ["api", "hello"]}
//! ```
//!
//! `line` and `key` are there when known (a worker's command that does not exist has neither).
//! Exit codes as `check`: 0 ok, 1 invalid (or, with `--strict`, warnings).

use std::path::Path;

use serde::Serialize;

use crate::config::{Config, ConfigError};

#[derive(Debug, Serialize)]
pub struct Verdict {
    pub ok: bool,
    pub file: String,
    pub errors: Vec<Problem>,
    pub warnings: Vec<String>,
    pub workers: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Problem {
    pub file: Option<String>,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl From<&ConfigError> for Problem {
    fn from(e: &ConfigError) -> Problem {
        Problem {
            file: Some(e.file.display().to_string()),
            line: e.line,
            key: (!e.key.is_empty()).then(|| e.key.clone()),
            message: e.message.clone(),
        }
    }
}

/// The verdict on the configuration at `path`.
pub fn verdict(path: &Path, strict: bool) -> Verdict {
    let file = crate::config::absolute(path).display().to_string();
    match Config::load(path) {
        Err(errors) => Verdict {
            ok: false,
            file,
            errors: errors.0.iter().map(Problem::from).collect(),
            warnings: Vec::new(),
            workers: Vec::new(),
        },
        Ok(c) => {
            // A worker's own check (its command, its user) says which file in its text.
            let errors: Vec<Problem> = crate::config::check_workers(&c)
                .into_iter()
                .map(|message| Problem {
                    file: None,
                    line: None,
                    key: None,
                    message,
                })
                .collect();
            let warnings = crate::config::advice(&c);
            let ok = errors.is_empty() && (!strict || warnings.is_empty());
            Verdict {
                ok,
                file: c.file.display().to_string(),
                errors,
                warnings,
                workers: c.workers.keys().cloned().collect(),
            }
        }
    }
}

/// Prints the verdict; returns the exit code.
pub fn run(path: &Path, strict: bool) -> i32 {
    let v = verdict(path, strict);
    match serde_json::to_string_pretty(&v) {
        Ok(s) => println!("{s}"),
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    }
    if v.ok { 0 } else { 1 }
}
