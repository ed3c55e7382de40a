//! Training checkpoints: a diffusers-style model folder (the EMA weights) plus the state needed to
//! resume exactly (raw weights, AdamW moments, step, noise generator state, options), written to a
//! temporary folder and renamed into place so that a crash never leaves a half-written checkpoint as
//! the latest.
//!
//! Layout of `DIR/step-000500/`:
//! ```text
//! model/config.json                          the network's config (a UNet2DModel's for `ddpm train`)
//! model/scheduler_config.json                the noise schedule (diffusers DDPMScheduler)
//! model/diffusion_pytorch_model.safetensors  the EMA weights
//! training_state.safetensors                 model.* raw weights, adam.m.* / adam.v.* moments;
//!                                            metadata: format, step, rng, options (JSON)
//! ```
//!
//! It lives in ddpm-core, beside the optimizer whose state it holds, because it needs nothing but
//! safetensors and serde_json: the configs are kept as JSON values, so that ddpm-core does not depend
//! on the network's crate and any network's config round-trips unchanged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::optim::{AdamW, AdamWState, Ema};
use crate::rng::NoiseRng;

/// The `format` metadata value of a training state file.
pub const STATE_FORMAT: &str = "ddpm-rs-train-v1";
/// File name of the training state inside a checkpoint folder.
pub const STATE_FILE: &str = "training_state.safetensors";
/// Name of the model folder inside a checkpoint folder.
pub const MODEL_DIR: &str = "model";
/// File name of the weights in a model folder, as diffusers names it.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// File name of the network's config in a model folder.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the scheduler's config in a model folder.
pub const SCHEDULER_FILE: &str = "scheduler_config.json";

/// Everything a checkpoint holds, in memory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Optimizer steps taken.
    pub step: u64,
    /// State of the training noise generator ([`NoiseRng::state`]).
    pub rng: [u64; 4],
    /// The training options as JSON (for the caller to compare on resume).
    pub options: serde_json::Value,
    /// The network's `config.json` contents (a UNet2DModel config for `ddpm train`).
    pub model_config: serde_json::Value,
    /// `scheduler_config.json` contents.
    pub scheduler_config: serde_json::Value,
    /// EMA weights, by name.
    pub ema: HashMap<String, Tensor>,
    /// Raw weights, by name.
    pub weights: HashMap<String, Tensor>,
    /// Optimizer moments (`adam.m.NAME`, `adam.v.NAME`).
    pub optimizer: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// The checkpoint of a run: the optimizer's weights, moments and step, the EMA, and the noise
    /// generator, with the two configs and the options as given.
    pub fn of_run(
        opt: &AdamW,
        ema: &Ema,
        rng: &NoiseRng,
        model_config: serde_json::Value,
        scheduler_config: serde_json::Value,
        options: serde_json::Value,
    ) -> Self {
        let state = opt.state();
        Checkpoint {
            step: state.step,
            rng: rng.state(),
            options,
            model_config,
            scheduler_config,
            ema: ema.state(),
            weights: opt.vars().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect(),
            optimizer: state.tensors,
        }
    }

    /// The optimizer's saved state (step and moments), for [`AdamW::load_state`].
    pub fn optimizer_state(&self) -> AdamWState {
        AdamWState { step: self.step, tensors: self.optimizer.clone() }
    }

    /// Restores a run from this checkpoint: the raw weights into the optimizer's variables (each must
    /// be there with its shape), the moments and step count into `opt`, the averages into `ema`, and
    /// returns the noise generator. `origin` (the folder) starts the error messages.
    pub fn restore(&self, opt: &mut AdamW, ema: &mut Ema, origin: &str) -> Result<NoiseRng> {
        for (name, var) in opt.vars() {
            let t = self.weights.get(name).ok_or_else(|| Error::arg(format!("{origin}: checkpoint lacks weight `{name}`")))?;
            if t.dims() != var.dims() {
                return Err(Error::arg(format!("{origin}: weight `{name}` has shape {:?}, the model needs {:?}", t.dims(), var.dims())));
            }
            var.set(t)?;
        }
        opt.load_state(&self.optimizer_state(), origin)?;
        ema.load_state(&self.ema, origin)?;
        Ok(NoiseRng::from_state(self.rng))
    }
}

/// An I/O error that names `path`.
fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

/// A file-format error that names `path` and what is wrong (a field, a tensor).
fn format_err(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::File { path: path.display().to_string(), message: message.to_string() }
}

/// Folder name of the checkpoint at `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// Writes a JSON value, pretty-printed, to `path`.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| format_err(path, e))?;
    std::fs::write(path, text + "\n").map_err(|e| io_err(path, e))
}

/// Saves tensors with string metadata as safetensors (sorted by name, moved to the CPU).
pub fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>, meta: Option<HashMap<String, String>>) -> Result<()> {
    let mut items: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        items.push((k, t.to_device(&Device::Cpu)?.contiguous()?));
    }
    items.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::serialize_to_file(items, meta, path).map_err(|e| io_err(path, std::io::Error::other(e.to_string())))
}

/// [`save_with_hook`] without a hook.
pub fn save(checkpoints_dir: &Path, ckpt: &Checkpoint) -> Result<PathBuf> {
    save_with_hook(checkpoints_dir, ckpt, &|_| Ok(()))
}

/// Writes `ckpt` under `checkpoints_dir/step-NNNNNN`, through a temporary folder `.step-NNNNNN.tmp`
/// that is renamed at the end. `before_write` is called with each file's name before it is written
/// (tests inject a failure there). On error the temporary folder is removed, earlier checkpoints are
/// untouched, and the error says so.
pub fn save_with_hook(checkpoints_dir: &Path, ckpt: &Checkpoint, before_write: &dyn Fn(&str) -> Result<()>) -> Result<PathBuf> {
    std::fs::create_dir_all(checkpoints_dir).map_err(|e| io_err(checkpoints_dir, e))?;
    let name = step_dir_name(ckpt.step);
    let final_dir = checkpoints_dir.join(&name);
    let tmp = checkpoints_dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = write_all(&tmp, ckpt, before_write).and_then(|_| {
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| io_err(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| io_err(&final_dir, e))
    });
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::Io {
            path: final_dir.display().to_string(),
            source: std::io::Error::other(format!("saving checkpoint failed; the previous checkpoints are intact: {e}")),
        });
    }
    Ok(final_dir)
}

/// Writes every file of a checkpoint into `dir`.
fn write_all(dir: &Path, ckpt: &Checkpoint, before_write: &dyn Fn(&str) -> Result<()>) -> Result<()> {
    let model = dir.join(MODEL_DIR);
    std::fs::create_dir_all(&model).map_err(|e| io_err(&model, e))?;
    before_write(CONFIG_FILE)?;
    write_json(&model.join(CONFIG_FILE), &ckpt.model_config)?;
    before_write(SCHEDULER_FILE)?;
    write_json(&model.join(SCHEDULER_FILE), &ckpt.scheduler_config)?;
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
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| format_err(path, format!("invalid JSON: {e}")))
}

/// Loads a checkpoint folder written by [`save`]; every error names the file and the field.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let state_path = dir.join(STATE_FILE);
    if !state_path.is_file() {
        return Err(format_err(dir, format!("not a training checkpoint (no {STATE_FILE})")));
    }
    let bytes = std::fs::read(&state_path).map_err(|e| io_err(&state_path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| format_err(&state_path, format!("not a valid safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |k: &str| -> Result<&String> { meta.get(k).ok_or_else(|| format_err(&state_path, format!("metadata field `{k}` is missing"))) };
    if field("format")? != STATE_FORMAT {
        return Err(format_err(&state_path, format!("metadata field `format` is {:?}, expected {STATE_FORMAT:?}", field("format")?)));
    }
    let step: u64 = field("step")?.parse().map_err(|_| format_err(&state_path, "metadata field `step` is not a number"))?;
    let rng_vals: Vec<u64> = field("rng")?
        .split(',')
        .map(|s| s.parse::<u64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| format_err(&state_path, "metadata field `rng` is not four numbers"))?;
    let rng: [u64; 4] = rng_vals.try_into().map_err(|_| format_err(&state_path, "metadata field `rng` is not four numbers"))?;
    let options = serde_json::from_str(field("options")?).map_err(|e| format_err(&state_path, format!("metadata field `options` is not JSON: {e}")))?;
    let all = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| format_err(&state_path, format!("cannot read tensors: {e}")))?;
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
    let ema = candle_core::safetensors::load(&ema_path, device).map_err(|e| format_err(&ema_path, format!("cannot read EMA weights: {e}")))?;
    Ok(Checkpoint {
        step,
        rng,
        options,
        model_config: read_json(&model.join(CONFIG_FILE))?,
        scheduler_config: read_json(&model.join(SCHEDULER_FILE))?,
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
        std::fs::remove_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    Ok(())
}
