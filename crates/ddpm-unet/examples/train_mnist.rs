//! Training a UNet from the libraries alone: ddpm-core's training loss, AdamW (a `candle_nn::Optimizer`
//! with clipping and savable moments), EMA and checkpoints, with ddpm-unet's UNet2DModel and its
//! dropout. It trains the mnist-small preset for a few steps on synthetic 28x28 digits-like images
//! (a bright disk on a dark background), saves a checkpoint half-way, resumes from it in a fresh run,
//! and checks that the resumed run ends bit for bit where the uninterrupted one does.
//!
//! Run with `cargo run --release --example train_mnist -- [STEPS] [OUT]` (default 10 steps into
//! `runs/train_mnist_example`). The checkpoint's `model/` folder is a diffusers model folder.
//! `crates/ddpm-unet/tests/train_library.rs` runs the same code with a tiny UNet.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarMap};
use ddpm_core::checkpoint::{self, Checkpoint};
use ddpm_core::optim::{ema_decay, warmup_lr, AdamW, AdamWParams, Ema};
use ddpm_core::{training_loss, LossWeighting, NoiseRng, NoiseSchedule, SchedulerConfig};
use ddpm_unet::{UNet2DModel, UNetConfig};

/// Errors of every library, boxed.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Peak learning rate, warm-up steps, clipping threshold and largest EMA decay.
const LR: f64 = 1e-3;
const WARMUP: u64 = 4;
const MAX_GRAD_NORM: f64 = 1.0;
const EMA_DECAY: f64 = 0.999;

/// `n` synthetic one-channel images in [-1, 1]: a disk of random centre and radius.
pub fn synthetic_images(n: usize, size: usize, rng: &mut NoiseRng, device: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(n * size * size);
    for _ in 0..n {
        let s = size as f64;
        let (cx, cy, r) = (s * (0.3 + 0.4 * rng.uniform()), s * (0.3 + 0.4 * rng.uniform()), s * (0.15 + 0.15 * rng.uniform()));
        v.extend((0..size * size).map(|i| if ((i % size) as f64 - cx).hypot((i / size) as f64 - cy) < r { 1f32 } else { -1f32 }));
    }
    Ok(Tensor::from_vec(v, (n, 1, size, size), device)?)
}

/// A training run: the model, its optimizer (which holds the variables), the EMA and the generator
/// of every draw (batches, timesteps, noise, dropout).
pub struct Run {
    /// The UNet, its parameters in the optimizer's variables.
    pub model: UNet2DModel,
    /// AdamW with global-norm clipping.
    pub opt: AdamW,
    /// The averaged weights.
    pub ema: Ema,
    /// The run's random source.
    pub rng: NoiseRng,
    schedule: NoiseSchedule,
    config: UNetConfig,
    sched_config: SchedulerConfig,
}

impl Run {
    /// A fresh run (candle's initialisers; the seed drives every later draw).
    pub fn new(config: &UNetConfig, sched_config: &SchedulerConfig, seed: u64, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let model = UNet2DModel::new_trainable(config, &varmap, DType::F32, device)?;
        let opt = AdamW::from_varmap(&varmap, AdamWParams { lr: LR, weight_decay: 0.0, max_grad_norm: Some(MAX_GRAD_NORM), ..Default::default() })?;
        let ema = Ema::new(opt.vars())?;
        let schedule = NoiseSchedule::new(sched_config, device)?;
        Ok(Run { model, opt, ema, rng: NoiseRng::new(seed), schedule, config: config.clone(), sched_config: sched_config.clone() })
    }

    /// One step (algorithm 1 of the paper): a random batch, L_simple on the training forward
    /// (dropout), AdamW at the warmed-up rate after clipping, the EMA. Returns the loss.
    pub fn step(&mut self, images: &Tensor, batch: usize) -> Result<f32> {
        let n = images.dim(0)? as u64;
        let idx: Vec<u32> = (0..batch).map(|_| self.rng.below(n) as u32).collect();
        let x0 = images.index_select(&Tensor::new(idx, images.device())?, 0)?;
        let out = training_loss(&self.model, &self.schedule, LossWeighting::None, &x0, &mut self.rng)?;
        let k = self.opt.step_count() + 1;
        self.opt.set_learning_rate(warmup_lr(LR, k, WARMUP));
        self.opt.backward_step(&out.loss)?;
        self.ema.update(self.opt.vars(), ema_decay(EMA_DECAY, k))?;
        Ok(out.loss.to_scalar::<f32>()?)
    }

    /// Saves the run under `dir/step-NNNNNN` and returns that folder.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let sched = serde_json::to_value(&self.sched_config)?;
        let ck = Checkpoint::of_run(&self.opt, &self.ema, &self.rng, self.config.to_json_value(), sched, serde_json::json!({}));
        Ok(checkpoint::save(dir, &ck)?)
    }

    /// A run resumed from the checkpoint folder `dir`: a fresh model whose weights, moments, step,
    /// EMA and generator are the checkpoint's.
    pub fn resume(dir: &Path, device: &Device) -> Result<Self> {
        let ck = checkpoint::load(dir, device)?;
        let config = UNetConfig::from_json_value(&ck.model_config)?;
        let sched_config = SchedulerConfig::from_json_value(&ck.scheduler_config)?;
        let mut run = Run::new(&config, &sched_config, 0, device)?;
        run.rng = ck.restore(&mut run.opt, &mut run.ema, &dir.display().to_string())?;
        Ok(run)
    }

    /// The raw and EMA weights as host values, by name (`ema.NAME` for the averages).
    pub fn snapshot(&self) -> Result<HashMap<String, Vec<f32>>> {
        let mut out = HashMap::new();
        let raw = self.opt.vars().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone()));
        for (k, t) in raw.chain(self.ema.weights().iter().map(|(k, t)| (format!("ema.{k}"), t.clone()))) {
            out.insert(k, t.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

/// Trains `steps` steps with a checkpoint after `save_at`, then resumes that checkpoint in a fresh
/// run and trains it to `steps` too. Returns the uninterrupted run's losses and both runs' final
/// weights.
#[allow(clippy::type_complexity)]
pub fn train_and_resume(config: &UNetConfig, steps: u64, save_at: u64, out: &Path, device: &Device) -> Result<(Vec<f32>, HashMap<String, Vec<f32>>, HashMap<String, Vec<f32>>)> {
    let sched = SchedulerConfig::default();
    let size = config.sample_size.unwrap_or(28);
    let images = synthetic_images(64, size, &mut NoiseRng::new(1), device)?;
    let mut run = Run::new(config, &sched, 7, device)?;
    let (mut losses, mut saved) = (vec![], None);
    for k in 1..=steps {
        losses.push(run.step(&images, 8)?);
        if k == save_at {
            saved = Some(run.save(&out.join("checkpoints"))?);
        }
    }
    let mut resumed = Run::resume(&saved.ok_or("save_at is past the last step")?, device)?;
    for _ in save_at..steps {
        resumed.step(&images, 8)?;
    }
    Ok((losses, run.snapshot()?, resumed.snapshot()?))
}

#[allow(dead_code)]
fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let out = PathBuf::from(args.next().unwrap_or("runs/train_mnist_example".into()));
    let config = ddpm_unet::presets::preset("mnist-small")?;
    let (losses, straight, resumed) = train_and_resume(&config, steps, steps / 2, &out, &Device::Cpu)?;
    for (k, l) in losses.iter().enumerate() {
        println!("step {}: loss {l:.4}", k + 1);
    }
    let same = straight.iter().all(|(k, v)| v.iter().zip(&resumed[k]).all(|(a, b)| a.to_bits() == b.to_bits()));
    println!("resumed from step {} of {steps}: {}", steps / 2, if same { "bit-exact" } else { "DIFFERS" });
    Ok(())
}
