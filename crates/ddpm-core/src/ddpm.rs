//! The ancestral sampling step of DDPM (Ho et al. 2020, algorithm 2), as diffusers'
//! `DDPMScheduler.step` computes it, for every fixed variance type and prediction type.

use candle_core::{DType, Device, Tensor};

use crate::config::{PredictionType, SchedulerConfig, VarianceType};
use crate::error::{Error, Result};
use crate::rng::NoiseRng;
use crate::schedule::NoiseSchedule;
use crate::timesteps::inference_timesteps;

/// The result of one reverse step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// x_{t_prev}, the sample after the step (the input of the next step).
    pub prev_sample: Tensor,
    /// The x_0 the step used (after clipping or thresholding).
    pub pred_original_sample: Tensor,
}

/// Dynamic thresholding of a predicted x_0 (Imagen, Saharia et al. 2022): per sample, s is the
/// `ratio` quantile of |x_0| (linear interpolation, as `torch.quantile`), clamped to
/// [1, `max_value`]; then x_0 <- clamp(x_0, -s, s) / s.
///
/// The quantile is taken on the host; the clamping runs on the tensor's device.
pub fn dynamic_threshold(x0: &Tensor, ratio: f64, max_value: f64) -> Result<Tensor> {
    if x0.rank() == 0 {
        return Err(Error::arg("dynamic thresholding needs a batch dimension"));
    }
    let n = x0.dim(0)?;
    let flat = x0.flatten_from(1)?.abs()?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut s = Vec::with_capacity(n);
    for mut row in flat {
        if row.is_empty() {
            s.push(1.0f32);
            continue;
        }
        row.sort_by(|a, b| a.total_cmp(b));
        // position = ratio (len - 1); q = v[floor] + (v[ceil] - v[floor]) (position - floor)
        let pos = ratio * (row.len() - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = (pos.ceil() as usize).min(row.len() - 1);
        let q = row[lo] as f64 + (row[hi] as f64 - row[lo] as f64) * (pos - lo as f64);
        // s = clamp(q, min = 1, max = sample_max_value)
        s.push(q.max(1.0).min(max_value) as f32);
    }
    let mut shape = vec![1usize; x0.rank()];
    shape[0] = n;
    let s = Tensor::from_vec(s, shape, x0.device())?.to_dtype(x0.dtype())?;
    // x_0 <- clamp(x_0, -s, s) / s
    Ok(x0.broadcast_minimum(&s)?.broadcast_maximum(&s.neg()?)?.broadcast_div(&s)?)
}

/// Clips or thresholds a predicted x_0 as the config says: dynamic thresholding when
/// `thresholding`, else clamp(x_0, -clip_sample_range, clip_sample_range) when `clip_sample`.
pub fn clip_or_threshold(config: &SchedulerConfig, x0: Tensor) -> Result<Tensor> {
    if config.thresholding {
        dynamic_threshold(&x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    } else if config.clip_sample {
        // x_0 <- clamp(x_0, -r, r)
        Ok(x0.clamp(-config.clip_sample_range, config.clip_sample_range)?)
    } else {
        Ok(x0)
    }
}

/// Checks the shapes of a step's inputs.
pub(crate) fn check_step_inputs(model_output: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> Result<()> {
    if model_output.dims() != sample.dims() {
        return Err(Error::arg(format!(
            "model output {:?} and sample {:?} differ in shape (a learned variance doubles the channels and is not supported)",
            model_output.dims(),
            sample.dims()
        )));
    }
    if let Some(z) = noise {
        if z.dims() != sample.dims() {
            return Err(Error::arg(format!("noise {:?} and sample {:?} differ in shape", z.dims(), sample.dims())));
        }
    }
    Ok(())
}

/// x_0 from a model output at a single timestep with host scalars
/// `a` = alpha_bar_t and `b` = 1 - alpha_bar_t.
pub(crate) fn pred_x0_scalar(pt: PredictionType, model_output: &Tensor, sample: &Tensor, a: f64, b: f64) -> Result<Tensor> {
    Ok(match pt {
        // x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
        PredictionType::Epsilon => ((sample - (model_output * b.sqrt())?)? / a.sqrt())?,
        PredictionType::Sample => model_output.clone(),
        // x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v
        PredictionType::VPrediction => ((sample * a.sqrt())? - (model_output * b.sqrt())?)?,
    })
}

/// How the scalar coefficients of a DDPM step are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepPrecision {
    /// In f64 from the f64 schedule (the default, the most accurate).
    #[default]
    F64,
    /// As diffusers computes them: from diffusers' float32 alpha_bar
    /// ([`crate::schedule::diffusers_f32_alphas_cumprod`]), with every intermediate rounded to f32. At small t, 1 - alpha_bar_t / alpha_bar_{t-1} then loses about 1e-3 of its relative
    /// precision to cancellation, and the step differs from the f64 one by up to ~5e-4; use this to
    /// reproduce diffusers' numbers exactly.
    DiffusersF32,
}

/// The scalar coefficients of one DDPM step (see [`DdpmScheduler::coefficients`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoefficients {
    /// alpha_bar_t.
    pub alpha_bar: f64,
    /// 1 - alpha_bar_t.
    pub one_minus_alpha_bar: f64,
    /// The weight of x_0 in the mean: sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t).
    pub coef_x0: f64,
    /// The weight of x_t in the mean: sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t).
    pub coef_xt: f64,
    /// The standard deviation of the added noise (0 at t = 0).
    pub sigma: f64,
}

/// The DDPM sampler: the ancestral step x_{t-1} ~ p(x_{t-1} | x_t) of diffusers' `DDPMScheduler`.
///
/// Without [`DdpmScheduler::set_timesteps`] it visits all T timesteps; with n inference steps it
/// visits the n timesteps of the configured spacing, and each step goes from a timestep to the
/// next one in that list (diffusers PR #2076), not to t - 1.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    schedule: NoiseSchedule,
    timesteps: Vec<usize>,
    num_inference_steps: Option<usize>,
    precision: StepPrecision,
}

impl DdpmScheduler {
    /// A scheduler for `config` (validated), visiting all training timesteps T-1, ..., 0.
    pub fn new(config: &SchedulerConfig, device: &Device) -> Result<Self> {
        Ok(Self::from_schedule(NoiseSchedule::new(config, device)?))
    }

    /// A scheduler over an already computed schedule.
    pub fn from_schedule(schedule: NoiseSchedule) -> Self {
        let timesteps = (0..schedule.num_train_timesteps()).rev().collect();
        Self { schedule, timesteps, num_inference_steps: None, precision: StepPrecision::F64 }
    }

    /// Chooses how the step's scalar coefficients are computed (default [`StepPrecision::F64`]).
    pub fn with_precision(mut self, precision: StepPrecision) -> Self {
        self.precision = precision;
        self
    }

    /// The precision of the step's scalar coefficients.
    pub fn precision(&self) -> StepPrecision {
        self.precision
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        self.schedule.config()
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Samples with `n` inference steps, spaced as the config's `timestep_spacing` and
    /// `steps_offset` say (see [`inference_timesteps`]).
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = self.schedule.config();
        self.timesteps = inference_timesteps(c.timestep_spacing, self.schedule.num_train_timesteps(), n, c.steps_offset)?;
        self.num_inference_steps = Some(n);
        Ok(())
    }

    /// The timesteps a sampling loop visits, in order (descending).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The number of inference steps set by [`DdpmScheduler::set_timesteps`], if any.
    pub fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// The timestep a step from `t` goes to: `None` for the end of the chain (t_prev = -1).
    /// Without inference steps that is t - 1; with them, the next entry of the timestep list
    /// (an error if `t` is not in the list).
    pub fn previous_timestep(&self, t: usize) -> Result<Option<usize>> {
        if t >= self.schedule.num_train_timesteps() {
            return Err(Error::arg(format!("timestep {t} is outside [0, {})", self.schedule.num_train_timesteps())));
        }
        if self.num_inference_steps.is_none() {
            return Ok(t.checked_sub(1));
        }
        let i = self
            .timesteps
            .iter()
            .position(|&x| x == t)
            .ok_or_else(|| Error::arg(format!("timestep {t} is not one of the scheduler's inference timesteps")))?;
        Ok(self.timesteps.get(i + 1).copied())
    }

    /// The scalar coefficients of the step from `t`, in the scheduler's [`StepPrecision`].
    pub fn coefficients(&self, t: usize) -> Result<StepCoefficients> {
        let variance_type = self.config().variance_type;
        if matches!(variance_type, VarianceType::Learned | VarianceType::LearnedRange) {
            return Err(Error::Unsupported(format!("variance_type `{variance_type}` (a network-predicted variance)")));
        }
        let prev = self.previous_timestep(t)?;
        // r(x): every intermediate rounded to f32 in DiffusersF32 precision, as diffusers' f32 tensors do
        let f32_mode = self.precision == StepPrecision::DiffusersF32;
        let r = |x: f64| if f32_mode { x as f32 as f64 } else { x };
        let abar = if f32_mode { self.schedule.alphas_cumprod_diffusers_f32() } else { self.schedule.alphas_cumprod() };
        let ab = r(abar[t]);
        let ab_prev = r(prev.map_or(1.0, |p| abar[p]));
        // 1 - alpha_bar_t, 1 - alpha_bar_{t_prev}
        let b = r(1.0 - ab);
        let b_prev = r(1.0 - ab_prev);
        // alpha_t = alpha_bar_t / alpha_bar_{t_prev}, beta_t = 1 - alpha_t (over the strided step)
        let cur_alpha = r(ab / ab_prev);
        let cur_beta = r(1.0 - cur_alpha);
        // coef_x0 = sqrt(alpha_bar_{t_prev}) beta_t / (1 - alpha_bar_t)
        let coef_x0 = r(r(r(ab_prev.sqrt()) * cur_beta) / b);
        // coef_xt = sqrt(alpha_t) (1 - alpha_bar_{t_prev}) / (1 - alpha_bar_t)
        let coef_xt = r(r(r(cur_alpha.sqrt()) * b_prev) / b);
        let sigma = if t == 0 {
            0.0
        } else {
            // beta-tilde_t = (1 - alpha_bar_{t_prev}) / (1 - alpha_bar_t) beta_t, clamped at 1e-20
            let beta_tilde = r(r(b_prev / b) * cur_beta).max(1e-20);
            match variance_type {
                // sigma = sqrt(beta-tilde)
                VarianceType::FixedSmall => r(beta_tilde.sqrt()),
                // sigma = exp(0.5 log beta-tilde)
                VarianceType::FixedSmallLog => r(r(0.5 * r(beta_tilde.ln())).exp()),
                // sigma = sqrt(beta)
                VarianceType::FixedLarge => r(cur_beta.sqrt()),
                // sigma = exp(0.5 log beta) (diffusers takes sqrt(log beta): NaN, #14569)
                VarianceType::FixedLargeLog => r(r(0.5 * r(cur_beta.ln())).exp()),
                VarianceType::Learned | VarianceType::LearnedRange => {
                    return Err(Error::Unsupported(format!("variance_type `{variance_type}`")))
                }
            }
        };
        Ok(StepCoefficients { alpha_bar: ab, one_minus_alpha_bar: b, coef_x0, coef_xt, sigma })
    }

    /// The standard deviation sigma_t of the noise added by the step from `t`
    /// (0 for t = 0, where no noise is added).
    pub fn noise_std(&self, t: usize) -> Result<f64> {
        Ok(self.coefficients(t)?.sigma)
    }

    /// One reverse step from timestep `t` (one for the whole batch): computes x_0 from the model
    /// output, clips or thresholds it, forms the posterior mean
    /// mu = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) x_0 + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t,
    /// and adds sigma_t `noise` for t > 0. `noise` (standard normal, the shape of `sample`) is
    /// required for t > 0 and ignored at t = 0.
    ///
    /// Contiguous f32 tensors on the CPU take one fused pass ([`crate::ops::ddpm_step`]); other
    /// devices and dtypes, and dynamic thresholding, take [`DdpmScheduler::step_composed`].
    pub fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<StepOutput> {
        check_step_inputs(model_output, sample, noise)?;
        let c = self.config();
        // Fails early for learned variances and unknown timesteps.
        let k = self.coefficients(t)?;
        let noise = if t > 0 {
            Some(noise.ok_or_else(|| Error::arg(format!("the DDPM step from t = {t} needs noise")))?)
        } else {
            None
        };
        if c.thresholding || !crate::ops::ddpm_step::fused_step_available(model_output, sample, noise) {
            return self.composed_step_with(&k, model_output, t, sample, noise);
        }
        let (x0_from_sample, x0_from_output) = crate::ops::ddpm_step::x0_coefficients(c.prediction_type, k.alpha_bar, k.one_minus_alpha_bar);
        let scalars = crate::ops::ddpm_step::StepScalars {
            x0_from_sample,
            x0_from_output,
            clip: c.clip_sample.then_some(c.clip_sample_range),
            coef_x0: k.coef_x0,
            coef_xt: k.coef_xt,
            sigma: k.sigma,
        };
        let (prev_sample, pred_original_sample) = crate::ops::ddpm_step::ddpm_step(model_output, sample, noise, scalars)?;
        Ok(StepOutput { prev_sample, pred_original_sample })
    }

    /// [`DdpmScheduler::step`] from candle's elementwise ops: runs on every device and dtype and
    /// handles dynamic thresholding; the reference the fused step is tested against.
    pub fn step_composed(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<StepOutput> {
        check_step_inputs(model_output, sample, noise)?;
        let k = self.coefficients(t)?;
        self.composed_step_with(&k, model_output, t, sample, noise)
    }

    /// The composed step with the inputs checked and the coefficients `k` of timestep `t` computed.
    fn composed_step_with(&self, k: &StepCoefficients, model_output: &Tensor, t: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<StepOutput> {
        let c = self.config();
        let x0 = pred_x0_scalar(c.prediction_type, model_output, sample, k.alpha_bar, k.one_minus_alpha_bar)?;
        let x0 = clip_or_threshold(c, x0)?;
        // mu = coef_x0 x_0 + coef_xt x_t
        let mut prev_sample = ((&x0 * k.coef_x0)? + (sample * k.coef_xt)?)?;
        if t > 0 {
            let z = noise.ok_or_else(|| Error::arg(format!("the DDPM step from t = {t} needs noise")))?;
            // x_{t_prev} = mu + sigma_t z
            prev_sample = (prev_sample + (z.to_dtype(sample.dtype())? * k.sigma)?)?;
        }
        Ok(StepOutput { prev_sample, pred_original_sample: x0 })
    }

    /// [`DdpmScheduler::step`] with the noise drawn from `rng` (only for t > 0, as diffusers does).
    pub fn step_with_rng(&self, model_output: &Tensor, t: usize, sample: &Tensor, rng: &mut NoiseRng) -> Result<StepOutput> {
        let noise = if t > 0 { Some(rng.randn(sample.shape(), sample.dtype(), sample.device())?) } else { None };
        self.step(model_output, t, sample, noise.as_ref())
    }
}
