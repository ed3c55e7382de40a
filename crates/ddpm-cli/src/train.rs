//! `ddpm train`: trains a UNet on a dataset with L_simple, AdamW, warm-up, gradient clipping and EMA,
//! writing sample grids, checkpoints and `metrics.jsonl`, and resuming exactly where it stopped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use ddpm_core::{NoiseRng, NoiseSchedule, SchedulerConfig};
use ddpm_unet::{UNet2DModel, UNetConfig};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Checkpoint};
use crate::data::{self, ImageSet, Split};
use crate::device::{device_name, parse_device};
use crate::optim::{ema_decay, warmup_cosine_lr, warmup_lr, AdamW, AdamWParams, Ema};
use ddpm_core::LossWeighting;
use crate::run_dir::RunDir;
use crate::{generate, imageio, init, progress};

/// Options of `ddpm train`; saved in every checkpoint and compared on resume.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct TrainArgs {
    /// Dataset: mnist, fashion-mnist, cifar10 (from data/NAME), or a folder of IDX files, CIFAR-10
    /// binary batches or images.
    #[arg(long, default_value = "mnist")]
    pub data: String,
    /// Use only the first N training images.
    #[arg(long)]
    pub max_images: Option<usize>,
    /// UNet preset: mnist-fast, mnist-small, labml or ddpm-cifar10.
    #[arg(long, default_value = "mnist-fast")]
    pub preset: String,
    /// A diffusers UNet2DModel config.json to use instead of a preset.
    #[arg(long)]
    pub unet_config: Option<PathBuf>,
    /// A diffusers scheduler_config.json for the noise schedule (the flags below override its fields).
    #[arg(long)]
    pub scheduler_config: Option<PathBuf>,
    /// Beta schedule: linear, scaled_linear, squaredcos_cap_v2 or sigmoid.
    #[arg(long)]
    pub beta_schedule: Option<String>,
    /// Number of diffusion steps T.
    #[arg(long)]
    pub num_train_timesteps: Option<usize>,
    /// beta_1 of the schedule.
    #[arg(long, allow_negative_numbers = true)]
    pub beta_start: Option<f64>,
    /// beta_T of the schedule.
    #[arg(long, allow_negative_numbers = true)]
    pub beta_end: Option<f64>,
    /// What the network predicts: epsilon, sample or v_prediction.
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// Variance of the reverse process used for sampling: fixed_small, fixed_large, ...
    #[arg(long)]
    pub variance_type: Option<String>,
    /// Images per optimizer step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Peak learning rate: the paper's 2e-4, except 1e-3 for the small MNIST presets (mnist-fast,
    /// mnist-small) so that a short CPU run converges.
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Linear learning-rate warm-up steps (the paper uses 5000); default min(5000, steps / 10).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Learning-rate schedule after the warm-up: constant (the paper's) or cosine (down to 0 at the
    /// last step).
    #[arg(long, value_enum, default_value = "constant")]
    pub lr_schedule: LrSchedule,
    /// Loss weighting over timesteps: none (the paper's L_simple) or min-snr (Hang et al. 2023)
    /// [default: min-snr for the MNIST presets, whose short CPU runs it makes better (see
    /// docs/quality.md), none otherwise].
    #[arg(long, value_enum)]
    pub loss_weighting: Option<Weighting>,
    /// The SNR cap gamma of --loss-weighting min-snr.
    #[arg(long, default_value_t = 5.0)]
    pub snr_gamma: f64,
    /// Clip the global gradient norm to this value (0 turns clipping off).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// AdamW weight decay.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Largest EMA decay; the decay warms up as min(decay, (1 + k) / (10 + k)).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.9999)]
    pub ema_decay: f64,
    /// Flip training images left-right at random (off for digits).
    #[arg(long, default_value_t = false)]
    pub random_flip: bool,
    /// Total optimizer steps (default 2100, about 14 minutes of mnist-fast on 2 AVX-512 CPU cores,
    /// or what --epochs gives).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Train for this many passes over the data instead of --steps.
    #[arg(long, allow_negative_numbers = true, conflicts_with = "steps")]
    pub epochs: Option<f64>,
    /// Stop after this many minutes of training (at the end of a step), saving a checkpoint and the
    /// sample grid as at the last step; --steps still sets the schedule.
    #[arg(long)]
    #[serde(skip)]
    pub minutes: Option<f64>,
    /// Seed of the weights, the data order and the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute dtype: f32, or bf16 for mixed precision on CUDA (f32 master weights, optimizer state
    /// and EMA; activations and products in bf16; the loss in f32), as PyTorch's autocast trains.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    #[serde(skip)]
    pub device: String,
    /// Output folder (default runs/PRESET).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Save a checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 200)]
    pub save_every: u64,
    /// Write a grid of EMA samples every N steps (0: only at the end).
    #[arg(long, default_value_t = 200)]
    pub sample_every: u64,
    /// Images in each sample grid.
    #[arg(long, default_value_t = 16)]
    pub num_samples: usize,
    /// DDIM steps for the sample grids.
    #[arg(long, default_value_t = 50)]
    pub sample_steps: usize,
    /// DDIM eta of the sample grids: 1 (the default) adds DDPM's noise at each step, which gives a
    /// short run's model much better samples than the deterministic 0 (docs/quality.md).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub sample_eta: f64,
    /// Keep only the newest N checkpoints (0 keeps all).
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    /// Continue from a checkpoint folder, or `auto` for the newest one under --out.
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<String>,
    /// Start a fresh run in an --out folder that holds another run, deleting that run's checkpoints,
    /// metrics.jsonl and sample grids (and nothing else).
    #[arg(long, conflicts_with = "resume")]
    #[serde(skip)]
    pub overwrite: bool,
}

/// The learning rate after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// The peak rate until the end (the DDPM paper's).
    Constant,
    /// A half cosine from the peak rate to 0 at the last step.
    Cosine,
}

/// The loss weighting over timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Weighting {
    /// L_simple: every timestep weighs 1.
    None,
    /// Min-SNR-gamma: w_t = min(snr_t, gamma) / snr_t for epsilon prediction.
    MinSnr,
}

/// Optimizer steps when neither --steps nor --epochs is given.
pub const DEFAULT_STEPS: u64 = 2100;

/// Whether the run uses one of the small MNIST presets (mnist-fast, mnist-small), whose short CPU runs
/// get a learning rate of 1e-3 and the min-SNR loss by default.
fn quick_cpu_preset(args: &TrainArgs) -> bool {
    args.unet_config.is_none() && matches!(args.preset.as_str(), "mnist-fast" | "mnist-small")
}

/// The loss weighting of a run: --loss-weighting, else min-SNR-gamma for the MNIST presets (the short
/// CPU runs that the README's main command makes: at 1500 steps of mnist-small its samples score FID 84
/// on the classifier features against L_simple's 103, docs/quality.md) and L_simple, the paper's, for
/// the rest.
pub fn loss_weighting_of(args: &TrainArgs) -> LossWeighting {
    weighting_of(args).loss(args.snr_gamma)
}

/// The weighting a fresh run chooses: --loss-weighting, else by preset (see [`loss_weighting_of`]).
fn weighting_of(args: &TrainArgs) -> Weighting {
    args.loss_weighting.unwrap_or(if quick_cpu_preset(args) { Weighting::MinSnr } else { Weighting::None })
}

impl Weighting {
    /// The loss weighting this names, min-SNR with the cap `gamma`.
    pub fn loss(self, gamma: f64) -> LossWeighting {
        match self {
            Weighting::None => LossWeighting::None,
            Weighting::MinSnr => LossWeighting::MinSnr { gamma },
        }
    }
}

/// The most images a sample grid may hold: the grid is sampled as one batch.
pub const MAX_GRID_SAMPLES: usize = 1024;

/// Checks every option that needs neither the data nor the model, before anything is read or written.
pub fn validate_options(args: &TrainArgs) -> Result<()> {
    let positive = |v: f64| v > 0.0 && v.is_finite();
    let non_negative = |v: f64| v >= 0.0 && v.is_finite();
    if args.batch_size == 0 {
        bail!("--batch-size 0: a batch needs at least one image");
    }
    if args.steps == Some(0) {
        bail!("--steps 0: nothing to train; give at least 1 (or --epochs)");
    }
    if let Some(e) = args.epochs.filter(|e| !positive(*e)) {
        bail!("--epochs {e}: must be a positive number of passes over the data");
    }
    if args.max_images == Some(0) {
        bail!("--max-images 0: training needs at least one image");
    }
    if let Some(lr) = args.lr.filter(|v| !positive(*v)) {
        bail!("--lr {lr}: the learning rate must be a positive number");
    }
    if !(0.0..=1.0).contains(&args.ema_decay) {
        bail!("--ema-decay {}: must be between 0 and 1 (the paper's is 0.9999)", args.ema_decay);
    }
    if !non_negative(args.grad_clip) {
        bail!("--grad-clip {}: must be a positive gradient norm, or 0 to turn clipping off", args.grad_clip);
    }
    if !non_negative(args.weight_decay) {
        bail!("--weight-decay {}: must be 0 or a positive number", args.weight_decay);
    }
    if !positive(args.snr_gamma) {
        bail!("--snr-gamma {}: must be a positive number (5 is the paper's)", args.snr_gamma);
    }
    if let Some(m) = args.minutes.filter(|m| !positive(*m)) {
        bail!("--minutes {m}: must be a positive number");
    }
    if args.sample_steps == 0 {
        bail!("--sample-steps 0: DDIM needs at least one step for the sample grids");
    }
    if !non_negative(args.sample_eta) {
        bail!("--sample-eta {}: must be 0 (deterministic DDIM) or a positive number (1 is DDPM-like)", args.sample_eta);
    }
    if args.num_samples > MAX_GRID_SAMPLES {
        bail!("--num-samples {}: a sample grid holds at most {MAX_GRID_SAMPLES} images (sampled as one batch); use `ddpm sample --num N` on the checkpoint for more", args.num_samples);
    }
    if args.dtype == "f16" {
        bail!("--dtype f16: f16 training would need loss scaling; train in bf16 (same speed, f32's range) or f32");
    }
    Ok(())
}

/// Everything fixed at the start of a run.
struct Setup {
    unet_config: UNetConfig,
    sched_config: SchedulerConfig,
    total_steps: u64,
    warmup: u64,
    out: PathBuf,
    lr: f64,
    /// The loss weighting (`weighting_of`, or the checkpoint's on resume).
    weighting: Weighting,
}

/// Reads the UNet config from --unet-config or the preset.
pub fn unet_config_from(args: &TrainArgs) -> Result<UNetConfig> {
    match &args.unet_config {
        Some(p) => Ok(UNetConfig::from_file(p)?),
        None => Ok(ddpm_unet::presets::preset(&args.preset)?),
    }
}

/// Builds the scheduler config: a file or diffusers' defaults, with the command-line fields on top.
pub fn scheduler_config_from(args: &TrainArgs) -> Result<SchedulerConfig> {
    let base = match &args.scheduler_config {
        Some(p) => SchedulerConfig::from_file(p)?,
        None => SchedulerConfig::default(),
    };
    let mut json = serde_json::to_value(&base)?;
    let obj = json.as_object_mut().context("scheduler config is not a JSON object")?;
    let mut set = |k: &str, v: serde_json::Value| {
        obj.insert(k.to_string(), v);
    };
    if let Some(v) = &args.beta_schedule {
        set("beta_schedule", v.clone().into());
    }
    if let Some(v) = args.num_train_timesteps {
        set("num_train_timesteps", v.into());
    }
    if let Some(v) = args.beta_start {
        set("beta_start", v.into());
    }
    if let Some(v) = args.beta_end {
        set("beta_end", v.into());
    }
    if let Some(v) = &args.prediction_type {
        set("prediction_type", v.clone().into());
    }
    if let Some(v) = &args.variance_type {
        set("variance_type", v.clone().into());
    }
    Ok(SchedulerConfig::from_json_value(&json)?)
}

/// Validates the options against the data and the model.
fn setup(args: &TrainArgs, set: &ImageSet) -> Result<Setup> {
    validate_options(args)?;
    let unet_config = unet_config_from(args)?;
    let sched_config = scheduler_config_from(args)?;
    let size = crate::model::sample_size(&unet_config)?;
    if set.height != size || set.width != size {
        bail!("dataset {} holds {}x{} images but the model's sample_size is {size}; pick a matching --preset or --unet-config", set.source, set.height, set.width);
    }
    if set.channels != unet_config.in_channels {
        bail!("dataset {} has {} channel(s) but the model's in_channels is {}", set.source, set.channels, unet_config.in_channels);
    }
    let div = unet_config.size_divisor();
    if size % div != 0 {
        bail!("image size {size} is not divisible by {div} (2^(levels-1)) as this UNet's down-sampling needs");
    }
    let batches_per_epoch = (set.len / args.batch_size) as u64;
    if batches_per_epoch == 0 {
        bail!("--batch-size {} is larger than the dataset ({} images)", args.batch_size, set.len);
    }
    let total_steps = match (args.steps, args.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => (e * batches_per_epoch as f64).ceil() as u64,
        (None, None) => DEFAULT_STEPS,
    };
    let warmup = args.warmup_steps.unwrap_or((total_steps / 10).min(5000));
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(&args.preset));
    let lr = args.lr.unwrap_or(if quick_cpu_preset(args) { 1e-3 } else { 2e-4 });
    if args.sample_steps > sched_config.num_train_timesteps {
        bail!("--sample-steps {}: more than the schedule's {} diffusion steps", args.sample_steps, sched_config.num_train_timesteps);
    }
    Ok(Setup { unet_config, sched_config, total_steps, warmup, out, lr, weighting: weighting_of(args) })
}

/// The indices of the batch at optimizer step `step` (0-based): epoch e = step / batches_per_epoch is a
/// permutation seeded by (seed, e), so the order is a function of the step and resuming replays it.
fn batch_indices(n: usize, batch: usize, seed: u64, step: u64, cache: &mut Option<(u64, Vec<usize>)>) -> Vec<usize> {
    let per_epoch = (n / batch) as u64;
    let (epoch, k) = (step / per_epoch, (step % per_epoch) as usize);
    if cache.as_ref().map(|c| c.0) != Some(epoch) {
        let mut rng = NoiseRng::new(seed ^ 0x5EED_DA7A ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        *cache = Some((epoch, data::permutation(n, &mut rng)));
    }
    let perm = &cache.as_ref().expect("set above").1;
    perm[k * batch..(k + 1) * batch].to_vec()
}

/// The state of a run in memory (the optimizer holds the model's variables).
struct Trainer {
    model: UNet2DModel,
    opt: AdamW,
    ema: Ema,
    rng: NoiseRng,
}

/// Compares a checkpoint's config with the current one, field by field.
fn check_same(what: &str, ckpt: &serde_json::Value, now: &serde_json::Value, dir: &Path) -> Result<()> {
    let (Some(a), Some(b)) = (ckpt.as_object(), now.as_object()) else { return Ok(()) };
    for (k, v) in b {
        if k.starts_with('_') {
            continue;
        }
        if a.get(k) != Some(v) {
            bail!(
                "{}: checkpoint from another config: {what} field `{k}` is {} there but {} now; resume with the same options or start a new --out",
                dir.display(),
                a.get(k).map(|x| x.to_string()).unwrap_or("missing".into()),
                v
            );
        }
    }
    Ok(())
}

/// Options that fix which images each step sees and the random draws of a run: resuming with another
/// value would not continue the same run, so it is refused.
const SAME_RUN_OPTIONS: &[&str] = &["data", "max_images", "batch_size", "seed", "random_flip"];

/// Options that a resume may change, with a note: the run goes on with the new value, but it no longer
/// matches an uninterrupted run. `--lr` and `--warmup-steps` given on the command line count here too
/// (left out, the checkpoint's are kept).
const CHANGEABLE_OPTIONS: &[&str] = &["grad_clip", "weight_decay", "ema_decay", "dtype", "lr", "warmup_steps", "lr_schedule", "loss_weighting", "snr_gamma"];

/// Compares the command line with the options a checkpoint was trained with: refuses a change of
/// [`SAME_RUN_OPTIONS`] naming the option, and notes each change of [`CHANGEABLE_OPTIONS`]. Options
/// that a checkpoint does not hold (older formats) are not compared.
fn check_run_options(saved: &serde_json::Value, args: &TrainArgs, dir: &Path) -> Result<()> {
    let now = serde_json::to_value(args)?;
    let flag = |k: &str| format!("--{}", k.replace('_', "-"));
    let shown = |v: Option<&serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => "unset".to_string(),
        Some(v) => v.to_string(),
    };
    for k in SAME_RUN_OPTIONS {
        let Some(before) = saved.get(*k) else { continue };
        if now.get(*k) != Some(before) {
            bail!(
                "{}: trained with {} {} but {} now: another value changes which images and noise each step draws, so it would not continue the same run; resume with the same value or start a new --out",
                dir.display(),
                flag(k),
                shown(Some(before)),
                shown(now.get(*k))
            );
        }
    }
    for k in CHANGEABLE_OPTIONS {
        let (Some(before), Some(after)) = (saved.get(*k), now.get(*k)) else { continue };
        if after.is_null() || before == after {
            continue;
        }
        eprintln!("note: {} is {} now, {} in {}: the run continues with the new value (no longer the same as an uninterrupted run)", flag(k), shown(Some(after)), shown(Some(before)), dir.display());
    }
    Ok(())
}

/// The options saved in a checkpoint: the command line plus the values derived from it (the warm-up
/// length and learning rate actually used), so that a resume with other `--steps` keeps them.
fn options_json(args: &TrainArgs, s: &Setup) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(args)?;
    if let Some(o) = v.as_object_mut() {
        o.insert("resolved_warmup_steps".into(), s.warmup.into());
        o.insert("resolved_lr".into(), s.lr.into());
        o.insert("resolved_loss_weighting".into(), serde_json::to_value(s.weighting)?);
    }
    Ok(v)
}

/// On resume, keeps the warm-up length, learning rate and loss weighting the checkpoint was trained
/// with unless the command line sets them: their defaults depend on other options (the warm-up on `--steps`), and a
/// resume that changes `--steps` must not change the learning-rate schedule of the steps already run.
fn keep_schedule_of(saved: &serde_json::Value, args: &TrainArgs, s: &mut Setup) {
    if args.warmup_steps.is_none() {
        if let Some(w) = saved.get("resolved_warmup_steps").and_then(|v| v.as_u64()) {
            s.warmup = w;
        }
    }
    if args.lr.is_none() {
        if let Some(lr) = saved.get("resolved_lr").and_then(|v| v.as_f64()) {
            s.lr = lr;
        }
    }
    // the weighting the run started with; a checkpoint older than the option trained L_simple
    if args.loss_weighting.is_none() {
        s.weighting = saved.get("resolved_loss_weighting").and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or(Weighting::None);
    }
}

/// Runs `ddpm train`.
pub fn run(args: TrainArgs) -> Result<()> {
    run_with_hook(args, &|_| Ok(()))
}

/// Runs `ddpm train`; `before_write` is called before each checkpoint file is written (tests inject
/// faults there). The steps: set-up (`setup`, `Trainer::new`), resume (`Trainer::resume`), then per
/// optimizer step `Trainer::step`, `log_step`, `save_checkpoint` and `write_samples`.
pub fn run_with_hook(args: TrainArgs, before_write: &dyn Fn(&str) -> Result<()>) -> Result<()> {
    validate_options(&args)?;
    let device = parse_device(&args.device)?;
    let cfg = unet_config_from(&args)?;
    let mut set = data::load(&args.data, Split::Train, crate::model::sample_size(&cfg)?, cfg.in_channels)?;
    if let Some(n) = args.max_images {
        set.truncate(n);
    }
    let mut s = setup(&args, &set)?;
    let schedule = NoiseSchedule::new(&s.sched_config, &device)?;
    let run_dir = RunDir::new(&s.out);
    let ckpt_dir = run_dir.checkpoints();
    let samples_dir = run_dir.samples();
    if args.resume.is_none() {
        run_dir.prepare_fresh(args.overwrite)?;
    }
    std::fs::create_dir_all(&samples_dir).with_context(|| format!("{}: cannot create folder", samples_dir.display()))?;

    let mut tr = Trainer::new(&args, &s, &device)?;
    let mut step = match &args.resume {
        Some(r) => tr.resume(r, &ckpt_dir, &args, &mut s, &device)?,
        None => 0,
    };
    eprintln!(
        "training {} ({} parameters) on {} images from {} for {} steps, batch {}, on {}",
        if args.unet_config.is_some() { "custom UNet" } else { args.preset.as_str() },
        tr.opt.vars().iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        set.len,
        set.source,
        s.total_steps,
        args.batch_size,
        device_name(&device)
    );
    // a resumed run continues the folder's metrics from its checkpoint's step (the steps logged after
    // that checkpoint by a killed run are cut, to be logged again); a fresh one starts them over
    if step > 0 {
        run_dir.truncate_metrics(step)?;
    }
    let mut metrics = run_dir.open_metrics(step > 0)?;
    let bar = progress::bar(s.total_steps, "train");
    bar.set_position(step);
    let mut order_cache = None;
    let mut last_saved: Option<PathBuf> = checkpoint::list(&ckpt_dir).pop().map(|x| x.1);
    let t_start = Instant::now();
    let start_step = step;
    let mut log = StepLog::default();
    while step < s.total_steps {
        let idx = batch_indices(set.len, args.batch_size, args.seed, step, &mut order_cache);
        let stats = tr.step(&set, &idx, &schedule, &args, &s, step, &device)?;
        step += 1;
        log.push(stats, ((step - start_step) as usize * args.batch_size) as f64 / t_start.elapsed().as_secs_f64());
        bar.set_position(step);
        let out_of_time = args.minutes.is_some_and(|m| t_start.elapsed().as_secs_f64() >= m * 60.0);
        let last = step == s.total_steps || out_of_time;
        let save = last || (args.save_every > 0 && step.is_multiple_of(args.save_every));
        let sample = args.num_samples > 0 && (last || (args.sample_every > 0 && step.is_multiple_of(args.sample_every)));
        // the losses are read from the device every READ_EVERY steps, and before anything is written
        // from the weights, so that a non-finite loss never reaches a checkpoint or a grid
        if log.len() >= READ_EVERY || save || sample {
            if let Some(Diverged { step: bad_step, what, value }) = log.flush(&mut metrics, &bar)? {
                bail!(
                    "{what} is {value} at step {bad_step}; lower --lr (now {}) or raise --warmup-steps; the last good checkpoint is {}",
                    s.lr,
                    last_saved.as_ref().map(|p| p.display().to_string()).unwrap_or("none (nothing saved yet)".into())
                );
            }
        }
        if save {
            last_saved = Some(save_checkpoint(&tr, &ckpt_dir, &args, &s, step, before_write)?);
        }
        if sample {
            let path = write_samples(&tr, &samples_dir, &args, &s, step, &device)?;
            bar.println(format!("step {step}: wrote {}", path.display()));
        }
        if out_of_time && step < s.total_steps {
            bar.println(format!("--minutes {}: time is up at step {step} of {}; continue with --resume auto", args.minutes.unwrap_or_default(), s.total_steps));
            break;
        }
    }
    bar.finish();
    eprintln!(
        "done: {} steps in {:.1} s; model at {}",
        step - start_step,
        t_start.elapsed().as_secs_f64(),
        last_saved.map(|p| p.join(checkpoint::MODEL_DIR).display().to_string()).unwrap_or_default()
    );
    Ok(())
}

/// Optimizer steps whose losses and gradient norms stay on the device before they are read together:
/// one wait for the device per this many steps instead of one per step.
const READ_EVERY: usize = 16;

/// What one optimizer step measured; the loss and the norm stay on the device until [`StepLog::flush`].
struct StepStats {
    /// The step's number, counted from 1.
    step: u64,
    /// The batch's loss before the update (a detached device scalar).
    loss: Tensor,
    /// The learning rate of the update (after warm-up).
    lr: f64,
    /// The gradient's global L2 norm before clipping (a detached device scalar).
    grad_norm: Tensor,
}

/// The first step whose figures are not finite.
struct Diverged {
    /// Its number, counted from 1.
    step: u64,
    /// "loss" or "the gradient norm".
    what: &'static str,
    /// The value (NaN or an infinity).
    value: f64,
}

/// The steps not yet read from the device, each with the training images per second since the run
/// (or the resume) started.
#[derive(Default)]
struct StepLog {
    pending: Vec<(StepStats, f64)>,
}

impl StepLog {
    /// Queues one step's figures and the speed measured after it.
    fn push(&mut self, stats: StepStats, images_per_s: f64) {
        self.pending.push((stats, images_per_s));
    }

    /// Steps queued.
    fn len(&self) -> usize {
        self.pending.len()
    }

    /// Reads the queued losses and norms from the device (two waits), appends a `metrics.jsonl` line
    /// per step and shows the newest on the progress bar. Stops at the first step whose loss or
    /// gradient norm is not finite (its update has made or may make the weights non-finite) and says
    /// which; that step's line and the later ones are not written.
    fn flush(&mut self, metrics: &mut std::fs::File, bar: &indicatif::ProgressBar) -> Result<Option<Diverged>> {
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return Ok(None);
        }
        // one stacked read per figure; the norm is f32 on Metal and f64 elsewhere
        let read = |ts: Vec<Tensor>| -> Result<Tensor> { Ok(Tensor::stack(&ts, 0)?.to_device(&candle_core::Device::Cpu)?) };
        let losses = read(pending.iter().map(|(p, _)| p.loss.clone()).collect())?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let norms = read(pending.iter().map(|(p, _)| p.grad_norm.clone()).collect())?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for (((p, images_per_s), loss), grad_norm) in pending.iter().zip(losses).zip(norms) {
            if !loss.is_finite() {
                return Ok(Some(Diverged { step: p.step, what: "loss", value: loss.into() }));
            }
            if !grad_norm.is_finite() {
                return Ok(Some(Diverged { step: p.step, what: "the gradient norm", value: grad_norm }));
            }
            let line = serde_json::json!({"step": p.step, "loss": loss, "lr": p.lr, "grad_norm": grad_norm, "images_per_s": (images_per_s * 100.0).round() / 100.0});
            writeln!(metrics, "{line}")?;
            bar.set_message(format!("loss {loss:.4}  {images_per_s:.1} img/s"));
        }
        Ok(None)
    }
}

impl Trainer {
    /// A fresh run's state: the model on a variable map with seeded initial weights, AdamW over its
    /// variables, the EMA starting at the initial weights, and the noise source seeded by `--seed`.
    fn new(args: &TrainArgs, s: &Setup, device: &candle_core::Device) -> Result<Self> {
        let varmap = VarMap::new();
        // f32 master weights; with --dtype bf16 the activations and products run in bf16
        let compute = crate::device::parse_dtype(&args.dtype, device)?;
        let model = UNet2DModel::new_trainable(&s.unet_config, &varmap, DType::F32, device)?.with_compute_dtype(compute);
        let mut rng = NoiseRng::new(args.seed);
        init::seeded_init(&varmap, &mut rng)?;
        let params = AdamWParams { lr: s.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: args.weight_decay, max_grad_norm: Some(args.grad_clip) };
        let opt = AdamW::from_varmap(&varmap, params)?;
        let ema = Ema::new(opt.vars())?;
        Ok(Trainer { model, opt, ema, rng })
    }

    /// Restores the checkpoint that `--resume` names (`auto`: the latest under `ckpt_dir`, if any)
    /// after checking that it was trained with the same configs, and returns its step (0 when there is
    /// nothing to resume). The warm-up and learning rate it was trained with are kept in `s`.
    fn resume(&mut self, resume: &str, ckpt_dir: &Path, args: &TrainArgs, s: &mut Setup, device: &candle_core::Device) -> Result<u64> {
        let dir = if resume == "auto" {
            match checkpoint::list(ckpt_dir).pop() {
                Some((_, d)) => d,
                None => {
                    eprintln!("--resume auto: no checkpoint under {}, starting from scratch", ckpt_dir.display());
                    return Ok(0);
                }
            }
        } else {
            PathBuf::from(resume)
        };
        let ck = checkpoint::load(&dir, device)?;
        check_same("UNet config", &ck.model_config, &s.unet_config.to_json_value(), &dir)?;
        check_same("scheduler config", &ck.scheduler_config, &serde_json::to_value(&s.sched_config)?, &dir)?;
        check_run_options(&ck.options, args, &dir)?;
        // raw weights, AdamW moments and step, EMA, noise generator
        self.rng = ck.restore(&mut self.opt, &mut self.ema, &dir.display().to_string())?;
        keep_schedule_of(&ck.options, args, s);
        eprintln!("resumed from {} at step {}", dir.display(), ck.step);
        Ok(ck.step)
    }

    /// Optimizer step `step + 1` on the images `idx` of `set` (flipped at random with
    /// `--random-flip`): x_t = q_sample(x_0, t, eps) at random t, L_simple on the network's
    /// training forward (dropout), AdamW with warm-up and clipping, then the EMA update.
    #[allow(clippy::too_many_arguments)]
    fn step(&mut self, set: &ImageSet, idx: &[usize], schedule: &NoiseSchedule, args: &TrainArgs, s: &Setup, step: u64, device: &candle_core::Device) -> Result<StepStats> {
        let flips: Vec<bool> = (0..idx.len()).map(|_| args.random_flip && self.rng.uniform() < 0.5).collect();
        let x0 = set.batch(idx, &flips, device)?;
        // the timesteps on the host too: their coefficients need no read back from the device
        let (ts, t) = self.rng.timesteps(idx.len(), s.sched_config.num_train_timesteps, device)?;
        let noise = self.rng.randn(x0.shape(), DType::F32, device)?;
        let x_t = schedule.q_sample_at(&x0, &ts, &noise)?;
        let pred = self.model.forward_train(&x_t, &t, &mut self.rng)?;
        let loss = ddpm_core::loss::simple_loss_at(schedule, s.weighting.loss(args.snr_gamma), &pred, &x0, &noise, &ts)?;
        let grads = loss.backward()?;
        let lr = match args.lr_schedule {
            LrSchedule::Constant => warmup_lr(s.lr, step + 1, s.warmup),
            LrSchedule::Cosine => warmup_cosine_lr(s.lr, step + 1, s.warmup, s.total_steps),
        };
        self.opt.set_learning_rate(lr);
        // global-norm clipping to --grad-clip, then the AdamW step, all on the device (no wait)
        let grad_norm = self.opt.step_clipped(&grads)?;
        self.ema.update(self.opt.vars(), ema_decay(args.ema_decay, step + 1))?;
        // detached: a kept loss must not keep the step's graph (its activations) alive
        Ok(StepStats { step: step + 1, loss: loss.detach(), lr, grad_norm })
    }
}

/// Writes the checkpoint of step `step` under `ckpt_dir` (a temporary name, then renamed), prunes the
/// older ones to `--keep-last`, and returns its folder.
fn save_checkpoint(tr: &Trainer, ckpt_dir: &Path, args: &TrainArgs, s: &Setup, step: u64, before_write: &dyn Fn(&str) -> Result<()>) -> Result<PathBuf> {
    let ck = Checkpoint::of_run(&tr.opt, &tr.ema, &tr.rng, s.unet_config.to_json_value(), serde_json::to_value(&s.sched_config)?, options_json(args, s)?);
    debug_assert_eq!(ck.step, step);
    // the CLI's hook speaks anyhow; the library's takes its own error, an I/O error of that file
    let hook = |name: &str| before_write(name).map_err(|e| ddpm_core::Error::Io { path: name.to_string(), source: std::io::Error::other(format!("{e:#}")) });
    let dir = checkpoint::save_with_hook(ckpt_dir, &ck, &hook)?;
    checkpoint::prune(ckpt_dir, args.keep_last)?;
    Ok(dir)
}

/// Samples `--num-samples` images from the EMA weights with DDIM (`--sample-steps`, `--sample-eta`,
/// seeded by `--seed`) and writes their grid as `samples/step-NNNNNN.png`; returns its path.
fn write_samples(tr: &Trainer, samples_dir: &Path, args: &TrainArgs, s: &Setup, step: u64, device: &candle_core::Device) -> Result<PathBuf> {
    let ema_model = UNet2DModel::new(&s.unet_config, VarBuilder::from_tensors(tr.ema.state(), DType::F32, device))?;
    let size = crate::model::sample_size(&s.unet_config)?;
    let shape = (args.num_samples, s.unet_config.in_channels, size, size);
    let grid = generate::ddim_grid(&ema_model, &s.sched_config, shape, args.sample_steps, args.sample_eta, args.seed, device)?;
    let path = samples_dir.join(format!("step-{step:06}.png"));
    imageio::save_grid(&grid, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> TrainArgs {
        match crate::Cli::try_parse_from(["ddpm", "train"].iter().chain(extra)).unwrap() {
            crate::Cli::Train(a) => *a,
            _ => unreachable!("a train command"),
        }
    }

    #[test]
    fn mnist_presets_default_to_min_snr_and_a_resume_keeps_the_runs_weighting() {
        let min_snr = LossWeighting::MinSnr { gamma: 5.0 };
        assert_eq!(loss_weighting_of(&args(&[])), min_snr);
        assert_eq!(loss_weighting_of(&args(&["--preset", "mnist-small"])), min_snr);
        assert_eq!(loss_weighting_of(&args(&["--preset", "ddpm-cifar10"])), LossWeighting::None);
        assert_eq!(loss_weighting_of(&args(&["--loss-weighting", "none"])), LossWeighting::None);
        let a = args(&[]);
        let fresh = || Setup {
            unet_config: ddpm_unet::presets::preset("mnist-fast").unwrap(),
            sched_config: SchedulerConfig::default(),
            total_steps: 2100,
            warmup: 210,
            out: PathBuf::from("runs/x"),
            lr: 1e-3,
            weighting: weighting_of(&a),
        };
        // the options a new checkpoint saves bring the weighting back
        let mut s = fresh();
        let saved = options_json(&a, &s).unwrap();
        keep_schedule_of(&saved, &a, &mut s);
        assert_eq!(s.weighting.loss(5.0), min_snr);
        // a checkpoint older than the option trained L_simple, and goes on with it
        let mut old = saved.clone();
        old.as_object_mut().unwrap().remove("resolved_loss_weighting");
        keep_schedule_of(&old, &a, &mut s);
        assert_eq!(s.weighting.loss(5.0), LossWeighting::None);
        // unless the command line names one
        let named = args(&["--loss-weighting", "min-snr"]);
        let mut s = fresh();
        keep_schedule_of(&old, &named, &mut s);
        assert_eq!(s.weighting.loss(5.0), min_snr);
    }
}
