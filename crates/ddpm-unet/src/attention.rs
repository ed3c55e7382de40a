//! Spatial self-attention over the H*W positions (diffusers' `Attention` as used by UNet2DModel).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use crate::nn::{group_norm, linear, GroupNorm, Recorder};

/// Multi-head self-attention with a group norm in front and a residual connection:
///
/// h = group_norm(x) viewed as (N, HW, C); q, k, v = to_q(h), to_k(h), to_v(h), split into heads of
/// width d; a = softmax(q k^T / sqrt(d)) v; y = (to_out.0(a) + x) / rescale_output_factor.
#[derive(Debug, Clone)]
pub struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    rescale_output_factor: f64,
}

impl Attention {
    pub(crate) fn new(
        vb: VarBuilder,
        rec: &Recorder,
        channels: usize,
        head_dim: usize,
        groups: usize,
        eps: f64,
        rescale_output_factor: f64,
    ) -> Result<Self> {
        if head_dim == 0 || !channels.is_multiple_of(head_dim) {
            candle_core::bail!(
                "attention: head width {head_dim} does not divide {channels} channels"
            );
        }
        Ok(Self {
            group_norm: group_norm(vb.pp("group_norm"), rec, groups, channels, eps)?,
            to_q: linear(vb.pp("to_q"), rec, channels, channels)?,
            to_k: linear(vb.pp("to_k"), rec, channels, channels)?,
            to_v: linear(vb.pp("to_v"), rec, channels, channels)?,
            to_out: linear(vb.pp("to_out").pp("0"), rec, channels, channels)?,
            heads: channels / head_dim,
            head_dim,
            rescale_output_factor,
        })
    }

    /// Applies attention to `x` (N, C, H, W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let hw = h * w;
        let (heads, d) = (self.heads, self.head_dim);
        // (N, C, H, W) -> (N, HW, C)
        let hs = self
            .group_norm
            .forward(x)?
            .reshape((n, c, hw))?
            .transpose(1, 2)?
            .contiguous()?;
        // (N, HW, C) -> (N, heads, HW, d)
        let split = |t: Tensor| t.reshape((n, hw, heads, d))?.transpose(1, 2)?.contiguous();
        let scale = 1.0 / (d as f64).sqrt();
        let q = split((self.to_q.forward(&hs)? * scale)?)?;
        let k = split(self.to_k.forward(&hs)?)?;
        let v = split(self.to_v.forward(&hs)?)?;
        // softmax((q / sqrt(d)) k^T) in f32 (diffusers' upcast_softmax); `ops::softmax` has a backward.
        let scores = q.matmul(&k.t()?)?;
        let dtype = scores.dtype();
        let probs =
            candle_nn::ops::softmax(&scores.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(dtype)?;
        // (N, heads, HW, d) -> (N, HW, C)
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((n, hw, c))?;
        let out = self.to_out.forward(&a)?;
        // back to (N, C, H, W), residual, rescale
        let out = out.transpose(1, 2)?.reshape((n, c, h, w))?;
        let y = (out + x)?;
        if self.rescale_output_factor == 1.0 {
            Ok(y)
        } else {
            y / self.rescale_output_factor
        }
    }
}
