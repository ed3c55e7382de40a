//! The full reverse process: from pure noise x_T to a sample x_0 with a [`NoisePredictor`].

use candle_core::{DType, Device, Shape, Tensor};

use crate::config::SchedulerConfig;
use crate::ddim::DdimScheduler;
use crate::ddpm::{DdpmScheduler, StepOutput};
use crate::error::{Error, Result};
use crate::predictor::NoisePredictor;
use crate::rng::NoiseRng;
use crate::schedule::NoiseSchedule;

/// A reverse-process scheduler that a sampling loop can drive.
pub trait Scheduler {
    /// The timesteps to visit, in order (descending).
    fn timesteps(&self) -> &[usize];
    /// One reverse step from timestep `t`, with injected standard-normal `noise` where the step needs it.
    fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<StepOutput>;
    /// One reverse step from timestep `t`, drawing the noise it needs from `rng`.
    fn step_with_rng(&self, model_output: &Tensor, t: usize, sample: &Tensor, rng: &mut NoiseRng) -> Result<StepOutput>;
    /// The noise schedule.
    fn schedule(&self) -> &NoiseSchedule;
    /// The standard deviation of the initial noise x_T (1 for DDPM and DDIM).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
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

/// The two samplers behind one type, for code that picks one at run time (`--sampler ddpm|ddim`).
#[derive(Debug, Clone)]
pub enum Sampler {
    /// Ancestral DDPM sampling.
    Ddpm(DdpmScheduler),
    /// DDIM sampling with eta.
    Ddim(DdimScheduler),
}

impl Sampler {
    /// A DDPM sampler for `config` with `steps` inference steps (`None`: all T).
    pub fn ddpm(config: &SchedulerConfig, steps: Option<usize>, device: &Device) -> Result<Self> {
        let mut s = DdpmScheduler::new(config, device)?;
        if let Some(n) = steps {
            s.set_timesteps(n)?;
        }
        Ok(Sampler::Ddpm(s))
    }

    /// A DDIM sampler for `config` with `steps` inference steps and the given eta.
    pub fn ddim(config: &SchedulerConfig, steps: usize, eta: f64, device: &Device) -> Result<Self> {
        let mut s = DdimScheduler::new(config, device)?.with_eta(eta)?;
        s.set_timesteps(steps)?;
        Ok(Sampler::Ddim(s))
    }

    fn inner(&self) -> &dyn Scheduler {
        match self {
            Sampler::Ddpm(s) => s,
            Sampler::Ddim(s) => s,
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
}

/// Runs the reverse process from `x_t` (the noise x_T, shape (N, C, H, W)) through every timestep
/// of `scheduler`, and returns the final sample. For each timestep t the predictor gets x_t and a
/// tensor of N copies of t (i64, on x_t's device); the step's noise comes from `rng`.
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
