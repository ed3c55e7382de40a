//! The noise schedule and the forward process q(x_t | x_0).
//!
//! Every array is computed once in f64 on the host (`betas`, `alphas`, `alphas_cumprod`, the
//! posterior variance and mean coefficients). Per-sample coefficients are gathered on the host
//! and sent to the device of the data as a small (N, 1, ..., 1) tensor in the data's dtype, so that
//! every tensor operation runs where the data lives (CPU, CUDA or Metal).

use candle_core::{DType, Device, Tensor};

use crate::config::{BetaSchedule, PredictionType, SchedulerConfig};
use crate::error::{Error, Result};

/// The largest beta of the `squaredcos_cap_v2` schedule (Improved DDPM caps betas at 0.999).
pub const MAX_BETA_COSINE: f64 = 0.999;

/// Mean and variance of a diagonal Gaussian over a batch.
///
/// `mean` has the shape of the data; `variance` and `log_variance` hold one value per sample,
/// shaped (N, 1, ..., 1) so that they broadcast against the data.
#[derive(Debug, Clone)]
pub struct Gaussian {
    /// The mean, shaped like the data.
    pub mean: Tensor,
    /// The variance, (N, 1, ..., 1).
    pub variance: Tensor,
    /// The natural logarithm of the variance, (N, 1, ..., 1).
    pub log_variance: Tensor,
}

/// The betas of `config` in f64 (validated first), one per training timestep.
pub fn compute_betas(config: &SchedulerConfig) -> Result<Vec<f64>> {
    config.validate()?;
    let n = config.num_train_timesteps;
    // linspace(a, b, n)_i = a + i (b - a) / (n - 1)
    let linspace = |a: f64, b: f64| -> Vec<f64> {
        if n == 1 {
            return vec![a];
        }
        let step = (b - a) / (n - 1) as f64;
        (0..n).map(|i| if i == n - 1 { b } else { a + i as f64 * step }).collect()
    };
    let mut betas = if let Some(b) = &config.trained_betas {
        b.clone()
    } else {
        match config.beta_schedule {
            // beta_t = linspace(beta_start, beta_end, T)_t
            BetaSchedule::Linear => linspace(config.beta_start, config.beta_end),
            // beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)_t^2
            BetaSchedule::ScaledLinear => {
                linspace(config.beta_start.sqrt(), config.beta_end.sqrt()).into_iter().map(|x| x * x).collect()
            }
            BetaSchedule::SquaredcosCapV2 => {
                // alpha_bar(s) = cos^2(((s + 0.008) / 1.008) pi / 2)
                let alpha_bar = |s: f64| ((s + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        // beta_i = min(1 - alpha_bar(t2) / alpha_bar(t1), 0.999)
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(MAX_BETA_COSINE)
                    })
                    .collect()
            }
            // beta_t = sigmoid(linspace(-6, 6, T)_t) (beta_end - beta_start) + beta_start
            BetaSchedule::Sigmoid => linspace(-6.0, 6.0)
                .into_iter()
                .map(|x| 1.0 / (1.0 + (-x).exp()) * (config.beta_end - config.beta_start) + config.beta_start)
                .collect(),
        }
    };
    if config.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    Ok(betas)
}

/// Rescales betas so that the last timestep has zero signal-to-noise ratio (Lin et al. 2023,
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1).
pub fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    if betas.is_empty() {
        return Vec::new();
    }
    // sqrt(alpha_bar_t), shifted so that the last is 0 and scaled so that the first is unchanged
    let mut acc = 1.0;
    let mut s: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc.sqrt()
        })
        .collect();
    let (s0, s_last) = (s[0], s[s.len() - 1]);
    for v in s.iter_mut() {
        // s_t <- (s_t - s_T) s_0 / (s_0 - s_T)
        *v = (*v - s_last) * s0 / (s0 - s_last);
    }
    // alpha_bar_t = s_t^2; alpha_t = alpha_bar_t / alpha_bar_{t-1}; beta_t = 1 - alpha_t
    let abar: Vec<f64> = s.iter().map(|v| v * v).collect();
    (0..abar.len()).map(|i| if i == 0 { 1.0 - abar[0] } else { 1.0 - abar[i] / abar[i - 1] }).collect()
}

/// f32 rounding of an f64, kept as f64.
fn r32(x: f64) -> f64 {
    x as f32 as f64
}

/// `torch.linspace(a, b, n, dtype=float32)` as PyTorch's CPU kernel computes it (checked bit for bit
/// against diffusers' schedules): a, b rounded to f32, step = f32(f32(b - a) / (n - 1)), the first half
/// counted up from a and the second half down from b, each value rounded to f32.
fn torch_linspace_f32(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![r32(a)];
    }
    let (a, b) = (r32(a), r32(b));
    let step = r32(r32(b - a) / (n - 1) as f64);
    let half = n / 2;
    (0..n)
        .map(|i| if i < half { r32(a + step * i as f64) } else { r32(b - step * (n - 1 - i) as f64) })
        .collect()
}

/// alpha_bar_t as diffusers holds it: float32 betas (linear and scaled_linear made exactly as
/// `torch.linspace` does, the others rounded from f64), alpha = f32(1 - beta), and the cumulative
/// product accumulated in f64 and rounded to f32 at each t, as `torch.cumprod` does on the CPU.
pub fn diffusers_f32_alphas_cumprod(config: &SchedulerConfig, betas: &[f64]) -> Vec<f64> {
    let n = betas.len();
    let betas32: Vec<f64> = if config.trained_betas.is_some() || config.rescale_betas_zero_snr {
        betas.iter().map(|&b| r32(b)).collect()
    } else {
        match config.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(config.beta_start, config.beta_end, n),
            BetaSchedule::ScaledLinear => torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                .into_iter()
                .map(|x| r32(x * x))
                .collect(),
            BetaSchedule::SquaredcosCapV2 | BetaSchedule::Sigmoid => betas.iter().map(|&b| r32(b)).collect(),
        }
    };
    let mut acc = 1.0f64;
    betas32
        .iter()
        .map(|&b| {
            acc *= r32(1.0 - b);
            r32(acc)
        })
        .collect()
}

/// The noise schedule of a [`SchedulerConfig`]: betas and every quantity derived from them, in f64.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    config: SchedulerConfig,
    device: Device,
    betas: Vec<f64>,
    alphas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    alphas_cumprod_f32: Vec<f64>,
    alphas_cumprod_prev: Vec<f64>,
    sqrt_alphas_cumprod: Vec<f64>,
    sqrt_one_minus_alphas_cumprod: Vec<f64>,
    posterior_variance: Vec<f64>,
    posterior_log_variance_clipped: Vec<f64>,
    posterior_mean_coef1: Vec<f64>,
    posterior_mean_coef2: Vec<f64>,
}

impl NoiseSchedule {
    /// Computes the schedule of `config` (validated first). `device` is where
    /// [`NoiseSchedule::to_tensor`] puts arrays; the per-sample operations follow their input.
    pub fn new(config: &SchedulerConfig, device: &Device) -> Result<Self> {
        let betas = compute_betas(config)?;
        let t_len = betas.len();
        // alpha_t = 1 - beta_t
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        // alpha_bar_t = prod_{s <= t} alpha_s
        let mut acc = 1.0;
        let alphas_cumprod: Vec<f64> = alphas
            .iter()
            .map(|a| {
                acc *= a;
                acc
            })
            .collect();
        // alpha_bar_{t-1}, with alpha_bar_{-1} = 1
        let alphas_cumprod_prev: Vec<f64> =
            std::iter::once(1.0).chain(alphas_cumprod.iter().copied().take(t_len - 1)).collect();
        let sqrt_alphas_cumprod = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let sqrt_one_minus_alphas_cumprod = alphas_cumprod.iter().map(|a| (1.0 - a).sqrt()).collect();
        let mut posterior_variance = Vec::with_capacity(t_len);
        let mut posterior_mean_coef1 = Vec::with_capacity(t_len);
        let mut posterior_mean_coef2 = Vec::with_capacity(t_len);
        for t in 0..t_len {
            let (b, a, ab, ab_prev) = (betas[t], alphas[t], alphas_cumprod[t], alphas_cumprod_prev[t]);
            // beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
            posterior_variance.push(b * (1.0 - ab_prev) / (1.0 - ab));
            // mu-tilde_t = coef1 x_0 + coef2 x_t, coef1 = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t)
            posterior_mean_coef1.push(b * ab_prev.sqrt() / (1.0 - ab));
            // coef2 = (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t)
            posterior_mean_coef2.push((1.0 - ab_prev) * a.sqrt() / (1.0 - ab));
        }
        // log beta-tilde_t, with beta-tilde_0 = 0 replaced by beta-tilde_1 (Improved DDPM's clipping)
        let first = if t_len > 1 { posterior_variance[1] } else { betas[0] };
        let posterior_log_variance_clipped = std::iter::once(first)
            .chain(posterior_variance.iter().copied().skip(1))
            .map(f64::ln)
            .collect();
        let alphas_cumprod_f32 = diffusers_f32_alphas_cumprod(config, &betas);
        Ok(Self {
            config: config.clone(),
            device: device.clone(),
            betas,
            alphas,
            alphas_cumprod,
            alphas_cumprod_f32,
            alphas_cumprod_prev,
            sqrt_alphas_cumprod,
            sqrt_one_minus_alphas_cumprod,
            posterior_variance,
            posterior_log_variance_clipped,
            posterior_mean_coef1,
            posterior_mean_coef2,
        })
    }

    /// The config this schedule was computed from.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }
    /// The device given to [`NoiseSchedule::new`].
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// T, the number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }
    /// beta_t.
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }
    /// alpha_t = 1 - beta_t.
    pub fn alphas(&self) -> &[f64] {
        &self.alphas
    }
    /// alpha_bar_t = prod_{s <= t} alpha_s.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }
    /// alpha_bar_t rounded as diffusers' float32 tensor holds it (see [`diffusers_f32_alphas_cumprod`]).
    pub fn alphas_cumprod_diffusers_f32(&self) -> &[f64] {
        &self.alphas_cumprod_f32
    }
    /// alpha_bar_{t-1}, with alpha_bar_{-1} = 1.
    pub fn alphas_cumprod_prev(&self) -> &[f64] {
        &self.alphas_cumprod_prev
    }
    /// sqrt(alpha_bar_t).
    pub fn sqrt_alphas_cumprod(&self) -> &[f64] {
        &self.sqrt_alphas_cumprod
    }
    /// sqrt(1 - alpha_bar_t).
    pub fn sqrt_one_minus_alphas_cumprod(&self) -> &[f64] {
        &self.sqrt_one_minus_alphas_cumprod
    }
    /// beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, the variance of q(x_{t-1} | x_t, x_0).
    pub fn posterior_variance(&self) -> &[f64] {
        &self.posterior_variance
    }
    /// log beta-tilde_t, with the 0 at t = 0 replaced by beta-tilde_1.
    pub fn posterior_log_variance_clipped(&self) -> &[f64] {
        &self.posterior_log_variance_clipped
    }
    /// beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t), the weight of x_0 in the posterior mean.
    pub fn posterior_mean_coef1(&self) -> &[f64] {
        &self.posterior_mean_coef1
    }
    /// (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t), the weight of x_t in the posterior mean.
    pub fn posterior_mean_coef2(&self) -> &[f64] {
        &self.posterior_mean_coef2
    }
    /// The signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at training timestep `t`.
    pub fn snr(&self, t: usize) -> Result<f64> {
        let ab = *self.alphas_cumprod.get(t).ok_or_else(|| self.out_of_range(t as i64))?;
        Ok(ab / (1.0 - ab))
    }

    /// One of the arrays (e.g. [`NoiseSchedule::alphas_cumprod`]) as an f32 tensor of shape (T) on
    /// the schedule's device.
    pub fn to_tensor(&self, values: &[f64]) -> Result<Tensor> {
        let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(v, values.len(), &self.device)?)
    }

    fn out_of_range(&self, t: i64) -> Error {
        Error::arg(format!("timestep {t} is outside [0, {})", self.num_train_timesteps()))
    }

    /// Reads a timestep tensor (rank 0 or 1, any integer dtype) back to the host and checks that
    /// every value lies in [0, T).
    pub fn timesteps_to_vec(&self, t: &Tensor) -> Result<Vec<usize>> {
        if !t.dtype().is_int() {
            return Err(Error::arg(format!("timesteps must be an integer tensor, got {:?}", t.dtype())));
        }
        if t.rank() > 1 {
            return Err(Error::arg(format!("timesteps must have shape (N), got {:?}", t.dims())));
        }
        let v = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        v.into_iter()
            .map(|x| if x < 0 || x as usize >= self.num_train_timesteps() { Err(self.out_of_range(x)) } else { Ok(x as usize) })
            .collect()
    }

    /// Per-sample coefficients `values[t_i]`, as a tensor of shape (N, 1, ..., 1) (the rank of
    /// `like`) in `like`'s dtype and on its device, ready to broadcast against a batch.
    /// `ts` holds one timestep per sample of `like`, or a single one for the whole batch.
    pub fn gather(&self, values: &[f64], ts: &[usize], like: &Tensor) -> Result<Tensor> {
        if like.rank() == 0 {
            return Err(Error::arg("the data must have a batch dimension"));
        }
        let n = like.dim(0)?;
        if ts.len() != n && ts.len() != 1 {
            return Err(Error::arg(format!("{} timesteps for a batch of {n}", ts.len())));
        }
        let v = ts
            .iter()
            .map(|&t| values.get(t).map(|&x| x as f32).ok_or_else(|| self.out_of_range(t as i64)))
            .collect::<Result<Vec<f32>>>()?;
        let mut shape = vec![1usize; like.rank()];
        shape[0] = ts.len();
        // through page-locked memory on CUDA: the copy does not wait for the device's queued work
        Ok(crate::ops::upload(v, shape, like.device())?.to_dtype(like.dtype())?)
    }

    fn check_same_shape(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
        if a.dims() != b.dims() {
            return Err(Error::arg(format!("{what}: shapes {:?} and {:?} differ", a.dims(), b.dims())));
        }
        Ok(())
    }

    /// The forward process: a draw from q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    /// with the given standard-normal `noise`, one timestep per sample (`t`: shape (N), integer).
    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Result<Tensor> {
        Self::check_same_shape(x0, noise, "q_sample x0 and noise")?;
        let ts = self.timesteps_to_vec(t)?;
        self.q_sample_at(x0, &ts, noise)
    }

    /// [`NoiseSchedule::q_sample`] with the timesteps already on the host.
    pub fn q_sample_at(&self, x0: &Tensor, ts: &[usize], noise: &Tensor) -> Result<Tensor> {
        Self::check_same_shape(x0, noise, "q_sample x0 and noise")?;
        let a = self.gather(&self.sqrt_alphas_cumprod, ts, x0)?;
        let s = self.gather(&self.sqrt_one_minus_alphas_cumprod, ts, x0)?;
        // x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// Mean and variance of q(x_t | x_0): mean sqrt(alpha_bar_t) x_0, variance 1 - alpha_bar_t.
    pub fn q_mean_variance(&self, x0: &Tensor, t: &Tensor) -> Result<Gaussian> {
        let ts = self.timesteps_to_vec(t)?;
        let one_minus: Vec<f64> = self.alphas_cumprod.iter().map(|a| 1.0 - a).collect();
        let log_one_minus: Vec<f64> = one_minus.iter().map(|v| v.ln()).collect();
        // mean = sqrt(alpha_bar_t) x_0
        let mean = x0.broadcast_mul(&self.gather(&self.sqrt_alphas_cumprod, &ts, x0)?)?;
        // variance = 1 - alpha_bar_t
        let variance = self.gather(&one_minus, &ts, x0)?;
        let log_variance = self.gather(&log_one_minus, &ts, x0)?;
        Ok(Gaussian { mean, variance, log_variance })
    }

    /// The posterior q(x_{t-1} | x_t, x_0) = N(mu-tilde_t, beta-tilde_t I) with
    /// mu-tilde_t = coef1 x_0 + coef2 x_t; `log_variance` is the clipped log beta-tilde.
    pub fn posterior_mean_variance(&self, x0: &Tensor, xt: &Tensor, t: &Tensor) -> Result<Gaussian> {
        let ts = self.timesteps_to_vec(t)?;
        self.posterior_mean_variance_at(x0, xt, &ts)
    }

    /// [`NoiseSchedule::posterior_mean_variance`] with the timesteps already on the host.
    pub fn posterior_mean_variance_at(&self, x0: &Tensor, xt: &Tensor, ts: &[usize]) -> Result<Gaussian> {
        Self::check_same_shape(x0, xt, "posterior x0 and x_t")?;
        let c1 = self.gather(&self.posterior_mean_coef1, ts, x0)?;
        let c2 = self.gather(&self.posterior_mean_coef2, ts, x0)?;
        // mu-tilde = coef1 x_0 + coef2 x_t
        let mean = (x0.broadcast_mul(&c1)? + xt.broadcast_mul(&c2)?)?;
        let variance = self.gather(&self.posterior_variance, ts, x0)?;
        let log_variance = self.gather(&self.posterior_log_variance_clipped, ts, x0)?;
        Ok(Gaussian { mean, variance, log_variance })
    }

    /// The velocity target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, ts: &[usize]) -> Result<Tensor> {
        Self::check_same_shape(x0, noise, "velocity x0 and noise")?;
        let a = self.gather(&self.sqrt_alphas_cumprod, ts, x0)?;
        let s = self.gather(&self.sqrt_one_minus_alphas_cumprod, ts, x0)?;
        // v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
    }

    /// The x_0 implied by a model output of the given prediction type at x_t:
    /// - epsilon: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    /// - sample:  x_0 = output
    /// - v:       x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v
    pub fn predict_x0(&self, prediction_type: PredictionType, model_output: &Tensor, xt: &Tensor, ts: &[usize]) -> Result<Tensor> {
        Self::check_same_shape(model_output, xt, "model output and x_t")?;
        let a = self.gather(&self.sqrt_alphas_cumprod, ts, xt)?;
        let s = self.gather(&self.sqrt_one_minus_alphas_cumprod, ts, xt)?;
        Ok(match prediction_type {
            // x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
            PredictionType::Epsilon => (xt - model_output.broadcast_mul(&s)?)?.broadcast_div(&a)?,
            PredictionType::Sample => model_output.clone(),
            // x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v
            PredictionType::VPrediction => (xt.broadcast_mul(&a)? - model_output.broadcast_mul(&s)?)?,
        })
    }

    /// The noise implied by x_0 at x_t: eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t).
    pub fn predict_eps_from_x0(&self, x0: &Tensor, xt: &Tensor, ts: &[usize]) -> Result<Tensor> {
        Self::check_same_shape(x0, xt, "x0 and x_t")?;
        let a = self.gather(&self.sqrt_alphas_cumprod, ts, xt)?;
        let s = self.gather(&self.sqrt_one_minus_alphas_cumprod, ts, xt)?;
        // eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)
        Ok((xt - x0.broadcast_mul(&a)?)?.broadcast_div(&s)?)
    }
}
