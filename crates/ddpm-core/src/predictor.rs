//! The network interface that the reverse process and the training loss drive.

use candle_core::Tensor;

use crate::rng::NoiseRng;

/// A network that, given a noisy batch `x_t` (N, C, H, W) and one timestep per sample `t` (N, i64 or
/// u32), predicts the model output (noise, x0 or v, as the scheduler's `prediction_type` says), of the
/// same shape as `x_t`.
///
/// ddpm-core never knows which network it drives: any closure
/// `Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>` is a predictor too, and so is any
/// [`TimeModule`] wrapped in [`ModulePredictor`].
pub trait NoisePredictor {
    /// Predicts the model output for `x_t` at timesteps `t`, in evaluation mode (no dropout).
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor>;

    /// The training-mode prediction that [`crate::training_loss`] differentiates: dropout and any other
    /// training-only randomness drawn from `rng`, so that a run repeats bit for bit. A network without
    /// such layers keeps this default, its evaluation forward.
    fn predict_train(&self, x_t: &Tensor, t: &Tensor, rng: &mut NoiseRng) -> candle_core::Result<Tensor> {
        let _ = rng;
        self.predict(x_t, t)
    }
}

impl<F> NoisePredictor for F
where
    F: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
{
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self(x_t, t)
    }
}

/// A network of two inputs in the manner of `candle_nn::ModuleT`: `forward_t(x_t, t, train)`, where
/// `train` is `None` in evaluation mode and, in training mode, the generator its dropout draws from
/// (candle's own dropout draws from candle's generator, which cannot be seeded on the CPU).
pub trait TimeModule {
    /// The network's output for `x_t` at timesteps `t`; training mode when `train` is `Some`.
    fn forward_t(&self, x_t: &Tensor, t: &Tensor, train: Option<&mut NoiseRng>) -> candle_core::Result<Tensor>;
}

/// Makes a [`TimeModule`] a [`NoisePredictor`]: `predict` is `forward_t(x_t, t, None)`,
/// `predict_train` is `forward_t(x_t, t, Some(rng))`.
#[derive(Debug, Clone)]
pub struct ModulePredictor<M>(pub M);

impl<M: TimeModule> NoisePredictor for ModulePredictor<M> {
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward_t(x_t, t, None)
    }

    fn predict_train(&self, x_t: &Tensor, t: &Tensor, rng: &mut NoiseRng) -> candle_core::Result<Tensor> {
        self.0.forward_t(x_t, t, Some(rng))
    }
}
