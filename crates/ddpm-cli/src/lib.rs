//! The `ddpm` command line: train, sample, interpolate, export, eval and bench, as a library so that the
//! workspace tests can drive each command in process.

#![warn(missing_docs)]

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod eval;
pub mod fid;
pub mod export;
pub mod generate;
pub mod hub_data;
pub mod imageio;
pub mod inception;
pub mod init;
pub mod interpolate;
pub mod model;
pub mod optim;
pub mod progress;
pub mod run_dir;
pub mod sample;
pub mod train;

/// The `ddpm` subcommands.
#[derive(Debug, clap::Parser)]
#[command(name = "ddpm", version, about = "Denoising diffusion probabilistic models on candle")]
pub enum Cli {
    /// Train a UNet on a dataset (MNIST from data/mnist by default).
    Train(Box<train::TrainArgs>),
    /// Generate images from a model folder, a training checkpoint or a Hub repo id.
    Sample(sample::SampleArgs),
    /// Interpolate between two images in the noisy space, as in the DDPM paper's section 4.3.
    Interpolate(interpolate::InterpolateArgs),
    /// Write a folder that diffusers loads with DDPMPipeline.from_pretrained.
    Export(export::ExportArgs),
    /// The variational bound (NLL in bits/dim) of a model on a dataset's test split.
    Eval(eval::EvalArgs),
    /// Training and inference throughput and peak memory, as the PyTorch peer prints them.
    Bench(bench::BenchArgs),
}

/// An error and its causes on one line, outermost first, joined by ": ", as the binary prints it. A
/// cause whose text the line already holds is left out: several error types print their source in
/// their own message (`{path}: {source}`), and the chain would otherwise repeat it. Only the first
/// line of each cause is kept: candle appends its captured backtrace to an error's text when
/// `RUST_BACKTRACE` is set.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let full = cause.to_string();
        let text = full.lines().next().unwrap_or_default();
        if !line.contains(text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(text);
        }
    }
    line
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli {
        Cli::Train(a) => train::run(*a),
        Cli::Sample(a) => sample::run(a),
        Cli::Interpolate(a) => interpolate::run(a),
        Cli::Export(a) => export::run(a),
        Cli::Eval(a) => eval::run(a),
        Cli::Bench(a) => bench::run(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_line_is_one_line_without_backtraces() {
        // candle's errors carry a backtrace on further lines when RUST_BACKTRACE is set (issue 22)
        let with_trace = candle_core::Error::Msg("tensor too large\n   0: backtrace frame\n   1: another".into());
        let e = anyhow::Error::from(with_trace).context("sample: cannot run the model");
        assert_eq!(error_line(&e), "sample: cannot run the model: tensor too large");
    }
}
