//! The `ddpm` binary.

use clap::Parser;

fn main() {
    let cli = ddpm_cli::Cli::parse();
    if let Err(e) = ddpm_cli::run(cli) {
        // One line: the causes joined, outermost first.
        let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", msg.join(": "));
        std::process::exit(1);
    }
}
