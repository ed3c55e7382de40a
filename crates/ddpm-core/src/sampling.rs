//! The full reverse process: from pure noise x_T to a sample x_0 with a [`NoisePredictor`].

use candle_core::{DType, Device, Shape, Tensor};

use crate::config::{SchedulerClass, SchedulerConfig};
use crate::ddim::DdimScheduler;
use crate::ddpm::{DdpmScheduler, StepOutput, StepPrecision};
use crate::dpm_solver::DpmSolverMultistepScheduler;
use crate::error::{Error, Result};
use crate::predictor::NoisePredictor;
use crate::rng::NoiseRng;
use crate::schedule::NoiseSchedule;

/// A reverse-process scheduler that a sampling loop can drive.
///
/// `step` takes `&self`: DDPM and DDIM keep no state between steps, and a multistep scheduler
/// ([`DpmSolverMultistepScheduler`]) keeps its history of model outputs behind a lock inside
/// itself, so that one scheduler is shared by reference by the loop, the pipeline and the CLI.
/// Such a scheduler's steps must follow [`Scheduler::timesteps`] in order; [`Scheduler::reset`]
/// starts a new run.
pub trait Scheduler {
    /// The timesteps to visit, in order (descending).
    fn timesteps(&self) -> &[usize];
    /// One reverse step from timestep `t`, with injected standard-normal `noise` where the step
    /// needs it. A multistep scheduler also uses (and records) the outputs of the run's previous steps.
    fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<StepOutput>;
    /// One reverse step from timestep `t`, drawing the noise it needs from `rng`.
    fn step_with_rng(&self, model_output: &Tensor, t: usize, sample: &Tensor, rng: &mut NoiseRng) -> Result<StepOutput>;
    /// The noise schedule.
    fn schedule(&self) -> &NoiseSchedule;
    /// The standard deviation of the initial noise x_T (1 for DDPM, DDIM and DPM-Solver).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Starts a new sampling run: forgets the state a multistep scheduler keeps between steps
    /// (DPM-Solver's last model outputs). [`sample`] calls it before the first step; a scheduler
    /// without state keeps this default, which does nothing, and a wrapper forwards it.
    fn reset(&self) {}
}

impl Scheduler for DdpmScheduler {
    fn timesteps(&self) -> &[usize] {
        DdpmScheduler::timesteps(self)
    }
    fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<StepOutput> {
        DdpmScheduler::step(self, model_output, t, sample, noise)
    }
    fn step_with_rng(&self, model_output: &Tensor, t: usize, sample: &Tensor, rng: &mut NoiseRng) -> Result<StepOutput> {
        DdpmScheduler::step_with_rng(self, model_output, t, sample, rng)
    }
    fn schedule(&self) -> &NoiseSchedule {
        DdpmScheduler::schedule(self)
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn timesteps(&self) -> &[usize] {
        DpmSolverMultistepScheduler::timesteps(self)
    }
    fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<StepOutput> {
        DpmSolverMultistepScheduler::step(self, model_output, t, sample, noise)
    }
    fn step_with_rng(&self, model_output: &Tensor, t: usize, sample: &Tensor, rng: &mut NoiseRng) -> Result<StepOutput> {
        DpmSolverMultistepScheduler::step_with_rng(self, model_output, t, sample, rng)
    }
    fn schedule(&self) -> &NoiseSchedule {
        DpmSolverMultistepScheduler::schedule(self)
    }
    fn reset(&self) {
        DpmSolverMultistepScheduler::reset(self)
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[usize] {
        DdimScheduler::timesteps(self)
    }
    fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<StepOutput> {
        DdimScheduler::step(self, model_output, t, sample, noise)
    }
    fn step_with_rng(&self, model_output: &Tensor, t: usize, sample: &Tensor, rng: &mut NoiseRng) -> Result<StepOutput> {
        DdimScheduler::step_with_rng(self, model_output, t, sample, rng)
    }
    fn schedule(&self) -> &NoiseSchedule {
        DdimScheduler::schedule(self)
    }
}

/// Every implemented scheduler behind one type, for code that picks one at run time: from a
/// `scheduler_config.json` by its `_class_name` ([`Sampler::from_config`]) or by a flag
/// (`--scheduler ddpm|ddim`). It implements [`Scheduler`], so generic code swaps samplers without
/// naming the concrete type.
///
/// Non-exhaustive: further diffusers classes (UniPCMultistepScheduler, ...) become variants.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Sampler {
    /// Ancestral DDPM sampling.
    Ddpm(DdpmScheduler),
    /// DDIM sampling with eta.
    Ddim(DdimScheduler),
    /// DPM-Solver(++) multistep sampling.
    DpmSolver(DpmSolverMultistepScheduler),
}

impl Sampler {
    /// The scheduler of the class that `config.class_name` names, built from every field of the
    /// config, as diffusers' `SchedulerMixin.from_pretrained` builds it: DDPM, DDIM (eta 0; set it
    /// with [`DdimScheduler::set_eta`] through [`Sampler::Ddim`]) or DPM-Solver, visiting all T
    /// training timesteps until [`Sampler::set_timesteps`].
    ///
    /// ```
    /// # fn main() -> ddpm_core::Result<()> {
    /// use ddpm_core::{Sampler, Scheduler, SchedulerConfig};
    /// let config = SchedulerConfig::from_json_str(
    ///     r#"{"_class_name": "DDIMScheduler", "set_alpha_to_one": false, "steps_offset": 1}"#,
    /// )?;
    /// let mut sampler = Sampler::from_config(&config, &candle_core::Device::Cpu)?;
    /// sampler.set_timesteps(10)?;
    /// assert_eq!(sampler.timesteps()[..3], [901, 801, 701]);
    /// # Ok(()) }
    /// ```
    pub fn from_config(config: &SchedulerConfig, device: &Device) -> Result<Self> {
        Ok(match config.class_name {
            SchedulerClass::Ddpm => Sampler::Ddpm(DdpmScheduler::new(config, device)?),
            SchedulerClass::Ddim => Sampler::Ddim(DdimScheduler::new(config, device)?),
            SchedulerClass::DpmSolverMultistep => Sampler::DpmSolver(DpmSolverMultistepScheduler::new(config, device)?),
        })
    }

    /// Samples with `n` inference steps, spaced as the config's `timestep_spacing` and
    /// `steps_offset` say.
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        match self {
            Sampler::Ddpm(s) => s.set_timesteps(n),
            Sampler::Ddim(s) => s.set_timesteps(n),
            Sampler::DpmSolver(s) => s.set_timesteps(n),
        }
    }

    /// Chooses how the step's scalar coefficients are computed (default [`StepPrecision::F64`];
    /// [`StepPrecision::DiffusersF32`] reproduces diffusers' float32 numbers).
    pub fn with_precision(self, precision: StepPrecision) -> Self {
        match self {
            Sampler::Ddpm(s) => Sampler::Ddpm(s.with_precision(precision)),
            Sampler::Ddim(s) => Sampler::Ddim(s.with_precision(precision)),
            Sampler::DpmSolver(s) => Sampler::DpmSolver(s.with_precision(precision)),
        }
    }

    /// The class of the scheduler (what `_class_name` it saves as).
    pub fn class_name(&self) -> SchedulerClass {
        match self {
            Sampler::Ddpm(_) => SchedulerClass::Ddpm,
            Sampler::Ddim(_) => SchedulerClass::Ddim,
            Sampler::DpmSolver(_) => SchedulerClass::DpmSolverMultistep,
        }
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &SchedulerConfig {
        self.inner().schedule().config()
    }

    /// A DDPM sampler for `config` with `steps` inference steps (`None`: all T), whatever class the
    /// config names.
    pub fn ddpm(config: &SchedulerConfig, steps: Option<usize>, device: &Device) -> Result<Self> {
        let mut s = DdpmScheduler::new(config, device)?;
        if let Some(n) = steps {
            s.set_timesteps(n)?;
        }
        Ok(Sampler::Ddpm(s))
    }

    /// A DDIM sampler for `config` with `steps` inference steps and the given eta, whatever class
    /// the config names (its `set_alpha_to_one` is used either way).
    pub fn ddim(config: &SchedulerConfig, steps: usize, eta: f64, device: &Device) -> Result<Self> {
        let mut s = DdimScheduler::new(config, device)?.with_eta(eta)?;
        s.set_timesteps(steps)?;
        Ok(Sampler::Ddim(s))
    }

    fn inner(&self) -> &dyn Scheduler {
        match self {
            Sampler::Ddpm(s) => s,
            Sampler::Ddim(s) => s,
            Sampler::DpmSolver(s) => s,
        }
    }
}

impl From<DdpmScheduler> for Sampler {
    fn from(s: DdpmScheduler) -> Self {
        Sampler::Ddpm(s)
    }
}

impl From<DdimScheduler> for Sampler {
    fn from(s: DdimScheduler) -> Self {
        Sampler::Ddim(s)
    }
}

impl From<DpmSolverMultistepScheduler> for Sampler {
    fn from(s: DpmSolverMultistepScheduler) -> Self {
        Sampler::DpmSolver(s)
    }
}

impl Scheduler for Sampler {
    fn timesteps(&self) -> &[usize] {
        self.inner().timesteps()
    }
    fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<StepOutput> {
        self.inner().step(model_output, t, sample, noise)
    }
    fn step_with_rng(&self, model_output: &Tensor, t: usize, sample: &Tensor, rng: &mut NoiseRng) -> Result<StepOutput> {
        self.inner().step_with_rng(model_output, t, sample, rng)
    }
    fn schedule(&self) -> &NoiseSchedule {
        self.inner().schedule()
    }
    fn init_noise_sigma(&self) -> f64 {
        self.inner().init_noise_sigma()
    }
    fn reset(&self) {
        self.inner().reset()
    }
}

/// Runs the reverse process from `x_t` (the noise x_T, shape (N, C, H, W)) through every timestep
/// of `scheduler`, and returns the final sample. For each timestep t the predictor gets x_t and a
/// tensor of N copies of t (i64, on x_t's device); the step's noise comes from `rng`. The
/// scheduler is [`Scheduler::reset`] first, so that a multistep scheduler starts a new run.
/// After each step `callback(step_index, t, &x_prev)` sees the new sample (e.g. to record an
/// animation). No gradient graph is kept: each model output and sample is detached.
pub fn sample<P, S>(
    predictor: &P,
    scheduler: &S,
    x_t: Tensor,
    rng: &mut NoiseRng,
    mut callback: impl FnMut(usize, usize, &Tensor),
) -> Result<Tensor>
where
    P: NoisePredictor + ?Sized,
    S: Scheduler + ?Sized,
{
    if x_t.rank() == 0 {
        return Err(Error::arg("the initial noise must have a batch dimension"));
    }
    let n = x_t.dim(0)?;
    let device = x_t.device().clone();
    let mut x = x_t.detach();
    scheduler.reset();
    for (i, &t) in scheduler.timesteps().iter().enumerate() {
        let t_tensor = Tensor::full(t as i64, n, &device)?;
        let out = predictor.predict(&x, &t_tensor)?.detach();
        let step = scheduler.step_with_rng(&out, t, &x, rng)?;
        x = step.prev_sample.detach();
        callback(i, t, &x);
    }
    Ok(x)
}

/// [`sample`] starting from x_T = init_noise_sigma z, z drawn from `rng` with the given shape,
/// dtype and device.
pub fn sample_from_shape<P, S>(
    predictor: &P,
    scheduler: &S,
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
    rng: &mut NoiseRng,
    callback: impl FnMut(usize, usize, &Tensor),
) -> Result<Tensor>
where
    P: NoisePredictor + ?Sized,
    S: Scheduler + ?Sized,
{
    // x_T ~ N(0, sigma^2 I)
    let x_t = (rng.randn(shape, dtype, device)? * scheduler.init_noise_sigma())?;
    sample(predictor, scheduler, x_t, rng, callback)
}
