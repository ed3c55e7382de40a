//! DDIM (Song, Meng and Ermon 2021): the generalized, possibly deterministic reverse step, as
//! diffusers' `DDIMScheduler.step` computes it.

use candle_core::{Device, Tensor};

use crate::config::{PredictionType, SchedulerConfig};
use crate::ddpm::{check_step_inputs, clip_or_threshold, pred_x0_scalar, StepOutput, StepPrecision};
use crate::error::{Error, Result};
use crate::rng::NoiseRng;
use crate::schedule::NoiseSchedule;
use crate::timesteps::inference_timesteps;

/// The DDIM sampler.
///
/// Defaults as diffusers' `DDIMScheduler`: eta = 0 (deterministic), `set_alpha_to_one` as the config
/// says (the step past the last timestep uses alpha_bar = 1 when true, alpha_bar_0 when false), the
/// model output not recomputed from the clipped x_0. The `variance_type` of the config is not used
/// (DDIM's variance is set by eta). Until [`DdimScheduler::set_timesteps`] is called it visits all T
/// timesteps.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    schedule: NoiseSchedule,
    timesteps: Vec<usize>,
    num_inference_steps: usize,
    eta: f64,
    set_alpha_to_one: bool,
    use_clipped_model_output: bool,
    precision: StepPrecision,
}

impl DdimScheduler {
    /// A DDIM scheduler for `config` (validated) with eta = 0 and the config's `set_alpha_to_one`,
    /// visiting all training timesteps.
    pub fn new(config: &SchedulerConfig, device: &Device) -> Result<Self> {
        Ok(Self::from_schedule(NoiseSchedule::new(config, device)?))
    }

    /// A DDIM scheduler over an already computed schedule (`set_alpha_to_one` from its config).
    pub fn from_schedule(schedule: NoiseSchedule) -> Self {
        let t = schedule.num_train_timesteps();
        let set_alpha_to_one = schedule.config().set_alpha_to_one;
        Self {
            schedule,
            timesteps: (0..t).rev().collect(),
            num_inference_steps: t,
            eta: 0.0,
            set_alpha_to_one,
            use_clipped_model_output: false,
            precision: StepPrecision::F64,
        }
    }

    /// Sets eta, the weight of the noise: 0 is deterministic DDIM, 1 gives DDPM's posterior
    /// variance over the strided steps. Must be finite and non-negative.
    pub fn with_eta(mut self, eta: f64) -> Result<Self> {
        self.set_eta(eta)?;
        Ok(self)
    }

    /// Sets eta in place (see [`DdimScheduler::with_eta`]).
    pub fn set_eta(&mut self, eta: f64) -> Result<()> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(Error::arg(format!("DDIM eta must be finite and non-negative, got {eta}")));
        }
        self.eta = eta;
        Ok(())
    }

    /// The eta in use.
    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// Overrides the config's `set_alpha_to_one`: when true the final step goes to alpha_bar = 1,
    /// else to alpha_bar_0.
    pub fn with_set_alpha_to_one(mut self, set_alpha_to_one: bool) -> Self {
        self.set_alpha_to_one = set_alpha_to_one;
        self
    }

    /// diffusers' `use_clipped_model_output`: recompute the noise from the clipped x_0 (default false).
    pub fn with_use_clipped_model_output(mut self, yes: bool) -> Self {
        self.use_clipped_model_output = yes;
        self
    }

    /// Chooses how the step's scalar coefficients are computed (default [`StepPrecision::F64`]).
    /// [`StepPrecision::DiffusersF32`] reproduces diffusers' float32 numbers: near t = 0 the
    /// variance 1 - alpha_bar_t / alpha_bar_prev and the direction coefficient
    /// 1 - alpha_bar_prev - sigma_t^2 lose about 1e-3 of their relative precision to cancellation
    /// in f32, so with eta > 0 the last step differs from the f64 one by up to ~1e-4.
    pub fn with_precision(mut self, precision: StepPrecision) -> Self {
        self.precision = precision;
        self
    }

    /// The precision of the step's scalar coefficients.
    pub fn precision(&self) -> StepPrecision {
        self.precision
    }

    /// alpha_bar used after the last timestep: 1 with `set_alpha_to_one`, else alpha_bar_0.
    pub fn final_alpha_cumprod(&self) -> f64 {
        if self.set_alpha_to_one {
            1.0
        } else {
            self.schedule.alphas_cumprod()[0]
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        self.schedule.config()
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Samples with `n` inference steps, spaced as the config's `timestep_spacing` and `steps_offset` say.
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = self.schedule.config();
        self.timesteps = inference_timesteps(c.timestep_spacing, self.schedule.num_train_timesteps(), n, c.steps_offset)?;
        self.num_inference_steps = n;
        Ok(())
    }

    /// The timesteps a sampling loop visits, in order (descending).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The timestep a step from `t` goes to, `None` past the end: the next entry of the timestep
    /// list when `t` is in it, else t - T / n as diffusers computes it. The two agree for
    /// `leading` spacing; for the other spacings the list is the trajectory actually sampled.
    pub fn previous_timestep(&self, t: usize) -> Result<Option<usize>> {
        let t_train = self.schedule.num_train_timesteps();
        if t >= t_train {
            return Err(Error::arg(format!("timestep {t} is outside [0, {t_train})")));
        }
        if let Some(i) = self.timesteps.iter().position(|&x| x == t) {
            return Ok(self.timesteps.get(i + 1).copied());
        }
        // t_prev = t - T // n
        Ok(t.checked_sub(t_train / self.num_inference_steps))
    }

    /// One DDIM step from timestep `t`:
    /// x_{t_prev} = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev - sigma_t^2) eps + sigma_t z,
    /// sigma_t = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev).
    /// `noise` z is required when eta > 0 (diffusers draws it for every step then) and ignored otherwise.
    pub fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<StepOutput> {
        check_step_inputs(model_output, sample, noise)?;
        let c = self.config();
        let prev = self.previous_timestep(t)?;
        // r(x): every intermediate rounded to f32 in DiffusersF32 precision, as diffusers' f32 tensors do
        let f32_mode = self.precision == StepPrecision::DiffusersF32;
        let r = |x: f64| if f32_mode { x as f32 as f64 } else { x };
        let abar = if f32_mode { self.schedule.alphas_cumprod_diffusers_f32() } else { self.schedule.alphas_cumprod() };
        let ab = abar[t];
        // alpha_bar_prev: alpha_bar of the previous timestep, past the end 1 or alpha_bar_0
        let ab_prev = match prev {
            Some(p) => abar[p],
            None if self.set_alpha_to_one => 1.0,
            None => abar[0],
        };
        // beta_bar_t = 1 - alpha_bar_t
        let b = r(1.0 - ab);

        let x0 = pred_x0_scalar(c.prediction_type, model_output, sample, ab, b)?;
        let mut eps = match c.prediction_type {
            PredictionType::Epsilon => model_output.clone(),
            // eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)
            PredictionType::Sample => ((sample - (&x0 * ab.sqrt())?)? / b.sqrt())?,
            // eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t
            PredictionType::VPrediction => ((model_output * ab.sqrt())? + (sample * b.sqrt())?)?,
        };
        let x0 = clip_or_threshold(c, x0)?;

        // sigma_t^2 = (1 - alpha_bar_prev) / (1 - alpha_bar_t) (1 - alpha_bar_t / alpha_bar_prev)
        let variance = r(r(r(1.0 - ab_prev) / b) * r(1.0 - r(ab / ab_prev)));
        // sigma_t = eta sqrt(sigma_t^2)
        let std = r(self.eta * r(variance.max(0.0).sqrt()));
        if self.use_clipped_model_output {
            // eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t), with the clipped x_0
            eps = ((sample - (&x0 * ab.sqrt())?)? / b.sqrt())?;
        }
        // direction pointing to x_t: sqrt(1 - alpha_bar_prev - sigma_t^2) eps
        let dir = (eps * r(r(r(1.0 - ab_prev) - r(std * std)).max(0.0).sqrt()))?;
        // x_{t_prev} = sqrt(alpha_bar_prev) x_0 + direction
        let mut prev_sample = ((&x0 * ab_prev.sqrt())? + dir)?;
        if self.eta > 0.0 {
            let z = noise.ok_or_else(|| Error::arg(format!("the DDIM step from t = {t} with eta > 0 needs noise")))?;
            // + sigma_t z
            prev_sample = (prev_sample + (z.to_dtype(sample.dtype())? * std)?)?;
        }
        Ok(StepOutput { prev_sample, pred_original_sample: x0 })
    }

    /// [`DdimScheduler::step`] with the noise drawn from `rng` when eta > 0.
    pub fn step_with_rng(&self, model_output: &Tensor, t: usize, sample: &Tensor, rng: &mut NoiseRng) -> Result<StepOutput> {
        let noise = if self.eta > 0.0 { Some(rng.randn(sample.shape(), sample.dtype(), sample.device())?) } else { None };
        self.step(model_output, t, sample, noise.as_ref())
    }
}
