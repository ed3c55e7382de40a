//! `ddpm export`: a folder that diffusers loads as it is with `DDPMPipeline.from_pretrained(DIR)`
//! (`DDIMPipeline` when the model's scheduler config is a DDIMScheduler's):
//! `model_index.json`, `unet/` (config.json, diffusion_pytorch_model.safetensors) and
//! `scheduler/scheduler_config.json`, written by ddpm-unet's [`ddpm_unet::DdpmPipeline::save_pretrained`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use ddpm_core::Sampler;
use ddpm_unet::DdpmPipeline;

use crate::checkpoint::WEIGHTS_FILE;
use crate::model::model_dir_of;

/// Options of `ddpm export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// A training checkpoint folder (its EMA weights are exported) or a model folder.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The pipeline folder to write; must not exist yet.
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `ddpm export`.
pub fn run(a: ExportArgs) -> Result<()> {
    let pipeline = export(&a.checkpoint, &a.out)?;
    eprintln!("wrote {}: load it with {pipeline}.from_pretrained({:?})", a.out.display(), a.out.display().to_string());
    Ok(())
}

/// Copies a model (checkpoint or model folder) into a diffusers pipeline folder at `out`, through a
/// temporary folder renamed at the end; returns the pipeline class written into `model_index.json`.
pub fn export(src: &Path, out: &Path) -> Result<&'static str> {
    let model = model_dir_of(src);
    let config = model.join("config.json");
    let weights = model.join(WEIGHTS_FILE);
    for f in [&config, &weights] {
        if !f.is_file() {
            bail!("{}: missing; --checkpoint must be a training checkpoint or a model folder with config.json and {WEIGHTS_FILE}", f.display());
        }
    }
    if out.exists() {
        bail!("{}: already exists; choose a new --out folder", out.display());
    }
    // Check that the weights fit the config before writing anything.
    let unet = ddpm_unet::load_dir(&model, &Device::Cpu, DType::F32).with_context(|| format!("{}: weights do not load", model.display()))?;
    let sched = match model.join("scheduler_config.json") {
        p if p.is_file() => crate::model::read_scheduler_config(&p)?,
        _ => ddpm_core::SchedulerConfig::default(),
    };
    // DDPMPipeline or DDIMPipeline, by the scheduler class
    let pipeline = DdpmPipeline::from_parts(unet, Sampler::from_config(&sched, &Device::Cpu)?);
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "export".into());
    let tmp = out.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    // a folder that cannot be written is named as asked, not by the hidden temporary name
    std::fs::create_dir(&tmp).map_err(|e| anyhow::anyhow!("{}: cannot write there: {e}", out.display()))?;
    let result = pipeline
        .save_pretrained(&tmp)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot move into place", out.display())));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| pipeline.class_name())
}
