//! `kvd`: the node binary; all logic lives in the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match server::node::run(server::node::Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kvd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
