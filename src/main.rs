//! The `refdpo` binary: parse flags, run the command, print errors with their cause chain.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = refdpo::cli::Cli::parse();
    match refdpo::run::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
