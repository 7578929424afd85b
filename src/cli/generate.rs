//! `tqproxy completions SHELL` and `tqproxy man --out DIR`: shell completions (clap_complete)
//! and man pages (clap_mangen), generated from the clap definitions of [`super::Cli`], so they
//! name exactly the verbs, arguments and help texts of the binary that prints them. The Debian
//! package ships both (`scripts/package.sh` runs them); `man` is hidden from `--help`.
//!
//! Also the packaged binary's default configuration: [`default_config`].

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

/// The shells `tqproxy completions` writes for (the ones the package installs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

impl Shell {
    fn generator(self) -> clap_complete::Shell {
        match self {
            Shell::Bash => clap_complete::Shell::Bash,
            Shell::Zsh => clap_complete::Shell::Zsh,
            Shell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// The completion script for `shell`: of the visible verbs and options only.
pub fn completion_script(shell: Shell) -> Vec<u8> {
    let mut cmd = visible(&super::Cli::command());
    let mut out = Vec::new();
    clap_complete::generate(shell.generator(), &mut cmd, "tqproxy", &mut out);
    out
}

/// `cmd` without its hidden arguments and subcommands, recursively. clap_complete's generators
/// offer hidden ones too (https://github.com/clap-rs/clap/issues/1335) and `clap::Command` has
/// no way to remove one, so the tree is assembled again from the visible parts (nothing is
/// restated: it cannot drift from [`super::Cli`]).
fn visible(cmd: &clap::Command) -> clap::Command {
    let mut out = clap::Command::new(cmd.get_name().to_string());
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        out = out.version(version.to_string());
    }
    out.args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .subcommands(
            cmd.get_subcommands()
                .filter(|c| !c.is_hide_set())
                .map(visible),
        )
}

/// `tqproxy completions SHELL`: the script on stdout; exit 1 if it cannot be written (a closed
/// pipe ends it by SIGPIPE first, as every client verb), never a panic.
pub fn completions(shell: Shell) -> i32 {
    let script = completion_script(shell);
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&script).and_then(|()| stdout.flush()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cannot write the completion script: {e}");
            1
        }
    }
}

/// Writes `tqproxy.1` and one `tqproxy-<verb>.1` per visible verb into `dir` (created if
/// missing); returns the files written, sorted.
pub fn write_man_pages(dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    clap_mangen::generate_to(super::Cli::command(), dir)
        .map_err(|e| format!("cannot write the man pages into {}: {e}", dir.display()))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("tqproxy") && n.ends_with(".1"))
        })
        .collect();
    pages.sort();
    Ok(pages)
}

/// `tqproxy man --out DIR`: prints each page written.
pub fn man(dir: &Path) -> i32 {
    match write_man_pages(dir) {
        Ok(pages) => {
            for p in pages {
                println!("{}", p.display());
            }
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// `-c`'s default, relative to the working directory.
pub const DEFAULT_CONFIG: &str = "conf/tqproxy.yaml";
/// Where the Debian package installs the configuration.
pub const PACKAGED_CONFIG: &str = "/etc/tqproxy/tqproxy.yaml";

/// The configuration a verb uses when `-c` names the default and no such file exists here: the
/// packaged `/etc/tqproxy/tqproxy.yaml` if that exists (so `tqproxy status` works from any
/// directory after installing the package), else `config` unchanged (whose error then names
/// it). An explicit other path is never replaced.
pub fn default_config(config: PathBuf) -> PathBuf {
    if config == Path::new(DEFAULT_CONFIG)
        && !config.exists()
        && Path::new(PACKAGED_CONFIG).is_file()
    {
        PathBuf::from(PACKAGED_CONFIG)
    } else {
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_completes_every_visible_verb() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completion_script(shell)).unwrap();
            for verb in super::super::Cli::command()
                .get_subcommands()
                .filter(|c| !c.is_hide_set())
            {
                assert!(
                    script.contains(verb.get_name()),
                    "{shell:?}: no `{}` in\n{script}",
                    verb.get_name()
                );
            }
            assert!(
                !script.contains("upgrade-from"),
                "{shell:?}: a hidden option"
            );
            let hidden_verb = match shell {
                Shell::Bash => "tqproxy,man)",
                Shell::Zsh => "(man)",
                Shell::Fish => "__fish_tqproxy_using_subcommand man",
            };
            assert!(!script.contains(hidden_verb), "{shell:?}: the hidden `man`");
        }
    }

    #[test]
    fn man_pages_are_one_per_visible_verb_and_hide_the_internal_ones() {
        let d = tempfile::tempdir().unwrap();
        let pages = write_man_pages(&d.path().join("man1")).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        // A page per visible verb, and per visible verb of a verb (`certs renew`).
        fn visible(c: &clap::Command) -> usize {
            c.get_subcommands()
                .filter(|c| !c.is_hide_set())
                .map(|c| 1 + visible(c))
                .sum()
        }
        let verbs = visible(&super::super::Cli::command());
        assert_eq!(names.len(), verbs + 1, "{names:?}");
        assert!(
            names.iter().any(|n| n == "tqproxy-certs-renew.1"),
            "{names:?}"
        );
        for want in ["tqproxy.1", "tqproxy-deploy.1", "tqproxy-completions.1"] {
            assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
        }
        assert!(!names.iter().any(|n| n == "tqproxy-man.1"), "{names:?}");
        let root = std::fs::read_to_string(d.path().join("man1/tqproxy.1")).unwrap();
        assert!(root.starts_with(".ie \\n(.g .ds Aq"), "not roff:\n{root}");
        assert!(root.contains("tqproxy\\-deploy(1)"), "{root}");
    }

    #[test]
    fn the_default_config_falls_back_only_for_the_default_path() {
        let other = PathBuf::from("/nonexistent/tqproxy.yaml");
        assert_eq!(default_config(other.clone()), other);
    }
}
