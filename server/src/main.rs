//! `kvd`: the node binary; all logic lives in the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // `--config FILE` becomes flags in front of the real ones (which win).
    let command_line = match server::config::command_line(std::env::args().collect()) {
        Ok(command_line) => command_line,
        Err(error) => {
            eprintln!("kvd: {error:#}");
            return ExitCode::from(2);
        }
    };
    match server::node::run(server::node::Args::parse_from(command_line)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kvd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
