//! The UNet's resolution levels: down blocks, the middle block and up blocks, with their
//! down- and upsamplers (diffusers' `DownBlock2D`/`AttnDownBlock2D`, `UNetMidBlock2D`,
//! `UpBlock2D`/`AttnUpBlock2D`, `Downsample2D`, `Upsample2D`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use crate::ops::conv::Conv2d;
use ddpm_core::NoiseRng;

use crate::attention::Attention;
use crate::nn::{conv2d, Recorder};
use crate::resnet::{ResnetBlock2D, ResnetParams};

/// Halves the resolution with a 3x3 stride-2 conv (`downsamplers.0.conv`). With padding 0 the input
/// is first padded by one on the right and bottom only (as diffusers and the original DDPM do).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    fn new(vb: VarBuilder, rec: &Recorder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(vb.pp("conv"), rec, channels, channels, 3, padding, 2)?,
            pad_right_bottom: padding == 0,
        })
    }

    /// (N, C, H, W) -> (N, C, H/2, W/2).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            // F.pad(x, (0, 1, 0, 1)): one zero column on the right, one zero row at the bottom
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Doubles the resolution: nearest x2, then a 3x3 conv (`upsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    fn new(vb: VarBuilder, rec: &Recorder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(vb.pp("conv"), rec, channels, channels, 3, 1, 1)?,
        })
    }

    /// (N, C, H, W) -> (N, C, 2H, 2W), without building the upsampled image on the CPU (see
    /// [`crate::ops::conv::upsample2x_conv2d`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.conv;
        crate::ops::conv::upsample2x_conv2d(x, &c.weight, c.bias.as_ref())
    }
}

/// Attention settings of a block: head width, groups and eps of its norm.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnParams {
    pub head_dim: usize,
    pub groups: usize,
    pub eps: f64,
}

/// One level on the way down: residual blocks (each followed by attention in `AttnDownBlock2D`), then
/// an optional downsampler. Every intermediate output is kept as a skip connection.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vb: VarBuilder,
        rec: &Recorder,
        in_c: usize,
        out_c: usize,
        layers: usize,
        rp: ResnetParams,
        attn: Option<AttnParams>,
        downsample_padding: Option<usize>,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for j in 0..layers {
            let c_in = if j == 0 { in_c } else { out_c };
            resnets.push(ResnetBlock2D::new(
                vb.pp("resnets").pp(j),
                rec,
                c_in,
                out_c,
                rp,
                1.0,
            )?);
            if let Some(a) = attn {
                attentions.push(Attention::new(
                    vb.pp("attentions").pp(j),
                    rec,
                    out_c,
                    a.head_dim,
                    a.groups,
                    a.eps,
                    1.0,
                )?);
            }
        }
        let downsampler = match downsample_padding {
            Some(p) => Some(Downsample2D::new(
                vb.pp("downsamplers").pp(0),
                rec,
                out_c,
                p,
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Runs the level, pushing every output (after each resnet/attention pair, and after the
    /// downsampler) onto `skips`; returns the last one.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        skips: &mut Vec<Tensor>,
        mut rng: Option<&mut NoiseRng>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb, rng.as_deref_mut())?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// The middle block: resnet, attention (when `add_attention`), resnet, all at the lowest resolution,
/// with `mid_block_scale_factor` as every output divisor.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<Attention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    pub(crate) fn new(
        vb: VarBuilder,
        rec: &Recorder,
        channels: usize,
        rp: ResnetParams,
        attn: Option<AttnParams>,
        scale: f64,
    ) -> Result<Self> {
        let resnet0 =
            ResnetBlock2D::new(vb.pp("resnets").pp(0), rec, channels, channels, rp, scale)?;
        let attention = match attn {
            Some(a) => Some(Attention::new(
                vb.pp("attentions").pp(0),
                rec,
                channels,
                a.head_dim,
                a.groups,
                a.eps,
                scale,
            )?),
            None => None,
        };
        let resnet1 =
            ResnetBlock2D::new(vb.pp("resnets").pp(1), rec, channels, channels, rp, scale)?;
        Ok(Self {
            resnet0,
            attention,
            resnet1,
        })
    }

    /// h = resnet1(attention(resnet0(x))).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        mut rng: Option<&mut NoiseRng>,
    ) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x, temb, rng.as_deref_mut())?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnet1.forward(&h, temb, rng)
    }
}

/// One level on the way up: `layers_per_block + 1` residual blocks, each on the concatenation
/// [hidden, skip] with the skip popped from the end of the stack (each followed by attention in
/// `AttnUpBlock2D`), then an optional upsampler.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `prev_c`: channels coming from below; `skip_in_c`: channels of the last skip (the next
    /// level's); `out_c`: this level's channels.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vb: VarBuilder,
        rec: &Recorder,
        skip_in_c: usize,
        out_c: usize,
        prev_c: usize,
        layers: usize,
        rp: ResnetParams,
        attn: Option<AttnParams>,
        add_upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for j in 0..layers {
            // skip channels: out_c for all but the last resnet, which takes the level-below's skip
            let skip_c = if j == layers - 1 { skip_in_c } else { out_c };
            let h_c = if j == 0 { prev_c } else { out_c };
            resnets.push(ResnetBlock2D::new(
                vb.pp("resnets").pp(j),
                rec,
                h_c + skip_c,
                out_c,
                rp,
                1.0,
            )?);
            if let Some(a) = attn {
                attentions.push(Attention::new(
                    vb.pp("attentions").pp(j),
                    rec,
                    out_c,
                    a.head_dim,
                    a.groups,
                    a.eps,
                    1.0,
                )?);
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(vb.pp("upsamplers").pp(0), rec, out_c)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Runs the level, popping one skip per residual block from the end of `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        skips: &mut Vec<Tensor>,
        mut rng: Option<&mut NoiseRng>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.pop() else {
                candle_core::bail!("UNet up block ran out of skip connections");
            };
            // [hidden, skip] along channels
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, temb, rng.as_deref_mut())?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h)?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h)?;
        }
        Ok(h)
    }
}
