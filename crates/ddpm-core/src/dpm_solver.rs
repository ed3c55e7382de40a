//! DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
//! Sampling in Around 10 Steps") and DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for
//! Guided Sampling of Diffusion Probabilistic Models"), multistep, as diffusers'
//! `DPMSolverMultistepScheduler.step` computes them.
//!
//! Notation (VP diffusion, x_t = alpha_t x_0 + sigma_t eps): alpha_t = sqrt(alpha_bar_t),
//! sigma_t = sqrt(1 - alpha_bar_t), and the half log-SNR lambda_t = log(alpha_t / sigma_t), which
//! increases as t goes to 0. A step goes from s0 (the current timestep) to t (the next one) with
//! h = lambda_t - lambda_s0 > 0; s1, s2 are the timesteps before s0, with h_0 = lambda_s0 - lambda_s1,
//! h_1 = lambda_s1 - lambda_s2, r0 = h_0 / h, r1 = h_1 / h. m0, m1, m2 are the model outputs at s0,
//! s1, s2, converted to what the algorithm integrates: x_0 (DPM-Solver++) or eps (DPM-Solver).

use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};

use crate::config::{DpmAlgorithmType, DpmSolverType, FinalSigmasType, PredictionType, SchedulerConfig};
use crate::ddpm::{check_step_inputs, dynamic_threshold, StepOutput, StepPrecision};
use crate::error::{Error, Result};
use crate::rng::NoiseRng;
use crate::schedule::NoiseSchedule;
use crate::timesteps::dpm_solver_timesteps;

/// diffusers sets the last alpha_bar to this (the smallest positive f16 subnormal) under
/// `rescale_betas_zero_snr`, so that the first sigma is finite.
const ZERO_SNR_ALPHA_BAR: f64 = 1.0 / (1u64 << 24) as f64;

/// One point of the solver's trajectory.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    /// diffusers' sigma = sqrt((1 - alpha_bar) / alpha_bar), the noise-to-signal ratio.
    ratio: f64,
    /// alpha_t = sqrt(alpha_bar_t) (1 / sqrt(ratio^2 + 1) in diffusers).
    alpha: f64,
    /// sigma_t = sqrt(1 - alpha_bar_t) (ratio alpha_t in diffusers).
    sigma: f64,
    /// lambda_t = log(alpha_t) - log(sigma_t) (+inf where sigma_t = 0).
    lambda: f64,
}

impl Point {
    /// The point of alpha_bar in f64: alpha_t = sqrt(alpha_bar), sigma_t = sqrt(1 - alpha_bar).
    fn f64(alpha_bar: f64) -> Self {
        let (alpha, sigma) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
        // ratio = sigma_t / alpha_t, lambda = log(alpha_t) - log(sigma_t)
        Self { ratio: sigma / alpha, alpha, sigma, lambda: alpha.ln() - sigma.ln() }
    }

    /// The point after the last timestep with sigma = 0: alpha = 1, sigma = 0, lambda = +inf.
    fn noiseless() -> Self {
        Self { ratio: 0.0, alpha: 1.0, sigma: 0.0, lambda: f64::INFINITY }
    }

    /// The point as diffusers computes it from its float32 alpha_bar, every operation rounded to f32:
    /// ratio = ((1 - alpha_bar) / alpha_bar)^0.5, then [`Point::f32_from_ratio`].
    fn f32(alpha_bar: f64) -> Self {
        Self::f32_from_ratio(f32r(f32r(f32r(1.0 - alpha_bar) / alpha_bar).sqrt()))
    }

    /// diffusers' `_sigma_to_alpha_sigma_t` in float32: alpha_t = 1 / (ratio^2 + 1)^0.5,
    /// sigma_t = ratio alpha_t, lambda = log(alpha_t) - log(sigma_t).
    fn f32_from_ratio(ratio: f64) -> Self {
        let alpha = f32r(1.0 / f32r(f32r(f32r(ratio * ratio) + 1.0).sqrt()));
        let sigma = f32r(ratio * alpha);
        Self { ratio, alpha, sigma, lambda: f32r(f32r(alpha.ln()) - f32r(sigma.ln())) }
    }
}

/// f32 rounding of an f64, kept as f64.
fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// What a sampling run has done so far: diffusers' `model_outputs`, `lower_order_nums` and
/// `step_index`.
#[derive(Debug, Clone, Default)]
struct SolverState {
    /// The converted model outputs (x_0 or eps) of the last `solver_order` steps, oldest first.
    outputs: Vec<Tensor>,
    /// Steps taken in this run, up to `solver_order`: the warm-up uses lower orders until there
    /// are enough outputs.
    lower_order_nums: usize,
    /// Position in the timesteps of the next step; `None` before a run's first step.
    step_index: Option<usize>,
    /// The order of the last step's update.
    last_order: Option<usize>,
}

/// The DPM-Solver(++) multistep sampler of diffusers' `DPMSolverMultistepScheduler`: orders 1, 2
/// and 3, DPM-Solver++ and DPM-Solver as ODE or SDE solvers, midpoint and Heun second-order
/// updates, lower-order warm-up and final steps, dynamic thresholding, `lambda_min_clipped`,
/// `final_sigmas_type` zero or sigma_min.
///
/// **State.** A multistep solver keeps the model outputs of its last steps, while the
/// [`crate::Scheduler`] trait's `step` takes `&self` (a scheduler is shared by reference by the
/// sampling loop, the pipeline and the CLI, and DDPM and DDIM keep no state). The history therefore
/// lives behind a [`Mutex`] inside the scheduler (interior mutability), which keeps the trait and
/// every caller unchanged and the scheduler `Send + Sync`. A run is the sequence of steps through
/// [`DpmSolverMultistepScheduler::timesteps`] in order; it starts at the first step after
/// construction, [`DpmSolverMultistepScheduler::set_timesteps`], [`DpmSolverMultistepScheduler::reset`]
/// (which [`crate::sample`] calls) or the end of the previous run. A step whose `t` is not the next
/// timestep of the run is an error, so two loops interleaved on one scheduler fail at once instead
/// of mixing their histories: give each concurrent loop its own clone (a clone copies the history).
///
/// **Timesteps.** As diffusers: n + 1 points spaced by `timestep_spacing` with the one nearest t = 0
/// dropped ([`dpm_solver_timesteps`]), after the timesteps whose lambda is below
/// `lambda_min_clipped` are removed. Before `set_timesteps` (where diffusers refuses to step) it
/// visits all T training timesteps. Like diffusers, the first step of a run may start at any of
/// the timesteps (e.g. from a partly noised image): the run starts at its position (the second
/// one if `t` occurs twice, as diffusers' `index_for_timestep`).
///
/// **Precision.** [`StepPrecision::F64`] (default) computes alpha_t, sigma_t, lambda_t and the
/// update's coefficients in f64 from the f64 schedule (with `expm1`); [`StepPrecision::DiffusersF32`]
/// reproduces diffusers' float32 chain (sigma from alpha_bar, then alpha_t and sigma_t from sigma,
/// each operation rounded to f32). The timesteps are the same in both (`lambda_min_clipped` is
/// compared with diffusers' float32 lambdas).
#[derive(Debug)]
pub struct DpmSolverMultistepScheduler {
    schedule: NoiseSchedule,
    /// alpha_bar per training timestep, f64 and as diffusers' float32 (the last one 2^-24 under
    /// `rescale_betas_zero_snr`).
    alphas_cumprod: Vec<f64>,
    alphas_cumprod_f32: Vec<f64>,
    timesteps: Vec<usize>,
    /// One point per timestep, then the point after the last; f64 and diffusers' float32.
    points: Vec<Point>,
    points_f32: Vec<Point>,
    precision: StepPrecision,
    state: Mutex<SolverState>,
}

impl Clone for DpmSolverMultistepScheduler {
    fn clone(&self) -> Self {
        Self {
            schedule: self.schedule.clone(),
            alphas_cumprod: self.alphas_cumprod.clone(),
            alphas_cumprod_f32: self.alphas_cumprod_f32.clone(),
            timesteps: self.timesteps.clone(),
            points: self.points.clone(),
            points_f32: self.points_f32.clone(),
            precision: self.precision,
            state: Mutex::new(self.lock().clone()),
        }
    }
}

impl DpmSolverMultistepScheduler {
    /// A DPM-Solver for `config` (validated, its `dpm_solver` fields included), visiting all
    /// training timesteps until [`DpmSolverMultistepScheduler::set_timesteps`].
    pub fn new(config: &SchedulerConfig, device: &Device) -> Result<Self> {
        Self::from_schedule(NoiseSchedule::new(config, device)?)
    }

    /// A DPM-Solver over an already computed schedule; its config's `dpm_solver` fields are
    /// checked ([`SchedulerConfig::validate_dpm_solver`]) whatever its class.
    pub fn from_schedule(schedule: NoiseSchedule) -> Result<Self> {
        let config = schedule.config();
        config.validate_dpm_solver()?;
        let mut alphas_cumprod = schedule.alphas_cumprod().to_vec();
        let mut alphas_cumprod_f32 = schedule.alphas_cumprod_diffusers_f32().to_vec();
        if config.rescale_betas_zero_snr {
            // alpha_bar_{T-1} = 2^-24: close to 0 without being 0, so that the first sigma is finite
            for a in [&mut alphas_cumprod, &mut alphas_cumprod_f32] {
                if let Some(last) = a.last_mut() {
                    *last = ZERO_SNR_ALPHA_BAR;
                }
            }
        }
        let t = schedule.num_train_timesteps();
        let mut s = Self {
            schedule,
            alphas_cumprod,
            alphas_cumprod_f32,
            timesteps: Vec::new(),
            points: Vec::new(),
            points_f32: Vec::new(),
            precision: StepPrecision::F64,
            state: Mutex::new(SolverState::default()),
        };
        s.use_timesteps((0..t).rev().collect());
        Ok(s)
    }

    /// Chooses how alpha_t, sigma_t, lambda_t and the update's coefficients are computed (default
    /// [`StepPrecision::F64`]; [`StepPrecision::DiffusersF32`] reproduces diffusers' float32 numbers).
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

    /// The solver's order (`solver_order`, 1 to 3).
    pub fn solver_order(&self) -> usize {
        self.config().dpm_solver.solver_order
    }

    /// The training timesteps that remain after `lambda_min_clipped`: L such that timesteps
    /// 0..L are sampled. diffusers counts, from t = T - 1 down, the timesteps whose float32
    /// lambda_t = log(sqrt(alpha_bar_t)) - log(sqrt(1 - alpha_bar_t)) is below the threshold
    /// (`searchsorted` on the reversed lambdas) and removes them.
    pub fn last_timestep(&self) -> usize {
        let min = self.config().dpm_solver.lambda_min_clipped;
        let t = self.alphas_cumprod_f32.len();
        // lambda_t in float32, as diffusers' self.lambda_t
        let lambda = |ab: f64| f32r(f32r(f32r(ab.sqrt()).ln()) - f32r(f32r(f32r(1.0 - ab).sqrt()).ln()));
        let clipped = self.alphas_cumprod_f32.iter().rev().take_while(|&&ab| lambda(ab) < min).count();
        t - clipped
    }

    /// Samples with `n` inference steps, spaced as `timestep_spacing` and `steps_offset` say
    /// ([`dpm_solver_timesteps`]) below `lambda_min_clipped`; the next step starts a new run.
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = self.schedule.config();
        let ts = dpm_solver_timesteps(c.timestep_spacing, self.schedule.num_train_timesteps(), self.last_timestep(), n, c.steps_offset)?;
        self.use_timesteps(ts);
        Ok(())
    }

    /// Sets the timesteps, their points and the final point, and forgets the run.
    fn use_timesteps(&mut self, timesteps: Vec<usize>) {
        let last = match self.config().dpm_solver.final_sigmas_type {
            // sigma_last = 0
            FinalSigmasType::Zero => (Point::noiseless(), Point::noiseless()),
            // sigma_last = sqrt((1 - alpha_bar_0) / alpha_bar_0)
            FinalSigmasType::SigmaMin => (Point::f64(self.alphas_cumprod[0]), Point::f32(self.alphas_cumprod_f32[0])),
        };
        self.points = timesteps.iter().map(|&t| Point::f64(self.alphas_cumprod[t])).chain([last.0]).collect();
        self.points_f32 = timesteps.iter().map(|&t| Point::f32(self.alphas_cumprod_f32[t])).chain([last.1]).collect();
        self.timesteps = timesteps;
        self.reset();
    }

    /// The timesteps a sampling loop visits, in order (descending; may repeat, see
    /// [`dpm_solver_timesteps`]).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// diffusers' `sigmas`: sqrt((1 - alpha_bar) / alpha_bar) at each timestep, then the final
    /// sigma (0 or sigma_min), in the scheduler's precision.
    pub fn sigmas(&self) -> Vec<f64> {
        self.points().iter().map(|p| p.ratio).collect()
    }

    fn points(&self) -> &[Point] {
        match self.precision {
            StepPrecision::F64 => &self.points,
            StepPrecision::DiffusersF32 => &self.points_f32,
        }
    }

    /// The run's state; a poisoned lock (a panic elsewhere while it was held) still holds a
    /// consistent state, since the state is only replaced whole.
    fn lock(&self) -> MutexGuard<'_, SolverState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the run: the next step starts a new one, with first-order warm-up.
    pub fn reset(&self) {
        *self.lock() = SolverState::default();
    }

    /// The position in [`DpmSolverMultistepScheduler::timesteps`] of the next step of the run
    /// (`None` before its first step).
    pub fn step_index(&self) -> Option<usize> {
        self.lock().step_index
    }

    /// The order (1, 2 or 3) of the update the last step used, `None` before a run's first step.
    pub fn last_order(&self) -> Option<usize> {
        self.lock().last_order
    }

    /// Where a run whose first step is from `t` starts: the position of `t` in the timesteps,
    /// the second one if it occurs more than once (diffusers' `index_for_timestep`).
    fn index_for_timestep(&self, t: usize) -> Result<usize> {
        let mut at = self.timesteps.iter().enumerate().filter(|(_, &x)| x == t).map(|(i, _)| i);
        let first = at.next().ok_or_else(|| {
            Error::arg(format!("timestep {t} is not one of the DPM-Solver's {} inference timesteps", self.timesteps.len()))
        })?;
        Ok(at.next().unwrap_or(first))
    }

    /// diffusers' `convert_model_output` at the point `p` of the current timestep: returns what the
    /// algorithm integrates (x_0 for DPM-Solver++, eps for DPM-Solver) and the x_0 it implies, both
    /// after dynamic thresholding when the config asks for it.
    fn convert_model_output(&self, model_output: &Tensor, x: &Tensor, p: Point) -> Result<(Tensor, Tensor)> {
        let c = self.config();
        let threshold = |x0: Tensor| -> Result<Tensor> {
            if c.thresholding {
                dynamic_threshold(&x0, c.dynamic_thresholding_ratio, c.sample_max_value)
            } else {
                Ok(x0)
            }
        };
        if c.dpm_solver.algorithm_type.predicts_data() {
            let x0 = match c.prediction_type {
                // x_0 = (x_t - sigma_t eps) / alpha_t
                PredictionType::Epsilon => ((x - (model_output * p.sigma)?)? / p.alpha)?,
                PredictionType::Sample => model_output.clone(),
                // x_0 = alpha_t x_t - sigma_t v
                PredictionType::VPrediction => ((x * p.alpha)? - (model_output * p.sigma)?)?,
            };
            let x0 = threshold(x0)?;
            return Ok((x0.clone(), x0));
        }
        let eps = match c.prediction_type {
            PredictionType::Epsilon => model_output.clone(),
            // eps = (x_t - alpha_t x_0) / sigma_t
            PredictionType::Sample => ((x - (model_output * p.alpha)?)? / p.sigma)?,
            // eps = alpha_t v + sigma_t x_t
            PredictionType::VPrediction => ((model_output * p.alpha)? + (x * p.sigma)?)?,
        };
        // x_0 = (x_t - sigma_t eps) / alpha_t
        let x0 = ((x - (&eps * p.sigma)?)? / p.alpha)?;
        if !c.thresholding {
            return Ok((eps, x0));
        }
        let x0 = threshold(x0)?;
        // eps = (x_t - alpha_t x_0) / sigma_t, from the thresholded x_0
        let eps = ((x - (&x0 * p.alpha)?)? / p.sigma)?;
        Ok((eps, x0))
    }

    /// The multistep update of `order` from the point of timestep i (s0) to the next point (t),
    /// with the converted outputs `m` (newest last) and the SDE noise `z`:
    /// x_t = a x_s0 + w0 D0 + w1 D1 + w2 D2 + wz z, where D0 = m0 and D1, D2 are the scaled
    /// differences below, and the weights are the exponential integrator's (see [`Weights`]).
    fn update(&self, order: usize, m: &[Tensor], i: usize, x: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let f32_mode = self.precision == StepPrecision::DiffusersF32;
        let r = |v: f64| if f32_mode { f32r(v) } else { v };
        let pts = self.points();
        let (pt, p0) = (pts[i + 1], pts[i]);
        let missing = || Error::arg(format!("DPM-Solver order {order} at step {i} lacks the outputs of the previous steps"));
        let out = |k: usize| m.len().checked_sub(k + 1).map(|j| &m[j]).ok_or_else(missing);
        // h = lambda_t - lambda_s0
        let h = r(pt.lambda - p0.lambda);
        let m0 = out(0)?;
        let (d1, d2) = match order {
            1 => (None, None),
            2 => {
                let p1 = pts[i.checked_sub(1).ok_or_else(missing)?];
                // r0 = h_0 / h, h_0 = lambda_s0 - lambda_s1
                let r0 = r(r(p0.lambda - p1.lambda) / h);
                // D1 = (m0 - m1) / r0
                (Some(((m0 - out(1)?)? * r(1.0 / r0))?), None)
            }
            _ => {
                let (p1, p2) = (pts[i.checked_sub(1).ok_or_else(missing)?], pts[i.checked_sub(2).ok_or_else(missing)?]);
                let (m1, m2) = (out(1)?, out(2)?);
                // r0 = h_0 / h, r1 = h_1 / h, h_1 = lambda_s1 - lambda_s2
                let r0 = r(r(p0.lambda - p1.lambda) / h);
                let r1 = r(r(p1.lambda - p2.lambda) / h);
                // D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1
                let d1_0 = ((m0 - m1)? * r(1.0 / r0))?;
                let d1_1 = ((m1 - m2)? * r(1.0 / r1))?;
                let diff = (&d1_0 - &d1_1)?;
                let r01 = r(r0 + r1);
                // D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1)
                let d1 = (&d1_0 + (&diff * r(r0 / r01))?)?;
                (Some(d1), Some((&diff * r(1.0 / r01))?))
            }
        };
        let w = Weights::of(self.config().dpm_solver.algorithm_type, self.config().dpm_solver.solver_type, order, h, pt, p0, f32_mode);
        let mut acc = ((x * w.a)? + (m0 * w.w0)?)?;
        if let Some(d1) = d1 {
            acc = (acc + (d1 * w.w1)?)?;
        }
        if let Some(d2) = d2 {
            acc = (acc + (d2 * w.w2)?)?;
        }
        if let Some(z) = z {
            acc = (acc + (z * w.wz)?)?;
        }
        Ok(acc)
    }

    /// One step from timestep `t`, the next timestep of the run (or, first in a run, any of the
    /// timesteps): converts the model output, chooses the order (first order until a run has
    /// outputs to extrapolate; lower orders at the end as below), and applies the update.
    /// `noise` (standard normal, the shape of `sample`) is required by the sde-* algorithms and
    /// ignored by the others. `pred_original_sample` is the x_0 the step used or implied.
    ///
    /// The order, as diffusers chooses it: 1 when `solver_order` is 1, at the run's first step, or
    /// at the last step when `euler_at_final`, when the final sigma is zero, or with
    /// `lower_order_final` and fewer than 15 steps; at most 2 at the run's second step and, with
    /// `lower_order_final` and fewer than 15 steps, at the one before last; else `solver_order`.
    pub fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<StepOutput> {
        check_step_inputs(model_output, sample, noise)?;
        let o = &self.config().dpm_solver;
        let n = self.timesteps.len();
        let mut state = self.lock();
        let mut run = match state.step_index {
            Some(i) if i < n => {
                if self.timesteps[i] != t {
                    return Err(Error::arg(format!(
                        "DPM-Solver step from t = {t} out of order: the run is at step {i}, t = {}; call reset() to start a new run",
                        self.timesteps[i]
                    )));
                }
                state.clone()
            }
            // a new run, at the position of t
            _ => SolverState { step_index: Some(self.index_for_timestep(t)?), ..SolverState::default() },
        };
        let i = run.step_index.unwrap_or_default();
        // work in f32 (f64 for f64 samples), as diffusers upcasts the sample
        let dtype = if sample.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let x = sample.to_dtype(dtype)?;
        let (converted, x0) = self.convert_model_output(&model_output.to_dtype(dtype)?, &x, self.points()[i])?;

        let last_step = i + 1 == n;
        let lower_order_final = last_step
            && (o.euler_at_final || (o.lower_order_final && n < 15) || o.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = i + 2 == n && o.lower_order_final && n < 15;
        let order = if o.solver_order == 1 || run.lower_order_nums < 1 || lower_order_final {
            1
        } else if o.solver_order == 2 || run.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        run.outputs.push(converted);
        if run.outputs.len() > o.solver_order {
            run.outputs.remove(0);
        }
        let z = if o.algorithm_type.is_sde() {
            let z = noise.ok_or_else(|| Error::arg(format!("the {} step from t = {t} needs noise", o.algorithm_type)))?;
            Some(z.to_dtype(dtype)?)
        } else {
            None
        };
        let prev = self.update(order, &run.outputs, i, &x, z.as_ref())?;
        run.lower_order_nums = (run.lower_order_nums + 1).min(o.solver_order);
        run.step_index = Some(i + 1);
        run.last_order = Some(order);
        *state = run;
        let out_dtype = model_output.dtype();
        Ok(StepOutput { prev_sample: prev.to_dtype(out_dtype)?, pred_original_sample: x0.to_dtype(out_dtype)? })
    }

    /// [`DpmSolverMultistepScheduler::step`] with the noise of the sde-* algorithms drawn from `rng`
    /// (nothing is drawn for the ODE ones).
    pub fn step_with_rng(&self, model_output: &Tensor, t: usize, sample: &Tensor, rng: &mut NoiseRng) -> Result<StepOutput> {
        let noise = if self.config().dpm_solver.algorithm_type.is_sde() {
            Some(rng.randn(sample.shape(), sample.dtype(), sample.device())?)
        } else {
            None
        };
        self.step(model_output, t, sample, noise.as_ref())
    }
}

/// The weights of one update, x_t = a x_s0 + w0 D0 + w1 D1 + w2 D2 + wz z (unused weights 0).
#[derive(Debug, Clone, Copy, Default)]
struct Weights {
    a: f64,
    w0: f64,
    w1: f64,
    w2: f64,
    wz: f64,
}

impl Weights {
    /// The exponential integrator's weights for a step of size h from p0 (s0) to pt (t). In
    /// `f32_mode` every operation is rounded to f32 in diffusers' order; otherwise e^x - 1 is
    /// `expm1`, exact near 0.
    fn of(alg: DpmAlgorithmType, solver: DpmSolverType, order: usize, h: f64, pt: Point, p0: Point, f32_mode: bool) -> Self {
        let r = |v: f64| if f32_mode { f32r(v) } else { v };
        // e^x - 1
        let em1 = |x: f64| if f32_mode { r(r(x.exp()) - 1.0) } else { x.exp_m1() };
        let heun = order == 3 || solver == DpmSolverType::Heun;
        let mut w = Weights::default();
        match alg {
            DpmAlgorithmType::DpmSolverPlusPlus => {
                // x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) D0
                let b = r(pt.alpha * em1(-h));
                w.a = r(pt.sigma / p0.sigma);
                w.w0 = -b;
                w.w1 = match (order, heun) {
                    (1, _) => 0.0,
                    // midpoint: - 0.5 alpha_t (e^-h - 1) D1
                    (_, false) => -r(0.5 * b),
                    // heun: + alpha_t ((e^-h - 1) / h + 1) D1
                    (_, true) => r(pt.alpha * r(r(em1(-h) / h) + 1.0)),
                };
                if order == 3 {
                    // - alpha_t ((e^-h - 1 + h) / h^2 - 0.5) D2
                    w.w2 = -r(pt.alpha * r(r(r(em1(-h) + h) / r(h * h)) - 0.5));
                }
            }
            DpmAlgorithmType::DpmSolver => {
                // x_t = (alpha_t / alpha_s0) x - sigma_t (e^h - 1) D0
                let b = r(pt.sigma * em1(h));
                w.a = r(pt.alpha / p0.alpha);
                w.w0 = -b;
                w.w1 = match (order, heun) {
                    (1, _) => 0.0,
                    // midpoint: - 0.5 sigma_t (e^h - 1) D1
                    (_, false) => -r(0.5 * b),
                    // heun: - sigma_t ((e^h - 1) / h - 1) D1
                    (_, true) => -r(pt.sigma * r(r(em1(h) / h) - 1.0)),
                };
                if order == 3 {
                    // - sigma_t ((e^h - 1 - h) / h^2 - 0.5) D2
                    w.w2 = -r(pt.sigma * r(r(r(em1(h) - h) / r(h * h)) - 0.5));
                }
            }
            DpmAlgorithmType::SdeDpmSolverPlusPlus => {
                // 1 - e^-2h
                let one_minus = if f32_mode { r(1.0 - r(r(-2.0 * h).exp())) } else { -(-2.0 * h).exp_m1() };
                // x_t = (sigma_t / sigma_s0 e^-h) x + alpha_t (1 - e^-2h) D0 + sigma_t sqrt(1 - e^-2h) z
                let b = r(pt.alpha * one_minus);
                w.a = r(r(pt.sigma / p0.sigma) * r((-h).exp()));
                w.w0 = b;
                w.wz = r(pt.sigma * r(one_minus.sqrt()));
                w.w1 = match (order, heun) {
                    (1, _) => 0.0,
                    // midpoint: + 0.5 alpha_t (1 - e^-2h) D1
                    (_, false) => r(0.5 * b),
                    // heun: + alpha_t ((1 - e^-2h) / (-2h) + 1) D1
                    (_, true) => r(pt.alpha * r(r(one_minus / r(-2.0 * h)) + 1.0)),
                };
                if order == 3 {
                    // + alpha_t ((1 - e^-2h - 2h) / (2h)^2 - 0.5) D2
                    let two_h = r(2.0 * h);
                    w.w2 = r(pt.alpha * r(r(r(one_minus - two_h) / r(two_h * two_h)) - 0.5));
                }
            }
            DpmAlgorithmType::SdeDpmSolver => {
                // x_t = (alpha_t / alpha_s0) x - 2 sigma_t (e^h - 1) D0 + sigma_t sqrt(e^2h - 1) z
                let b = r(pt.sigma * em1(h));
                w.a = r(pt.alpha / p0.alpha);
                w.w0 = -r(2.0 * b);
                w.wz = r(pt.sigma * r(em1(r(2.0 * h)).sqrt()));
                w.w1 = match (order, heun) {
                    (1, _) => 0.0,
                    // midpoint: - sigma_t (e^h - 1) D1
                    (_, false) => -b,
                    // heun: - 2 sigma_t ((e^h - 1) / h - 1) D1
                    (_, true) => -r(2.0 * r(pt.sigma * r(r(em1(h) / h) - 1.0))),
                };
                // no third order: refused by the config (diffusers has none)
            }
        }
        w
    }
}
