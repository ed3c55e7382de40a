//! Training checkpoints: a diffusers-style model folder (EMA weights) plus the state needed to resume
//! exactly (raw weights, AdamW moments, step, RNG state, options), written to a temporary folder and
//! renamed into place so that a crash never leaves a half-written checkpoint as the latest.
//!
//! Layout of `OUT/checkpoints/step-000500/`:
//! ```text
//! model/config.json                          the UNet config (diffusers UNet2DModel)
//! model/scheduler_config.json                the noise schedule (diffusers DDPMScheduler)
//! model/diffusion_pytorch_model.safetensors  the EMA weights
//! training_state.safetensors                 model.* raw weights, adam.m.* / adam.v.* moments;
//!                                            metadata: format, step, rng, options (JSON)
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

/// The `format` metadata value of a training state file.
pub const STATE_FORMAT: &str = "ddpm-rs-train-v1";
/// File name of the training state inside a checkpoint folder.
pub const STATE_FILE: &str = "training_state.safetensors";
/// Name of the model folder inside a checkpoint folder.
pub const MODEL_DIR: &str = "model";
/// File name of the weights in a model folder, as diffusers names it.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// Everything a checkpoint holds, in memory.
pub struct Checkpoint {
    /// Optimizer steps taken.
    pub step: u64,
    /// State of the training noise generator.
    pub rng: [u64; 4],
    /// The training options as JSON (compared on resume).
    pub options: serde_json::Value,
    /// UNet config.json contents.
    pub unet_config: serde_json::Value,
    /// scheduler_config.json contents.
    pub scheduler_config: serde_json::Value,
    /// EMA weights, diffusers key names.
    pub ema: HashMap<String, Tensor>,
    /// Raw weights, diffusers key names.
    pub weights: HashMap<String, Tensor>,
    /// Optimizer moments (`adam.m.KEY`, `adam.v.KEY`).
    pub optimizer: HashMap<String, Tensor>,
}

/// Folder name of the checkpoint at `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// Writes a JSON value, pretty-printed, to `path`.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("{}: cannot write", path.display()))
}

/// Saves tensors with string metadata as safetensors.
pub fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>, meta: Option<HashMap<String, String>>) -> Result<()> {
    let mut items: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        items.push((k, t.to_device(&Device::Cpu)?.contiguous()?));
    }
    items.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::serialize_to_file(items, meta, path).with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes `ckpt` under `checkpoints_dir/step-NNNNNN`, through a temporary folder that is renamed at the
/// end. `before_write` is called with each file's name before it is written (tests inject a failure
/// there). On error the temporary folder is removed and earlier checkpoints are untouched.
pub fn save(checkpoints_dir: &Path, ckpt: &Checkpoint, before_write: &dyn Fn(&str) -> Result<()>) -> Result<PathBuf> {
    std::fs::create_dir_all(checkpoints_dir).with_context(|| format!("{}: cannot create folder", checkpoints_dir.display()))?;
    let name = step_dir_name(ckpt.step);
    let final_dir = checkpoints_dir.join(&name);
    let tmp = checkpoints_dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = write_all(&tmp, ckpt, before_write).and_then(|_| {
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).with_context(|| format!("{}: cannot replace", final_dir.display()))?;
        }
        std::fs::rename(&tmp, &final_dir).with_context(|| format!("{}: cannot move checkpoint into place", final_dir.display()))
    });
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("saving checkpoint {} failed; the previous checkpoints are intact", final_dir.display())));
    }
    Ok(final_dir)
}

/// Writes every file of a checkpoint into `dir`.
fn write_all(dir: &Path, ckpt: &Checkpoint, before_write: &dyn Fn(&str) -> Result<()>) -> Result<()> {
    let model = dir.join(MODEL_DIR);
    std::fs::create_dir_all(&model).with_context(|| format!("{}: cannot create folder", model.display()))?;
    before_write("config.json")?;
    write_json(&model.join("config.json"), &ckpt.unet_config)?;
    before_write("scheduler_config.json")?;
    write_json(&model.join("scheduler_config.json"), &ckpt.scheduler_config)?;
    before_write(WEIGHTS_FILE)?;
    write_safetensors(&model.join(WEIGHTS_FILE), &ckpt.ema, None)?;
    before_write(STATE_FILE)?;
    let mut state: HashMap<String, Tensor> = ckpt.optimizer.clone();
    for (k, t) in &ckpt.weights {
        state.insert(format!("model.{k}"), t.clone());
    }
    let meta = HashMap::from([
        ("format".to_string(), STATE_FORMAT.to_string()),
        ("step".to_string(), ckpt.step.to_string()),
        ("rng".to_string(), ckpt.rng.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")),
        ("options".to_string(), ckpt.options.to_string()),
    ]);
    write_safetensors(&dir.join(STATE_FILE), &state, Some(meta))
}

/// Reads a JSON file.
fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Loads a checkpoint folder written by [`save`]; every error names the file and the field.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let state_path = dir.join(STATE_FILE);
    if !state_path.is_file() {
        bail!("{}: not a training checkpoint (no {STATE_FILE})", dir.display());
    }
    let bytes = std::fs::read(&state_path).with_context(|| format!("{}: cannot read", state_path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", state_path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |k: &str| -> Result<&String> {
        meta.get(k).with_context(|| format!("{}: metadata field `{k}` is missing", state_path.display()))
    };
    if field("format")? != STATE_FORMAT {
        bail!("{}: metadata field `format` is {:?}, expected {STATE_FORMAT:?}", state_path.display(), field("format")?);
    }
    let step: u64 = field("step")?.parse().with_context(|| format!("{}: metadata field `step` is not a number", state_path.display()))?;
    let rng_vals: Vec<u64> = field("rng")?
        .split(',')
        .map(|s| s.parse::<u64>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("{}: metadata field `rng` is not four numbers", state_path.display()))?;
    let rng: [u64; 4] = rng_vals
        .try_into()
        .map_err(|_| anyhow::anyhow!("{}: metadata field `rng` is not four numbers", state_path.display()))?;
    let options = serde_json::from_str(field("options")?).with_context(|| format!("{}: metadata field `options` is not JSON", state_path.display()))?;
    let all = candle_core::safetensors::load_buffer(&bytes, device).with_context(|| format!("{}: cannot read tensors", state_path.display()))?;
    let (mut weights, mut optimizer) = (HashMap::new(), HashMap::new());
    for (k, t) in all {
        if let Some(name) = k.strip_prefix("model.") {
            weights.insert(name.to_string(), t);
        } else {
            optimizer.insert(k, t);
        }
    }
    let model = dir.join(MODEL_DIR);
    let ema_path = model.join(WEIGHTS_FILE);
    let ema = candle_core::safetensors::load(&ema_path, device).with_context(|| format!("{}: cannot read EMA weights", ema_path.display()))?;
    Ok(Checkpoint {
        step,
        rng,
        options,
        unet_config: read_json(&model.join("config.json"))?,
        scheduler_config: read_json(&model.join("scheduler_config.json"))?,
        ema,
        weights,
        optimizer,
    })
}

/// The checkpoint folders under `checkpoints_dir`, oldest first (by step).
pub fn list(checkpoints_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(checkpoints_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join(STATE_FILE).is_file().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Deletes all but the newest `keep` checkpoints (0 keeps all).
pub fn prune(checkpoints_dir: &Path, keep: usize) -> Result<()> {
    let all = list(checkpoints_dir);
    if keep == 0 || all.len() <= keep {
        return Ok(());
    }
    for (_, dir) in &all[..all.len() - keep] {
        std::fs::remove_dir_all(dir).with_context(|| format!("{}: cannot remove old checkpoint", dir.display()))?;
    }
    Ok(())
}
