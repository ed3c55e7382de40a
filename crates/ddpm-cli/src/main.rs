//! The `ddpm` binary.

use clap::Parser;

/// mimalloc keeps freed pages for reuse: the training step allocates and frees many large tensors,
/// which glibc's allocator returns to the kernel and faults back in on every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = ddpm_cli::Cli::parse();
    if let Err(e) = ddpm_cli::run(cli) {
        // One line: the causes joined, outermost first.
        let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", msg.join(": "));
        std::process::exit(1);
    }
}
