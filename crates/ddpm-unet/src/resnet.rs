//! diffusers' `ResnetBlock2D` with the time embedding added after the first conv ("default").

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use ddpm_core::ops::conv::Conv2d;
use ddpm_core::NoiseRng;

use crate::nn::{conv2d, dropout, group_norm, linear, silu, GroupNorm, Recorder};

/// A residual block:
///
/// h = conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(temb))[:, :, None, None]
/// h = conv2(dropout(SiLU(norm2(h))))
/// y = (shortcut(x) + h) / output_scale_factor, shortcut = 1x1 `conv_shortcut` when channels change.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    dropout: f64,
    output_scale_factor: f64,
}

/// Hyper-parameters shared by every residual block of a UNet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResnetParams {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub dropout: f64,
}

impl ResnetBlock2D {
    pub(crate) fn new(
        vb: VarBuilder,
        rec: &Recorder,
        in_c: usize,
        out_c: usize,
        p: ResnetParams,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let norm1 = group_norm(vb.pp("norm1"), rec, p.groups, in_c, p.eps)?;
        let conv1 = conv2d(vb.pp("conv1"), rec, in_c, out_c, 3, 1, 1)?;
        let time_emb_proj = linear(vb.pp("time_emb_proj"), rec, p.temb_channels, out_c)?;
        let norm2 = group_norm(vb.pp("norm2"), rec, p.groups, out_c, p.eps)?;
        let conv2 = conv2d(vb.pp("conv2"), rec, out_c, out_c, 3, 1, 1)?;
        let conv_shortcut = if in_c != out_c {
            Some(conv2d(vb.pp("conv_shortcut"), rec, in_c, out_c, 1, 0, 1)?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            dropout: p.dropout,
            output_scale_factor,
        })
    }

    /// Applies the block to `x` (N, C_in, H, W) with time embedding `temb` (N, D); dropout only when
    /// `rng` is given (training).
    pub fn forward(&self, x: &Tensor, temb: &Tensor, rng: Option<&mut NoiseRng>) -> Result<Tensor> {
        // h = conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(temb)) broadcast over H, W: the (N, C) time
        // term joins conv1's bias as one row per sample, so it costs no pass over h.
        let t = self.time_emb_proj.forward(&silu(temb)?)?;
        let bias = match &self.conv1.bias {
            Some(b) => t.broadcast_add(b)?,
            None => t,
        };
        let c1 = &self.conv1;
        let h = ddpm_core::ops::conv::conv2d(&self.norm1.forward_silu(x)?, &c1.weight, Some(&bias), c1.stride, c1.padding)?;
        // h = conv2(dropout(SiLU(norm2(h))))
        let h = self.norm2.forward_silu(&h)?;
        let h = dropout(&h, self.dropout, rng)?;
        let h = self.conv2.forward(&h)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        // y = (shortcut(x) + h) / output_scale_factor
        let y = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(y)
        } else {
            y / self.output_scale_factor
        }
    }
}
