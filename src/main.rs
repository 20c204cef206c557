//! The `refdpo` binary: parse flags, run the command, print errors with their cause chain.

use clap::Parser;

/// Counts live heap bytes, for `--profile`'s per-phase peak.
#[global_allocator]
static HEAP: refdpo::profile::heap::Counting = refdpo::profile::heap::Counting;

fn main() -> std::process::ExitCode {
    let cli = refdpo::cli::Cli::parse();
    match refdpo::run::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // not eprintln!, which panics where stderr cannot be written
            use std::io::Write as _;
            let text = format!("{err:#}");
            let _ = writeln!(
                std::io::stderr(),
                "error: {}",
                refdpo::error::clip_lines(&text, 2000)
            );
            if let Some(hint) = refdpo::error::hint(&text) {
                let _ = writeln!(std::io::stderr(), "{hint}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
