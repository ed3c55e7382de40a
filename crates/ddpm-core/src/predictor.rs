//! The network interface that the reverse process drives.

use candle_core::Tensor;

/// A network that, given a noisy batch `x_t` (N, C, H, W) and one timestep per sample `t` (N, i64 or
/// u32), predicts the model output (noise, x0 or v, as the scheduler's `prediction_type` says), of the
/// same shape as `x_t`.
///
/// ddpm-core never knows which network it drives: any closure
/// `Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>` is a predictor too.
pub trait NoisePredictor {
    /// Predicts the model output for `x_t` at timesteps `t`.
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor>;
}

impl<F> NoisePredictor for F
where
    F: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
{
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self(x_t, t)
    }
}
