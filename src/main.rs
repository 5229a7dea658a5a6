//! The `usher` binary: parse the command line, run one command, map errors to exit codes.
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(usher::cli::main());
}
