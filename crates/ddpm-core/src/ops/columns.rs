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

/// y = conv2d(x, w) of geometry `g` by columns (see the module docs), without the bias.
pub(super) fn conv2d(x: &Tensor, w: &Tensor, g: Geometry) -> Result<Tensor> {
    let o = w.dim(0)?;
    let cols = x.contiguous()?.apply_op1(Im2col(g))?;
    // y_b = W (O, C k k) @ cols_b (C k k, L) for every image b
    w.reshape((o, g.rows()))?.broadcast_matmul(&cols)?.reshape((g.b, o, g.oh, g.ow))
}

/// The images' shape (B, C, H, W).
fn images(g: &Geometry) -> Shape {
    Shape::from((g.b, g.c, g.h, g.w))
}

/// The column matrices' shape (B, C k k, L).
fn columns(g: &Geometry) -> Shape {
    Shape::from((g.b, g.rows(), g.positions()))
}

/// An error unless `what` of op `op` holds as many values as `shape`.
fn check_len(op: &str, what: &str, got: usize, shape: &Shape, g: &Geometry) -> Result<()> {
    if got != shape.elem_count() {
        candle_core::bail!("{op}: {what} has {got} values, the geometry {g:?} needs {}", shape.elem_count());
    }
    Ok(())
}

/// The geometry as the CUDA kernels take it: C, H, W, K, S, P, OH, OW.
#[cfg(feature = "cuda")]
fn kernel_geometry(g: &Geometry) -> [u64; 8] {
    [g.c, g.h, g.w, g.k, g.stride, g.pad, g.oh, g.ow].map(|v| v as u64)
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
        let (xs, cs) = (images(&g), columns(&g));
        check_len(self.name(), "x", x.len(), &xs, &g)?;
        let mut cols = vec![0f32; cs.elem_count()];
        cols.par_chunks_mut(cs.elem_count() / g.b).zip(x.par_chunks(xs.elem_count() / g.b)).for_each(|(cb, xb)| im2col_image(&g, xb, cb));
        Ok((CpuStorage::F32(cols), cs))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let g = self.0;
        let dev = s.device().clone();
        let x = cuda::f32_view(s, l, self.name(), "x")?;
        let cs = columns(&g);
        check_len(self.name(), "x", x.len(), &images(&g), &g)?;
        let n = cs.elem_count() as u64;
        let mut cols = cuda::alloc_f32(&dev, cs.elem_count())?;
        let [c, h, w, k, stride, pad, oh, ow] = kernel_geometry(&g);
        cuda::launch!(&dev, "ddpm_im2col", cuda::elementwise(cs.elem_count()); &x, &mut cols, &n, &c, &h, &w, &k, &stride, &pad, &oh, &ow);
        Ok((cuda::wrap(cols, s), cs))
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
        let (xs, cs) = (images(&g), columns(&g));
        check_len(self.name(), "dcols", cols.len(), &cs, &g)?;
        let mut dx = vec![0f32; xs.elem_count()];
        dx.par_chunks_mut(xs.elem_count() / g.b).zip(cols.par_chunks(cs.elem_count() / g.b)).for_each(|(db, cb)| col2im_image(&g, cb, db));
        Ok((CpuStorage::F32(dx), xs))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let g = self.0;
        let dev = s.device().clone();
        let cols = cuda::f32_view(s, l, self.name(), "dcols")?;
        let xs = images(&g);
        check_len(self.name(), "dcols", cols.len(), &columns(&g), &g)?;
        let n = xs.elem_count() as u64;
        let mut dx = cuda::alloc_f32(&dev, xs.elem_count())?;
        let [c, h, w, k, stride, pad, oh, ow] = kernel_geometry(&g);
        cuda::launch!(&dev, "ddpm_col2im", cuda::elementwise(xs.elem_count()); &cols, &mut dx, &n, &c, &h, &w, &k, &stride, &pad, &oh, &ow);
        Ok((cuda::wrap(dx, s), xs))
    }

    fn bwd(&self, _dcols: &Tensor, _dx: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2col(self.0))?))
    }
}
