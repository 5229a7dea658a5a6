//! The `usher` binary: parse the command line, run one command, map errors to exit codes.
#![deny(unsafe_code)]

/// mimalloc instead of the system allocator: glibc's malloc/free were a third of usher's CPU
/// on the busy streams (many small JSON strings and maps per record).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (the same number in v2 and v3; the Rust crate names
/// only the older options).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory freed by a page of records goes back to the OS after 10 ms, as in mimalloc v2,
/// instead of v3's 1 s: a busy stream frees a page's worth every few milliseconds, and with
/// 1 s the process held on to ~40% more than it used (ARCHITECTURE, "Performance"). No CPU
/// cost was measurable. `MIMALLOC_PURGE_DELAY` in the environment still wins.
#[allow(unsafe_code)] // the allocator's options have no safe API
fn return_freed_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set stores an integer in mimalloc's option table; any thread
        // may call it at any time, and 10 is a valid delay in milliseconds.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10) };
    }
}

fn main() {
    return_freed_memory_promptly();
    std::process::exit(usher::cli::main());
}
