//! The `usher` binary: parse the command line, run one command, map errors to exit codes.
#![forbid(unsafe_code)]

/// mimalloc instead of the system allocator: glibc's malloc/free were a third of usher's CPU
/// on the busy streams (many small JSON strings and maps per record).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(usher::cli::main());
}
