//! diffusers' `ResnetBlock2D` with the time embedding added after the first conv ("default").

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use crate::ops::conv::Conv2d;
use ddpm_core::NoiseRng;

mod node;

use crate::nn::{conv2d, dropout_seed, group_norm, linear, silu, GroupNorm, Linear, Recorder};

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
    ///
    /// When gradients are tracked on the CPU in f32 the block is one node of candle's graph with the
    /// backward written out in `resnet/node.rs` (same values and gradients, without the zeroed
    /// buffer and the add that candle's gradient store spends on every edge inside the block).
    pub fn forward(&self, x: &Tensor, temb: &Tensor, rng: Option<&mut NoiseRng>) -> Result<Tensor> {
        let t = self.time_emb_proj.forward(&silu(temb)?)?;
        let seed = dropout_seed(self.dropout, rng);
        if node::applies(self, x) {
            return node::forward(self, x, &t, seed);
        }
        let p = self.parts(x, &t, seed)?;
        self.output(&p.skip, &p.out)
    }

    /// The block up to its last sum, for `x`, the projected time embedding `t` (N, C_out) and the
    /// dropout mask's seed:
    ///
    /// h1 = SiLU(norm1(x))
    /// h  = conv1(h1) + t[:, :, None, None]     (t joins conv1's bias as one row per sample)
    /// h2 = dropout(SiLU(norm2(h)))
    /// out = conv2(h2), skip = shortcut(x)
    pub(crate) fn parts(&self, x: &Tensor, t: &Tensor, seed: Option<u64>) -> Result<Parts> {
        let bias = match &self.conv1.bias {
            Some(b) => t.broadcast_add(&crate::ops::cast_like(b, t)?)?,
            None => t.clone(),
        };
        let c1 = &self.conv1;
        let h1 = self.h1(x)?;
        let h = crate::ops::conv::conv2d(&h1, &c1.weight, Some(&bias), c1.stride, c1.padding)?;
        let h2 = self.h2(&h, seed)?;
        let out = self.conv2.forward(&h2)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok(Parts { h1, h, h2, out, skip })
    }

    /// h1 = SiLU(norm1(x)), conv1's input.
    fn h1(&self, x: &Tensor) -> Result<Tensor> {
        self.norm1.forward_silu(x)
    }

    /// h2 = dropout(SiLU(norm2(h))), conv2's input, with the dropout mask of `seed` (none: no dropout).
    fn h2(&self, h: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        let h2 = self.norm2.forward_silu(h)?;
        match seed {
            Some(s) => crate::ops::dropout(&h2, self.dropout, s),
            None => Ok(h2),
        }
    }

    /// The parameters in a fixed order: norm1 (weight, bias), conv1 (weight, bias), norm2, conv2,
    /// then conv_shortcut if there is one; `None` if a convolution has no bias.
    fn params(&self) -> Option<Vec<&Tensor>> {
        let convs = [Some(&self.conv1), Some(&self.conv2), self.conv_shortcut.as_ref()];
        let [c1, c2, sc] = convs.map(|c| c.map(|c| Some([&c.weight, c.bias.as_ref()?])));
        let mut out = Vec::with_capacity(10);
        out.extend(self.norm1.params());
        out.extend(c1??);
        out.extend(self.norm2.params());
        out.extend(c2??);
        if let Some(sc) = sc {
            out.extend(sc?);
        }
        Some(out)
    }

    /// The same block on detached parameters (shared storage, no gradient tracking).
    fn detached(&self) -> Self {
        let conv = |c: &Conv2d| Conv2d::new(c.weight.detach(), c.bias.as_ref().map(Tensor::detach), c.stride, c.padding);
        Self {
            norm1: self.norm1.detached(),
            conv1: conv(&self.conv1),
            norm2: self.norm2.detached(),
            conv2: conv(&self.conv2),
            conv_shortcut: self.conv_shortcut.as_ref().map(conv),
            ..self.clone()
        }
    }

    /// y = (skip + h) / output_scale_factor.
    fn output(&self, skip: &Tensor, h: &Tensor) -> Result<Tensor> {
        let y = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(y)
        } else {
            y / self.output_scale_factor
        }
    }
}

/// The intermediate tensors of [`ResnetBlock2D::parts`] (see there for the formulas).
pub(crate) struct Parts {
    /// SiLU(norm1(x)), conv1's input.
    pub h1: Tensor,
    /// conv1's output, norm2's input.
    pub h: Tensor,
    /// conv2's input (after dropout).
    pub h2: Tensor,
    /// conv2's output.
    pub out: Tensor,
    /// The shortcut: x, or conv_shortcut(x).
    pub skip: Tensor,
}
