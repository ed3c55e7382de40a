//! A convolution as column matrices and a matrix product, differentiable without a transposed
//! convolution: the path CUDA tensors take when the project's kernels are enabled
//! ([`super::cuda_kernels_enabled`]; `conv::conv2d_columns` runs it on any device).
//!
//! ```text
//!   cols (B, C k k, L) = im2col(x)            Im2col, CUDA kernel ddpm_im2col
//!   y_b (O, L)         = W (O, C k k) @ cols_b candle's matmul (cuBLAS on CUDA), batched over b
//! ```
//!
//! candle's autograd differentiates the product with the same matmul (dW = sum_b dY_b cols_b^T,
//! dcols_b = W^T dY_b), and [`Im2col`]'s backward is col2im, the scatter-add adjoint, which the CUDA
//! kernel `ddpm_col2im` computes as a gather: each input pixel sums, in a fixed order, the column
//! entries that were copied from it. candle's own CUDA convolution gradient instead runs
//! `conv_transpose2d`, a direct loop over every input pixel, channel and kernel tap. Both ops also run
//! on the CPU (the im2col and col2im of `ops/conv.rs`), which is how the tests check the composition
//! against candle's convolution without a GPU.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{col2im_image, im2col_image, Geometry};

/// y = conv2d(x, w) + bias of geometry `g` by columns (see the module docs); the bias has `bias_rows`
/// rows (1: shared (O), B: per image (B, O)).
pub(super) fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, bias_rows: usize, g: Geometry) -> Result<Tensor> {
    let o = w.dim(0)?;
    let cols = x.contiguous()?.apply_op1(Im2col(g))?;
    // y_b = W (O, C k k) @ cols_b (C k k, L) for every image b
    let y = w.reshape((o, g.rows()))?.broadcast_matmul(&cols)?.reshape((g.b, o, g.oh, g.ow))?;
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((bias_rows, o, 1, 1))?),
        None => Ok(y),
    }
}

/// An error unless `what` of op `op` holds `want` values.
fn check_len(op: &str, what: &str, got: usize, want: usize, g: &Geometry) -> Result<()> {
    if got != want {
        candle_core::bail!("{op}: {what} has {got} values, the geometry {g:?} needs {want}");
    }
    Ok(())
}

/// `x (B, C, H, W) -> cols (B, C k k, L)`, the column matrix of every image; backward [`Col2im`].
struct Im2col(Geometry);

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "ddpm-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = super::f32_slice(s, l, self.name(), "x")?;
        let (chw, per_image) = (g.c * g.h * g.w, g.rows() * g.positions());
        check_len(self.name(), "x", x.len(), g.b * chw, &g)?;
        let mut cols = vec![0f32; g.b * per_image];
        cols.par_chunks_mut(per_image).zip(x.par_chunks(chw)).for_each(|(cb, xb)| im2col_image(&g, xb, cb));
        Ok((CpuStorage::F32(cols), Shape::from((g.b, g.rows(), g.positions()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let g = self.0;
        let dev = s.device().clone();
        let x = cuda::f32_view(s, l, self.name(), "x")?;
        check_len(self.name(), "x", x.len(), g.b * g.c * g.h * g.w, &g)?;
        let n = (g.b * g.rows() * g.positions()) as u64;
        let mut cols = cuda::alloc_f32(&dev, n as usize)?;
        let [c, h, w, k, stride, pad, oh, ow] = [g.c, g.h, g.w, g.k, g.stride, g.pad, g.oh, g.ow].map(|v| v as u64);
        cuda::launch!(&dev, "ddpm_im2col", cuda::elementwise(n as usize); &x, &mut cols, &n, &c, &h, &w, &k, &stride, &pad, &oh, &ow);
        Ok((cuda::wrap(cols, s), Shape::from((g.b, g.rows(), g.positions()))))
    }

    fn bwd(&self, _x: &Tensor, _cols: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2im(self.0))?))
    }
}

/// `dcols (B, C k k, L) -> dx (B, C, H, W)`, the adjoint of [`Im2col`]: every column entry added back
/// onto the input pixel it was copied from. Its backward is [`Im2col`] again.
struct Col2im(Geometry);

impl CustomOp1 for Col2im {
    fn name(&self) -> &'static str {
        "ddpm-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = super::f32_slice(s, l, self.name(), "dcols")?;
        let (chw, per_image) = (g.c * g.h * g.w, g.rows() * g.positions());
        check_len(self.name(), "dcols", cols.len(), g.b * per_image, &g)?;
        let mut dx = vec![0f32; g.b * chw];
        dx.par_chunks_mut(chw).zip(cols.par_chunks(per_image)).for_each(|(db, cb)| col2im_image(&g, cb, db));
        Ok((CpuStorage::F32(dx), Shape::from((g.b, g.c, g.h, g.w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let g = self.0;
        let dev = s.device().clone();
        let cols = cuda::f32_view(s, l, self.name(), "dcols")?;
        check_len(self.name(), "dcols", cols.len(), g.b * g.rows() * g.positions(), &g)?;
        let n = (g.b * g.c * g.h * g.w) as u64;
        let mut dx = cuda::alloc_f32(&dev, n as usize)?;
        let [c, h, w, k, stride, pad, oh, ow] = [g.c, g.h, g.w, g.k, g.stride, g.pad, g.oh, g.ow].map(|v| v as u64);
        cuda::launch!(&dev, "ddpm_col2im", cuda::elementwise(n as usize); &cols, &mut dx, &n, &c, &h, &w, &k, &stride, &pad, &oh, &ow);
        Ok((cuda::wrap(dx, s), Shape::from((g.b, g.c, g.h, g.w))))
    }

    fn bwd(&self, _dcols: &Tensor, _dx: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2col(self.0))?))
    }
}
