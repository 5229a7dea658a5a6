//! `usher-sandbox`: the fake vendors and what runs usher against them (the demo, the
//! benchmarks). Not part of the product: the `usher` binary a sysadmin installs carries none
//! of this.
#![deny(unsafe_code)]

mod cli;

/// The same allocator and settings as `usher` (its `src/main.rs`): the benchmarks print the
/// fakes' CPU beside usher's, and with glibc's malloc 40% of the fakes' CPU was malloc/free.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the OS after 10 ms, as in `usher` (unless
/// `MIMALLOC_PURGE_DELAY` says otherwise).
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
    std::process::exit(cli::main());
}
