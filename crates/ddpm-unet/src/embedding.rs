//! The timestep embedding: sinusoidal features of t, then a two-layer MLP (`time_embedding`).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{linear, silu, Linear, Recorder};

/// Sinusoidal timestep features (diffusers' `Timesteps`, the Transformer's positional encoding):
///
/// half = dim / 2, freqs_i = exp(-ln(10000) * i / (half - freq_shift)) for i in 0..half,
/// emb(t) = [sin(t freqs), cos(t freqs)], or [cos, sin] when `flip_sin_to_cos`; a zero column is
/// appended when `dim` is odd. Computed in f32 as diffusers does.
#[derive(Debug, Clone)]
pub struct SinusoidalEmbedding {
    dim: usize,
    flip_sin_to_cos: bool,
    /// freqs as a (1, half) f32 tensor on the model's device.
    freqs: Tensor,
}

impl SinusoidalEmbedding {
    /// Precomputes the frequencies on `device`.
    pub fn new(
        dim: usize,
        flip_sin_to_cos: bool,
        freq_shift: usize,
        device: &Device,
    ) -> Result<Self> {
        let half = dim / 2;
        // f32 throughout, in diffusers' order of operations: (-ln(10000) * i) / (half - shift), then exp.
        let ln = -(10000f64.ln() as f32);
        let denom = half as f32 - freq_shift as f32;
        let freqs: Vec<f32> = (0..half).map(|i| ((ln * i as f32) / denom).exp()).collect();
        let freqs = Tensor::from_vec(freqs, (1, half), device)?;
        Ok(Self {
            dim,
            flip_sin_to_cos,
            freqs,
        })
    }

    /// Embeds timesteps `t` (N) of any numeric dtype into (N, dim) f32 features.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let n = t.elem_count();
        // arg[n, i] = t_n * freqs_i
        let args = t
            .to_dtype(DType::F32)?
            .reshape((n, 1))?
            .broadcast_mul(&self.freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 1)?
        } else {
            Tensor::cat(&[sin, cos], 1)?
        };
        if self.dim % 2 == 1 {
            emb.pad_with_zeros(1, 0, 1)
        } else {
            Ok(emb)
        }
    }
}

/// diffusers' `TimestepEmbedding`: emb = linear_2(SiLU(linear_1(features))), C0 -> D -> D.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub(crate) fn new(vb: VarBuilder, rec: &Recorder, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(vb.pp("linear_1"), rec, in_dim, dim)?,
            linear_2: linear(vb.pp("linear_2"), rec, dim, dim)?,
        })
    }

    /// Maps features (N, C0) to the embedding (N, D).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&silu(&self.linear_1.forward(x)?)?)
    }
}
