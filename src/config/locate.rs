//! Errors with lines: parsing YAML with the path of the failing key, and finding a key's
//! line in the source text for checks made after parsing.

use super::*;

// ---------------------------------------------------------------------------------------------
// Errors with lines
// ---------------------------------------------------------------------------------------------

pub(super) struct Ctx<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
}

impl Ctx<'_> {
    /// An error at `path` (YAML keys from the root); `value` narrows the line to where that
    /// value appears under the key (list items).
    pub(super) fn err(
        &self,
        path: &[&str],
        value: Option<&str>,
        key: impl Into<String>,
        message: String,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: locate(self.text, path, value),
            key: key.into(),
            message,
        }
    }
}

pub(super) fn parse_yaml<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_yaml reports where the *value* failed; for a value under a known key we
        // prefer the key's own line (serde points at the enclosing mapping for some errors).
        let keys: Vec<&str> = path
            .split('.')
            .map(|k| k.split('[').next().unwrap_or(k))
            .filter(|k| !k.is_empty() && *k != "?")
            .collect();
        // libyaml puts the end of a text without a final line break one line further down,
        // on a line the file does not have: that is the last line.
        let line = locate(text, &keys, None).or_else(|| {
            inner
                .location()
                .map(|l| l.line().min(yaml_line_count(text)))
        });
        let mut message = inner.to_string();
        // serde_yaml adds " at line L column C" (at the end, or before libyaml's ", while …")
        // and prefixes the path; we report both ourselves, so strip them.
        strip_position(&mut message);
        for prefix in [format!("{path}: "), format!("{}: ", parent_path(&path))] {
            if let Some(rest) = message.strip_prefix(&prefix) {
                message = rest.to_string();
                break;
            }
        }
        ConfigError {
            file: file.to_path_buf(),
            line,
            key: if path == "." { String::new() } else { path },
            message,
        }
    })
}

/// Removes every " at line L column C" from `message` that ends it or is followed by ", "
/// (libyaml's syntax errors give two: the problem's and its context's).
fn strip_position(message: &mut String) {
    let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    let mut before = message.len();
    while let Some(i) = message[..before].rfind(" at line ") {
        before = i;
        let rest = &message[i + " at line ".len()..];
        let l = digits(rest);
        let Some(after) = rest[l..].strip_prefix(" column ") else {
            continue;
        };
        let c = digits(after);
        let end = message.len() - after.len() + c;
        if l > 0 && c > 0 && (end == message.len() || message[end..].starts_with(", ")) {
            message.replace_range(i..end, "");
        }
    }
}

/// The lines of `text` as libyaml counts them: CR LF, CR, LF, NEL, LS and PS end a line; the
/// last line may be empty.
fn yaml_line_count(text: &str) -> usize {
    let mut n = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                chars.next_if_eq(&'\n');
                n += 1;
            }
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => n += 1,
            _ => {}
        }
    }
    n
}

pub(super) fn parent_path(path: &str) -> &str {
    match path.rfind('.') {
        Some(i) => &path[..i],
        None => path,
    }
}

/// Finds the 1-based line of a key path in block-style YAML (or of `value` below it).
/// Best effort: falls back to the deepest key found.
pub(super) fn locate(text: &str, path: &[&str], value: Option<&str>) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0usize;
    let mut found: Option<usize> = None;
    let mut min_indent: Option<usize> = None;
    for key in path {
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(start) {
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            if found.is_some()
                && !trimmed.is_empty()
                && !trimmed.starts_with('#')
                && let Some(mi) = min_indent
                && indent <= mi
                && i > start
            {
                break;
            }
            let bare = trimmed.trim_start_matches("- ");
            if bare.starts_with(&format!("{key}:"))
                || trimmed.contains(&format!("{{{key}:"))
                || trimmed.contains(&format!(" {key}:"))
            {
                hit = Some((i, indent));
                break;
            }
        }
        match hit {
            Some((i, indent)) => {
                found = Some(i);
                start = i;
                min_indent = Some(indent);
            }
            None => break,
        }
    }
    if let (Some(v), Some(f)) = (value, found) {
        for (i, line) in lines.iter().enumerate().skip(f) {
            if line.contains(v) {
                return Some(i + 1);
            }
        }
    }
    found.map(|i| i + 1)
}
