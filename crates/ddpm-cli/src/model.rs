//! Finding and loading a model for the commands that use one: a model folder, a training checkpoint
//! (its `model/` folder holds the EMA weights) or a Hub repo id.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use ddpm_core::SchedulerConfig;
use ddpm_unet::UNet2DModel;

/// A model ready to sample from, with its noise schedule.
pub struct LoadedModel {
    /// The UNet.
    pub unet: UNet2DModel,
    /// The scheduler config found beside it (diffusers' DDPMScheduler defaults when there is none).
    pub scheduler: SchedulerConfig,
    /// Where the weights came from, for messages.
    pub origin: String,
}

/// A training checkpoint folder is accepted where a model folder is: its model is in `model/`.
pub fn model_dir_of(path: &Path) -> PathBuf {
    let inner = path.join(crate::checkpoint::MODEL_DIR);
    if inner.join("config.json").is_file() && !path.join("config.json").is_file() {
        inner
    } else {
        path.to_path_buf()
    }
}

/// Loads `spec`: a local model folder or checkpoint, else a Hub repo id (cache first, then network
/// unless HF_HUB_OFFLINE=1).
pub fn load(spec: &str, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let local = Path::new(spec);
    let target = if local.is_dir() { model_dir_of(local).display().to_string() } else { spec.to_string() };
    let files = ddpm_unet::resolve_model(&target).with_context(|| format!("--model {spec}"))?;
    let unet = ddpm_unet::load_from_files(&files.config, &files.weights, device, dtype)?;
    let scheduler = match &files.scheduler_config {
        Some(p) => read_scheduler_config(p)?,
        None => {
            let d = SchedulerConfig::default();
            eprintln!(
                "warning: {spec} has no scheduler_config.json; assuming {} with diffusers' defaults \
                 ({} steps, {} betas {} to {}, {} variance, {} prediction)",
                d.class_name, d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end, d.variance_type, d.prediction_type
            );
            d
        }
    };
    Ok(LoadedModel { unet, scheduler, origin: files.unet_dir().display().to_string() })
}

/// Reads a `scheduler_config.json`, printing the one-line warning that names the fields no supported
/// scheduler reads (diffusers ignores them too).
pub fn read_scheduler_config(path: &Path) -> Result<SchedulerConfig> {
    let (config, unknown) = SchedulerConfig::from_file_checked(path)?;
    if let Some(w) = unknown.warning() {
        eprintln!("{w}");
    }
    Ok(config)
}

/// The image size of a UNet config (`sample_size`), required by the commands that make images.
pub fn sample_size(cfg: &ddpm_unet::UNetConfig) -> Result<usize> {
    cfg.sample_size
        .context("the UNet config.json has no `sample_size`; add it (the image side in pixels)")
}
