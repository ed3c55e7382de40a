//! Training as a library: AdamW whose moments can be saved and restored (candle's own cannot),
//! global-norm gradient clipping, the learning-rate warm-up, and the exponential moving average of the
//! weights with its decay warm-up.
//!
//! [`AdamW`] implements [`candle_nn::Optimizer`], so it drops in where `candle_nn::AdamW` was
//! (`new(vars, params)`, `step(&grads)`, `learning_rate`/`set_learning_rate`, `backward_step`); its
//! [`AdamW::state`] and [`AdamW::load_state`] save and restore the moments and the step count for an
//! exact resume. On contiguous f32 tensors (CPU, and CUDA or Metal when their kernels are enabled) each
//! update is one in-place pass ([`crate::ops::optim`]), and on CUDA one launch updates every variable
//! ([`crate::ops::multi_tensor`]); elsewhere it is composed of candle's ops, with the same formulas.
//! [`AdamW::step_clipped`] computes the gradient norm and the clipping scale on the device and
//! returns the norm as a device scalar, so a training loop on a GPU need not wait for the device at
//! every step (`ddpm train` reads its losses and norms every 16 steps).
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Optimizer, VarBuilder, VarMap};
//! use ddpm_core::optim::{ema_decay, AdamW, AdamWParams, Ema};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let varmap = VarMap::new();
//! let w = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu).get(4, "w")?;
//! let mut opt = AdamW::from_varmap(&varmap, AdamWParams { lr: 1e-3, max_grad_norm: Some(1.0), ..Default::default() })?;
//! let mut ema = Ema::new(opt.vars())?;
//! for k in 1..=10u64 {
//!     let loss = w.sqr()?.sum_all()?;
//!     let grad_norm = opt.step_and_norm(&loss.backward()?)?;
//!     ema.update(opt.vars(), ema_decay(0.999, k))?;
//! }
//! let saved = opt.state(); // moments and step count, for a checkpoint
//! # Ok(()) }
//! ```

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

use crate::error::{Error, Result};
use crate::ops::multi_tensor as multi;
use crate::ops::optim as ops;

/// AdamW hyper-parameters: candle's `ParamsAdamW` (whose defaults are PyTorch's) plus the clipping
/// threshold of the global gradient norm.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    /// Learning rate (of the next step; change it with `set_learning_rate` for a schedule).
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value in [`AdamW::step_and_norm`] (and so in
    /// `Optimizer::step`); `None`, 0 or less turns clipping off.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWParams {
    /// candle's (and PyTorch's) defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01;
    /// no clipping.
    fn default() -> Self {
        Self::from(candle_nn::ParamsAdamW::default())
    }
}

impl From<candle_nn::ParamsAdamW> for AdamWParams {
    /// The same hyper-parameters, without clipping.
    fn from(p: candle_nn::ParamsAdamW) -> Self {
        Self { lr: p.lr, beta1: p.beta1, beta2: p.beta2, eps: p.eps, weight_decay: p.weight_decay, max_grad_norm: None }
    }
}

/// The saved state of an [`AdamW`]: its step count and its moments as named tensors
/// (`adam.m.NAME`, `adam.v.NAME`, NAME being the variable's name).
#[derive(Debug, Clone)]
pub struct AdamWState {
    /// Optimizer steps taken (k of the bias corrections 1 - beta^k).
    pub step: u64,
    /// The moments, `adam.m.NAME` and `adam.v.NAME` for each variable.
    pub tensors: HashMap<String, Tensor>,
}

/// AdamW (Loshchilov and Hutter) over named variables, with its moments exposed for checkpoints.
#[derive(Debug)]
pub struct AdamW {
    /// The trained variables, sorted by name.
    vars: Vec<(String, Var)>,
    /// First moments m, one per variable.
    m: Vec<Tensor>,
    /// Second moments v, one per variable.
    v: Vec<Tensor>,
    /// Number of steps taken so far.
    step: u64,
    /// Hyper-parameters.
    params: AdamWParams,
}

/// A candle error from one of this module's errors (for the [`candle_nn::Optimizer`] methods).
fn to_candle(e: Error) -> candle_core::Error {
    match e {
        Error::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

impl AdamW {
    /// An optimizer with zero moments over `vars` (name, variable). The names key the saved state,
    /// so they must be the same from run to run (a [`VarMap`]'s names are).
    pub fn new_named(mut vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = vars.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::arg(format!("AdamW: two variables are named `{}`", w[0].0)));
        }
        // Two separate allocations: the in-place step updates m and v.
        let m = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars, m, v, step: 0, params })
    }

    /// An optimizer over every variable of `varmap`, named as the map names them.
    pub fn from_varmap(varmap: &VarMap, params: AdamWParams) -> Result<Self> {
        let data = varmap.data().lock().map_err(|_| Error::arg("AdamW: the variable map's lock is poisoned"))?;
        Self::new_named(data.iter().map(|(k, v)| (k.clone(), v.clone())).collect(), params)
    }

    /// The variables, sorted by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &AdamWParams {
        &self.params
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Global L2 norm of the gradients: sqrt(sum_i sum(g_i^2)), summed in f64 over the variables (f32
    /// on Metal, which has no f64). Variables without a gradient count 0. Read on the host; see
    /// [`Self::grad_norm_on_device`] for a norm that the host does not wait for.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        Ok(self.grad_norm_on_device(grads)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }

    /// [`Self::grad_norm`] as a scalar tensor on the variables' device (f64, or f32 on Metal):
    /// computing it queues work and never waits for the device.
    pub fn grad_norm_on_device(&self, grads: &GradStore) -> Result<Tensor> {
        self.norm_of(&self.present_grads(grads)?)
    }

    /// [`Self::grad_norm_on_device`] of the gradients [`Self::present_grads`] gives.
    fn norm_of(&self, present: &[(usize, Tensor)]) -> Result<Tensor> {
        let gs: Vec<&Tensor> = present.iter().map(|(_, g)| g).collect();
        if multi::available(&[&gs]) {
            // every gradient in two launches, summed in f64
            return Ok(multi::norm_and_clip_scale(&gs, 0.0)?.0);
        }
        let device = self.device();
        let acc = scalar_dtype(&device);
        // sum(g_i^2) of each variable, in the gradient's dtype (f32 for f32 variables)
        let sums = gs
            .iter()
            .map(|g| g.sqr()?.sum_all()?.to_dtype(acc))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if sums.is_empty() {
            return Ok(Tensor::zeros((), acc, &device)?);
        }
        Ok(Tensor::stack(&sums, 0)?.sum_all()?.sqrt()?)
    }

    /// Global-norm clipping and one step at the current learning rate: with n = [`Self::grad_norm`],
    /// the gradients are scaled by [`clip_scale`]`(n, max_grad_norm)`. Returns n (before clipping),
    /// read on the host: use [`Self::step_clipped`] in a loop that should not wait for the device.
    pub fn step_and_norm(&mut self, grads: &GradStore) -> Result<f64> {
        Ok(self.step_clipped(grads)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }

    /// [`Self::step_and_norm`] without a host round trip: the norm n and the clipping scale
    /// min(1, max_grad_norm / (n + 1e-6)) are computed on the device and the step reads the scale
    /// there. Returns n as a device scalar (detached; read it whenever convenient).
    pub fn step_clipped(&mut self, grads: &GradStore) -> Result<Tensor> {
        let _span = crate::ops::profile::span(&self.device(), "optimizer");
        let max = self.params.max_grad_norm.unwrap_or(0.0);
        let present = self.present_grads(grads)?;
        let gs: Vec<&Tensor> = present.iter().map(|(_, g)| g).collect();
        if multi::available(&[&gs]) {
            // the norm and the scale in two launches (the same formulas, the sums in f64)
            let (norm, scale) = multi::norm_and_clip_scale(&gs, max)?;
            self.step_scaled(&present, self.params.lr, &scale)?;
            return Ok(norm);
        }
        let norm = self.norm_of(&present)?.detach();
        let scale = if max > 0.0 {
            // min(1, max / (n + 1e-6)), as clip_scale computes it on the host
            (norm.affine(1.0, 1e-6)?.recip()? * max)?.minimum(1.0)?
        } else {
            Tensor::ones((), norm.dtype(), norm.device())?
        };
        self.step_scaled(&present, self.params.lr, &scale.reshape(1)?)?;
        Ok(norm)
    }

    /// One AdamW update at learning rate `lr`, after scaling every gradient by `grad_scale` (clipping);
    /// with k the step count after this step:
    ///   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    ///   theta = theta (1 - lr wd) - lr (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)
    pub fn step_with(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        let device = self.device();
        let _span = crate::ops::profile::span(&device, "optimizer");
        // copied through page-locked memory on CUDA (crate::ops::upload): no wait for the device
        let scale = match scalar_dtype(&device) {
            DType::F32 => crate::ops::upload(vec![grad_scale as f32], 1, &device)?,
            _ => crate::ops::upload(vec![grad_scale], 1, &device)?,
        };
        self.step_scaled(&self.present_grads(grads)?, lr, &scale)
    }

    /// The variables that have a gradient, in order: each one's index and its gradient, made
    /// contiguous where it is not (a copy; candle's gradients are contiguous as a rule), as the
    /// in-place kernels take it.
    fn present_grads(&self, grads: &GradStore) -> Result<Vec<(usize, Tensor)>> {
        let present = self.vars.iter().enumerate().filter_map(|(i, (_, var))| grads.get(var).map(|g| (i, g)));
        Ok(present.map(|(i, g)| Ok((i, g.contiguous()?))).collect::<candle_core::Result<_>>()?)
    }

    /// The variables' device (the CPU when there are none).
    fn device(&self) -> candle_core::Device {
        self.vars.first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu)
    }

    /// [`Self::step_with`] with the gradient scale c as a one-element tensor on the variables' device
    /// (so that clipping can compute it there), in [`scalar_dtype`].
    fn step_scaled(&mut self, present: &[(usize, Tensor)], lr: f64, grad_scale: &Tensor) -> Result<()> {
        // the in-place kernels read c in f32
        let scale32 = grad_scale.to_dtype(DType::F32)?;
        self.step += 1;
        let p = self.params;
        let k = self.step.min(i32::MAX as u64) as i32;
        // bias corrections 1 - b1^k, 1 - b2^k
        let (bc1, bc2) = (1.0 - p.beta1.powi(k), 1.0 - p.beta2.powi(k));
        let s = ops::AdamWStep { lr, beta1: p.beta1, beta2: p.beta2, eps: p.eps, weight_decay: p.weight_decay, step: self.step };
        // (theta, m, v, g) of the variables that have a gradient
        let mut lists: [Vec<&Tensor>; 4] = Default::default();
        for (i, g) in present {
            for (list, t) in lists.iter_mut().zip([self.vars[*i].1.as_tensor(), &self.m[*i], &self.v[*i], g]) {
                list.push(t);
            }
        }
        let [thetas, ms, vs, gs] = &lists;
        if multi::available(&[thetas, ms, vs, gs, &[&scale32]]) {
            // every variable in one launch, the same formulas as below
            return Ok(multi::adamw_(thetas, ms, vs, gs, &scale32, &s)?);
        }
        for (i, g) in present {
            let (i, var) = (*i, &self.vars[*i].1);
            let theta = var.as_tensor();
            if ops::fused_available(&[theta, &self.m[i], &self.v[i], g, &scale32]) {
                // One in-place pass per tensor, the same formulas as below.
                ops::adamw_step_(theta, &self.m[i], &self.v[i], g, &scale32, &s)?;
                continue;
            }
            // Gradients, moments and the new weights are detached: an op graph kept in a moment would
            // chain every past step's tensors together and grow without bound.
            // g = c grad
            let g = g.detach().broadcast_mul(&grad_scale.to_dtype(g.dtype())?)?;
            // m = b1 m + (1 - b1) g
            let m = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            // v = b2 v + (1 - b2) g^2
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            // (m / bc1) / (sqrt(v / bc2) + eps)
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + p.eps)?)?;
            // theta (1 - lr wd) - lr update
            let theta = theta.detach();
            let decayed = if p.weight_decay != 0.0 { (theta * (1.0 - lr * p.weight_decay))? } else { theta };
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The step count and the moments as named tensors (`adam.m.NAME`, `adam.v.NAME`), for a
    /// checkpoint. The tensors share storage with the optimizer's: write them out before the next step.
    pub fn state(&self) -> AdamWState {
        let mut tensors = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            tensors.insert(format!("adam.m.{name}"), self.m[i].clone());
            tensors.insert(format!("adam.v.{name}"), self.v[i].clone());
        }
        AdamWState { step: self.step, tensors }
    }

    /// Restores the moments and the step count saved by [`AdamW::state`]; every variable must have both
    /// moments with its own shape (extra tensors are ignored). `origin` (a file name) starts the error
    /// messages. The moments are copied to the variables' device and dtype.
    pub fn load_state(&mut self, state: &AdamWState, origin: &str) -> Result<()> {
        let mut m = Vec::with_capacity(self.vars.len());
        let mut v = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            for (out, kind) in [(&mut m, "m"), (&mut v, "v")] {
                let key = format!("adam.{kind}.{name}");
                let Some(t) = state.tensors.get(&key) else {
                    return Err(Error::arg(format!("{origin}: missing optimizer state `{key}`")));
                };
                if t.dims() != var.dims() {
                    return Err(Error::arg(format!("{origin}: `{key}` has shape {:?}, the model's parameter has {:?}", t.dims(), var.dims())));
                }
                // a copy of its own: the in-place step writes into it
                out.push(t.to_device(var.device())?.to_dtype(var.dtype())?.copy()?);
            }
        }
        (self.m, self.v, self.step) = (m, v, state.step);
        Ok(())
    }
}

impl candle_nn::Optimizer for AdamW {
    type Config = AdamWParams;

    /// An optimizer over `vars` named by position (`0`, `1`, ...), as candle's takes them. The saved
    /// state is keyed by those names, so a resume must pass the variables in the same order; use
    /// [`AdamW::from_varmap`] or [`AdamW::new_named`] for names that do not depend on it.
    fn new(vars: Vec<Var>, params: AdamWParams) -> candle_core::Result<Self> {
        let named = vars.into_iter().filter(|v| v.dtype().is_float()).enumerate().map(|(i, v)| (i.to_string(), v)).collect();
        Self::new_named(named, params).map_err(to_candle)
    }

    /// [`AdamW::step_and_norm`]: clipping (when `max_grad_norm` is set), then one step.
    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_and_norm(grads).map(|_| ()).map_err(to_candle)
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}

/// The dtype of the optimizer's device scalars (the gradient norm and the clipping scale): f64, or f32
/// on Metal, which has no f64.
fn scalar_dtype(device: &candle_core::Device) -> DType {
    if device.is_metal() {
        DType::F32
    } else {
        DType::F64
    }
}

/// Scale that clips the global gradient norm to `max_norm`: min(1, max_norm / (norm + 1e-6)).
/// A `max_norm` of 0 or less turns clipping off.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        1.0
    } else {
        (max_norm / (norm + 1e-6)).min(1.0)
    }
}

/// Linear warm-up: lr_k = lr min(1, k / warmup) for step k counted from 1 (no warm-up when 0).
pub fn warmup_lr(lr: f64, step: u64, warmup: u64) -> f64 {
    if warmup == 0 {
        lr
    } else {
        lr * (step as f64 / warmup as f64).min(1.0)
    }
}

/// The learning rate at optimizer step `step` (1-based) of `total` with a linear warm-up over
/// `warmup` steps, then a half cosine down to 0 at `total` (Loshchilov & Hutter 2017, as diffusers'
/// `get_cosine_schedule_with_warmup`): lr_s = lr s / w for s < w, then
/// lr_s = lr (1 + cos(pi (s - w) / (total - w))) / 2.
pub fn warmup_cosine_lr(lr: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup || total <= warmup {
        return warmup_lr(lr, step, warmup);
    }
    let progress = (step - warmup) as f64 / (total - warmup) as f64;
    lr * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// The EMA decay at optimizer step k with the usual warm-up: min(max_decay, (1 + k) / (10 + k)).
pub fn ema_decay(max_decay: f64, step: u64) -> f64 {
    let k = step as f64;
    max_decay.min((1.0 + k) / (10.0 + k))
}

/// The exponential moving average of named weights, ema = d ema + (1 - d) theta, whose tensors are
/// the model folder's weights at the end of training.
#[derive(Debug, Clone)]
pub struct Ema {
    /// The averaged weights, keyed by the variables' names.
    weights: HashMap<String, Tensor>,
}

impl Ema {
    /// An average that starts at the variables' current values (copies of them).
    pub fn new(vars: &[(String, Var)]) -> Result<Self> {
        let weights = vars.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?))).collect::<Result<_>>()?;
        Ok(Self { weights })
    }

    /// Moves the average towards the variables: ema = d ema + (1 - d) theta for each of `vars`, with
    /// d = `decay` (see [`ema_decay`] for the warm-up). Every variable must have an average.
    pub fn update(&mut self, vars: &[(String, Var)], decay: f64) -> Result<()> {
        let device = vars.first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let _span = crate::ops::profile::span(&device, "ema");
        let mut lists: [Vec<&Tensor>; 2] = Default::default();
        for (name, var) in vars {
            let Some(e) = self.weights.get(name) else {
                return Err(Error::arg(format!("EMA weights lack `{name}`")));
            };
            lists[0].push(e);
            lists[1].push(var.as_tensor());
        }
        let [emas, thetas] = &lists;
        if multi::available(&[emas, thetas]) {
            // every weight in one launch, the same formula as below
            return Ok(multi::ema_(emas, thetas, decay)?);
        }
        for (name, var) in vars {
            // every name has an average (checked above)
            let Some(e) = self.weights.get_mut(name) else { continue };
            if ops::fused_available(&[e, var.as_tensor()]) {
                // in place, the same formula as below
                ops::ema_update_(e, var.as_tensor(), decay)?;
                continue;
            }
            // d ema + (1 - d) theta, detached so that each average does not keep the previous one
            // alive through its op graph
            *e = ((&*e * decay)? + (var.as_tensor().detach() * (1.0 - decay))?)?;
        }
        Ok(())
    }

    /// The averaged weights by name (they are updated in place on the fused path: copy them to keep
    /// a snapshot).
    pub fn weights(&self) -> &HashMap<String, Tensor> {
        &self.weights
    }

    /// The averaged weights as named tensors for a checkpoint (shared storage, as [`Self::weights`]).
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.weights.clone()
    }

    /// Restores the averages saved by [`Ema::state`]: every weight this average holds must be there
    /// with its shape (extra tensors are ignored). Copies, to this average's device and dtype.
    /// `origin` (a file name) starts the error messages.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, origin: &str) -> Result<()> {
        let mut loaded = HashMap::with_capacity(self.weights.len());
        for (name, now) in &self.weights {
            let Some(t) = tensors.get(name) else {
                return Err(Error::arg(format!("{origin}: missing EMA weight `{name}`")));
            };
            if t.dims() != now.dims() {
                return Err(Error::arg(format!("{origin}: EMA weight `{name}` has shape {:?}, the model's has {:?}", t.dims(), now.dims())));
            }
            loaded.insert(name.clone(), t.to_device(now.device())?.to_dtype(now.dtype())?.copy()?);
        }
        self.weights = loaded;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One AdamW step computed by hand: with k = 1 the bias-corrected update is g / (|g| + eps).
    #[test]
    fn adamw_first_step_matches_closed_form() {
        let var = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let params = AdamWParams { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, max_grad_norm: None };
        let mut opt = AdamW::new_named(vec![("w".into(), var.clone())], params).unwrap();
        // loss = sum(w^2 * 0.5 * [1, 3]) -> g = [1 * 1, 3 * -2] = [1, -6]
        let c = Tensor::new(&[1.0f32, 3.0], &Device::Cpu).unwrap();
        let loss = ((var.as_tensor().sqr().unwrap() * 0.5).unwrap() * &c).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!((opt.grad_norm(&grads).unwrap() - 37f64.sqrt()).abs() < 1e-5);
        opt.step_with(&grads, 0.1, 1.0).unwrap();
        let w: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        // theta = theta (1 - 0.1 * 0.01) - 0.1 sign(g)
        assert!((w[0] - (1.0 * 0.999 - 0.1)).abs() < 1e-6, "{w:?}");
        assert!((w[1] - (-2.0 * 0.999 + 0.1)).abs() < 1e-6, "{w:?}");
    }

    /// The in-place CPU step (f32) against the composed one (taken for f64 tensors) over several steps
    /// with clipping, weight decay and the EMA.
    #[test]
    fn in_place_step_matches_composed() {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1., (3, 50), &dev).unwrap();
        let params = AdamWParams { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, max_grad_norm: Some(5.0) };
        let run = |dtype: DType| {
            let var = Var::from_tensor(&init.to_dtype(dtype).unwrap()).unwrap();
            let mut opt = AdamW::new_named(vec![("w".into(), var.clone())], params).unwrap();
            let mut ema = Ema::new(opt.vars()).unwrap();
            for k in 1..=6u64 {
                // loss = sum(sin(w) * k): a gradient that changes from step to step
                let loss = (var.as_tensor().sin().unwrap() * k as f64).unwrap().sum_all().unwrap();
                let grads = loss.backward().unwrap();
                opt.step_and_norm(&grads).unwrap();
                ema.update(opt.vars(), ema_decay(0.99, k)).unwrap();
            }
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (f(var.as_tensor()), f(&opt.m[0]), f(&opt.v[0]), f(&ema.weights()["w"]))
        };
        let (fused, composed) = (run(DType::F32), run(DType::F64));
        for (name, a, b) in [("weights", &fused.0, &composed.0), ("m", &fused.1, &composed.1), ("v", &fused.2, &composed.2), ("ema", &fused.3, &composed.3)] {
            let scale = b.iter().fold(1e-3f32, |s, v| s.max(v.abs()));
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale;
            assert!(d < 1e-5, "{name} differs by {d} (relative)");
        }
        // The step moved the weights.
        assert!(fused.0.iter().zip(init.flatten_all().unwrap().to_vec1::<f32>().unwrap()).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    #[test]
    fn schedules() {
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert!((clip_scale(4.0, 1.0) - 0.25).abs() < 1e-6);
        assert_eq!(warmup_lr(2e-4, 50, 100), 1e-4);
        // warm-up as warmup_lr, then cos: full rate at the end of the warm-up, half way through the
        // rest cos(pi / 2) = 0 gives half the rate, 0 at the last step
        assert_eq!(warmup_cosine_lr(2e-4, 50, 100, 300), 1e-4);
        assert!((warmup_cosine_lr(2e-4, 100, 100, 300) - 2e-4).abs() < 1e-18);
        assert!((warmup_cosine_lr(2e-4, 200, 100, 300) - 1e-4).abs() < 1e-18);
        assert!(warmup_cosine_lr(2e-4, 300, 100, 300).abs() < 1e-18);
        assert_eq!(ema_decay(0.9999, 0), 0.1);
        assert_eq!(ema_decay(0.5, 1000), 0.5);
    }
}
