//! AdamW whose moments can be saved and restored (candle's own cannot), global-norm gradient clipping,
//! the learning-rate warm-up, and the exponential moving average of the weights.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{backprop::GradStore, Tensor, Var};
use ddpm_core::ops::optim as ops;

/// AdamW hyper-parameters (PyTorch's defaults apart from the learning rate).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    /// Peak learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW (Loshchilov and Hutter) over named variables, with its moments exposed for checkpoints.
pub struct AdamW {
    /// The trained variables, sorted by name.
    vars: Vec<(String, Var)>,
    /// First moments m, one per variable.
    m: Vec<Tensor>,
    /// Second moments v, one per variable.
    v: Vec<Tensor>,
    /// Number of steps taken so far.
    pub step: u64,
    /// Hyper-parameters.
    pub params: AdamWParams,
}

impl AdamW {
    /// An optimizer with zero moments over `vars` (name, variable).
    pub fn new(mut vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        // Two separate allocations: the CPU step updates m and v in place.
        let m = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars, m, v, step: 0, params })
    }

    /// The variables, sorted by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Global L2 norm of the gradients: sqrt(sum_i sum(g_i^2)). Variables without a gradient count 0.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0f64;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var) {
                total += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            }
        }
        Ok(total.sqrt())
    }

    /// One AdamW update at learning rate `lr`, after scaling every gradient by `grad_scale` (clipping):
    ///   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    ///   theta = theta (1 - lr wd) - lr (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let k = self.step as i32;
        let (bc1, bc2) = (1.0 - p.beta1.powi(k), 1.0 - p.beta2.powi(k));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var) else { continue };
            let theta = var.as_tensor();
            if ops::fused_available(&[theta, &self.m[i], &self.v[i], g]) {
                // One in-place pass per tensor on the CPU, the same formulas as below.
                let s = ops::AdamWStep { lr, beta1: p.beta1, beta2: p.beta2, eps: p.eps, weight_decay: p.weight_decay, step: self.step, grad_scale };
                ops::adamw_step_(theta, &self.m[i], &self.v[i], g, &s)?;
                continue;
            }
            // Gradients, moments and the new weights are detached: an op graph kept in a moment would
            // chain every past step's tensors together and grow without bound.
            let g = if grad_scale != 1.0 { (g.detach() * grad_scale)? } else { g.detach() };
            let m = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + p.eps)?)?;
            let theta = var.as_tensor().detach();
            let decayed = if p.weight_decay != 0.0 { (theta * (1.0 - lr * p.weight_decay))? } else { theta };
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments as named tensors (`adam.m.NAME`, `adam.v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("adam.m.{name}"), self.m[i].clone());
            out.insert(format!("adam.v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores the moments saved by [`AdamW::state_tensors`] and the step count; every variable must
    /// have both moments with its own shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64, origin: &str) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (slot, kind) in [(&mut self.m[i], "m"), (&mut self.v[i], "v")] {
                let key = format!("adam.{kind}.{name}");
                let Some(t) = tensors.get(&key) else { bail!("{origin}: missing optimizer state `{key}`") };
                if t.dims() != var.dims() {
                    bail!("{origin}: `{key}` has shape {:?}, the model's parameter has {:?}", t.dims(), var.dims());
                }
                // a copy of its own: the CPU step writes into it
                *slot = t.to_device(var.device())?.to_dtype(var.dtype())?.copy()?;
            }
        }
        self.step = step;
        Ok(())
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

/// Linear warm-up: lr_k = lr min(1, k / warmup) for step k counted from 1.
pub fn warmup_lr(lr: f64, step: u64, warmup: u64) -> f64 {
    if warmup == 0 {
        lr
    } else {
        lr * (step as f64 / warmup as f64).min(1.0)
    }
}

/// The EMA decay at optimizer step k with the usual warm-up: min(max_decay, (1 + k) / (10 + k)).
pub fn ema_decay(max_decay: f64, step: u64) -> f64 {
    let k = step as f64;
    max_decay.min((1.0 + k) / (10.0 + k))
}

/// Moves the EMA weights towards the model's: ema = d ema + (1 - d) theta.
pub fn ema_update(ema: &mut HashMap<String, Tensor>, vars: &[(String, Var)], decay: f64) -> Result<()> {
    for (name, var) in vars {
        let Some(e) = ema.get_mut(name) else { bail!("EMA weights lack `{name}`") };
        if ops::fused_available(&[e, var.as_tensor()]) {
            // in place on the CPU, the same formula as below
            ops::ema_update_(e, var.as_tensor(), decay)?;
            continue;
        }
        // Detached, so that each EMA tensor does not keep the previous one alive through its op graph.
        *e = ((&*e * decay)? + (var.as_tensor().detach() * (1.0 - decay))?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One AdamW step computed by hand: with k = 1 the bias-corrected update is g / (|g| + eps).
    #[test]
    fn adamw_first_step_matches_closed_form() {
        let var = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let params = AdamWParams { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], params).unwrap();
        // loss = sum(w^2 * 0.5 * [1, 3]) -> g = [1 * 1, 3 * -2] = [1, -6]
        let c = Tensor::new(&[1.0f32, 3.0], &Device::Cpu).unwrap();
        let loss = ((var.as_tensor().sqr().unwrap() * 0.5).unwrap() * &c).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!((opt.grad_norm(&grads).unwrap() - 37f64.sqrt()).abs() < 1e-5);
        opt.step(&grads, 0.1, 1.0).unwrap();
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
        let params = AdamWParams { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let run = |dtype: candle_core::DType| {
            let var = Var::from_tensor(&init.to_dtype(dtype).unwrap()).unwrap();
            let mut opt = AdamW::new(vec![("w".into(), var.clone())], params).unwrap();
            let mut ema = HashMap::from([("w".to_string(), var.as_tensor().copy().unwrap())]);
            for k in 1..=6u64 {
                // loss = sum(sin(w) * k): a gradient that changes from step to step
                let loss = (var.as_tensor().sin().unwrap() * k as f64).unwrap().sum_all().unwrap();
                let grads = loss.backward().unwrap();
                let scale = clip_scale(opt.grad_norm(&grads).unwrap(), 5.0);
                opt.step(&grads, 0.01, scale).unwrap();
                ema_update(&mut ema, opt.vars(), ema_decay(0.99, k)).unwrap();
            }
            let f = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (f(var.as_tensor()), f(&opt.m[0]), f(&opt.v[0]), f(&ema["w"]))
        };
        let (fused, composed) = (run(candle_core::DType::F32), run(candle_core::DType::F64));
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
        assert_eq!(ema_decay(0.9999, 0), 0.1);
        assert_eq!(ema_decay(0.5, 1000), 0.5);
    }
}
