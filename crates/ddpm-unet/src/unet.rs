//! [`UNet2DModel`]: the time-embedded UNet of DDPM, weight-compatible with diffusers' `UNet2DModel`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use crate::ops::conv::Conv2d;
use ddpm_core::{NoisePredictor, NoiseRng};

use crate::blocks::{AttnParams, DownBlock, MidBlock, UpBlock};
use crate::config::UNetConfig;
use crate::embedding::{SinusoidalEmbedding, TimestepEmbedding};
use crate::error::{Error, Result};
use crate::nn::{conv2d, group_norm, GroupNorm, Recorder, ShapeOnly};
use crate::resnet::ResnetParams;

/// The UNet noise predictor eps_theta(x_t, t).
///
/// Its modules are named as diffusers names its state dict (`conv_in`, `time_embedding.linear_1`,
/// `down_blocks.{i}.resnets.{j}.norm1`, `down_blocks.{i}.attentions.{j}.to_q`, `mid_block`,
/// `up_blocks`, `conv_norm_out`, `conv_out`, ...), so the [`VarBuilder`] paths are the keys of
/// `diffusion_pytorch_model.safetensors`.
///
/// ```text
/// emb  = time_embedding(sinusoidal(t))
/// h    = conv_in(x);  skips = [h]
/// for each down block:  h = block(h, emb), pushing its outputs to skips
/// h    = mid_block(h, emb)
/// for each up block:    h = block(h, skips popped from the end, emb)
/// out  = conv_out(SiLU(conv_norm_out(h)))
/// ```
#[derive(Debug, Clone)]
pub struct UNet2DModel {
    config: UNetConfig,
    time_proj: SinusoidalEmbedding,
    time_embedding: TimestepEmbedding,
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    tensors: Vec<(String, Tensor)>,
    dtype: DType,
    compute_dtype: DType,
    device: Device,
}

impl UNet2DModel {
    /// Builds the UNet of `config` (validated first) from `vb`: from loaded weights
    /// (`VarBuilder::from_tensors`, `from_mmaped_safetensors`) or from a [`VarMap`] to train
    /// (`VarBuilder::from_varmap`, new parameters initialised as PyTorch does).
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        Ok(Self::build(config, vb)?)
    }

    /// A trainable UNet whose parameters live in `varmap` (created there on first use); optimise
    /// `varmap.all_vars()`.
    pub fn new_trainable(
        config: &UNetConfig,
        varmap: &VarMap,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::new(config, VarBuilder::from_varmap(varmap, dtype, device))
    }

    fn build(cfg: &UNetConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let rec = Recorder::default();
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let boc = &cfg.block_out_channels;
        let levels = boc.len();
        let c0 = boc[0];
        let temb_dim = cfg.time_embed_dim();

        let time_proj = SinusoidalEmbedding::new(c0, cfg.flip_sin_to_cos, cfg.freq_shift, &device)?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), &rec, c0, temb_dim)?;
        let conv_in = conv2d(vb.pp("conv_in"), &rec, cfg.in_channels, c0, 3, 1, 1)?;

        let rp = ResnetParams {
            temb_channels: temb_dim,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            dropout: cfg.dropout,
        };
        let attn = |channels: usize, groups: usize| AttnParams {
            head_dim: cfg.head_dim(channels),
            groups,
            eps: cfg.norm_eps,
        };

        let mut down_blocks = Vec::with_capacity(levels);
        let mut out_c = c0;
        for (i, t) in cfg.down_block_types.iter().enumerate() {
            let in_c = out_c;
            out_c = boc[i];
            let is_final = i == levels - 1;
            let a = t.has_attention().then(|| attn(out_c, cfg.norm_num_groups));
            let ds = (!is_final).then_some(cfg.downsample_padding);
            let vbi = vb.pp("down_blocks").pp(i);
            down_blocks.push(DownBlock::new(
                vbi,
                &rec,
                in_c,
                out_c,
                cfg.layers_per_block,
                rp,
                a,
                ds,
            )?);
        }

        let last = boc[levels - 1];
        let mid_attn = cfg.add_attention.then(|| attn(last, cfg.mid_attn_groups()));
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            &rec,
            last,
            rp,
            mid_attn,
            cfg.mid_block_scale_factor,
        )?;

        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(levels);
        let mut out_c = rev[0];
        for (i, t) in cfg.up_block_types.iter().enumerate() {
            let prev_c = out_c;
            out_c = rev[i];
            let skip_in_c = rev[(i + 1).min(levels - 1)];
            let is_final = i == levels - 1;
            let a = t.has_attention().then(|| attn(out_c, cfg.norm_num_groups));
            let vbi = vb.pp("up_blocks").pp(i);
            up_blocks.push(UpBlock::new(
                vbi,
                &rec,
                skip_in_c,
                out_c,
                prev_c,
                cfg.layers_per_block + 1,
                rp,
                a,
                !is_final,
            )?);
        }

        let conv_norm_out = group_norm(
            vb.pp("conv_norm_out"),
            &rec,
            cfg.norm_num_groups,
            c0,
            cfg.norm_eps,
        )?;
        let conv_out = conv2d(vb.pp("conv_out"), &rec, c0, cfg.out_channels, 3, 1, 1)?;
        Ok(Self {
            config: cfg.clone(),
            time_proj,
            time_embedding,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            tensors: rec.into_inner(),
            dtype,
            compute_dtype: dtype,
            device,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The dtype of the weights (inputs are converted to it, outputs back to the input's dtype).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The same model computing in `dtype` (bf16 or f16) while its weights keep theirs: mixed
    /// precision, as PyTorch's autocast trains. Weights in f32 (the optimizer's master weights, from
    /// a [`VarMap`] of f32 variables) are cast to `dtype` where they meet the activations, and their
    /// gradients come back in f32; the time embedding's MLP stays in the weights' dtype. Inputs are
    /// converted to `dtype`, outputs back to the input's dtype.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// The dtype the activations run in: the weights' unless [`with_compute_dtype`](Self::with_compute_dtype)
    /// set another.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every parameter under its diffusers state-dict name, in creation order. For a model built
    /// from a [`VarMap`] these share storage with the variables, so they follow training updates.
    pub fn named_tensors(&self) -> &[(String, Tensor)] {
        &self.tensors
    }

    /// The parameters as a name -> tensor map (for saving).
    pub fn tensor_map(&self) -> HashMap<String, Tensor> {
        self.tensors.iter().cloned().collect()
    }

    /// Number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.tensors.iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// Writes `config.json` and `diffusion_pytorch_model.safetensors` into `dir` (see
    /// [`crate::load::save_pretrained`]).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        crate::load::save_pretrained(dir, &self.config, &self.tensor_map())
    }

    /// Predicts the noise for `x` (N, C, H, W) at timesteps `t` (N values, or one for the whole
    /// batch; any numeric dtype), in evaluation mode (no dropout).
    pub fn forward(&self, x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_impl(x, t, None)
    }

    /// Training-mode forward: as [`forward`](Self::forward) plus dropout in the residual blocks,
    /// with masks derived from `rng` so that training is reproducible bit for bit.
    pub fn forward_train(
        &self,
        x: &Tensor,
        t: &Tensor,
        rng: &mut NoiseRng,
    ) -> candle_core::Result<Tensor> {
        self.forward_impl(x, t, Some(rng))
    }

    fn forward_impl(
        &self,
        x: &Tensor,
        t: &Tensor,
        mut rng: Option<&mut NoiseRng>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (n, c, h, w) = x.dims4()?;
        if c != cfg.in_channels {
            candle_core::bail!(
                "UNet: input has {c} channels, the model expects {}",
                cfg.in_channels
            );
        }
        let div = cfg.size_divisor();
        if h % div != 0 || w % div != 0 {
            candle_core::bail!(
                "UNet: input size {h}x{w} is not a multiple of {div} (2^(levels - 1))"
            );
        }
        // one timestep per sample: a scalar or a single value is broadcast to the batch
        let t = match t.elem_count() {
            1 => t.flatten_all()?.broadcast_as(n)?,
            m if m == n => t.flatten_all()?,
            m => candle_core::bail!("UNet: {m} timesteps for a batch of {n}"),
        };
        let in_dtype = x.dtype();
        let mut x = x.to_dtype(self.compute_dtype)?;
        if cfg.center_input_sample {
            // x -> 2x - 1
            x = x.affine(2.0, -1.0)?;
        }
        // emb = linear_2(SiLU(linear_1(sinusoidal(t)))), features computed in f32, the MLP in the
        // weights' dtype, the result in the compute dtype
        let emb = self.time_proj.forward(&t)?.to_dtype(self.dtype)?;
        let emb = self.time_embedding.forward(&emb)?.to_dtype(self.compute_dtype)?;

        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &emb, &mut skips, rng.as_deref_mut())?;
        }
        h = self.mid_block.forward(&h, &emb, rng.as_deref_mut())?;
        for block in &self.up_blocks {
            h = block.forward(&h, &emb, &mut skips, rng.as_deref_mut())?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)?.to_dtype(in_dtype)
    }
}

impl NoisePredictor for UNet2DModel {
    /// Evaluation-mode [`UNet2DModel::forward`].
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(x_t, t)
    }

    /// Training-mode [`UNet2DModel::forward_train`]: dropout masks from `rng`.
    fn predict_train(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        rng: &mut NoiseRng,
    ) -> candle_core::Result<Tensor> {
        self.forward_train(x_t, t, rng)
    }
}

/// The state-dict keys and shapes a config needs, in creation order (nothing is allocated).
pub fn expected_tensors(config: &UNetConfig) -> Result<Vec<(String, Vec<usize>)>> {
    config.validate()?;
    let vb = VarBuilder::from_backend(Box::new(ShapeOnly), DType::F32, Device::Cpu);
    let m = UNet2DModel::build(config, vb).map_err(Error::Candle)?;
    Ok(m.tensors
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect())
}

/// The number of scalar parameters of the UNet that `config` describes.
pub fn count_parameters(config: &UNetConfig) -> Result<usize> {
    Ok(expected_tensors(config)?
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum())
}
