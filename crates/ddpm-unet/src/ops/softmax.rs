//! Softmax over the last dimension as one op with an analytic backward: the attention probabilities
//! on CUDA and Metal (with the project's kernels enabled), where candle composes the softmax from five ops, each
//! with a buffer and a backward of its own. For each row x (length n):
//!
//! ```text
//!   m = max_j x_j      s = sum_j e^(x_j - m)      p_j = e^(x_j - m) / s
//!   D = sum_j p_j dp_j                            dx_j = p_j (dp_j - D)
//! ```
//!
//! with the sums in f64 (CPU: in row order; CUDA kernels `ddpm_softmax_rows` and
//! `ddpm_softmax_rows_backward`: one block per row, a fixed reduction tree; the Metal kernels of the
//! same names sum in f32 in the same tree).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// softmax(x) over the last dimension, differentiable. One fused op for contiguous f32 tensors on the
/// CPU, or on CUDA with the project's kernels enabled ([`super::cuda_kernels_enabled`]); candle's
/// composed softmax elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let fused = x.dtype() == DType::F32 && super::fused_device(x.device()) && x.rank() > 0 && x.elem_count() > 0;
    if !fused {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(SoftmaxRows { cols: x.dim(D::Minus1)? })
}

/// row <- softmax(row): p_j = e^(x_j - m) / s (see the module docs), s summed in f64.
pub(super) fn softmax_row(row: &mut [f32]) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0f64;
    for v in row.iter_mut() {
        *v = (*v - m).exp();
        s += *v as f64;
    }
    let inv = (1.0 / s) as f32;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// g <- p (g - D), D = sum_j p_j g_j (in f64): the softmax's input gradient from its output p and
/// output gradient g, for one row.
pub(super) fn softmax_row_backward(p: &[f32], g: &mut [f32]) {
    let d = p.iter().zip(g.iter()).map(|(&pv, &gv)| pv as f64 * gv as f64).sum::<f64>() as f32;
    g.iter_mut().zip(p).for_each(|(gv, &pv)| *gv = pv * (*gv - d));
}

/// `x -> p`, rows of `cols` values; backward [`SoftmaxRowsGrad`].
struct SoftmaxRows {
    cols: usize,
}

impl CustomOp1 for SoftmaxRows {
    fn name(&self) -> &'static str {
        "ddpm-softmax-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::f32_slice(s, l, self.name(), "x")?;
        let mut p = x.to_vec();
        p.par_chunks_mut(self.cols).for_each(softmax_row);
        Ok((CpuStorage::F32(p), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let dev = s.device().clone();
        let x = cuda::f32_view(s, l, self.name(), "x")?;
        let mut p = cuda::alloc_f32(&dev, x.len())?;
        let cols = self.cols as u64;
        // one block per row
        cuda::launch!(&dev, "ddpm_softmax_rows", cuda::per_block(x.len() / self.cols); &x, &mut p, &cols);
        Ok((cuda::wrap(p, s), l.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::metal::{self, uint, Arg, Grid};
        use candle_core::backend::BackendStorage;
        let dev = s.device();
        let (x, xo, n) = metal::f32_buffer(s, l, self.name(), "x")?;
        let p = metal::alloc_f32(dev, n, self.name())?;
        // one threadgroup per row
        let args = [Arg::In(x, xo), Arg::Out(&p, 0), uint(metal::count(self.cols, self.name())?)];
        metal::launch(dev, "ddpm_softmax_rows", Grid::Groups(n / self.cols), &args)?;
        Ok((metal::wrap(p, dev, n), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_last_dim_backward(p, grad)?))
    }
}

/// The gradient dx = p (dp - D), D = sum_j p_j dp_j per row, of [`softmax_last_dim`] at its output
/// `p` for the incoming gradient `dp`, outside candle's graph: one fused op where
/// [`softmax_last_dim`] runs one (f32, p and dp of one shape), else composed from candle's ops.
pub(crate) fn softmax_last_dim_backward(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    // attention's, where candle's graph runs attention op by op (inside attention's own span otherwise)
    let _span = ddpm_core::ops::profile::span(p.device(), "attention backward");
    let (p, dp) = (p.detach(), dp.detach());
    let fused = p.dtype() == DType::F32 && dp.dtype() == DType::F32 && super::fused_device(p.device()) && p.rank() > 0 && p.elem_count() > 0 && p.shape() == dp.shape();
    if !fused {
        // D keeps its row axis (size 1) to broadcast over the row
        let d = (&p * &dp)?.sum_keepdim(D::Minus1)?;
        return p * dp.broadcast_sub(&d)?;
    }
    p.contiguous()?.apply_op2_no_bwd(&dp.contiguous()?, &SoftmaxRowsGrad { cols: p.dim(D::Minus1)? })
}

/// `(p, dp) -> dx = p (dp - D)`, D = sum_j p_j dp_j per row.
struct SoftmaxRowsGrad {
    cols: usize,
}

impl CustomOp2 for SoftmaxRowsGrad {
    fn name(&self) -> &'static str {
        "ddpm-softmax-rows-backward"
    }

    fn cpu_fwd(&self, sp: &CpuStorage, lp: &Layout, sd: &CpuStorage, ld: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = super::f32_slice(sp, lp, self.name(), "p")?;
        let dp = super::f32_slice(sd, ld, self.name(), "dp")?;
        if p.len() != dp.len() {
            candle_core::bail!("ddpm-softmax-rows-backward: p has {} values, dp {}", p.len(), dp.len());
        }
        let mut dx = dp.to_vec();
        dx.par_chunks_mut(self.cols).zip(p.par_chunks(self.cols)).for_each(|(gr, pr)| softmax_row_backward(pr, gr));
        Ok((CpuStorage::F32(dx), lp.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sp: &candle_core::CudaStorage,
        lp: &Layout,
        sd: &candle_core::CudaStorage,
        ld: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let dev = sp.device().clone();
        let p = cuda::f32_view(sp, lp, self.name(), "p")?;
        let dp = cuda::f32_view(sd, ld, self.name(), "dp")?;
        if p.len() != dp.len() {
            candle_core::bail!("ddpm-softmax-rows-backward: p has {} values, dp {}", p.len(), dp.len());
        }
        let mut dx = cuda::alloc_f32(&dev, p.len())?;
        let cols = self.cols as u64;
        cuda::launch!(&dev, "ddpm_softmax_rows_backward", cuda::per_block(p.len() / self.cols); &p, &dp, &mut dx, &cols);
        Ok((cuda::wrap(dx, sp), lp.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        sp: &candle_core::MetalStorage,
        lp: &Layout,
        sd: &candle_core::MetalStorage,
        ld: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::metal::{self, uint, Arg, Grid};
        use candle_core::backend::BackendStorage;
        let dev = sp.device();
        let (p, po, n) = metal::f32_buffer(sp, lp, self.name(), "p")?;
        let (dp, dpo, n_dp) = metal::f32_buffer(sd, ld, self.name(), "dp")?;
        if n != n_dp {
            candle_core::bail!("ddpm-softmax-rows-backward: p has {n} values, dp {n_dp}");
        }
        let dx = metal::alloc_f32(dev, n, self.name())?;
        let args = [Arg::In(p, po), Arg::In(dp, dpo), Arg::Out(&dx, 0), uint(metal::count(self.cols, self.name())?)];
        metal::launch(dev, "ddpm_softmax_rows_backward", Grid::Groups(n / self.cols), &args)?;
        Ok((metal::wrap(dx, dev, n), lp.shape().clone()))
    }
}
