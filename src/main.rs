//! `tqproxy`: parse the command line, dispatch, exit with the verb's code. The only place the
//! process exits (but for the sandbox helper, which execs or exits on its own).

#![deny(unsafe_code)]

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // The sandbox helper runs before anything else: single-threaded, no logging, no runtime.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(tqproxy::sandbox::HELPER_ARG))
    {
        tqproxy::sandbox::helper_main();
    }
    let cli = tqproxy::cli::Cli::parse();
    std::process::exit(tqproxy::cli::dispatch(cli));
}
