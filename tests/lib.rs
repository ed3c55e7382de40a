//! Shared helpers for the workspace-level tests: fixture paths, running `ddpm` commands in process, and
//! a tiny UNet config that trains in seconds.

use std::path::{Path, PathBuf};

use clap::Parser;

/// The diffusers reference fixtures copied into the repository.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/diffusers")
}

/// Parses `ddpm ARGS...` as the binary would.
pub fn parse(args: &[&str]) -> ddpm_cli::Cli {
    ddpm_cli::Cli::try_parse_from(std::iter::once("ddpm").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("ddpm {}: {e}", args.join(" ")))
}

/// Runs `ddpm ARGS...` in process and returns its result.
pub fn ddpm(args: &[&str]) -> anyhow::Result<()> {
    ddpm_cli::run(parse(args))
}

/// The error of `ddpm ARGS...` as the binary prints it ([`ddpm_cli::error_line`]); panics on success.
pub fn ddpm_err(args: &[&str]) -> String {
    match ddpm(args) {
        Ok(()) => panic!("ddpm {} succeeded but should have failed", args.join(" ")),
        Err(e) => ddpm_cli::error_line(&e),
    }
}

/// Writes a tiny 28x28 one-channel UNet config (two levels, attention at the lower one) into `dir`.
pub fn tiny_unet_config(dir: &Path) -> PathBuf {
    let cfg = serde_json::json!({
        "sample_size": 28,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "attention_head_dim": 8
    });
    let p = dir.join("tiny_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    p
}

/// Reads every tensor of a safetensors file as raw f32 values, keyed by name.
pub fn read_tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}
