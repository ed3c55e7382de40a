//! Inverted dropout with a counter-based mask: y_i = x_i m_i with m_i = 1 / (1 - p) if element i is
//! kept, else 0, and element i kept when its 32-bit uniform u_i >= ceil(p 2^32).
//!
//! The uniforms come from splitmix64 in counter mode (`rng::splitmix64`): r_j, its next output from
//! the state seed + j gamma (gamma = 0x9E3779B97F4A7C15), which is output j of the stream seeded with
//! `seed`, gives u_{2j} = r_j's low 32 bits and u_{2j+1} = its high 32 bits, so any element's mask is
//! a function of (seed, i) alone. The CPU kernel, the CUDA and Metal kernels and
//! [`dropout_mask`] (the mask on the host, for devices without a kernel) therefore give the same mask
//! bit for bit, and the backward recomputes it instead of storing it: dx = dy m is the same op on dy.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use ddpm_core::rng::{splitmix64, SPLITMIX_GAMMA};

/// The mask's parameters: element i is kept when u_i >= `threshold`, and then scaled by `scale`.
#[derive(Debug, Clone, Copy)]
struct Mask {
    seed: u64,
    /// ceil(p 2^32), at most 2^32 - 1
    threshold: u64,
    /// 1 / (1 - p)
    scale: f32,
}

impl Mask {
    fn new(p: f64, seed: u64) -> Self {
        Mask { seed, threshold: (p * 4294967296.0).ceil().min(4294967295.0) as u64, scale: (1.0 / (1.0 - p)) as f32 }
    }

    /// m_i for elements `start..start + out.len()` (`start` even) into `out`, through `f(i, m_i)`.
    fn fill(&self, start: usize, out: &mut [f32], f: impl Fn(usize, f32) -> f32) {
        for (k, pair) in out.chunks_mut(2).enumerate() {
            // r_j: splitmix64's next output from the state seed + j gamma
            let j = (start / 2 + k) as u64;
            let r = splitmix64(&mut self.seed.wrapping_add(j.wrapping_mul(SPLITMIX_GAMMA)));
            for (h, v) in pair.iter_mut().enumerate() {
                let u = if h == 0 { r & 0xFFFF_FFFF } else { r >> 32 };
                *v = f(start + 2 * k + h, if u >= self.threshold { self.scale } else { 0.0 });
            }
        }
    }
}

/// Elements per parallel chunk of the CPU kernel (even, so a chunk starts at a pair).
const CHUNK: usize = 1 << 14;

/// The dropout mask m (values 1 / (1 - p) and 0) of `n` elements for `seed`, on the host.
pub fn dropout_mask(n: usize, p: f64, seed: u64) -> Vec<f32> {
    let mask = Mask::new(p, seed);
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| mask.fill(c * CHUNK, o, |_, m| m));
    out
}

/// y = x m (see the module docs): dropout with probability `p` in [0, 1) and mask seed `seed`. One op
/// and one backward on the CPU and, with the project's kernels, on CUDA (f32; other dtypes multiply
/// by the f32 mask made there); elsewhere the mask is made on the host and multiplied in. The same
/// (seed, shape) gives the same mask on every device.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let _span = ddpm_core::ops::profile::span(x.device(), "dropout");
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout: p = {p} must be in [0, 1)");
    }
    let op = Dropout(Mask::new(p, seed));
    if !super::fused_device(x.device()) {
        let m = Tensor::from_vec(dropout_mask(x.elem_count(), p, seed), x.shape(), &Device::Cpu)?;
        return x.mul(&m.to_dtype(x.dtype())?.to_device(x.device())?);
    }
    if x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(op)
    } else {
        // the mask itself: the op applied to ones
        let m = Tensor::ones(x.shape(), DType::F32, x.device())?.apply_op1(op)?;
        x.mul(&m.to_dtype(x.dtype())?)
    }
}

/// y = x m, differentiable: dx = dy m.
struct Dropout(Mask);

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "ddpm-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::f32_slice(s, l, self.name(), "x")?;
        let mut y = vec![0f32; x.len()];
        // x m, not a select: the same values (and signed zeros, NaNs) as multiplying by the mask
        y.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| self.0.fill(c * CHUNK, o, |i, m| x[i] * m));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let dev = s.device().clone();
        let x = cuda::f32_view(s, l, self.name(), "x")?;
        let n = x.len() as u64;
        let mut y = cuda::alloc_f32(&dev, x.len())?;
        let Mask { seed, threshold, scale } = self.0;
        cuda::launch!(&dev, "ddpm_dropout", cuda::elementwise(x.len()); &x, &mut y, &n, &seed, &threshold, &scale);
        Ok((cuda::wrap(y, s), l.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::metal::{self, ulong_words, Arg, Grid};
        use candle_core::backend::BackendStorage;
        let dev = s.device();
        let (x, xo, n) = metal::f32_buffer(s, l, self.name(), "x")?;
        let y = metal::alloc_f32(dev, n, self.name())?;
        let Mask { seed, threshold, scale } = self.0;
        // DropoutScalars in kernels.metal: seed, threshold (ulong), n (uint), scale (float)
        let ([s0, s1], [t0, t1]) = (ulong_words(seed), ulong_words(threshold));
        let k = Arg::Words(vec![s0, s1, t0, t1, metal::count(n, self.name())?, scale.to_bits()]);
        metal::launch(dev, "ddpm_dropout", Grid::Elementwise(n), &[Arg::In(x, xo), Arg::Out(&y, 0), k])?;
        Ok((metal::wrap(y, dev, n), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _span = ddpm_core::ops::profile::span(grad.device(), "dropout");
        Ok(Some(grad.contiguous()?.apply_op1(Dropout(self.0))?))
    }
}
