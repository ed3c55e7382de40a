//! Load a diffusers pipeline folder (or Hub repo id) and write PNGs, as a candle user would:
//!
//! ```text
//! cargo run --release --example pipeline -- [FOLDER_OR_REPO_ID] [OUT_DIR]
//! ```
//! Without arguments it samples the tiny DDPM pipeline of tests/fixtures/diffusers/pipelines/ddpm
//! (random weights: the images are noise-like) into `pipeline-samples/`, offline.

use candle_core::{DType, Device};
use ddpm_unet::{images, DdpmPipeline, GenerateOptions};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/diffusers/pipelines/ddpm");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args().nth(1).unwrap_or(FIXTURE.into());
    let out = std::env::args().nth(2).unwrap_or("pipeline-samples".into());
    let pipe = DdpmPipeline::from_pretrained(&model, &Device::Cpu, DType::F32)?;
    let mut progress = |i, n| eprint!("\rstep {i}/{n}");
    let images = pipe.generate(GenerateOptions::new(4).steps(25).seed(0).progress(&mut progress))?;
    for path in images::save_pngs(&images, &out, "sample")? {
        eprintln!(" wrote {}", path.display());
    }
    Ok(())
}
