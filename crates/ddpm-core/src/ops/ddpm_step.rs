//! The DDPM reverse step as one fused pass over the batch.
//!
//! Every fixed-variance DDPM step is, per element, with host scalars for the step:
//!
//!   x_0  = c_x x_t + c_m m                     (m the model output; see [`x0_coefficients`])
//!   x_0  = clamp(x_0, -r, r)                   (when clipping)
//!   x'   = coef_x0 x_0 + coef_xt x_t + sigma z (z standard normal noise, absent at t = 0)
//!
//! candle runs this as six to eight elementwise ops, each a pass over the batch with its own buffer.
//! Here, for contiguous f32 tensors on the CPU, it is one multi-threaded pass that writes x' and x_0
//! (computed in f64 per element and rounded once); on CUDA, when [`super::cuda_kernels_enabled`], one
//! kernel does the same, and on Metal with [`super::metal_kernels_enabled`] (in f32 there: Metal has
//! no f64). Other devices and dtypes, and dynamic
//! thresholding (a per-sample quantile), take the composed candle ops in [`crate::ddpm`].

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::config::PredictionType;

/// The scalars of one fused step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepScalars {
    /// The weight of x_t in x_0.
    pub x0_from_sample: f64,
    /// The weight of the model output in x_0.
    pub x0_from_output: f64,
    /// Clamp x_0 to [-r, r] when set.
    pub clip: Option<f64>,
    /// The weight of x_0 in the posterior mean.
    pub coef_x0: f64,
    /// The weight of x_t in the posterior mean.
    pub coef_xt: f64,
    /// The standard deviation of the added noise (used only when noise is given).
    pub sigma: f64,
}

/// (c_x, c_m) with x_0 = c_x x_t + c_m m, for a = alpha_bar_t and b = 1 - alpha_bar_t:
/// epsilon: x_0 = (x_t - sqrt(b) eps) / sqrt(a), so (1 / sqrt(a), -sqrt(b) / sqrt(a));
/// sample: x_0 = m, so (0, 1); v_prediction: x_0 = sqrt(a) x_t - sqrt(b) v, so (sqrt(a), -sqrt(b)).
pub fn x0_coefficients(pt: PredictionType, a: f64, b: f64) -> (f64, f64) {
    match pt {
        PredictionType::Epsilon => (1.0 / a.sqrt(), -b.sqrt() / a.sqrt()),
        PredictionType::Sample => (0.0, 1.0),
        PredictionType::VPrediction => (a.sqrt(), -b.sqrt()),
    }
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// The fused step `(m, x_t, z) -> [x' | x_0]` (flat); without noise, z is a dummy and sigma unused.
struct DdpmStep {
    s: StepScalars,
    with_noise: bool,
}

impl CustomOp3 for DdpmStep {
    fn name(&self) -> &'static str {
        "ddpm-step"
    }

    fn cpu_fwd(
        &self,
        sm: &CpuStorage,
        lm: &Layout,
        sx: &CpuStorage,
        lx: &Layout,
        sz: &CpuStorage,
        lz: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, x, z) = (super::f32_slice(sm, lm, self.name(), "model output")?, super::f32_slice(sx, lx, self.name(), "sample")?, super::f32_slice(sz, lz, self.name(), "noise")?);
        let n = x.len();
        let s = self.s;
        let sigma = if self.with_noise { s.sigma } else { 0.0 };
        let mut out = vec![0f32; 2 * n];
        let (prev, x0_out) = out.split_at_mut(n);
        prev.par_chunks_mut(CHUNK).zip(x0_out.par_chunks_mut(CHUNK)).enumerate().for_each(|(k, (pc, xc))| {
            let lo = k * CHUNK;
            for j in 0..pc.len() {
                let (xv, mv) = (x[lo + j] as f64, m[lo + j] as f64);
                // x_0 = c_x x_t + c_m m, clamped to [-r, r]
                let mut x0 = s.x0_from_sample * xv + s.x0_from_output * mv;
                if let Some(r) = s.clip {
                    x0 = x0.clamp(-r, r);
                }
                // x' = coef_x0 x_0 + coef_xt x_t + sigma z
                let zv = if self.with_noise { z[lo + j] as f64 } else { 0.0 };
                pc[j] = (s.coef_x0 * x0 + s.coef_xt * xv + sigma * zv) as f32;
                xc[j] = x0 as f32;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sm: &candle_core::CudaStorage,
        lm: &Layout,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sz: &candle_core::CudaStorage,
        lz: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let dev = sx.device().clone();
        let (m, x, z) = (cuda::f32_view(sm, lm, self.name(), "model output")?, cuda::f32_view(sx, lx, self.name(), "sample")?, cuda::f32_view(sz, lz, self.name(), "noise")?);
        let n = x.len();
        let mut out = cuda::alloc_f32(&dev, 2 * n)?;
        let s = self.s;
        let (n64, clip, r, with_noise) = (n as u64, s.clip.is_some() as i32, s.clip.unwrap_or(0.0), self.with_noise as i32);
        let sigma = if self.with_noise { s.sigma } else { 0.0 };
        cuda::launch!(&dev, "ddpm_step", cuda::elementwise(n);
            &m, &x, &z, &mut out, &n64, &s.x0_from_sample, &s.x0_from_output, &clip, &r, &s.coef_x0, &s.coef_xt, &sigma, &with_noise);
        Ok((cuda::wrap(out, sx), Shape::from(2 * n)))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        sm: &candle_core::MetalStorage,
        lm: &Layout,
        sx: &candle_core::MetalStorage,
        lx: &Layout,
        sz: &candle_core::MetalStorage,
        lz: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::metal::{self, uint, Arg, Grid};
        use candle_core::backend::BackendStorage;
        let dev = sx.device();
        let (m, mo, _) = metal::f32_buffer(sm, lm, self.name(), "model output")?;
        let (x, xo, n) = metal::f32_buffer(sx, lx, self.name(), "sample")?;
        let (z, zo, _) = metal::f32_buffer(sz, lz, self.name(), "noise")?;
        let out = metal::alloc_f32(dev, 2 * n, self.name())?;
        let s = self.s;
        let sigma = if self.with_noise { s.sigma } else { 0.0 };
        // StepScalars in kernels.metal: cx, cm, r, c0, ct, sigma (f32, where the CPU computes in f64),
        // then clip and with_noise
        let coefficients = [s.x0_from_sample, s.x0_from_output, s.clip.unwrap_or(0.0), s.coef_x0, s.coef_xt, sigma];
        let mut k: Vec<u32> = coefficients.iter().map(|&v| (v as f32).to_bits()).collect();
        k.extend([s.clip.is_some() as u32, self.with_noise as u32]);
        let args = [Arg::In(m, mo), Arg::In(x, xo), Arg::In(z, zo), Arg::Out(&out, 0), uint(metal::count(n, self.name())?), Arg::Words(k)];
        metal::launch(dev, "ddpm_step", Grid::Elementwise(n), &args)?;
        Ok((metal::wrap(out, dev, 2 * n), Shape::from(2 * n)))
    }
}

/// Whether [`ddpm_step`] has a fused kernel for these tensors: f32 on the CPU, or on CUDA with
/// [`super::cuda_kernels_enabled`].
pub fn fused_step_available(model_output: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> bool {
    let f32_fused = |t: &Tensor| super::fused_device(t.device()) && t.dtype() == DType::F32;
    f32_fused(model_output) && f32_fused(sample) && noise.is_none_or(f32_fused) && sample.elem_count() > 0
}

/// One fused DDPM step: returns (x', x_0) as the module docs define them, both shaped like `sample`.
/// Needs [`fused_step_available`]; shapes are checked by the caller.
pub fn ddpm_step(model_output: &Tensor, sample: &Tensor, noise: Option<&Tensor>, s: StepScalars) -> Result<(Tensor, Tensor)> {
    if !fused_step_available(model_output, sample, noise) {
        candle_core::bail!("ddpm-step: the fused step takes f32 tensors on the CPU (or CUDA unless DDPM_CUDA_KERNELS=0, or Metal with DDPM_METAL_KERNELS=1)");
    }
    let sample_c = sample.contiguous()?;
    let z = match noise {
        Some(z) => z.contiguous()?,
        // a dummy third argument; never read
        None => sample_c.clone(),
    };
    let op = DdpmStep { s, with_noise: noise.is_some() };
    let packed = model_output.contiguous()?.apply_op3_no_bwd(&sample_c, &z, &op)?;
    let n = sample.elem_count();
    let prev = packed.narrow(0, 0, n)?.reshape(sample.shape())?;
    let x0 = packed.narrow(0, n, n)?.reshape(sample.shape())?;
    Ok((prev, x0))
}
