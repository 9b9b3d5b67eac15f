//! `kvd`: the node binary; all logic lives in the library.

use std::process::ExitCode;

use clap::Parser;

// Values of every size up to 1 MiB are allocated per write and a flush frees a memtable's
// worth at once: glibc's malloc spent a tenth of a shard's time on that (ARCHITECTURE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
