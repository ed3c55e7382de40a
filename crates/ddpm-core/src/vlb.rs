//! The variational bound on the negative log-likelihood (Ho et al. 2020, sec. 3.3 and eq. 5;
//! Nichol and Dhariwal 2021, sec. 2):
//!
//! L_vlb = L_T + sum_{t>1} L_{t-1} + L_0, with
//! L_T = KL(q(x_T | x_0) || N(0, I)), the prior term;
//! L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), Gaussians with the true posterior and the
//! model's mean (from its x_0 prediction) and fixed variance;
//! L_0 = -log p(x_0 | x_1), a Gaussian discretized into the 256 bins of 8-bit data scaled to [-1, 1].
//!
//! Timesteps here are 0-based as in diffusers: the term at timestep t = 0 is the decoder L_0, the
//! term at t > 0 is the KL of the step from t to t - 1. Values are reported in bits per dimension:
//! nats / ln 2 / (number of dimensions).

use candle_core::{Tensor, D};

use crate::config::VarianceType;
use crate::ddpm::clip_or_threshold;
use crate::error::{Error, Result};
use crate::predictor::NoisePredictor;
use crate::rng::NoiseRng;
use crate::schedule::NoiseSchedule;

/// Half the width of a data bin: 8-bit data in [-1, 1] has bins of width 2/255.
pub const BIN_HALF_WIDTH: f64 = 1.0 / 255.0;

/// Element-wise KL divergence between Gaussians N(mean1, exp(logvar1)) and N(mean2, exp(logvar2)),
/// in nats; the arguments broadcast against each other:
/// KL = 0.5 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2)).
pub fn normal_kl(mean1: &Tensor, logvar1: &Tensor, mean2: &Tensor, logvar2: &Tensor) -> Result<Tensor> {
    // logvar2 - logvar1
    let dlog = logvar2.broadcast_sub(logvar1)?;
    // exp(logvar1 - logvar2)
    let ratio = dlog.neg()?.exp()?;
    // (mean1 - mean2)^2 exp(-logvar2)
    let sq = mean1.broadcast_sub(mean2)?.sqr()?.broadcast_mul(&logvar2.neg()?.exp()?)?;
    // 0.5 (-1 + (logvar2 - logvar1) + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2))
    let sum = dlog.broadcast_add(&ratio)?.broadcast_add(&sq)?;
    Ok(((sum - 1.0)? * 0.5)?)
}

/// The standard normal CDF, Phi(x) = 0.5 (1 + erf(x / sqrt(2))).
pub fn std_normal_cdf(x: &Tensor) -> Result<Tensor> {
    // Phi(x) = 0.5 (1 + erf(x / sqrt 2))
    Ok(((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?.affine(0.5, 0.0)?)
}

/// The tanh approximation of the standard normal CDF used by the DDPM and Improved DDPM code:
/// Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
pub fn approx_std_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    // x + 0.044715 x^3
    let inner = (x + ((x.sqr()? * x)? * 0.044715)?)?;
    // 0.5 (1 + tanh(sqrt(2/pi) inner))
    Ok(((inner * c)?.tanh()? + 1.0)?.affine(0.5, 0.0)?)
}

/// Element-wise log-likelihood, in nats, of data `x` in [-1, 1] (8-bit values rescaled) under a
/// Gaussian with `means` and `log_scales` = log sigma discretized into bins of width 2/255
/// (Ho et al. 2020, eq. 13):
/// log [Phi((x + 1/255 - mu) / sigma) - Phi((x - 1/255 - mu) / sigma)] inside, with the lowest bin
/// extended to -infinity (x < -0.999: log Phi((x + 1/255 - mu) / sigma)) and the highest to
/// +infinity (x > 0.999: log(1 - Phi((x - 1/255 - mu) / sigma))). Probabilities are floored at 1e-12.
/// The CDF is the exact one (erf).
pub fn discretized_gaussian_log_likelihood(x: &Tensor, means: &Tensor, log_scales: &Tensor) -> Result<Tensor> {
    // centered = x - mu; inv_std = exp(-log sigma)
    let centered = x.broadcast_sub(means)?;
    let inv_stdv = log_scales.neg()?.exp()?;
    // Phi((x + 1/255 - mu) / sigma)
    let cdf_plus = std_normal_cdf(&(centered.clone() + BIN_HALF_WIDTH)?.broadcast_mul(&inv_stdv)?)?;
    // Phi((x - 1/255 - mu) / sigma)
    let cdf_min = std_normal_cdf(&(centered - BIN_HALF_WIDTH)?.broadcast_mul(&inv_stdv)?)?;
    // log Phi(plus), the lowest bin
    let log_cdf_plus = cdf_plus.maximum(1e-12)?.log()?;
    // log(1 - Phi(min)), the highest bin
    let log_one_minus_cdf_min = cdf_min.affine(-1.0, 1.0)?.maximum(1e-12)?.log()?;
    // log(Phi(plus) - Phi(min)), the inner bins
    let log_cdf_delta = (&cdf_plus - &cdf_min)?.maximum(1e-12)?.log()?;
    let x = x.broadcast_as(log_cdf_plus.shape())?;
    let high = x.gt(0.999)?.where_cond(&log_one_minus_cdf_min, &log_cdf_delta)?;
    Ok(x.lt(-0.999)?.where_cond(&log_cdf_plus, &high)?)
}

/// The fixed model variance of the configured `variance_type` at every timestep, as its log:
/// fixed_small(_log): log beta-tilde_t (with beta-tilde_0 clipped to beta-tilde_1);
/// fixed_large(_log): log beta_t, with beta_0 replaced by beta-tilde_1 (Improved DDPM).
/// Learned variances are unsupported.
pub fn model_log_variance(schedule: &NoiseSchedule) -> Result<Vec<f64>> {
    match schedule.config().variance_type {
        VarianceType::FixedSmall | VarianceType::FixedSmallLog => Ok(schedule.posterior_log_variance_clipped().to_vec()),
        VarianceType::FixedLarge | VarianceType::FixedLargeLog => {
            let betas = schedule.betas();
            let pv = schedule.posterior_variance();
            let first = if betas.len() > 1 { pv[1] } else { betas[0] };
            // log [beta-tilde_1, beta_1, beta_2, ...]
            Ok(std::iter::once(first).chain(betas.iter().copied().skip(1)).map(f64::ln).collect())
        }
        v @ (VarianceType::Learned | VarianceType::LearnedRange) => {
            Err(Error::Unsupported(format!("the variational bound with variance_type `{v}`")))
        }
    }
}

/// Mean over every dimension but the first: (N, ...) -> (N).
fn mean_flat(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(1)?.mean(D::Minus1)?)
}

/// The bound's term at timesteps `ts` (one per sample), in bits per dimension, shape (N), from a
/// model output already computed at (x_t, t): the KL of the step for t > 0 and the decoder NLL for
/// t = 0. The model's x_0 is clipped or thresholded as the sampler does; the result is
/// differentiable in `model_output`.
pub fn vlb_terms_from_output(schedule: &NoiseSchedule, model_output: &Tensor, x0: &Tensor, x_t: &Tensor, ts: &[usize]) -> Result<Tensor> {
    let log_var = model_log_variance(schedule)?;
    let n = x0.dim(0)?;
    if ts.len() != n {
        return Err(Error::arg(format!("{} timesteps for a batch of {n}", ts.len())));
    }
    // The true posterior q(x_{t-1} | x_t, x_0).
    let truth = schedule.posterior_mean_variance_at(x0, x_t, ts)?;
    // The model: mu_theta = posterior mean with x_0 replaced by the model's (clipped) x_0.
    let pred_x0 = schedule.predict_x0(schedule.config().prediction_type, model_output, x_t, ts)?;
    let pred_x0 = clip_or_threshold(schedule.config(), pred_x0)?;
    let model = schedule.posterior_mean_variance_at(&pred_x0, x_t, ts)?;
    let model_logvar = schedule.gather(&log_var, ts, x0)?;
    let ln2 = std::f64::consts::LN_2;

    let any_zero = ts.contains(&0);
    let all_zero = ts.iter().all(|&t| t == 0);
    // L_{t-1} = KL(q || p) averaged over dims, in bits
    let kl = if all_zero {
        None
    } else {
        let kl = normal_kl(&truth.mean, &truth.log_variance, &model.mean, &model_logvar)?;
        Some((mean_flat(&kl)? / ln2)?)
    };
    // L_0 = -log p(x_0 | x_1) averaged over dims, in bits, with log sigma = 0.5 log var
    let dec = if any_zero {
        let ll = discretized_gaussian_log_likelihood(x0, &model.mean, &(model_logvar * 0.5)?)?;
        Some((mean_flat(&ll)? / -ln2)?)
    } else {
        None
    };
    match (kl, dec) {
        (Some(kl), None) => Ok(kl),
        (None, Some(dec)) => Ok(dec),
        (Some(kl), Some(dec)) => {
            let mask: Vec<u8> = ts.iter().map(|&t| u8::from(t == 0)).collect();
            let mask = Tensor::from_vec(mask, n, x0.device())?;
            Ok(mask.where_cond(&dec, &kl)?)
        }
        (None, None) => Err(Error::arg("empty batch")),
    }
}

/// The bound's term at timesteps `t` (integer tensor, one per sample) in bits per dimension,
/// shape (N): draws x_t = q_sample(x_0, t, noise), runs the predictor and calls
/// [`vlb_terms_from_output`].
pub fn vlb_terms<P: NoisePredictor + ?Sized>(predictor: &P, schedule: &NoiseSchedule, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Result<Tensor> {
    let ts = schedule.timesteps_to_vec(t)?;
    let x_t = schedule.q_sample_at(x0, &ts, noise)?;
    let out = predictor.predict(&x_t, t)?;
    vlb_terms_from_output(schedule, &out, x0, &x_t, &ts)
}

/// The prior term L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, shape (N). It has no
/// parameters; it is small when alpha_bar_T is close to 0.
pub fn prior_bpd(schedule: &NoiseSchedule, x0: &Tensor) -> Result<Tensor> {
    if x0.rank() == 0 {
        return Err(Error::arg("x0 must have a batch dimension"));
    }
    let t_last = schedule.num_train_timesteps() - 1;
    // q(x_T | x_0) = N(sqrt(alpha_bar_T) x_0, (1 - alpha_bar_T) I)
    let ab = schedule.alphas_cumprod()[t_last];
    let mean = (x0 * ab.sqrt())?;
    let logvar = schedule.gather(&[(1.0 - ab).ln()], &[0], x0)?;
    let zeros = logvar.zeros_like()?;
    let kl = normal_kl(&mean, &logvar, &zeros, &zeros)?;
    Ok((mean_flat(&kl)? / std::f64::consts::LN_2)?)
}

/// The full bound of [`nll_bits_per_dim`].
#[derive(Debug, Clone)]
pub struct NllOutput {
    /// L_vlb in bits per dimension, one per sample (N): an upper bound on the NLL.
    pub total_bpd: Tensor,
    /// The prior term L_T, (N).
    pub prior_bpd: Tensor,
    /// Every term in bits per dimension, (N, T); column t is the term of timestep t
    /// (column 0 the decoder L_0).
    pub terms_bpd: Tensor,
}

/// The variational bound on -log p(x_0), in bits per dimension, for a batch `x0` in [-1, 1]: the
/// sum over all T timesteps of [`vlb_terms`] (each with fresh noise from `rng`, going from T-1 down
/// to 0) plus [`prior_bpd`]. `progress(done, total)` is called after each timestep. No gradient
/// graph is kept.
pub fn nll_bits_per_dim<P: NoisePredictor + ?Sized>(
    predictor: &P,
    schedule: &NoiseSchedule,
    x0: &Tensor,
    rng: &mut NoiseRng,
    mut progress: impl FnMut(usize, usize),
) -> Result<NllOutput> {
    if x0.rank() == 0 {
        return Err(Error::arg("x0 must have a batch dimension"));
    }
    let x0 = x0.detach();
    let n = x0.dim(0)?;
    let t_len = schedule.num_train_timesteps();
    let mut terms: Vec<Tensor> = Vec::with_capacity(t_len);
    for (done, t) in (0..t_len).rev().enumerate() {
        let t_tensor = Tensor::full(t as i64, n, x0.device())?;
        let noise = rng.randn(x0.shape(), x0.dtype(), x0.device())?;
        let ts = vec![t; n];
        let x_t = schedule.q_sample_at(&x0, &ts, &noise)?;
        let out = predictor.predict(&x_t, &t_tensor)?.detach();
        terms.push(vlb_terms_from_output(schedule, &out, &x0, &x_t, &ts)?.detach());
        progress(done + 1, t_len);
    }
    terms.reverse();
    let terms_bpd = Tensor::stack(&terms, 1)?;
    let prior = prior_bpd(schedule, &x0)?;
    // L_vlb = sum_t L_t + L_T
    let total = (terms_bpd.sum(1)? + &prior)?;
    Ok(NllOutput { total_bpd: total, prior_bpd: prior, terms_bpd })
}
