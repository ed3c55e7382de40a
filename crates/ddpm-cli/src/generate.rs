//! Running the reverse process for the commands: choosing a sampler, generating batches, and denoising
//! from an intermediate step (interpolation).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Shape, Tensor};
use ddpm_core::ddpm::{DdpmScheduler, StepOutput};
use ddpm_core::sampling::{self, Sampler, Scheduler};
use ddpm_core::{NoisePredictor, NoiseRng, NoiseSchedule, SchedulerClass, SchedulerConfig};

/// The sampler a command uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SamplerKind {
    /// Ancestral sampling of the DDPM paper (all T steps by default).
    Ddpm,
    /// DDIM (50 steps by default), deterministic with eta 0.
    Ddim,
    /// DPM-Solver++ multistep (20 steps by default, second order), diffusers'
    /// DPMSolverMultistepScheduler.
    DpmSolver,
}

/// The sampler options that `sample` and `eval --metric fid` share.
#[derive(Debug, Clone, clap::Args)]
pub struct SamplerArgs {
    /// ddpm (ancestral sampling), ddim or dpm-solver (DPM-Solver++) [default: the scheduler class
    /// named in the model's scheduler_config.json, DDPM without one].
    #[arg(long, value_enum)]
    pub scheduler: Option<SamplerKind>,
    /// Denoising steps (default: all training steps for DDPM, 50 for DDIM, 20 for DPM-Solver).
    #[arg(long)]
    pub steps: Option<usize>,
    /// DDIM eta: 0 is deterministic, 1 is DDPM-like noise.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
}

impl SamplerArgs {
    /// The sampler these options choose for a model's scheduler config ([`make_sampler`]).
    pub fn sampler(&self, config: &SchedulerConfig, device: &Device) -> Result<Sampler> {
        make_sampler(self.scheduler, config, self.steps, self.eta, device)
    }
}

impl From<SamplerKind> for SchedulerClass {
    fn from(kind: SamplerKind) -> Self {
        match kind {
            SamplerKind::Ddpm => SchedulerClass::Ddpm,
            SamplerKind::Ddim => SchedulerClass::Ddim,
            SamplerKind::DpmSolver => SchedulerClass::DpmSolverMultistep,
        }
    }
}

/// Builds the sampler of `kind`, or when `None` the class the config names (its `_class_name`), from
/// every field of the config: DDPM with `steps` (default all training steps), DDIM with `steps`
/// (default 50) and `eta`, or DPM-Solver++ with `steps` (default 20).
pub fn make_sampler(kind: Option<SamplerKind>, config: &SchedulerConfig, steps: Option<usize>, eta: f64, device: &Device) -> Result<Sampler> {
    if steps == Some(0) {
        bail!("--steps 0: sampling needs at least one denoising step");
    }
    if let Some(n) = steps.filter(|&n| n > config.num_train_timesteps) {
        bail!("--steps {n}: the model was trained with {} diffusion steps; use at most that many", config.num_train_timesteps);
    }
    let class = kind.map_or(config.class_name, SchedulerClass::from);
    let mut sampler = Sampler::from_config(&SchedulerConfig { class_name: class, ..config.clone() }, device)?;
    match &mut sampler {
        Sampler::Ddim(d) => {
            d.set_eta(eta)?;
            d.set_timesteps(steps.unwrap_or(50))?;
        }
        Sampler::DpmSolver(d) => d.set_timesteps(steps.unwrap_or(20))?,
        other => {
            if let Some(n) = steps {
                other.set_timesteps(n)?;
            }
        }
    }
    Ok(sampler)
}

/// Generates one batch of `shape` from noise drawn from `rng`; `on_step(i, x)` sees the sample after
/// each step i (progress, animation frames) and may fail.
pub fn generate<P: NoisePredictor + ?Sized>(
    model: &P,
    sampler: &Sampler,
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
    rng: &mut NoiseRng,
    mut on_step: impl FnMut(usize, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    let mut failure = None;
    let x = sampling::sample_from_shape(model, sampler, shape, dtype, device, rng, |i, _t, x| {
        if failure.is_none() {
            if let Err(e) = on_step(i, x) {
                failure = Some(e);
            }
        }
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok(x),
    }
}

/// A grid's worth of DDIM samples (`steps` steps with `eta`) from a fixed seed, so that the grids of
/// one training run are comparable step to step (with eta > 0 the noise added at each step is drawn
/// from the same seeded source).
pub fn ddim_grid<P: NoisePredictor + ?Sized>(
    model: &P,
    config: &SchedulerConfig,
    shape: impl Into<Shape>,
    steps: usize,
    eta: f64,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    let sampler = make_sampler(Some(SamplerKind::Ddim), config, Some(steps.min(config.num_train_timesteps)), eta, device)?;
    generate(model, &sampler, shape, DType::F32, device, &mut NoiseRng::new(seed), |_, _| Ok(()))
}

/// The ancestral sampler restricted to the timesteps t_start, t_start - 1, ..., 0.
struct FromStep {
    inner: DdpmScheduler,
    timesteps: Vec<usize>,
}

impl Scheduler for FromStep {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }
    fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: Option<&Tensor>) -> ddpm_core::Result<StepOutput> {
        self.inner.step(model_output, t, sample, noise)
    }
    fn step_with_rng(&self, model_output: &Tensor, t: usize, sample: &Tensor, rng: &mut NoiseRng) -> ddpm_core::Result<StepOutput> {
        self.inner.step_with_rng(model_output, t, sample, rng)
    }
    fn schedule(&self) -> &NoiseSchedule {
        self.inner.schedule()
    }
}

/// Denoises `x_t` (already at step `t_start`) down to x_0 with every ancestral step t_start, ..., 0.
pub fn denoise_from<P: NoisePredictor + ?Sized>(
    model: &P,
    config: &SchedulerConfig,
    x_t: Tensor,
    t_start: usize,
    rng: &mut NoiseRng,
    mut on_step: impl FnMut(),
) -> Result<Tensor> {
    let inner = DdpmScheduler::new(config, x_t.device())?;
    let sched = FromStep { inner, timesteps: (0..=t_start).rev().collect() };
    Ok(sampling::sample(model, &sched, x_t, rng, |_, _, _| on_step())?)
}
