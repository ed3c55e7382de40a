//! The `ddpm` binary.

use clap::Parser;

/// mimalloc keeps freed pages for reuse: the training step allocates and frees many large tensors,
/// which glibc's allocator returns to the kernel and faults back in on every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (the same in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Never hand freed pages back to the kernel: every training step would fault them in (and have
    // them zeroed) again, which cost a fifth of a CPU training step.
    // SAFETY: setting an option is a plain store in mimalloc's option table.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = ddpm_cli::Cli::parse();
    if let Err(e) = ddpm_cli::run(cli) {
        // One line: the causes joined, outermost first.
        let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", msg.join(": "));
        std::process::exit(1);
    }
}
