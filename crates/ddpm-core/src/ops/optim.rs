//! In-place optimizer updates: AdamW and the exponential moving average of the weights.
//!
//! Written with candle's tensor ops, an AdamW step allocates about a dozen temporaries the size of
//! each parameter and the EMA three more; for a 36M-parameter UNet that is several GB of fresh memory
//! per step, which the kernel must zero page by page. Here, for contiguous f32 tensors on the CPU,
//! each update is a multi-threaded pass that writes into the tensors' own storage and allocates
//! nothing; on CUDA, when [`super::cuda_kernels_enabled`], each is one kernel, and on Metal with
//! [`super::metal_kernels_enabled`]. [`fused_available`] says
//! whether a set of tensors qualifies; callers keep the composed ops for the rest (other devices and
//! dtypes).

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

/// Whether every tensor is a contiguous f32 tensor on the CPU, or on a CUDA or Metal device whose
/// kernels are enabled ([`super::cuda_kernels_enabled`], [`super::metal_kernels_enabled`]): what the
/// in-place kernels take.
pub fn fused_available(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| super::fused_device(t.device()) && t.dtype() == DType::F32 && t.is_contiguous())
}

/// The scalars of one AdamW step (the gradient's scale, which clipping computes on the device, is a
/// tensor argument of [`adamw_step_`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this step.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// The step number k, counted from 1 (for the bias corrections 1 - beta^k).
    pub step: u64,
}

/// keep = `beta`, take = 1 - `beta` (computed in f64, then rounded).
pub(crate) fn keep_take(beta: f64) -> (f32, f32) {
    (beta as f32, (1.0 - beta) as f32)
}

/// a <- keep a + take f(scale x), with f(u) = u, or u^2 when `square`, over matching slices, in
/// parallel chunks: the CPU loop of both running averages.
fn average_into(avg: &mut [f32], x: &[f32], keep: f32, take: f32, scale: f32, square: bool) {
    avg.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(ac, xc)| {
        for (a, &xv) in ac.iter_mut().zip(xc) {
            let u = xv * scale;
            let fu = if square { u * u } else { u };
            *a = keep * *a + take * fu;
        }
    });
}

/// The EMA of the weights written in place: a <- keep a + take x.
struct EmaUpdate {
    keep: f32,
    take: f32,
}

impl EmaUpdate {
    /// keep = `decay`, take = 1 - `decay`.
    fn new(decay: f64) -> Self {
        let (keep, take) = keep_take(decay);
        EmaUpdate { keep, take }
    }
}

impl InplaceOp2 for EmaUpdate {
    fn name(&self) -> &'static str {
        "ddpm-ema"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let x = super::f32_slice(s2, l2, self.name(), "weights")?;
        let avg = super::f32_slice_mut(s1, l1, self.name(), "average")?;
        if avg.len() != x.len() {
            candle_core::bail!("{}: average and weights differ in size", self.name());
        }
        average_into(avg, x, self.keep, self.take, 1.0, false);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<()> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let dev = s1.device().clone();
        let x = cuda::f32_view(s2, l2, self.name(), "weights")?;
        let mut avg = cuda::f32_view_mut(s1, l1, self.name(), "average")?;
        let n = avg.len();
        if x.len() != n {
            candle_core::bail!("{}: average and weights differ in size", self.name());
        }
        let n64 = n as u64;
        cuda::launch!(&dev, "ddpm_ema", cuda::elementwise(n); &mut avg, &x, &n64, &self.keep, &self.take);
        Ok(())
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s1: &mut candle_core::MetalStorage, l1: &Layout, s2: &candle_core::MetalStorage, l2: &Layout) -> Result<()> {
        use super::metal::{self, float, uint, Arg, Grid};
        use candle_core::backend::BackendStorage;
        let (x, xo, n_x) = metal::f32_buffer(s2, l2, self.name(), "weights")?;
        let (avg, ao, n) = metal::f32_buffer(s1, l1, self.name(), "average")?;
        if n_x != n {
            candle_core::bail!("{}: average and weights differ in size", self.name());
        }
        let args = [Arg::Out(avg, ao), Arg::In(x, xo), uint(metal::count(n, self.name())?), float(self.keep), float(self.take)];
        metal::launch(s1.device(), "ddpm_ema", Grid::Elementwise(n), &args)
    }
}

/// One of AdamW's moments written in place: a <- keep a + take f(s g), with f(u) = u (first moment)
/// or u^2 (second), where the gradient's scale s is the one value of a device tensor (global-norm
/// clipping computes it on the device, so the step never waits for it on the host).
struct Moment {
    keep: f32,
    take: f32,
    square: bool,
}

impl InplaceOp3 for Moment {
    fn name(&self) -> &'static str {
        "ddpm-adamw-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<()> {
        let g = super::f32_slice(s2, l2, self.name(), "gradient")?;
        let &[scale] = super::f32_slice(s3, l3, self.name(), "gradient scale")? else {
            candle_core::bail!("{}: the gradient scale must hold one value", self.name());
        };
        let avg = super::f32_slice_mut(s1, l1, self.name(), "moment")?;
        if avg.len() != g.len() {
            candle_core::bail!("{}: moment and gradient differ in size", self.name());
        }
        average_into(avg, g, self.keep, self.take, scale, self.square);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let dev = s1.device().clone();
        let (g, scale) = (cuda::f32_view(s2, l2, self.name(), "gradient")?, cuda::f32_view(s3, l3, self.name(), "gradient scale")?);
        if scale.len() != 1 {
            candle_core::bail!("{}: the gradient scale must hold one value", self.name());
        }
        let mut avg = cuda::f32_view_mut(s1, l1, self.name(), "moment")?;
        let n = avg.len();
        if g.len() != n {
            candle_core::bail!("{}: moment and gradient differ in size", self.name());
        }
        let (n64, square) = (n as u64, self.square as i32);
        cuda::launch!(&dev, "ddpm_adamw_moment", cuda::elementwise(n); &mut avg, &g, &scale, &n64, &self.keep, &self.take, &square);
        Ok(())
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &mut candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<()> {
        use super::metal::{self, float, uint, Arg, Grid};
        use candle_core::backend::BackendStorage;
        let (g, go, n_g) = metal::f32_buffer(s2, l2, self.name(), "gradient")?;
        let (scale, so, n_s) = metal::f32_buffer(s3, l3, self.name(), "gradient scale")?;
        if n_s != 1 {
            candle_core::bail!("{}: the gradient scale must hold one value", self.name());
        }
        let (avg, ao, n) = metal::f32_buffer(s1, l1, self.name(), "moment")?;
        if n_g != n {
            candle_core::bail!("{}: moment and gradient differ in size", self.name());
        }
        let args = [Arg::Out(avg, ao), Arg::In(g, go), Arg::In(scale, so), uint(metal::count(n, self.name())?), float(self.keep), float(self.take), uint(self.square as u32)];
        metal::launch(s1.device(), "ddpm_adamw_moment", Grid::Elementwise(n), &args)
    }
}

/// The f32 scalars of one AdamW step, as its kernels take them (the per-tensor ones here and the
/// multi-tensor one of [`super::multi_tensor`]): each computed in f64, then rounded.
pub(crate) struct AdamWScalars {
    /// beta1 (the first moment's keep).
    pub keep1: f32,
    /// 1 - beta1 (the first moment's take).
    pub take1: f32,
    /// beta2.
    pub keep2: f32,
    /// 1 - beta2.
    pub take2: f32,
    /// 1 - lr wd.
    pub decay: f32,
    /// The learning rate.
    pub lr: f32,
    /// 1 / (1 - beta1^k).
    pub inv_bc1: f32,
    /// 1 / (1 - beta2^k).
    pub inv_bc2: f32,
    /// Added to the root of the second moment.
    pub eps: f32,
}

impl AdamWScalars {
    /// The scalars of step `s` (k = `s.step`, at most i32::MAX).
    pub(crate) fn new(s: &AdamWStep) -> Self {
        let k = s.step.min(i32::MAX as u64) as i32;
        let ((keep1, take1), (keep2, take2)) = (keep_take(s.beta1), keep_take(s.beta2));
        AdamWScalars {
            keep1,
            take1,
            keep2,
            take2,
            decay: (1.0 - s.lr * s.weight_decay) as f32,
            lr: s.lr as f32,
            inv_bc1: (1.0 / (1.0 - s.beta1.powi(k))) as f32,
            inv_bc2: (1.0 / (1.0 - s.beta2.powi(k))) as f32,
            eps: s.eps as f32,
        }
    }
}

/// theta <- theta (1 - lr wd) - lr (m / bc1) / (sqrt(v / bc2) + eps).
struct Apply {
    decay: f32,
    lr: f32,
    inv_bc1: f32,
    inv_bc2: f32,
    eps: f32,
}

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "ddpm-adamw-apply"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<()> {
        let (m, v) = (super::f32_slice(s2, l2, self.name(), "first moment")?, super::f32_slice(s3, l3, self.name(), "second moment")?);
        let theta = super::f32_slice_mut(s1, l1, self.name(), "parameter")?;
        if theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("ddpm-adamw-apply: parameter and moments differ in size");
        }
        theta.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))).for_each(|(tc, (mc, vc))| {
            for ((t, &mv), &vv) in tc.iter_mut().zip(mc).zip(vc) {
                let update = (mv * self.inv_bc1) / ((vv * self.inv_bc2).sqrt() + self.eps);
                *t = *t * self.decay - self.lr * update;
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let dev = s1.device().clone();
        let (m, v) = (cuda::f32_view(s2, l2, self.name(), "first moment")?, cuda::f32_view(s3, l3, self.name(), "second moment")?);
        let mut theta = cuda::f32_view_mut(s1, l1, self.name(), "parameter")?;
        let n = theta.len();
        if m.len() != n || v.len() != n {
            candle_core::bail!("ddpm-adamw-apply: parameter and moments differ in size");
        }
        let n64 = n as u64;
        cuda::launch!(&dev, "ddpm_adamw_apply", cuda::elementwise(n); &mut theta, &m, &v, &n64, &self.decay, &self.lr, &self.inv_bc1, &self.inv_bc2, &self.eps);
        Ok(())
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &mut candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<()> {
        use super::metal::{self, uint, Arg, Grid};
        use candle_core::backend::BackendStorage;
        let (m, mo, n_m) = metal::f32_buffer(s2, l2, self.name(), "first moment")?;
        let (v, vo, n_v) = metal::f32_buffer(s3, l3, self.name(), "second moment")?;
        let (theta, to, n) = metal::f32_buffer(s1, l1, self.name(), "parameter")?;
        if n_m != n || n_v != n {
            candle_core::bail!("ddpm-adamw-apply: parameter and moments differ in size");
        }
        // AdamwScalars in kernels.metal
        let k = [self.decay, self.lr, self.inv_bc1, self.inv_bc2, self.eps].map(f32::to_bits).to_vec();
        let args = [Arg::Out(theta, to), Arg::In(m, mo), Arg::In(v, vo), uint(metal::count(n, self.name())?), Arg::Words(k)];
        metal::launch(s1.device(), "ddpm_adamw_apply", Grid::Elementwise(n), &args)
    }
}

/// One AdamW step (Loshchilov and Hutter) written into `theta`, `m` and `v`, with k = `s.step` and
/// c the one value of `grad_scale` (a one-element f32 tensor on the same device; global-norm
/// clipping computes it there):
///
///   g     = c grad
///   m     = beta1 m + (1 - beta1) g
///   v     = beta2 v + (1 - beta2) g^2
///   theta = theta (1 - lr wd) - lr (m / (1 - beta1^k)) / (sqrt(v / (1 - beta2^k)) + eps)
///
/// All five tensors must pass [`fused_available`] and the first four hold the same number of values;
/// `m` and `v` must not share storage with each other or with `theta`.
pub fn adamw_step_(theta: &Tensor, m: &Tensor, v: &Tensor, grad: &Tensor, grad_scale: &Tensor, s: &AdamWStep) -> Result<()> {
    if !fused_available(&[theta, m, v, grad, grad_scale]) {
        candle_core::bail!("adamw_step_: the in-place step takes contiguous f32 tensors on the CPU (or CUDA unless DDPM_CUDA_KERNELS=0, or Metal with DDPM_METAL_KERNELS=1)");
    }
    let k = AdamWScalars::new(s);
    m.inplace_op3(grad, grad_scale, &Moment { keep: k.keep1, take: k.take1, square: false })?;
    v.inplace_op3(grad, grad_scale, &Moment { keep: k.keep2, take: k.take2, square: true })?;
    theta.inplace_op3(m, v, &Apply { decay: k.decay, lr: k.lr, inv_bc1: k.inv_bc1, inv_bc2: k.inv_bc2, eps: k.eps })
}

/// The EMA update ema = d ema + (1 - d) theta written into `ema` (both must pass
/// [`fused_available`] and must not share storage).
pub fn ema_update_(ema: &Tensor, theta: &Tensor, decay: f64) -> Result<()> {
    if !fused_available(&[ema, theta]) {
        candle_core::bail!("ema_update_: the in-place update takes contiguous f32 tensors on the CPU (or CUDA unless DDPM_CUDA_KERNELS=0, or Metal with DDPM_METAL_KERNELS=1)");
    }
    ema.inplace_op2(theta, &EmaUpdate::new(decay))
}
