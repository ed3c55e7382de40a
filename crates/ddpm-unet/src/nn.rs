//! Building blocks shared by the UNet's modules: parameter creation (recorded under their
//! state-dict names), group norm, SiLU and dropout.

use std::cell::RefCell;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use crate::ops::conv::Conv2d;
use ddpm_core::NoiseRng;

/// Collects every parameter created while a model is built, under its full state-dict name, so that
/// the model can list and save its tensors and so that the expected keys and shapes of a config are
/// known before loading.
#[derive(Default)]
pub(crate) struct Recorder(RefCell<Vec<(String, Tensor)>>);

impl Recorder {
    /// The recorded `(name, tensor)` pairs in creation order.
    pub(crate) fn into_inner(self) -> Vec<(String, Tensor)> {
        self.0.into_inner()
    }
}

/// Fetches (or creates) parameter `name` of shape `shape` under `vb` and records it.
fn param<S: Into<Shape>>(
    vb: &VarBuilder,
    rec: &Recorder,
    shape: S,
    name: &str,
    init: Init,
) -> Result<Tensor> {
    let t = vb.get_with_hints(shape, name, init)?;
    let prefix = vb.prefix();
    let full = if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    };
    rec.0.borrow_mut().push((full, t.clone()));
    Ok(t)
}

/// PyTorch's default initialisation of conv and linear layers (what diffusers starts training from):
/// kaiming_uniform(a = sqrt(5)) for the weight and U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the bias,
/// both of which are U(-b, b) with b = 1 / sqrt(fan_in).
fn torch_default_init(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// A `k x k` convolution with bias, `weight` (out, in, k, k) and `bias` (out).
pub(crate) fn conv2d(
    vb: VarBuilder,
    rec: &Recorder,
    in_c: usize,
    out_c: usize,
    k: usize,
    padding: usize,
    stride: usize,
) -> Result<Conv2d> {
    let init = torch_default_init(in_c * k * k);
    let w = param(&vb, rec, (out_c, in_c, k, k), "weight", init)?;
    let b = param(&vb, rec, out_c, "bias", init)?;
    Ok(Conv2d::new(w, Some(b), stride, padding))
}

/// A linear layer y = x W^T + b with `weight` (out, in) and `bias` (out).
pub(crate) fn linear(vb: VarBuilder, rec: &Recorder, in_d: usize, out_d: usize) -> Result<Linear> {
    let init = torch_default_init(in_d);
    let w = param(&vb, rec, (out_d, in_d), "weight", init)?;
    let b = param(&vb, rec, out_d, "bias", init)?;
    Ok(Linear { weight: w, bias: b })
}

/// A linear layer y = x W^T + b, computed in x's dtype: f32 weights are cast for bf16 or f16 inputs
/// (mixed precision, [`crate::ops::cast_like`]).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// The weight (out, in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias (out).
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// y = x W^T + b for x (..., in).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (crate::ops::cast_like(&self.weight, x)?, crate::ops::cast_like(&self.bias, x)?);
        candle_nn::Module::forward(&candle_nn::Linear::new(w, Some(b)), x)
    }
}

/// Group normalisation over `groups` groups of channels:
/// y = (x - mean_g) / sqrt(var_g + eps) * weight_c + bias_c.
///
/// Computed by [`crate::ops::group_norm()`]: a fused kernel with an analytic backward for f32 on
/// the CPU, candle's composed (differentiable) ops elsewhere.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    pub(crate) groups: usize,
    pub(crate) eps: f64,
}

impl GroupNorm {
    /// Normalises `x` (N, C, ...).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, false)
    }

    /// SiLU(group_norm(x)) = y * sigmoid(y) with y = group_norm(x), in one fused op on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, true)
    }

    /// The gradients (dx, dweight, dbias) of [`forward_silu`](Self::forward_silu) at `x` for the
    /// incoming gradient `dout`, outside candle's graph ([`crate::ops::group_norm_backward`]).
    pub(crate) fn backward_silu(&self, x: &Tensor, dout: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        crate::ops::group_norm_backward(x, self.groups, &self.weight, &self.bias, self.eps, true, dout)
    }

    /// The weight and the bias.
    pub(crate) fn params(&self) -> [&Tensor; 2] {
        [&self.weight, &self.bias]
    }

    /// The same norm on detached parameters (shared storage, no gradient tracking).
    pub(crate) fn detached(&self) -> Self {
        Self { weight: self.weight.detach(), bias: self.bias.detach(), ..self.clone() }
    }
}

/// A group norm with `weight` (initialised to 1) and `bias` (initialised to 0).
pub(crate) fn group_norm(
    vb: VarBuilder,
    rec: &Recorder,
    groups: usize,
    channels: usize,
    eps: f64,
) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("GroupNorm: {groups} groups do not divide {channels} channels");
    }
    let weight = param(&vb, rec, channels, "weight", Init::Const(1.0))?;
    let bias = param(&vb, rec, channels, "bias", Init::Const(0.0))?;
    Ok(GroupNorm {
        weight,
        bias,
        groups,
        eps,
    })
}

/// SiLU: x * sigmoid(x).
pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(x)
}

/// The mask seed of an inverted dropout y = x * m / (1 - p), m_i ~ Bernoulli(1 - p)
/// ([`crate::ops::dropout`]), or `None` where dropout is the identity: `rng == None` (evaluation)
/// or `p == 0`. Otherwise one `u64` is drawn from the caller's generator and the mask is derived from
/// it by a counter-based hash (splitmix64, two 32-bit uniforms per output, made on the device), so a
/// training run is reproducible bit for bit, on any device, and the generator advances by one draw per
/// dropout layer whatever the tensor size.
pub(crate) fn dropout_seed(p: f64, rng: Option<&mut NoiseRng>) -> Option<u64> {
    match rng {
        Some(rng) if p > 0.0 => Some(rng.next_u64()),
        _ => None,
    }
}

/// A `SimpleBackend` that hands out a zero of the requested shape without allocating it (a
/// broadcast scalar): used to learn the keys and shapes a config needs.
pub(crate) struct ShapeOnly;

impl candle_nn::var_builder::SimpleBackend for ShapeOnly {
    fn get(&self, s: Shape, _: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("ShapeOnly backend cannot provide `{name}` without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
