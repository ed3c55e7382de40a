//! A convolution as one column matrix and one matrix product, differentiable without a transposed
//! convolution: the path CUDA tensors take when the project's kernels are enabled
//! ([`super::cuda_kernels_enabled`]), and Metal tensors with [`super::metal_kernels_enabled`] (f32
//! Metal kernels `ddpm_im2col` and `ddpm_col2im`; half-precision images are widened for them);
//! `conv::conv2d_columns` runs it on any device.
//!
//! ```text
//!   cols (C k k, B L) = im2col(x)        Im2col, CUDA kernel ddpm_im2col; column b L + p is image b's
//!                                        output position p
//!   y (O, B L)        = W (O, C k k) @ cols   one product by candle's matmul (cuBLAS on CUDA),
//!                                        then viewed as (B, O, H', W')
//! ```
//!
//! The images side by side make every product one large GEMM: candle's autograd differentiates it
//! with two more (dW = dY cols^T, a sum over all B L positions inside the product, and
//! dcols = W^T dY), where a batch of per-image products would leave B partial dW to add up. [`Im2col`]'s
//! backward is col2im, the scatter-add adjoint, which the CUDA kernel `ddpm_col2im` computes as a
//! gather: each input pixel sums, in a fixed order, the column entries that were copied from it.
//! candle's own CUDA convolution gradient instead runs `conv_transpose2d`, a direct loop over every
//! input pixel, channel and kernel tap. Both ops also run on the CPU (the im2col and col2im of
//! `ops/conv.rs`, per image, then reordered), which is how the tests check the composition against
//! candle's convolution without a GPU.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{col2im_image, im2col_image, Geometry};

/// y = conv2d(x, w) of geometry `g` by columns (see the module docs), without the bias, as a
/// transposed view. x and w share one dtype, f32, bf16 or f16, in which the product runs (tensor
/// cores on CUDA for the half types). The CUDA kernels read and write all three; on the CPU and Metal,
/// whose kernels are f32, half-precision images are widened for im2col and the columns narrowed back.
pub(super) fn conv2d(x: &Tensor, w: &Tensor, g: Geometry) -> Result<Tensor> {
    let o = w.dim(0)?;
    let dtype = x.dtype();
    let cols = if x.device().is_cuda() {
        x.contiguous()?.apply_op1(Im2col(g))?
    } else {
        x.contiguous()?.to_dtype(DType::F32)?.apply_op1(Im2col(g))?.to_dtype(dtype)?
    };
    // y (O, B L) = W (O, C k k) @ cols (C k k, B L), then (O, B, H', W') -> (B, O, H', W')
    w.reshape((o, g.rows()))?.matmul(&cols)?.reshape((o, g.b, g.oh, g.ow))?.transpose(0, 1)
}

/// The images' shape (B, C, H, W).
fn images(g: &Geometry) -> Shape {
    Shape::from((g.b, g.c, g.h, g.w))
}

/// The column matrix's shape (C k k, B L).
fn columns(g: &Geometry) -> Shape {
    Shape::from((g.rows(), g.b * g.positions()))
}

/// An error unless `what` of op `op` holds as many values as `shape`.
fn check_len(op: &str, what: &str, got: usize, shape: &Shape, g: &Geometry) -> Result<()> {
    if got != shape.elem_count() {
        candle_core::bail!("{op}: {what} has {got} values, the geometry {g:?} needs {}", shape.elem_count());
    }
    Ok(())
}

/// Runs the CUDA column kernel `ddpm_{name}_{f32,bf16,f16}` of geometry `g` (grid: `threads` threads
/// along x, one per column or pixel, `rows` along y) from the contiguous `input` to a fresh output of
/// `out_len` values, in the input's dtype.
#[cfg(feature = "cuda")]
fn launch_columns(name: &str, g: &Geometry, input: &candle_core::CudaStorage, l: &Layout, out_len: usize, threads: usize, rows: usize) -> Result<candle_core::CudaStorage> {
    use super::cuda;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig};
    use candle_core::cuda_backend::CudaDType;
    // the kernels index columns (B L), pixels (B H W) and planes (B C) with 32-bit integers
    let geometry = [g.b, g.c, g.h, g.w, g.k, g.stride, g.pad, g.oh, g.ow];
    let counts = [g.b * g.positions(), g.b * g.h * g.w, g.b * g.c];
    if counts.iter().chain(&geometry).any(|&v| v >= 1 << 31) {
        candle_core::bail!("ddpm-{name}: the geometry {g:?} is too large for the CUDA kernels' 32-bit indices");
    }
    let geometry = geometry.map(|v| v as u32);
    let cfg = LaunchConfig { grid_dim: (threads.div_ceil(256) as u32, rows.clamp(1, 65535) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    fn run<T: CudaDType + DeviceRepr>(kernel: &str, s: &candle_core::CudaStorage, l: &Layout, out_len: usize, cfg: LaunchConfig, geometry: [u32; 9]) -> Result<candle_core::CudaStorage> {
        let dev = s.device().clone();
        let Some((lo, hi)) = l.contiguous_offsets() else { candle_core::bail!("{kernel}: the input must be contiguous") };
        let input = s.as_cuda_slice::<T>()?.slice(lo..hi);
        // SAFETY: the kernel writes each of the out_len values (every row of every column, or every
        // channel of every pixel).
        let mut out = unsafe { dev.alloc::<T>(out_len) }?;
        let [b, c, h, w, k, stride, pad, oh, ow] = geometry;
        cuda::launch!(&dev, kernel, cfg; &input, &mut out, &b, &c, &h, &w, &k, &stride, &pad, &oh, &ow);
        Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
    }
    match input.dtype() {
        DType::F32 => run::<f32>(&format!("ddpm_{name}_f32"), input, l, out_len, cfg, geometry),
        DType::BF16 => run::<half::bf16>(&format!("ddpm_{name}_bf16"), input, l, out_len, cfg, geometry),
        DType::F16 => run::<half::f16>(&format!("ddpm_{name}_f16"), input, l, out_len, cfg, geometry),
        d => candle_core::bail!("ddpm-{name}: {d:?} input; the CUDA kernels take f32, bf16 and f16"),
    }
}

/// Runs the Metal column kernel `ddpm_{name}` (f32; one thread per output value) of geometry `g` from
/// the contiguous `input` to a fresh output of `out_len` values.
#[cfg(feature = "metal")]
fn launch_metal_columns(name: &'static str, g: &Geometry, input: &candle_core::MetalStorage, l: &Layout, out_len: usize) -> Result<candle_core::MetalStorage> {
    use super::metal::{self, uint, Arg, Grid};
    use candle_core::backend::BackendStorage;
    let dev = input.device();
    let (x, xo, _) = metal::f32_buffer(input, l, name, "the input")?;
    // ColumnGeometry in kernels.metal
    let mut geometry = [0u32; 9];
    for (dst, v) in geometry.iter_mut().zip([g.b, g.c, g.h, g.w, g.k, g.stride, g.pad, g.oh, g.ow]) {
        *dst = metal::count(v, name)?;
    }
    let out = metal::alloc_f32(dev, out_len, name)?;
    let args = [Arg::In(x, xo), Arg::Out(&out, 0), Arg::Words(geometry.to_vec()), uint(metal::count(out_len, name)?)];
    metal::launch(dev, name, Grid::Elementwise(out_len), &args)?;
    Ok(metal::wrap(out, dev, out_len))
}

/// `x (B, C, H, W) -> cols (C k k, B L)`, the images' column matrices side by side; backward
/// [`Col2im`].
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
        // each image's (C k k, L) matrix, then its rows placed at columns [b L, (b + 1) L)
        let mut per_image = vec![0f32; cs.elem_count()];
        per_image.par_chunks_mut(cs.elem_count() / g.b).zip(x.par_chunks(xs.elem_count() / g.b)).for_each(|(cb, xb)| im2col_image(&g, xb, cb));
        let n = g.positions();
        let mut cols = vec![0f32; cs.elem_count()];
        cols.par_chunks_mut(g.b * n).enumerate().for_each(|(r, row)| {
            for (b, dst) in row.chunks_exact_mut(n).enumerate() {
                dst.copy_from_slice(&per_image[(b * g.rows() + r) * n..][..n]);
            }
        });
        Ok((CpuStorage::F32(cols), cs))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.0;
        let cs = columns(&g);
        check_len(self.name(), "x", l.shape().elem_count(), &images(&g), &g)?;
        // one thread per column (b, output position), the rows along the grid's y
        let cols = launch_columns("im2col", &g, s, l, cs.elem_count(), g.b * g.positions(), g.rows())?;
        Ok((cols, cs))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        let g = self.0;
        let cs = columns(&g);
        check_len(self.name(), "x", l.shape().elem_count(), &images(&g), &g)?;
        Ok((launch_metal_columns("ddpm_im2col", &g, s, l, cs.elem_count())?, cs))
    }

    fn bwd(&self, _x: &Tensor, _cols: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2im(self.0))?))
    }
}

/// `dcols (C k k, B L) -> dx (B, C, H, W)`, the adjoint of [`Im2col`]: every column entry added back
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
        // image b's (C k k, L) matrix gathered from columns [b L, (b + 1) L), then added back
        let (n, rows) = (g.positions(), g.rows());
        let mut dx = vec![0f32; xs.elem_count()];
        dx.par_chunks_mut(xs.elem_count() / g.b).enumerate().for_each(|(b, db)| {
            let mut per_image = vec![0f32; rows * n];
            for (r, dst) in per_image.chunks_exact_mut(n).enumerate() {
                dst.copy_from_slice(&cols[(r * g.b + b) * n..][..n]);
            }
            col2im_image(&g, &per_image, db)
        });
        Ok((CpuStorage::F32(dx), xs))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.0;
        let xs = images(&g);
        check_len(self.name(), "dcols", l.shape().elem_count(), &columns(&g), &g)?;
        // one thread per input pixel (b, y, x), the channels along the grid's y
        let dx = launch_columns("col2im", &g, s, l, xs.elem_count(), g.b * g.h * g.w, g.c)?;
        Ok((dx, xs))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        let g = self.0;
        let xs = images(&g);
        check_len(self.name(), "dcols", l.shape().elem_count(), &columns(&g), &g)?;
        Ok((launch_metal_columns("ddpm_col2im", &g, s, l, xs.elem_count())?, xs))
    }

    fn bwd(&self, _dcols: &Tensor, _dx: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2col(self.0))?))
    }
}
