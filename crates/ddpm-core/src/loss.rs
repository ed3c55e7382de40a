//! The training loss L_simple (Ho et al. 2020, eq. 14): the mean squared error between the network
//! output and its target, for the three prediction types, with optional per-timestep weights.
//!
//! The squared error is [`crate::ops::weighted_mse`] (one fused op with an analytic backward on the
//! CPU, candle's differentiable ops elsewhere), so the returned scalar backpropagates into the
//! network that made the output.

use candle_core::Tensor;

use crate::config::PredictionType;
use crate::error::{Error, Result};
use crate::predictor::NoisePredictor;
use crate::rng::NoiseRng;
use crate::schedule::NoiseSchedule;

/// Per-timestep weighting of the squared error.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum LossWeighting {
    /// Every timestep weighs 1: L_simple.
    #[default]
    None,
    /// Min-SNR-gamma (Hang et al. 2023), with snr_t = alpha_bar_t / (1 - alpha_bar_t):
    /// epsilon: w_t = min(snr_t, gamma) / snr_t; sample: w_t = min(snr_t, gamma);
    /// v_prediction: w_t = min(snr_t, gamma) / (snr_t + 1). gamma = 5 is the paper's choice.
    MinSnr {
        /// The cap on the SNR; must be positive.
        gamma: f64,
    },
}

impl LossWeighting {
    /// The weight of timestep `t` for a network predicting `prediction_type`.
    pub fn weight(&self, schedule: &NoiseSchedule, prediction_type: PredictionType, t: usize) -> Result<f64> {
        match *self {
            LossWeighting::None => Ok(1.0),
            LossWeighting::MinSnr { gamma } => {
                if !(gamma.is_finite() && gamma > 0.0) {
                    return Err(Error::arg(format!("min-SNR gamma must be positive, got {gamma}")));
                }
                // snr_t = alpha_bar_t / (1 - alpha_bar_t)
                let snr = schedule.snr(t)?;
                // min(snr_t, gamma)
                let m = snr.min(gamma);
                Ok(match prediction_type {
                    // w = min(snr, gamma) / snr (-> 1 as snr -> 0)
                    PredictionType::Epsilon => {
                        if snr > 0.0 {
                            m / snr
                        } else {
                            1.0
                        }
                    }
                    // w = min(snr, gamma)
                    PredictionType::Sample => m,
                    // w = min(snr, gamma) / (snr + 1)
                    PredictionType::VPrediction => m / (snr + 1.0),
                })
            }
        }
    }
}

/// The regression target of the network at timesteps `ts` (one per sample):
/// epsilon: the noise; sample: x_0; v_prediction: v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0.
pub fn target(schedule: &NoiseSchedule, prediction_type: PredictionType, x0: &Tensor, noise: &Tensor, ts: &[usize]) -> Result<Tensor> {
    if x0.dims() != noise.dims() {
        return Err(Error::arg(format!("x0 {:?} and noise {:?} differ in shape", x0.dims(), noise.dims())));
    }
    Ok(match prediction_type {
        PredictionType::Epsilon => noise.clone(),
        PredictionType::Sample => x0.clone(),
        PredictionType::VPrediction => schedule.velocity(x0, noise, ts)?,
    })
}

/// The loss of a model output: mean over the batch of w_t * mean over dims of (output - target)^2,
/// a scalar tensor that backpropagates into `model_output`. `t` holds one timestep per sample
/// (integer tensor of shape N); the prediction type is the schedule config's.
pub fn simple_loss(
    schedule: &NoiseSchedule,
    weighting: LossWeighting,
    model_output: &Tensor,
    x0: &Tensor,
    noise: &Tensor,
    t: &Tensor,
) -> Result<Tensor> {
    let ts = schedule.timesteps_to_vec(t)?;
    simple_loss_at(schedule, weighting, model_output, x0, noise, &ts)
}

/// [`simple_loss`] with the timesteps already on the host.
pub fn simple_loss_at(
    schedule: &NoiseSchedule,
    weighting: LossWeighting,
    model_output: &Tensor,
    x0: &Tensor,
    noise: &Tensor,
    ts: &[usize],
) -> Result<Tensor> {
    let pt = schedule.config().prediction_type;
    if model_output.dims() != x0.dims() {
        return Err(Error::arg(format!("model output {:?} and x0 {:?} differ in shape", model_output.dims(), x0.dims())));
    }
    let target = target(schedule, pt, x0, noise, ts)?.detach();
    let weights = match weighting {
        // L_simple = E ||output - target||^2 (mean over every element)
        LossWeighting::None => None,
        _ => {
            let n = x0.dim(0)?;
            if ts.len() != n {
                return Err(Error::arg(format!("{} timesteps for a batch of {n}", ts.len())));
            }
            Some(ts.iter().map(|&t| weighting.weight(schedule, pt, t).map(|w| w as f32)).collect::<Result<Vec<f32>>>()?)
        }
    };
    // L = mean_i w_{t_i} mean_j (output_ij - target_ij)^2, fused on the CPU
    Ok(crate::ops::weighted_mse(model_output, &target, weights.as_deref())?)
}

/// The output of [`training_loss`]: the loss and the draws that made it.
#[derive(Debug, Clone)]
pub struct TrainingLoss {
    /// The scalar loss; backpropagates into the predictor's parameters.
    pub loss: Tensor,
    /// The timesteps drawn, one per sample (i64, shape N).
    pub t: Tensor,
    /// The noise drawn.
    pub noise: Tensor,
}

/// One training loss evaluation (Ho et al. 2020, algorithm 1): t ~ Uniform{0..T-1} and
/// eps ~ N(0, I) from `rng`, x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, and the loss of
/// the predictor's training-mode output ([`NoisePredictor::predict_train`], its dropout drawing from
/// `rng` after t and eps) at (x_t, t) against the target of the config's prediction type.
pub fn training_loss<P: NoisePredictor + ?Sized>(
    predictor: &P,
    schedule: &NoiseSchedule,
    weighting: LossWeighting,
    x0: &Tensor,
    rng: &mut NoiseRng,
) -> Result<TrainingLoss> {
    if x0.rank() == 0 {
        return Err(Error::arg("x0 must have a batch dimension"));
    }
    let n = x0.dim(0)?;
    let (t_host, t) = rng.timesteps(n, schedule.num_train_timesteps(), x0.device())?;
    let noise = rng.randn(x0.shape(), x0.dtype(), x0.device())?;
    let x_t = schedule.q_sample_at(x0, &t_host, &noise)?;
    let out = predictor.predict_train(&x_t, &t, rng)?;
    let loss = simple_loss_at(schedule, weighting, &out, x0, &noise, &t_host)?;
    Ok(TrainingLoss { loss, t, noise })
}
