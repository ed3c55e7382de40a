//! The `ddpm` binary.

use std::os::raw::{c_int, c_long};

use clap::Parser;

/// mimalloc keeps freed pages for reuse: the training step allocates and frees many large tensors,
/// which glibc's allocator returns to the kernel and faults back in on every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's `mi_option_set` (the library is linked through the mimalloc crate).
    fn mi_option_set(option: c_int, value: c_long);
}

/// `mi_option_purge_delay` in the `mi_option_t` enum of the mimalloc 2.x that the mimalloc crate builds.
const MI_OPTION_PURGE_DELAY: c_int = 15;

/// Never hands freed memory back to the kernel (mimalloc's `purge_delay = -1`), unless the user set
/// `MIMALLOC_PURGE_DELAY`. With the default 10 ms delay every training step faults its buffers back
/// in and the kernel zeroes them page by page (~10% of a step); the working set of a step is the same
/// from step to step (the convolutions reuse per-thread scratch), so keeping it costs no memory: peak
/// RSS of the default `ddpm train` stays at ~770 MiB either way.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads options at each purge decision.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

fn main() {
    keep_freed_memory();
    let cli = ddpm_cli::Cli::parse();
    if let Err(e) = ddpm_cli::run(cli) {
        eprintln!("error: {}", ddpm_cli::error_line(&e));
        std::process::exit(1);
    }
}
