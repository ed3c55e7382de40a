//! Spatial self-attention over the H*W positions (diffusers' `Attention` as used by UNet2DModel).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use crate::ops::attention;
use crate::ops::conv::conv2d;

use crate::nn::{group_norm, linear, GroupNorm, Linear, Recorder};

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
    ///
    /// The projections run as 1x1 convolutions in the channel-major layout (q, k and v as one product
    /// with the three weights stacked), so that no (N, HW, C) copy of the activations is made:
    ///
    ///   qkv = [W_q; W_k; W_v] group_norm(x) + [b_q; b_k; b_v]     (N, 3C, HW)
    ///   a   = softmax(q k^T / sqrt(d)) v per head                  (N, C, HW), crate::ops::attention
    ///   y   = (W_out a + b_out + x) / rescale_output_factor
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let hs = self.group_norm.forward(x)?;
        let (weights, biases) = self.qkv_params()?;
        let qkv = conv2d(&hs, &weights, Some(&biases), 1, 0)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let a = attention(&qkv.reshape((n, 3 * c, h * w))?, self.heads, scale)?.reshape((n, c, h, w))?;
        let out_w = self.to_out.weight().reshape((c, c, 1, 1))?;
        let out = conv2d(&a, &out_w, Some(self.to_out.bias()), 1, 0)?;
        let y = (out + x)?;
        if self.rescale_output_factor == 1.0 {
            Ok(y)
        } else {
            y / self.rescale_output_factor
        }
    }

    /// The stacked projection weights [W_q; W_k; W_v] as a (3C, C, 1, 1) kernel and their biases (3C).
    fn qkv_params(&self) -> Result<(Tensor, Tensor)> {
        let layers = [&self.to_q, &self.to_k, &self.to_v];
        let c = self.to_q.weight().dim(0)?;
        let weights = Tensor::cat(&layers.map(|l| l.weight()), 0)?.reshape((3 * c, c, 1, 1))?;
        let biases = Tensor::cat(&layers.map(|l| l.bias()), 0)?;
        Ok((weights, biases))
    }
}
